package libvirt

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
)

func readTestdata(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// edit returns s with old replaced by new, failing the test if old is
// not in s (an edit that silently does nothing tests nothing).
func edit(t testing.TB, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("test XML has no %q", old)
	}
	return strings.Replace(s, old, new, 1)
}

const novaUUID = "5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00"

func TestDiscoverNova(t *testing.T) {
	d, err := Inspect([]byte(readTestdata(t, "nova-domain.xml")), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := api.Guest{
		Name:    "instance-0000002a",
		RAMMiB:  2048,
		VCPUs:   1,
		RAMFile: "/var/lib/libvirt/qemu/ram/7-instance-0000002a/pc.ram",
		Console: "/var/lib/nova/instances/" + novaUUID + "/console.log",
		Agent:   "/var/lib/libvirt/qemu/channel/target/domain-7-instance-0000002a/org.axproject.agent.0",
		Tap:     "tapd2c4e6f8-0a",
		MAC:     "fa:16:3e:4c:2a:91",
		Disks:   []api.Disk{{Node: "libvirt-2-format", Path: "/var/lib/nova/instances/" + novaUUID + "/disk", Format: "qcow2", Plain: true}},
	}
	if !reflect.DeepEqual(d.Guest, want) {
		t.Errorf("guest\n got %+v\nwant %+v", d.Guest, want)
	}
	if d.ID != 7 || d.UUID != novaUUID || d.VCPUs != 1 || d.Machine != "pc-i440fx-7.2" {
		t.Errorf("id %d uuid %s vcpus %d machine %s", d.ID, d.UUID, d.VCPUs, d.Machine)
	}
	wantNova := &NovaInstance{
		Name: "web-1", CreationTime: "2026-11-30 09:14:02", Package: "26.2.1",
		Flavor:  NovaFlavor{Name: "m1.small", MemoryMiB: 2048, DiskGiB: 20, VCPUs: 1},
		User:    NovaOwner{UUID: "8f1e2d3c4b5a69788796a5b4c3d2e1f0", Name: "admin"},
		Project: NovaOwner{UUID: "0a1b2c3d4e5f60718293a4b5c6d7e8f9", Name: "demo"},
		Root:    NovaRoot{Type: "image", UUID: "c0ffee00-1234-4abc-8def-0123456789ab"},
	}
	if !reflect.DeepEqual(d.Nova, wantNova) {
		t.Errorf("nova\n got %+v\nwant %+v", d.Nova, wantNova)
	}
	if d.Level != api.LevelFT || d.Peer != "compute-2" {
		t.Errorf("ax metadata: level %q peer %q", d.Level, d.Peer)
	}
	if len(d.Skipped) != 1 || !strings.Contains(d.Skipped[0], "cdrom hda") {
		t.Errorf("skipped %q, want the config drive", d.Skipped)
	}
	if len(d.Warnings) != 1 || !strings.Contains(d.Warnings[0], "csum='off'") {
		t.Errorf("warnings %q, want the checksum offload one", d.Warnings)
	}
	g, err := Discover([]byte(readTestdata(t, "nova-domain.xml")), nil)
	if err != nil || !reflect.DeepEqual(g, want) {
		t.Errorf("Discover = %+v, %v; want Inspect's guest", g, err)
	}
}

// libvirt9-live.xml is what libvirt 9.0 (Debian 12) gave for a running
// domain defined with shared file memory, two virtio disks, a bridge and
// an ethernet NIC, a file serial and the agent's channel; its QEMU ran
// with -object memory-backend-file,id=pc.ram,
// mem-path=/var/lib/libvirt/qemu/ram/1-instance-0000002a/pc.ram and
// -blockdev node-name=libvirt-2-format / libvirt-1-format.
func TestDiscoverLibvirt9(t *testing.T) {
	x := readTestdata(t, "libvirt9-live.xml")
	opts := &Options{Dirs: []string{"/tmp/lvx"}}
	if _, err := Discover([]byte(x), opts); !isRefusal(err, "network") || !strings.Contains(err.Error(), "two NICs") {
		t.Fatalf("two NICs: %v", err)
	}
	i := strings.Index(x, "<interface type='ethernet'>")
	j := strings.Index(x[i:], "</interface>") + i + len("</interface>")
	g, err := Discover([]byte(x[:i]+x[j:]), opts)
	if err != nil {
		t.Fatal(err)
	}
	want := api.Guest{
		Name: "instance-0000002a", RAMMiB: 128, VCPUs: 1,
		RAMFile: "/var/lib/libvirt/qemu/ram/1-instance-0000002a/pc.ram",
		Console: "/tmp/lvx/img/console.log", Agent: "/tmp/lvx/img/agent.sock",
		Tap: "tap1234abcd-56", MAC: "fa:16:3e:12:34:56",
		Disks: []api.Disk{
			{Node: "libvirt-2-format", Path: "/tmp/lvx/img/disk0.raw", Format: "raw", Plain: true},
			{Node: "libvirt-1-format", Path: "/tmp/lvx/img/disk1.qcow2", Format: "qcow2", Plain: true},
		},
	}
	if !reflect.DeepEqual(g, want) {
		t.Errorf("guest\n got %+v\nwant %+v", g, want)
	}
	// The guest's vCPUs, what its partner promises to run it with: the
	// count it runs with when fewer than its maximum are online.
	for vcpu, n := range map[string]int{"<vcpu placement='static'>4</vcpu>": 4, "<vcpu placement='static' current='2'>4</vcpu>": 2} {
		y := strings.Replace(x[:i]+x[j:], "<vcpu placement='static'>1</vcpu>", vcpu, 1)
		if g, err := Discover([]byte(y), opts); err != nil || g.VCPUs != n {
			t.Errorf("%s: %d vCPUs, %v; want %d", vcpu, g.VCPUs, err, n)
		}
	}
	if _, err := Discover([]byte(x[:i]+x[j:]), nil); !isRefusal(err, "disk") || !strings.Contains(err.Error(), "outside") {
		t.Errorf("disks outside the default directories: %v", err)
	}
}

func TestDiscoverAccepts(t *testing.T) {
	base := readTestdata(t, "nova-domain.xml")
	for _, tc := range []struct {
		name  string
		edit  func(t *testing.T, x string) string
		check func(t *testing.T, d *Discovered)
	}{{
		name: "memory backing dir and a long name",
		edit: func(t *testing.T, x string) string {
			return edit(t, x, "<name>instance-0000002a</name>", "<name>a-rather-long-domain-name-of-40-bytes-x</name>")
		},
		check: func(t *testing.T, d *Discovered) {
			// libvirt keeps the first 20 bytes of the name.
			if want := "/srv/ram/7-a-rather-long-domain/pc.ram"; d.Guest.RAMFile != want {
				t.Errorf("RAM file %s, want %s", d.Guest.RAMFile, want)
			}
		},
	}, {
		name: "one NUMA cell",
		edit: func(t *testing.T, x string) string {
			return edit(t, x, "</cpu>", "<numa><cell id='0' cpus='0' memory='2097152' unit='KiB' memAccess='shared'/></numa></cpu>")
		},
		check: func(t *testing.T, d *Discovered) {
			if !strings.HasSuffix(d.Guest.RAMFile, "/7-instance-0000002a/ram-node0") {
				t.Errorf("RAM file %s, want the cell's backend ram-node0", d.Guest.RAMFile)
			}
		},
	}, {
		name: "memory in GiB, vsock, file serial, no metadata, offloads off",
		edit: func(t *testing.T, x string) string {
			x = edit(t, x, "<memory unit='KiB'>2097152</memory>", "<memory unit='GiB'>3</memory>")
			x = edit(t, x, "<memballoon", "<vsock model='virtio'><cid auto='no' address='42'/></vsock><memballoon")
			x = edit(t, x, "<serial type='pty'>\n      <source path='/dev/pts/1'/>", "<serial type='file'>\n      <source path='/var/log/libvirt/qemu/c.log'/>")
			x = edit(t, x, "<driver name='vhost' rx_queue_size='512'/>", "<driver name='vhost'><host csum='off'/></driver>")
			i, j := strings.Index(x, "<metadata>"), strings.Index(x, "</metadata>")
			return x[:i] + x[j+len("</metadata>"):]
		},
		check: func(t *testing.T, d *Discovered) {
			if d.Guest.RAMMiB != 3072 || d.Guest.VsockCID != 42 || d.Guest.Console != "/var/log/libvirt/qemu/c.log" {
				t.Errorf("guest %+v", d.Guest)
			}
			if d.Nova != nil || d.Level != "" || len(d.Warnings) != 0 {
				t.Errorf("nova %v level %q warnings %q", d.Nova, d.Level, d.Warnings)
			}
		},
	}, {
		name: "ethernet tap, current vcpus",
		edit: func(t *testing.T, x string) string {
			x = edit(t, x, "<vcpu placement='static'>1</vcpu>", "<vcpu placement='static' current='2'>4</vcpu>")
			x = edit(t, x, "<interface type='bridge'>", "<interface type='ethernet'>")
			return edit(t, x, "<source bridge='brqa1b2c3d4-e5'/>", "")
		},
		check: func(t *testing.T, d *Discovered) {
			if d.Guest.Tap != "tapd2c4e6f8-0a" || d.VCPUs != 2 {
				t.Errorf("tap %q vcpus %d", d.Guest.Tap, d.VCPUs)
			}
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Inspect([]byte(tc.edit(t, base)), &Options{MemoryBackingDir: "/srv/ram"})
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, d)
			if err := validGuest(d.Guest, "/srv/ram", DefaultDirs); err != nil {
				t.Error(err)
			}
		})
	}
}

