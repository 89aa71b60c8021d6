package libvirt

import (
	"fmt"
	"reflect"
	"slices"
	"strings"

	"libvirt.org/go/libvirtxml"

	"github.com/axproject/ax/ax/names"
)

// A failover resumes a replica as the partner's own definition of its
// domain (Nova defines a server's domain only on the host it records).
// With axd --define-replicas a partner that has no definition makes one
// from the primary's, sent with the replica's stream, once CheckPeerDefinition
// has read it as hostile: what comes out is only what AX knows and
// checked, rebuilt from libvirtxml's structures (an element libvirtxml does
// not know is not passed on), and everything else refuses it.

// MaxPeerDefinition bounds a peer's domain XML (it travels in the
// replica's stream spec, replication.MaxSpecSize; Nova's are under 10 KiB).
const MaxPeerDefinition = 48 << 10

// DefaultEmulators are the QEMU binaries a peer's definition may name.
var DefaultEmulators = []string{"/usr/bin/qemu-system-x86_64", "/usr/bin/kvm", "/usr/libexec/qemu-kvm"}

// PeerPolicy is what a partner accepts in a peer's definition.
type PeerPolicy struct {
	// Dirs bound every file the definition names (disks, kernel,
	// consoles, sockets; default: Options.Dirs).
	Dirs []string
	// Bridges are the bridges an interface may join (patterns as axd's
	// --bridge: a trailing '*' matches any suffix); empty: any (the bridge
	// must exist here all the same: BridgeReady).
	Bridges []string
	// Emulators are the QEMU binaries it may name (default
	// DefaultEmulators).
	Emulators []string
}

// domainFields are the elements of <domain> a peer's definition may
// have; seclabels are dropped (this host's own confinement applies).
var domainFields = []string{"XMLName", "Type", "Name", "UUID", "GenID", "Title", "Description", "Metadata",
	"MaximumMemory", "Memory", "CurrentMemory", "MemoryBacking", "VCPU", "VCPUs", "CPUTune", "SysInfo", "OS",
	"Features", "CPU", "Clock", "OnPoweroff", "OnReboot", "OnCrash", "PM", "Devices", "SecLabel", "Resource"}

// deviceFields are the device kinds it may have: none reaches the host's
// devices or runs a program.
var deviceFields = []string{"Emulator", "Disks", "Controllers", "Interfaces", "Serials", "Consoles", "Channels",
	"Inputs", "Graphics", "Audios", "Videos", "Watchdogs", "MemBalloon", "RNGs", "Panics", "VSock"}

// osFields are what <os> may hold: a direct kernel boot's files are
// checked like every other path.
var osFields = []string{"Type", "Kernel", "Initrd", "Cmdline", "BootDevices", "BootMenu", "SMBios", "BIOS"}

