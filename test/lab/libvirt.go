package lab

// Libvirt in the lab: one libvirtd per hypervisor host, inside that host's
// network namespace, with sockets, configuration, state, logs and caches of
// its own, so that guests can run as libvirt domains shaped like the ones
// Nova defines (DefineLibvirtGuest). LIBVIRT.md beside this file says what
// libvirt 9.0 does with such a domain (QEMU command line, RAM file, monitor)
// and how a domain is resumed from a checkpoint on the other host.

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/axproject/ax/ax/api"
)

// Programs of Debian's libvirt-daemon and libvirt-clients.
const (
	LibvirtdBinary = "libvirtd"
	VirshBinary    = "virsh"
)

// libvirtQEMUUser is the user libvirt 9.0's QEMU driver looks up when it
// starts, before it reads qemu.conf: Debian builds it in as the default
// QEMU user, so it must exist even though the lab's qemu.conf says root.
const libvirtQEMUUser = "libvirt-qemu"

// libvirtFixedDirs are where a privileged libvirtd 9.0 keeps what no
// configuration redirects (the QEMU driver's state, domain XML, monitor
// sockets, logs and capability cache are compiled-in paths below these).
// Each host's libvirtd runs in a mount namespace of its own in which a
// per-host directory (the key, under LibvirtDir) is bind-mounted over each.
var libvirtFixedDirs = []struct{ sub, path string }{
	{"etc", "/etc/libvirt"},
	{"run", "/run/libvirt"},
	{"lib", "/var/lib/libvirt"},
	{"log", "/var/log/libvirt"},
	{"cache", "/var/cache/libvirt"},
}

// LibvirtDir holds host h's libvirtd: etc, run, lib, log and cache, which
// it sees as /etc/libvirt, /run/libvirt, /var/lib/libvirt, … .
func (l *Lab) LibvirtDir(h string) string { return filepath.Join(l.StateDir, "libvirt-"+h) }

// LibvirtRAMDir is host h's memory_backing_dir, on tmpfs: the RAM of its
// domains are shared-memory files below it (see LibvirtRAMFile).
func (l *Lab) LibvirtRAMDir(h string) string { return filepath.Join(l.ShmDir, "libvirt-"+h) }

func (l *Lab) libvirtSocket(h string) string {
	return filepath.Join(l.LibvirtDir(h), "run", "libvirt-sock")
}

// LibvirtURI is the connection URI of host h's libvirtd (virsh -c URI).
func (l *Lab) LibvirtURI(h string) string {
	return "qemu+unix:///system?socket=" + l.libvirtSocket(h)
}

func libvirtdName(h string) string { return "libvirtd-" + h }

// checkLibvirtPrereqs says in one sentence what the machine lacks to run
// the lab's libvirtd.
func checkLibvirtPrereqs() error {
	if err := checkPrereqs(true); err != nil {
		return err
	}
	for _, bin := range []string{LibvirtdBinary, VirshBinary, "unshare"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s is missing (try: make deps, or apt-get install --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)", bin)
		}
	}
	if _, err := user.Lookup(libvirtQEMUUser); err != nil {
		return fmt.Errorf("user %s is missing: libvirtd's QEMU driver refuses to start without it, whatever qemu.conf says (try: make deps)", libvirtQEMUUser)
	}
	return nil
}