func isRefusal(err error, what string) bool {
	var r *Refusal
	return errors.As(err, &r) && r.What == what
}

// TestDiscoverRefusals: every domain AX cannot protect is refused with
// what to change in its XML.
func TestDiscoverRefusals(t *testing.T) {
	base := readTestdata(t, "nova-domain.xml")
	const memBacking = "<memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n    <allocation mode='immediate'/>\n    <discard/>\n  </memoryBacking>"
	const iface = "<interface type='bridge'>\n      <mac address='fa:16:3e:4c:2a:91'/>"
	const disk = "<source file='/var/lib/nova/instances/" + novaUUID + "/disk' index='2'/>"
	for _, tc := range []struct {
		name, old, new string
		what           string
		fix            string // in the refusal's text
	}{
		{"not XML", "<domain type='kvm' id='7'>", "<domain", "xml", ""},
		{"not QEMU", "<domain type='kvm' id='7'>", "<domain type='xen' id='7'>", "xml", "type='kvm'"},
		{"name with a slash", "<name>instance-0000002a</name>", "<name>../../etc</name>", "name", "virsh domrename"},
		{"name with a space", "<name>instance-0000002a</name>", "<name>web 1</name>", "name", "virsh domrename"},
		{"not running", "<domain type='kvm' id='7'>", "<domain type='kvm'>", "state", "virsh dumpxml"},
		{"bad UUID", "<uuid>" + novaUUID + "</uuid>", "<uuid>x/../y</uuid>", "xml", ""},
		{"no vcpu", "<vcpu placement='static'>1</vcpu>", "", "xml", "vcpu"},
		{"anonymous RAM", memBacking, "", "memory", "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"},
		{"memfd RAM", "<source type='file'/>\n    <access", "<source type='memfd'/>\n    <access", "memory", "<source type='file'/>"},
		{"private file RAM", "<access mode='shared'/>\n    <allocation", "<access mode='private'/>\n    <allocation", "memory", "<access mode='shared'/>"},
		{"hugepages", "<memoryBacking>\n    <source", "<memoryBacking>\n    <hugepages><page size='2048' unit='KiB'/></hugepages>\n    <source", "memory", "remove <hugepages/>"},
		{"RAM not whole MiB", "<memory unit='KiB'>2097152</memory>", "<memory unit='KiB'>2097153</memory>", "memory", ""},
		{"RAM too large", "<memory unit='KiB'>2097152</memory>", "<memory unit='TiB'>5</memory>", "memory", ""},
		{"two NUMA cells", "</cpu>", "<numa><cell id='0' cpus='0' memory='1048576'/><cell id='1' cpus='0' memory='1048576'/></numa></cpu>", "numa", "hw:numa_nodes=1"},
		{"NUMA cell private", "</cpu>", "<numa><cell id='0' cpus='0' memory='2097152' memAccess='private'/></numa></cpu>", "memory", "memAccess='shared'"},
		{"DIMM", "<memballoon", "<memory model='dimm'><target><size unit='KiB'>524288</size><node>0</node></target></memory><memballoon", "numa", "memory devices"},
		{"rbd disk", "<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' cache='none'/>\n      " + disk,
			"<disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source protocol='rbd' name='vms/" + novaUUID + "_disk' index='2'><host name='10.0.0.1' port='6789'/></source>", "disk", "images_type"},
		{"block disk", "<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' cache='none'/>\n      " + disk,
			"<disk type='block' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source dev='/dev/vg/lv' index='2'/>", "disk", "<disk type='file'>"},
		{"lun", "<disk type='file' device='disk'>", "<disk type='file' device='lun'>", "disk", "device='disk'"},
		{"vmdk", "type='qcow2' cache='none'", "type='vmdk' cache='none'", "disk", "raw and qcow2"},
		{"scsi bus", "<target dev='vda' bus='virtio'/>", "<target dev='sda' bus='scsi'/>", "disk", "hw_disk_bus=virtio"},
		{"shareable", "<target dev='vda' bus='virtio'/>", "<target dev='vda' bus='virtio'/><shareable/>", "disk", "multiattach"},
		{"no source index", disk, "<source file='/var/lib/nova/instances/" + novaUUID + "/disk'/>", "disk", "live XML"},
		{"disk outside the allowed dirs", disk, "<source file='/etc/shadow' index='2'/>", "disk", "directory axd allows"},
		{"disk path climbing out", disk, "<source file='/var/lib/nova/instances/../../../etc/shadow' index='2'/>", "disk", ""},
		{"disk path with a comma", disk, "<source file='/var/lib/nova/instances/a,b' index='2'/>", "disk", ""},
		{"two disks, one index", "<controller type='usb'", "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/var/lib/nova/instances/x' index='2'/><target dev='vdb' bus='virtio'/></disk><controller type='usb'", "disk", ""},
		{"macvtap", iface + "\n      <source bridge='brqa1b2c3d4-e5'/>", "<interface type='direct'>\n      <mac address='fa:16:3e:4c:2a:91'/>\n      <source dev='eth0' mode='bridge'/>", "network", "<interface type='bridge'>"},
		{"SR-IOV", "<interface type='bridge'>", "<interface type='hostdev'>", "network", "exactly one virtio NIC"},
		{"vhost-user", iface + "\n      <source bridge='brqa1b2c3d4-e5'/>", "<interface type='vhostuser'>\n      <mac address='fa:16:3e:4c:2a:91'/>\n      <source type='unix' path='/run/vhu.sock' mode='server'/>", "network", ""},
		{"no tap", "<interface type='bridge'>", "<!-- <interface type='bridge'>", "network", "exactly one virtio NIC"}, // closed below
		{"two taps", "<interface type='bridge'>", "<interface type='ethernet'><mac address='fa:16:3e:00:00:01'/><target dev='tapx'/><model type='virtio'/></interface><interface type='bridge'>", "network", "two NICs"},
		{"tap name too long", "<target dev='tapd2c4e6f8-0a'/>", "<target dev='tapd2c4e6f8-0a123'/>", "network", ""},
		{"tap name hostile", "<target dev='tapd2c4e6f8-0a'/>", "<target dev='../eth0'/>", "network", ""},
		{"no tap name", "<target dev='tapd2c4e6f8-0a'/>", "", "network", "live XML"},
		{"e1000", "<model type='virtio'/>\n      <driver", "<model type='e1000'/>\n      <driver", "network", "hw_vif_model=virtio"},
		{"multicast MAC", "<mac address='fa:16:3e:4c:2a:91'/>", "<mac address='01:00:5e:00:00:01'/>", "network", ""},
		{"agent on TCP", "<channel type='unix'>\n      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-instance-0000002a/org.axproject.agent.0'/>",
			"<channel type='tcp'>\n      <source mode='bind' host='0.0.0.0' service='4555'/>", "agent", "<channel type='unix'>"},
		{"agent outside the dirs", "path='/var/lib/libvirt/qemu/channel/target/domain-7-instance-0000002a/org.axproject.agent.0'", "path='/tmp/agent.sock'", "agent", ""},
		{"vsock CID 2", "<memballoon", "<vsock model='virtio'><cid auto='no' address='2'/></vsock><memballoon", "agent", ""},
		{"console outside the dirs", "<log file='/var/lib/nova/instances/" + novaUUID + "/console.log' append='off'/>\n      <target type='isa-serial'", "<log file='/root/.ssh/authorized_keys'/>\n      <target type='isa-serial'", "console", ""},
		{"AX level unknown", ">ft</ax:level>", ">max</ax:level>", "metadata", "none, ha or ft"},
		{"AX peer hostile", "peer=\"compute-2\"", "peer=\"../b\"", "metadata", ""},
		{"Nova flavor memory not a number", "<nova:memory>2048</nova:memory>", "<nova:memory>-1</nova:memory>", "metadata", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := edit(t, base, tc.old, tc.new)
			if tc.name == "no tap" {
				x = edit(t, x, "</interface>", "</interface> -->")
			}
			_, err := Discover([]byte(x), nil)
			var r *Refusal
			if !errors.As(err, &r) {
				t.Fatalf("err = %v, want a refusal", err)
			}
			if r.What != tc.what {
				t.Errorf("refused for %q, want %q: %v", r.What, tc.what, err)
			}
			if !strings.Contains(err.Error(), tc.fix) {
				t.Errorf("refusal %q does not say %q", err, tc.fix)
			}
			if strings.ContainsAny(r.Domain, "/ ") && !strings.HasPrefix(r.Domain, `"`) {
				t.Errorf("domain name %q unquoted in the refusal", r.Domain)
			}
		})
	}
}

