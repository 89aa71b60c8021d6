package libvirt

import (
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

var novaPolicy = PeerPolicy{Bridges: []string{"br-pub", "brq*"}}

// Nova's definition of a server is taken as the partner's: what is
// dropped is what belongs to the running domain on its host (its id, its
// confinement labels, its pty's path); the rest is kept as it was.
func TestPeerDefinitionNova(t *testing.T) {
	x := readTestdata(t, "nova-domain.xml")
	out, err := CheckPeerDefinition([]byte(x), "instance-0000002a", novaPolicy)
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	for _, gone := range []string{`<domain type="kvm" id=`, "seclabel", "/dev/pts/1", "apparmor"} {
		if strings.Contains(s, gone) {
			t.Errorf("the definition kept %q:\n%s", gone, s)
		}
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(s); err != nil {
		t.Fatal(err)
	}
	if dom.UUID != novaUUID || dom.Devices.Interfaces[0].Target.Dev != "tapd2c4e6f8-0a" || len(dom.Devices.Disks) != 2 ||
		!strings.Contains(dom.Metadata.XML, "<nova:name>web-1</nova:name>") || dom.MemoryBacking.MemorySource.Type != "file" {
		t.Errorf("the definition lost what Nova wrote:\n%s", s)
	}
	// What comes out is taken again as it is.
	if again, err := CheckPeerDefinition(out, "instance-0000002a", novaPolicy); err != nil || string(again) != s {
		t.Errorf("checked twice: %v\n%s\n%s", err, s, again)
	}
}

// Whatever reaches the host beyond the guest's own files and network, or
// runs a program, is refused, with what it was.
func TestPeerDefinitionRefuses(t *testing.T) {
	x := readTestdata(t, "nova-domain.xml")
	devices := func(dev string) string { return strings.Replace(x, "</devices>", dev+"</devices>", 1) }
	instance := "/var/lib/nova/instances/" + novaUUID
	for _, c := range []struct {
		name, xml, want string
	}{
		{"another name", x, "it names domain instance-0000002a"},
		{"QEMU command line", strings.Replace(x, "</domain>", `<qemu:commandline xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"><qemu:arg value="-chardev"/></qemu:commandline></domain>`, 1), "QEMUCommandline"},
		{"host device", devices(`<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>`), "<hostdev>"},
		{"host directory", devices(`<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>`), "<filesystem>"},
		{"lease", devices(`<lease><lockspace>x</lockspace><key>k</key><target path='/etc/passwd'/></lease>`), "<lease>"},
		{"disk outside", strings.Replace(x, instance+"/disk'", "/etc/shadow'", 1), `"/etc/shadow" is outside`},
		{"disk escaping", strings.Replace(x, instance+"/disk'", instance+"/../../../../etc/shadow'", 1), "must be absolute and clean"},
		{"backing store outside", strings.Replace(x, "/var/lib/nova/instances/_base/", "/root/", 1), "backing store"},
		{"network disk", strings.Replace(strings.Replace(x, "<disk type='file' device='disk'>", "<disk type='network' device='disk'>", 1),
			"<source file='"+instance+"/disk' index='2'/>", "<source protocol='rbd' name='pool/img'><host name='10.0.0.1' port='6789'/></source>", 1), "other than a file"},
		{"scsi passthrough", strings.Replace(x, "<disk type='file' device='disk'>", "<disk type='block' device='lun' sgio='unfiltered'>", 1), "raw SCSI"},
		{"emulator", strings.Replace(x, "<emulator>/usr/bin/qemu-system-x86_64</emulator>", "<emulator>/bin/sh</emulator>", 1), `emulator "/bin/sh"`},
		{"interface script", strings.Replace(x, "<source bridge='brqa1b2c3d4-e5'/>", "<source bridge='brqa1b2c3d4-e5'/><script path='/tmp/x.sh'/>", 1), "a script"},
		{"other bridge", strings.Replace(x, "<source bridge='brqa1b2c3d4-e5'/>", "<source bridge='virbr0'/>", 1), "bridge virbr0 is not one of this host's"},
		{"direct interface", strings.Replace(strings.Replace(x, "<interface type='bridge'>", "<interface type='direct'>", 1),
			"<source bridge='brqa1b2c3d4-e5'/>", "<source dev='eth0' mode='passthrough'/>", 1), "other than a bridge"},
		{"open vSwitch port", strings.Replace(x, "<source bridge='brqa1b2c3d4-e5'/>", "<source bridge='brqa1b2c3d4-e5'/><virtualport type='openvswitch'/>", 1), "virtual port"},
		{"serial over TCP", devices(`<serial type='tcp'><source mode='connect' host='10.0.0.9' service='4555'/><target port='1'/></serial>`), "serial: a source other than"},
		{"console log outside", strings.Replace(x, instance+"/console.log", "/etc/cron.d/x", 1), "outside"},
		{"guest forwarding", devices(`<channel type='pty'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>`), "other than virtio"},
		{"agent socket outside", strings.Replace(x, "/var/lib/libvirt/qemu/channel/target/domain-7-instance-0000002a/org.axproject.agent.0", "/etc/x.sock", 1), "outside"},
		{"graphics", devices(`<graphics type='sdl' display=':0'/>`), "other than VNC or SPICE"},
		{"graphics on the host's GPU", devices(`<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD128'/></graphics>`), "OpenGL"},
		{"video on the host's GPU", strings.Replace(x, "<model type='virtio' heads='1' primary='yes'/>", "<model type='virtio' heads='1' primary='yes'><acceleration accel3d='yes' rendernode='/dev/dri/renderD128'/></model>", 1), "render node"},
		{"host keyboard", devices(`<input type='evdev'><source dev='/dev/input/event1'/></input>`), "input passed through"},
		{"host file in firmware config", strings.Replace(x, "</sysinfo>", "</sysinfo><sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>", 1), "fw_cfg"},
		{"host-side route", strings.Replace(x, "<source bridge='brqa1b2c3d4-e5'/>", "<source bridge='brqa1b2c3d4-e5'/><route family='ipv4' address='0.0.0.0' prefix='0' gateway='10.0.0.1'/>", 1), "routes"},
		{"audio to a file", strings.Replace(x, "<audio id='1' type='none'/>", "<audio id='1' type='file' path='/etc/motd'/>", 1), "audio other than"},
		{"entropy from a socket", strings.Replace(x, "<backend model='random'>/dev/urandom</backend>", "<backend model='egd' type='tcp'><source mode='connect' host='10.0.0.9' service='1'/></backend>", 1), "random number generator"},
		{"anonymous memory", strings.Replace(x, "<source type='file'/>", "<source type='anonymous'/>", 1), "memory backing"},
		{"kernel outside", strings.Replace(x, "<boot dev='hd'/>", "<kernel>/boot/vmlinuz</kernel>", 1), `"/boot/vmlinuz" is outside`},
		{"firmware", strings.Replace(x, "<boot dev='hd'/>", "<loader readonly='yes' type='pflash'>/tmp/evil.fd</loader>", 1), "<os> has <loader>"},
		{"cgroup partition", strings.Replace(x, "<partition>/machine</partition>", "<partition>/system.slice</partition>", 1), "<resource>"},
		{"other hypervisor", strings.Replace(x, "<domain type='kvm'", "<domain type='lxc'", 1), "domain type lxc"},
		{"no uuid", strings.Replace(x, "<uuid>"+novaUUID+"</uuid>", "", 1), "domain UUID"},
		{"not XML", "<domain", "unreadable"},
		{"too big", x + strings.Repeat(" ", MaxPeerDefinition), "more than"},
	} {
		name := "instance-0000002a"
		if c.name == "another name" {
			name = "instance-0000002b"
		}
		_, err := CheckPeerDefinition([]byte(c.xml), name, novaPolicy)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want a refusal saying %q", c.name, err, c.want)
		}
	}
}

// Whatever a peer sends, the check does not panic, and a definition it
// takes is taken again unchanged.
func FuzzPeerDefinition(f *testing.F) {
	f.Add([]byte(readTestdata(f, "nova-domain.xml")))
	f.Add([]byte(readTestdata(f, "libvirt9-live.xml")))
	f.Add([]byte("<domain type='kvm'><name>instance-0000002a</name></domain>"))
	f.Fuzz(func(t *testing.T, x []byte) {
		out, err := CheckPeerDefinition(x, "instance-0000002a", novaPolicy)
		if err != nil {
			return
		}
		again, err := CheckPeerDefinition(out, "instance-0000002a", novaPolicy)
		if err != nil || string(again) != string(out) {
			t.Fatalf("taken, then: %v\n%s\n%s", err, out, again)
		}
	})
}