// labUUID is a UUID (version 5 layout) that the same parts always give.
func labUUID(parts ...string) string {
	b := sha1.Sum([]byte(strings.Join(parts, "\x00")))
	b[6] = b[6]&0x0f | 0x50
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// libvirtdConf is host h's libvirtd.conf. Only unix_sock_dir (sockets) and
// log_outputs redirect paths; the PID file is a flag (-p).
func (l *Lab) libvirtdConf(h string) string {
	return fmt.Sprintf(`# libvirtd of lab %[1]s, host %[2]s (written by the lab; see test/lab/libvirt.go)
unix_sock_dir = %[3]q
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
# Without DMI here every libvirtd would fall back to /etc/machine-id, and
# libvirt refuses to migrate between hosts of one UUID.
host_uuid = %[4]q
`, l.Prefix, h, filepath.Join(l.LibvirtDir(h), "run"), labUUID("ax-lab-host", l.Prefix, h))
}

// qemuConf is host h's qemu.conf: QEMU runs as root with no security
// driver, no relabelling and no cgroups (the lab's namespaces have no
// cgroup tree libvirt could use: ip netns exec remounts /sys), its
// stdio and file chardevs written by QEMU itself rather than virtlogd
// (which the lab does not run), and guest RAM in files on tmpfs. With
// QEMUUser set, QEMU runs as that user and group instead (Debian's own
// default is libvirt-qemu), and libvirt gives it the files its domain
// XML names (dynamic_ownership): what a stock host does, AppArmor aside.
func (l *Lab) qemuConf(h string) string {
	user, group, owned := "root", "root", 0
	if l.QEMUUser != "" {
		user, group, owned = l.QEMUUser, l.QEMUUser, 1
	}
	return fmt.Sprintf(`# QEMU driver of lab %[1]s, host %[2]s (written by the lab; see test/lab/libvirt.go)
user = %[4]q
group = %[5]q
dynamic_ownership = %[6]d
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
memory_backing_dir = %[3]q
`, l.Prefix, h, l.LibvirtRAMDir(h), user, group, owned)
}

// libvirtdScript sets the hostname "$3" (unless empty: in the UTS
// namespace unshare made), bind-mounts "$4" over "$5", "$6" over "$7", …
// in the mount namespace unshare made, then becomes libvirtd with config
// "$1" and PID file "$2" (the same process: the lab records its PID).
const libvirtdScript = `set -e
conf=$1 pid=$2 name=$3
shift 3
[ -z "$name" ] || hostname "$name"
while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
exec libvirtd -f "$conf" -p "$pid"`

// StartLibvirtd starts host h's libvirtd and waits until it serves. It
// runs in h's network namespace and in a mount namespace of its own where
// the per-host directories (LibvirtDir) stand in for /etc/libvirt,
// /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt;
// the machine's own are never written (the lab only creates them, empty,
// as mount points where missing, and never removes them: another lab's
// libvirtd may have one of them mounted over). Its QEMUs inherit both
// namespaces. Down stops it, its guests, and removes its directories.
func (l *Lab) StartLibvirtd(ctx context.Context, h string) error {
	if err := checkLibvirtPrereqs(); err != nil {
		return err
	}
	if err := l.loadState(); err != nil {
		return err
	}
	if h != HostA && h != HostB {
		return fmt.Errorf("libvirtd: host %q is no hypervisor (a or b)", h)
	}
	if pid, ok := l.libvirtdPID(h); ok {
		return fmt.Errorf("libvirtd on %s already runs (pid %d)", h, pid)
	}
	if !contains(l.state.Files, l.ShmDir) {
		if err := os.MkdirAll(l.ShmDir, 0o755); err != nil {
			return err
		}
		if err := l.recordFile(l.ShmDir); err != nil {
			return err
		}
	}
	dir := l.LibvirtDir(h)
	args := []string{"--mount", "--propagation", "private"}
	hostname := ""
	if l.LibvirtHostnames {
		args, hostname = append(args, "--uts"), l.Netns(h)
	}
	args = append(args, "--", "sh", "-c", libvirtdScript, "sh",
		filepath.Join(dir, "etc", "libvirtd.conf"), filepath.Join(dir, "libvirtd.pid"), hostname)
	for _, d := range libvirtFixedDirs {
		if err := os.MkdirAll(filepath.Join(dir, d.sub), 0o755); err != nil {
			return fmt.Errorf("libvirtd on %s: %w", h, err)
		}
		if err := os.MkdirAll(d.path, 0o755); err != nil {
			return fmt.Errorf("libvirtd on %s: mount point: %w", h, err)
		}
		args = append(args, filepath.Join(dir, d.sub), d.path)
	}
	if err := os.MkdirAll(l.LibvirtRAMDir(h), 0o755); err != nil {
		return err
	}
	for name, text := range map[string]string{"libvirtd.conf": l.libvirtdConf(h), "qemu.conf": l.qemuConf(h)} {
		if err := os.WriteFile(filepath.Join(dir, "etc", name), []byte(text), 0o644); err != nil {
			return err
		}
	}
	logPath := filepath.Join(l.StateDir, libvirtdName(h)+".log")
	pid, err := l.startLogged(h, libvirtdName(h), logPath, "unshare", args...)
	if err != nil {
		return err
	}
	// Until the QEMU driver has probed QEMU's capabilities (seconds under
	// TCG) libvirtd accepts connections but answers none.
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err := l.Virsh(ctx, h, "version")
		if err == nil {
			return nil
		}
		if isZombie(pid) {
			return fmt.Errorf("libvirtd on %s exited; %s", h, fileTail(logPath, 10))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("libvirtd on %s does not serve: %v; %s", h, err, fileTail(logPath, 10))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// libvirtdPID is the PID of host h's libvirtd if it runs.
func (l *Lab) libvirtdPID(h string) (int, bool) {
	for _, p := range l.state.Procs {
		if p.Name == libvirtdName(h) && p.alive() {
			return p.PID, true
		}
	}
	return 0, false
}

// StopLibvirtd stops host h's libvirtd (SIGTERM, then SIGKILL) and forgets
// it. Its domains' QEMUs go on running, as they do when a real host's
// libvirtd stops; a libvirtd started again finds them. Down ends them.
func (l *Lab) StopLibvirtd(h string) error {
	if err := l.loadState(); err != nil {
		return err
	}
	procs := l.state.Procs[:0]
	for _, p := range l.state.Procs {
		if p.Name == libvirtdName(h) {
			p.stop(10 * time.Second)
			if p.alive() {
				return fmt.Errorf("libvirtd on %s (pid %d) does not stop", h, p.PID)
			}
			continue
		}
		procs = append(procs, p)
	}
	l.state.Procs = procs
	return l.state.save()
}

// Virsh runs virsh against host h's libvirtd and returns what it printed.
// An error carries virsh's own message.
func (l *Lab) Virsh(ctx context.Context, h string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, VirshBinary, append([]string{"-q", "-c", l.LibvirtURI(h)}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return stdout.String(), fmt.Errorf("virsh %s on %s: %s", strings.Join(args, " "), h, msg)
	}
	return stdout.String(), nil
}

// LibvirtQMP sends one QMP command to a domain of host h through libvirt
// (virsh qemu-monitor-command: libvirt owns the monitor socket) and returns
// the "return" member of QEMU's answer.
func (l *Lab) LibvirtQMP(ctx context.Context, h, domain, command string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	js, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	out, err := l.Virsh(ctx, h, "qemu-monitor-command", domain, string(js))
	if err != nil {
		return nil, err
	}
	var r struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Desc string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("qmp %s via libvirt: %w: %q", command, err, out)
	}
	if r.Error != nil {
		return nil, fmt.Errorf("qmp %s via libvirt: %s", command, r.Error.Desc)
	}
	return r.Return, nil
}

// LibvirtDomainName is the libvirt name of guest index i: Nova's default
// instance_name_template, instance-%08x.
func LibvirtDomainName(index int) string { return fmt.Sprintf("instance-%08x", index) }

// DefineLibvirtGuest defines a lab guest as a domain of cfg.Host's libvirtd
// (StartLibvirtd first), shaped like one Nova defines, and records it; it
// makes the guest's tap on the host's public bridge and, with DiskMiB, its
// disk. StartLibvirtGuest starts it. cfg.Incoming defines it to wait,
// paused, for a checkpoint's device state (migrate-incoming) instead of
// booting. libvirt names the RAM file itself, so cfg.RAMFile is refused.
func (l *Lab) DefineLibvirtGuest(ctx context.Context, cfg GuestConfig) (*VM, error) {
	if err := checkLibvirtPrereqs(); err != nil {
		return nil, err
	}
	if err := l.loadState(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	switch {
	case cfg.Kernel == "" || cfg.Initrd == "":
		return nil, errors.New("define libvirt guest: no image (build one with the image package)")
	case cfg.RAMFile != "":
		return nil, errors.New("define libvirt guest: libvirt names a domain's RAM file itself (memory_backing_dir); leave RAMFile empty")
	case cfg.Accel != "tcg" && cfg.Accel != "kvm":
		return nil, fmt.Errorf("define libvirt guest: accel %q: use tcg or kvm", cfg.Accel)
	}
	for _, v := range l.state.VMs {
		if v.Name == cfg.Name && v.Host == cfg.Host {
			return nil, fmt.Errorf("define libvirt guest: lab %q already has a guest %s on %s", l.Prefix, cfg.Name, cfg.Host)
		}
	}
	if _, ok := l.libvirtdPID(cfg.Host); !ok {
		return nil, fmt.Errorf("define libvirt guest: no libvirtd runs on %s (StartLibvirtd first)", cfg.Host)
	}
	dir := filepath.Join(l.StateDir, cfg.Name+"-"+cfg.Host)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	d := NovaDomain{
		Type:        "qemu",
		Name:        LibvirtDomainName(cfg.Index),
		UUID:        labUUID("ax-lab-instance", l.Prefix, cfg.Name),
		DisplayName: cfg.Name,
		RAMMiB:      cfg.RAMMiB,
		VCPUs:       1,
		Kernel:      cfg.Kernel,
		Initrd:      cfg.Initrd,
		Cmdline:     cfg.kernelCmdline(),
		Tap:         fmt.Sprintf("tap-%s", cfg.Name),
		MAC:         fmt.Sprintf("52:54:00:a7:00:%02x", cfg.Index),
		Console:     cfg.Console,
		Agent:       filepath.Join(dir, "agent.sock"),
		Incoming:    cfg.Incoming,
		Created:     time.Now().UTC(),
	}
	if cfg.Accel == "kvm" {
		d.Type = "kvm"
	}
	if d.Console == "" {
		d.Console = filepath.Join(dir, "console.log")
	}
	if cfg.DiskMiB > 0 {
		disk, err := l.makeDisk(ctx, cfg)
		if err != nil {
			return nil, err
		}
		d.Disk = &disk
	}
	text, err := d.XML()
	if err != nil {
		return nil, err
	}
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(text), 0o644); err != nil {
		return nil, err
	}
	if err := l.addTap(ctx, cfg.Host, d.Tap); err != nil {
		return nil, err
	}
	if _, err := l.Virsh(ctx, cfg.Host, "define", "--validate", xmlPath); err != nil {
		return nil, err
	}
	spec := api.Guest{
		Name: cfg.Name, RAMMiB: cfg.RAMMiB, Console: d.Console, Agent: d.Agent,
		Tap: d.Tap, MAC: d.MAC,
		Boot: api.Boot{Kernel: cfg.Kernel, Initrd: cfg.Initrd, Append: d.Cmdline},
		QEMU: api.QEMU{Accel: cfg.Accel},
	}
	if d.Disk != nil {
		spec.Disks = []api.Disk{*d.Disk}
	}
	vm := VM{
		Spec: spec, Name: cfg.Name, Host: cfg.Host, Netns: l.Netns(cfg.Host),
		Console: d.Console, Agent: d.Agent, RAMMiB: cfg.RAMMiB, Tap: d.Tap, MAC: d.MAC,
		IP: cfg.guestIP(), Accel: cfg.Accel, Domain: d.Name,
	}
	l.state.VMs = append(l.state.VMs, vm)
	if err := l.state.save(); err != nil {
		return nil, err
	}
	return &vm, nil
}

// StartLibvirtGuest starts a guest DefineLibvirtGuest defined (virsh
// start, with --paused when paused) and fills in what libvirt chose: the
// QEMU's PID and its RAM file. Reach its monitor with LibvirtQMP.
func (l *Lab) StartLibvirtGuest(ctx context.Context, vm *VM, paused bool) error {
	if vm.Domain == "" {
		return fmt.Errorf("start libvirt guest: %s is no libvirt domain", vm.Name)
	}
	args := []string{"start", vm.Domain}
	if paused {
		args = append(args, "--paused")
	}
	if _, err := l.Virsh(ctx, vm.Host, args...); err != nil {
		return err
	}
	out, err := l.Virsh(ctx, vm.Host, "domid", vm.Domain)
	if err != nil {
		return err
	}
	id, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		return fmt.Errorf("start libvirt guest: virsh domid %s said %q", vm.Domain, out)
	}
	pidText, err := os.ReadFile(filepath.Join(l.LibvirtDir(vm.Host), "run", "qemu", vm.Domain+".pid"))
	if err != nil {
		return fmt.Errorf("start libvirt guest: libvirt's PID file of %s: %w", vm.Domain, err)
	}
	if vm.PID, err = strconv.Atoi(strings.TrimSpace(string(pidText))); err != nil {
		return fmt.Errorf("start libvirt guest: libvirt's PID file of %s: %w", vm.Domain, err)
	}
	// vm.QMP stays empty: QEMU serves one monitor connection, libvirt's.
	vm.RAMFile = l.LibvirtRAMFile(vm.Host, id, vm.Domain)
	vm.Spec.RAMFile = vm.RAMFile
	for i, v := range l.state.VMs {
		if v.Name == vm.Name && v.Host == vm.Host {
			l.state.VMs[i] = *vm
		}
	}
	return l.state.save()
}

// libvirtShortName is libvirt's short name of a running domain: its ID and
// at most the first 20 bytes of its name (virDomainDefGetShortName).
func libvirtShortName(id int, domain string) string {
	if len(domain) > 20 {
		domain = domain[:20]
	}
	return fmt.Sprintf("%d-%s", id, domain)
}

// LibvirtRAMFile is where libvirt 9.0 puts the RAM of running domain id
// on host h: memory_backing_dir/libvirt/qemu/<short name>/pc.ram ("pc.ram"
// is the memory backend's ID for a guest without NUMA cells). libvirt
// creates it at start and deletes the directory when the domain stops.
func (l *Lab) LibvirtRAMFile(h string, id int, domain string) string {
	return filepath.Join(l.LibvirtRAMDir(h), "libvirt", "qemu", libvirtShortName(id, domain), "pc.ram")
}

// LibvirtMonitor is the QMP socket libvirt opened for running domain id on
// host h (/var/lib/libvirt/qemu/domain-<short name>/monitor.sock inside
// libvirtd's mount namespace). libvirt keeps the one connection QEMU takes.
func (l *Lab) LibvirtMonitor(h string, id int, domain string) string {
	return filepath.Join(l.LibvirtDir(h), "lib", "qemu", "domain-"+libvirtShortName(id, domain), "monitor.sock")
}

// LibvirtQEMULog is the log libvirt writes a domain's QEMU command line
// and output to.
func (l *Lab) LibvirtQEMULog(h, domain string) string {
	return filepath.Join(l.LibvirtDir(h), "log", "qemu", domain+".log")
}