// validGuest holds a discovered guest to the rules axd checks every spec
// against (daemon.checkSpecFields), and to the directories it came from.
func validGuest(g api.Guest, memDir string, dirs []string) error {
	if err := names.Check("vm", g.Name); err != nil {
		return err
	}
	if g.RAMMiB < 1 || g.RAMMiB > maxRAMMiB {
		return errors.New("RAM size out of bounds")
	}
	for _, p := range []struct {
		kind, path string
		dirs       []string
	}{{"RAM file", g.RAMFile, []string{memDir}}, {"console", g.Console, dirs}, {"agent", g.Agent, dirs}} {
		if p.path == "" && p.kind != "RAM file" {
			continue
		}
		if err := names.CheckPath(p.kind, p.path, p.dirs...); err != nil {
			return err
		}
	}
	if filepath.Dir(filepath.Dir(g.RAMFile)) != memDir {
		return errors.New("RAM file not two levels below the memory backing dir: " + g.RAMFile)
	}
	if g.QMP != "" || g.PIDFile != "" || g.Kernel != "" || g.Initrd != "" || g.Append != "" || g.Accel != "" {
		return errors.New("QMP driver fields set")
	}
	if err := names.CheckInterface("tap", g.Tap); err != nil {
		return err
	}
	hw, err := net.ParseMAC(g.MAC)
	if err != nil || len(hw) != 6 || hw[0]&1 != 0 || hw.String() != g.MAC {
		return errors.New("bad MAC " + g.MAC)
	}
	if g.VsockCID != 0 && (g.VsockCID < 3 || g.VsockCID == ^uint32(0)) {
		return errors.New("reserved vsock CID")
	}
	if len(g.Disks) > maxDisks {
		return errors.New("too many disks")
	}
	seen := map[string]bool{}
	for _, dk := range g.Disks {
		if err := names.CheckNode(dk.Node); err != nil {
			return err
		}
		if seen[dk.Node] {
			return errors.New("two disks named " + dk.Node)
		}
		seen[dk.Node] = true
		if err := names.CheckPath("disk", dk.Path, dirs...); err != nil {
			return err
		}
		if dk.Format != "raw" && dk.Format != "qcow2" || !dk.Plain {
			return errors.New("disk format " + dk.Format)
		}
	}
	return nil
}

// FuzzDiscover: no XML makes Discover panic, and whatever guest it
// returns holds to the rules axd checks specs against, its paths inside
// the directories it was given. The seeds are whole domain XMLs, which
// the fuzzer minimizes for a minute each by default: run it with
// -fuzzminimizetime 1s, or it spends its time minimizing.
func FuzzDiscover(f *testing.F) {
	for _, name := range []string{"nova-domain.xml", "libvirt9-live.xml"} {
		f.Add(readTestdata(f, name))
	}
	f.Add("<domain type='kvm' id='1'><name>a</name></domain>")
	f.Fuzz(func(t *testing.T, x string) {
		g, err := Discover([]byte(x), nil)
		if err != nil {
			var r *Refusal
			if !errors.As(err, &r) {
				t.Fatalf("error %v is not a refusal", err)
			}
			return
		}
		if err := validGuest(g, DefaultMemoryBackingDir, DefaultDirs); err != nil {
			t.Fatalf("discovered an invalid guest: %v\n%+v", err, g)
		}
	})
}
