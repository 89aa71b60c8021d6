package openstack

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/template"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack"
	"github.com/gophercloud/gophercloud/v2/openstack/image/v2/imagedata"
	"github.com/gophercloud/gophercloud/v2/openstack/image/v2/images"
)

// LibvirtPythonModules are what Nova's libvirt driver imports beyond
// PythonModules (python3-libvirt, in deps.sh).
var LibvirtPythonModules = []string{"libvirt"}

// LibvirtCompute is a nova-compute with Nova's libvirt driver, run as
// compute host Host against the libvirtd at URI (one of the lab's, whose
// qemu.conf sets memory_backing_dir): what a Nova compute host with AX
// runs, guest RAM in a shared named file.
type LibvirtCompute struct {
	// Host is the compute host's name in Nova (nova.conf [DEFAULT] host).
	Host string
	// URI is libvirt's connection URI ([libvirt] connection_uri).
	URI string
	// FileBackedMemoryMiB is [libvirt] file_backed_memory: the RAM the host
	// offers, every guest's RAM a file below qemu.conf's memory_backing_dir.
	FileBackedMemoryMiB int
	// AdoptDriver, when set, is the path of AX's ax_adopt.py: nova-compute
	// runs compute_driver = ax_adopt.LibvirtAdoptDriver (loaded through
	// AdoptWrapper) with [ax] adopt_dir = AdoptDir, axd's --nova-adopt-dir.
	AdoptDriver, AdoptDir string
	// Netns, when set, is the network namespace nova-compute runs in (ip
	// netns exec): the host's, where os-vif makes the networks' bridges
	// (brq<network>, the Linux bridge agent puts the provider interface
	// in them) and libvirtd makes the guests' taps.
	// The cloud's loopback endpoints (Keystone's catalog, RabbitMQ) must
	// be reachable there.
	Netns string
	// Periodic, when positive, is the interval of the periodic tasks an
	// evacuated server meets (power-state sync, info cache heal, resource
	// update, running-deleted poll), instead of Nova's 60–600 s.
	Periodic time.Duration
}

// ComputeName is the name of the service (and of its log, DIR/log/NAME.log)
// of the nova-compute StartLibvirtCompute starts for host.
func ComputeName(host string) string { return "nova-compute-" + host }

// ComputeDir is where the nova-compute of host keeps its state: its
// instances are in ComputeDir/instances/UUID (disk, kernel, ramdisk,
// console.log).
func (c *Cloud) ComputeDir(host string) string { return filepath.Join(c.Dir, "compute-"+host) }

// InstanceDir is the directory of instance uuid on compute host host.
func (c *Cloud) InstanceDir(host, uuid string) string {
	return filepath.Join(c.ComputeDir(host), "instances", uuid)
}

// computeConf overrides nova.conf for one libvirt compute host. It runs as
// root: privsep's helpers (Nova's, os-vif's) are run directly (no sudo, no
// rootwrap). A guest has no VNC or SPICE,
// its serial console a pty logged to console.log in its instance directory.
const computeConf = `[DEFAULT]
host = {{.Host}}
state_path = {{.Dir}}
instances_path = {{.Dir}}/instances
{{if .AdoptDriver}}compute_driver = ax_adopt.LibvirtAdoptDriver{{else}}compute_driver = libvirt.LibvirtDriver{{end}}
{{with .Seconds}}# the periodic tasks run several times while a test watches (debug: they are logged)
debug = true
sync_power_state_interval = {{.}}
heal_instance_info_cache_interval = {{.}}
update_resources_interval = {{.}}
running_deleted_instance_poll_interval = {{.}}
# from the service's start, not after a random delay of up to 60 s (a
# nova-compute started again must sync within a short watch too)
periodic_fuzzy_delay = 0
{{end}}# file_backed_memory takes no overcommit
ram_allocation_ratio = 1.0
reserved_host_memory_mb = 0
# never boot a guest Nova's database places here by itself (AX's failover)
resume_guests_state_on_host_boot = false
# the lab's guests are small and booted by kernel: no image cache sweeps
image_cache_manager_interval = -1
[libvirt]
virt_type = qemu
connection_uri = {{.URI}}
cpu_mode = none
file_backed_memory = {{.FileBackedMemoryMiB}}
[oslo_concurrency]
lock_path = {{.Dir}}/lock
[nova_sys_admin]
helper_command = privsep-helper --config-file {{.NovaConf}} --config-file {{.Conf}}
[vif_plug_linux_bridge_privileged]
helper_command = privsep-helper --config-file {{.NovaConf}} --config-file {{.Conf}}
{{if .AdoptDriver}}[ax]
adopt_dir = {{.AdoptDir}}
{{end}}`

// AdoptWrapper is the script that runs nova-compute with dir added to
// nova.virt's path, where Nova looks for compute drivers
// (load_compute_driver imports nova.virt.X only): as if the files in dir
// (ax_adopt.py) were installed into nova/virt/.
const AdoptWrapper = `#!/usr/bin/python3
# nova-compute with AX's adopting driver, as AX's tests run it
import sys
from nova.cmd import compute
import nova.virt
nova.virt.__path__.append(%q)
sys.exit(compute.main())
`