// CheckPeerDefinition reads xml, a peer's definition of domain name, and
// returns the definition this host may define: an error says what was
// refused.
func CheckPeerDefinition(xml []byte, name string, p PeerPolicy) ([]byte, error) {
	refuse := func(format string, a ...any) ([]byte, error) {
		return nil, fmt.Errorf("the primary's definition of %s is refused: %s", name, fmt.Sprintf(format, a...))
	}
	if len(xml) > MaxPeerDefinition {
		return refuse("%d bytes, more than %d", len(xml), MaxPeerDefinition)
	}
	var dom libvirtxml.Domain
	if err := unmarshal(xml, &dom); err != nil {
		return refuse("unreadable: %v", err)
	}
	if dom.Name != name {
		return refuse("it names domain %s", printable(dom.Name))
	}
	if dom.Type != "kvm" && dom.Type != "qemu" {
		return refuse("domain type %s: AX protects QEMU domains", printable(dom.Type))
	}
	if uuid(dom.UUID) == "" {
		return refuse("domain UUID %s", printable(dom.UUID))
	}
	dom.ID = nil // a running domain's XML: defined, it has none
	dom.SecLabel = nil
	if bad := notAllowed(&dom, domainFields); len(bad) > 0 {
		return refuse("it has %s, which a partner does not take from a peer", strings.Join(bad, ", "))
	}
	for _, si := range dom.SysInfo {
		if si.SMBIOS == nil || si.FWCfg != nil {
			return refuse("<sysinfo> other than SMBIOS (fw_cfg entries may read this host's files)")
		}
	}
	if r := dom.Resource; r != nil && (r.Partition != "/machine" || r.FibreChannel != nil) {
		return refuse("<resource> other than the partition /machine")
	}
	if mb := dom.MemoryBacking; mb != nil && (mb.MemorySource == nil || mb.MemorySource.Type != "file") {
		return refuse("memory backing other than <source type='file'/>: AX reads the guest's RAM from its file")
	}
	dirs := p.Dirs
	if len(dirs) == 0 {
		dirs = DefaultDirs
	}
	path := func(kind, v string) error {
		if v == "" {
			return nil
		}
		return names.CheckPath(kind, v, dirs...)
	}
	if os := dom.OS; os != nil {
		if bad := notAllowed(os, osFields); len(bad) > 0 {
			return refuse("<os> has %s", strings.Join(bad, ", "))
		}
		for _, f := range []struct{ kind, v string }{{"kernel", os.Kernel}, {"initrd", os.Initrd}} {
			if err := path(f.kind, f.v); err != nil {
				return refuse("%v", err)
			}
		}
	}
	devs := dom.Devices
	if devs == nil {
		return refuse("no devices")
	}
	if bad := notAllowed(devs, deviceFields); len(bad) > 0 {
		return refuse("it has %s, which a partner does not take from a peer", strings.Join(bad, ", "))
	}
	emulators := p.Emulators
	if len(emulators) == 0 {
		emulators = DefaultEmulators
	}
	if devs.Emulator != "" && !slices.Contains(emulators, devs.Emulator) {
		return refuse("emulator %s is not one of %s", printable(devs.Emulator), strings.Join(emulators, ", "))
	}
	for i := range devs.Disks {
		if err := checkPeerDisk(&devs.Disks[i], path); err != nil {
			return refuse("disk %d: %v", i, err)
		}
	}
	for i := range devs.Interfaces {
		if err := checkPeerInterface(&devs.Interfaces[i], p.Bridges); err != nil {
			return refuse("interface %d: %v", i, err)
		}
	}
	type chardev struct {
		kind string
		src  *libvirtxml.DomainChardevSource
		log  *libvirtxml.DomainChardevLog
	}
	var chardevs []chardev
	for _, s := range devs.Serials {
		chardevs = append(chardevs, chardev{"serial", s.Source, s.Log})
	}
	for i := range devs.Consoles {
		c := &devs.Consoles[i]
		c.TTY = "" // the running domain's pty
		chardevs = append(chardevs, chardev{"console", c.Source, c.Log})
	}
	for _, c := range devs.Channels {
		if c.Target != nil && c.Target.VirtIO == nil {
			return refuse("a channel other than virtio")
		}
		chardevs = append(chardevs, chardev{"channel", c.Source, c.Log})
	}
	for _, c := range chardevs {
		if err := checkPeerChardev(c.src, path); err != nil {
			return refuse("%s: %v", c.kind, err)
		}
		if c.log != nil {
			if err := path(c.kind+" log", c.log.File); err != nil {
				return refuse("%v", err)
			}
		}
	}
	for _, g := range devs.Graphics {
		if g.VNC == nil && g.Spice == nil {
			return refuse("graphics other than VNC or SPICE")
		}
		if g.VNC != nil {
			if err := checkListeners(g.VNC.Socket, g.VNC.Listeners, path); err != nil {
				return refuse("VNC: %v", err)
			}
		}
		if g.Spice != nil {
			if g.Spice.GL != nil {
				return refuse("SPICE with OpenGL (this host's render node)")
			}
			if err := checkListeners("", g.Spice.Listeners, path); err != nil {
				return refuse("SPICE: %v", err)
			}
		}
	}
	for _, in := range devs.Inputs {
		if in.Source != nil && (in.Source.Passthrough != nil || in.Source.EVDev != nil) || in.Type == "passthrough" || in.Type == "evdev" {
			return refuse("an input passed through from this host")
		}
	}
	for _, v := range devs.Videos {
		if v.Model.Accel != nil && v.Model.Accel.RenderNode != "" {
			return refuse("a video device on this host's render node")
		}
	}
	for _, a := range devs.Audios {
		if a.None == nil {
			return refuse("audio other than type none")
		}
	}
	for _, r := range devs.RNGs {
		if r.Backend == nil || r.Backend.Random == nil || (r.Backend.Random.Device != "/dev/urandom" && r.Backend.Random.Device != "/dev/random") {
			return refuse("a random number generator other than /dev/urandom or /dev/random")
		}
	}
	out, err := dom.Marshal()
	if err != nil {
		return refuse("%v", err)
	}
	// What is defined must read back as what was checked.
	var again libvirtxml.Domain
	if err := unmarshal([]byte(out), &again); err != nil || !reflect.DeepEqual(again, dom) {
		return refuse("it does not read back as it was checked")
	}
	return []byte(out), nil
}

// notAllowed names the fields of the struct v points to that are set
// without being in allowed.
func notAllowed(v any, allowed []string) []string {
	rv := reflect.ValueOf(v).Elem()
	var bad []string
	for i := 0; i < rv.NumField(); i++ {
		f := rv.Type().Field(i)
		if !rv.Field(i).IsZero() && !slices.Contains(allowed, f.Name) {
			bad = append(bad, "<"+xmlName(f)+">")
		}
	}
	return bad
}

// xmlName is the element a libvirtxml field stands for.
func xmlName(f reflect.StructField) string {
	tag, _, _ := strings.Cut(f.Tag.Get("xml"), ",")
	if tag == "" || tag == "-" {
		return f.Name
	}
	return tag
}

func checkPeerDisk(d *libvirtxml.DomainDisk, path func(kind, v string) error) error {
	if d.Auth != nil || d.Encryption != nil || d.Mirror != nil || d.BackendDomain != nil || d.RawIO != "" || d.SGIO != "" {
		return fmt.Errorf("authentication, encryption, a mirror, a backend domain or raw SCSI")
	}
	if d.Device == "lun" {
		return fmt.Errorf("a lun (SCSI passthrough)")
	}
	if err := checkDiskSource(d.Source, path); err != nil {
		return err
	}
	for b := d.BackingStore; b != nil; b = b.BackingStore {
		if err := checkDiskSource(b.Source, path); err != nil {
			return fmt.Errorf("backing store: %w", err)
		}
	}
	return nil
}

func checkDiskSource(s *libvirtxml.DomainDiskSource, path func(kind, v string) error) error {
	if s == nil {
		return nil // an empty cdrom, or the end of a backing chain
	}
	if s.Network != nil || s.Volume != nil || s.NVME != nil || s.VHostUser != nil || s.VHostVDPA != nil || s.Dir != nil ||
		s.Ctl != nil || s.Encryption != nil || s.Reservations != nil || s.SSL != nil || s.Cookies != nil || s.DataStore != nil {
		return fmt.Errorf("a source other than a file or a block device")
	}
	if s.File != nil {
		if s.File.FDGroup != "" {
			return fmt.Errorf("a file descriptor group")
		}
		s.File.SecLabel = nil
		return path("disk", s.File.File)
	}
	if s.Block != nil {
		s.Block.SecLabel = nil
		if s.Block.Dev == "" {
			return fmt.Errorf("a block device without a path")
		}
		return path("disk", s.Block.Dev)
	}
	return nil
}

func checkPeerInterface(i *libvirtxml.DomainInterface, bridges []string) error {
	if i.Script != nil || i.DownScript != nil || i.Backend != nil || i.BackendDomain != nil || i.VirtualPort != nil ||
		i.FilterRef != nil || i.PortOptions != nil || i.ROM != nil || i.Teaming != nil || len(i.PortForward) > 0 ||
		len(i.IP) > 0 || len(i.Route) > 0 {
		return fmt.Errorf("a script, backend, virtual port, filter, ROM, teaming, port forward, or host-side addresses or routes")
	}
	src := i.Source
	switch {
	case src == nil:
		return fmt.Errorf("no source")
	case src.Bridge != nil:
		if !bridgeAllowed(src.Bridge.Bridge, bridges) {
			return fmt.Errorf("bridge %s is not one of this host's (axd --bridge)", printable(src.Bridge.Bridge))
		}
	case src.Ethernet != nil:
		// os-vif's tap, plugged into its bridge by this host's agents.
		if len(src.Ethernet.IP) > 0 || len(src.Ethernet.Route) > 0 {
			return fmt.Errorf("host-side addresses or routes")
		}
	default:
		return fmt.Errorf("a source other than a bridge or ethernet")
	}
	if i.Target != nil {
		if err := names.CheckInterface("tap", i.Target.Dev); err != nil {
			return err
		}
	}
	return nil
}

// bridgeAllowed says whether bridge matches one of patterns (a trailing
// '*' matches any suffix; no patterns: any).
func bridgeAllowed(bridge string, patterns []string) bool {
	if names.CheckInterface("bridge", bridge) != nil {
		return false
	}
	if len(patterns) == 0 {
		return true
	}
	for _, p := range patterns {
		if prefix, ok := strings.CutSuffix(p, "*"); ok && strings.HasPrefix(bridge, prefix) || p == bridge {
			return true
		}
	}
	return false
}

func checkPeerChardev(s *libvirtxml.DomainChardevSource, path func(kind, v string) error) error {
	switch {
	case s == nil:
		return nil
	case s.Pty != nil:
		s.Pty.SecLabel, s.Pty.Path = nil, "" // a pty is allocated at start
		return nil
	case s.File != nil:
		s.File.SecLabel = nil
		return path("chardev file", s.File.Path)
	case s.UNIX != nil:
		s.UNIX.SecLabel = nil
		if s.UNIX.Mode != "" && s.UNIX.Mode != "bind" {
			return fmt.Errorf("a unix socket QEMU connects to")
		}
		return path("chardev socket", s.UNIX.Path)
	case s.Null != nil:
		return nil
	}
	return fmt.Errorf("a source other than a pty, a file or a unix socket QEMU listens on")
}

func checkListeners(socket string, ls []libvirtxml.DomainGraphicListener, path func(kind, v string) error) error {
	if err := path("graphics socket", socket); err != nil {
		return err
	}
	for _, l := range ls {
		switch {
		case l.Address != nil:
		case l.Socket != nil:
			if err := path("graphics socket", l.Socket.Socket); err != nil {
				return err
			}
		default:
			return fmt.Errorf("a listener other than an address or a socket")
		}
	}
	return nil
}