// WriteAdoptWrapper copies files (ax_adopt.py, …) into DIR/virt and writes
// DIR/bin/nova-compute-adopt, the AdoptWrapper loading them; it returns
// the wrapper's path.
func (c *Cloud) WriteAdoptWrapper(files ...string) (string, error) {
	virt := filepath.Join(c.Dir, "virt")
	if err := os.MkdirAll(virt, 0o755); err != nil {
		return "", err
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		if err := writeAtomic(filepath.Join(virt, filepath.Base(f)), b, 0o644); err != nil {
			return "", err
		}
	}
	wrapper := filepath.Join(c.Dir, "bin", "nova-compute-adopt")
	return wrapper, writeAtomic(wrapper, []byte(fmt.Sprintf(AdoptWrapper, virt)), 0o700)
}

// writeAtomic replaces the file at path with data by a rename: a
// nova-compute of another host starting meanwhile reads the old file or
// the new one, never half of one.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// StartLibvirtCompute starts a nova-compute with the libvirt driver as
// compute host lc.Host and waits until Nova has mapped it. Close stops it
// with the rest of the cloud.
func (c *Cloud) StartLibvirtCompute(ctx context.Context, lc LibvirtCompute) error {
	if lc.Host == "" || lc.URI == "" || lc.FileBackedMemoryMiB <= 0 {
		return fmt.Errorf("libvirt compute: host, URI and file-backed memory are needed: %+v", lc)
	}
	dir := c.ComputeDir(lc.Host)
	for _, d := range []string{"instances", "lock"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return err
		}
	}
	novaConf := filepath.Join(c.Dir, "nova", "nova.conf")
	conf := filepath.Join(dir, "nova-compute.conf")
	var b bytes.Buffer
	if err := template.Must(template.New("").Parse(computeConf)).Execute(&b, struct {
		LibvirtCompute
		Dir, NovaConf, Conf string
		Seconds             int
	}{lc, dir, novaConf, conf, int(lc.Periodic.Seconds())}); err != nil {
		return err
	}
	if err := os.WriteFile(conf, b.Bytes(), 0o600); err != nil {
		return err
	}
	script := c.script("nova-compute")
	if lc.AdoptDriver != "" {
		if lc.AdoptDir == "" {
			return fmt.Errorf("libvirt compute %s: the adopting driver needs its adopt_dir", lc.Host)
		}
		var err error
		if script, err = c.WriteAdoptWrapper(lc.AdoptDriver); err != nil {
			return err
		}
	}
	name := ComputeName(lc.Host)
	if err := c.start(name, nil, append(inNetns(lc.Netns), script, "--config-file", novaConf, "--config-file", conf)...); err != nil {
		return err
	}
	return c.waitMapped(ctx, name, lc.Host)
}

// KernelImage puts a guest booted by kernel into Glance: the kernel (aki),
// the initrd (ari) and a small raw root disk whose kernel_id, ramdisk_id
// and os_command_line make Nova's libvirt driver boot the kernel directly
// with that command line. props are more properties of the root image. It
// returns the root image's ID, the one to boot.
func (c *Cloud) KernelImage(ctx context.Context, name, kernel, initrd, cmdline string, props map[string]string) (string, error) {
	pc, err := c.Admin(ctx)
	if err != nil {
		return "", err
	}
	client, err := openstack.NewImageV2(pc, gophercloud.EndpointOpts{})
	if err != nil {
		return "", err
	}
	upload := func(name, diskFormat, containerFormat string, props map[string]string, data io.Reader) (string, error) {
		img, err := images.Create(ctx, client, images.CreateOpts{Name: name, DiskFormat: diskFormat, ContainerFormat: containerFormat, Properties: props}).Extract()
		if err != nil {
			return "", fmt.Errorf("glance: image %s: %w", name, err)
		}
		if err := imagedata.Upload(ctx, client, img.ID, data).ExtractErr(); err != nil {
			return "", fmt.Errorf("glance: image %s's data: %w", name, err)
		}
		return img.ID, nil
	}
	file := func(name, path, format string) (string, error) {
		f, err := os.Open(path)
		if err != nil {
			return "", err
		}
		defer f.Close()
		return upload(name, format, format, nil, f)
	}
	kernelID, err := file(name+"-kernel", kernel, "aki")
	if err != nil {
		return "", err
	}
	ramdiskID, err := file(name+"-ramdisk", initrd, "ari")
	if err != nil {
		return "", err
	}
	all := map[string]string{"kernel_id": kernelID, "ramdisk_id": ramdiskID, "os_command_line": cmdline}
	for k, v := range props {
		all[k] = v
	}
	// The guest's root is its initrd: the disk is only what Nova needs to
	// boot an image (1 MiB, grown to the flavor's root disk).
	return upload(name, "raw", "bare", all, bytes.NewReader(make([]byte, 1<<20)))
}
