package libvirt

import (
	"errors"
	"fmt"
	"net"
	"strconv"

	"libvirt.org/go/libvirtxml"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/qemu"
)

// DefaultMemoryBackingDir is where libvirt puts the RAM file of a domain
// with <source type='file'/> when qemu.conf sets no memory_backing_dir.
// One that sets it, DIR, makes it DIR/libvirt/qemu (libvirt 9.0's
// virQEMUDriverConfigLoadMemoryEntry appends that).
const DefaultMemoryBackingDir = "/var/lib/libvirt/qemu/ram"

// DefaultDirs are the directories a domain's disks, console and agent
// socket may lie in when Options.Dirs is empty: libvirt's and Nova's.
var DefaultDirs = []string{"/var/lib/libvirt", "/var/lib/nova/instances", "/var/log/libvirt", "/run/libvirt"}

// Options says where this host keeps what a domain XML names.
type Options struct {
	// MemoryBackingDir is where libvirt puts domains' RAM files (default
	// DefaultMemoryBackingDir; qemu.conf's memory_backing_dir DIR makes
	// it DIR/libvirt/qemu).
	MemoryBackingDir string
	// Dirs bound every path AX takes from the XML (disks, console, agent
	// socket); empty means DefaultDirs.
	Dirs []string
}

func (o *Options) memoryBackingDir() string {
	if o == nil || o.MemoryBackingDir == "" {
		return DefaultMemoryBackingDir
	}
	return o.MemoryBackingDir
}

func (o *Options) dirs() []string {
	if o == nil || len(o.Dirs) == 0 {
		return DefaultDirs
	}
	return o.Dirs
}

// Discovered is what the XML of a running domain tells AX.
type Discovered struct {
	// Guest is the domain as AX protects it.
	Guest api.Guest
	// ID is libvirt's domain ID while it runs (part of its RAM file's path).
	ID int
	// PID is its QEMU's process ID, from libvirt's pid file; Driver.Discover
	// fills it in (0: unknown).
	PID int
	// Bridge is the bridge of an <interface type='bridge'>; for a tap
	// plugged by someone else ('ethernet', Nova's os-vif), Driver.Discover
	// asks this host which bridge the tap is in.
	Bridge string
	// UUID is the domain's UUID (Nova's instance UUID).
	UUID  string
	VCPUs int
	// Machine is the QEMU machine type the replica must use too.
	Machine string
	// Nova is Nova's metadata of the instance, nil for a domain Nova did
	// not create.
	Nova *NovaInstance
	// Level is the protection asked for in AX's own metadata element
	// (<ax:level>), "" without one; Peer the partner host it names.
	Level, Peer string
	// Skipped says which devices AX leaves alone (cdroms) and why.
	Skipped []string
	// Warnings are what does not stop protection but weakens it.
	Warnings []string
}

// Refusal is why a domain cannot be protected, and the change to its XML
// that makes it protectable.
type Refusal struct {
	Domain string
	// What the refusal is about: "xml", "name", "state", "memory",
	// "numa", "disk", "network", "agent", "console" or "metadata".
	What   string
	Reason string
	// Fix is the domain XML (or Nova setting) to change.
	Fix string
}

func (r *Refusal) Error() string {
	s := fmt.Sprintf("domain %s cannot be protected: %s", r.Domain, r.Reason)
	if r.Fix != "" {
		s += "; " + r.Fix
	}
	return s
}

// sharedFileMemory is the <memoryBacking> AX needs.
const sharedFileMemory = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"

const memoryFix = "give the domain " + sharedFileMemory +
	" (Nova: [libvirt] file_backed_memory = MiB in nova.conf and memory_backing_dir in qemu.conf): AX reads guest RAM from that file"

// Maximums that bound what a domain XML can make AX hold.
const (
	maxRAMMiB = 4 << 20 // 4 TiB
	maxDisks  = 32
	maxVCPUs  = 4096
)

// shortNameMax is libvirt's VIR_DOMAIN_SHORT_NAME_MAX: the domain's
// directories (its RAM's among them) are named <id>-<first 20 bytes of
// the name>.
const shortNameMax = 20

// Discover reads the XML of a running domain (virsh dumpxml, not
// --inactive) and returns the guest AX protects, or a *Refusal saying
// what to change.
func Discover(xml []byte, opts *Options) (api.Guest, error) {
	d, err := Inspect(xml, opts)
	if err != nil {
		return api.Guest{}, err
	}
	return d.Guest, nil
}

// Inspect is Discover with everything else the XML tells: Nova's and AX's
// metadata, vCPUs, the machine type, skipped devices and warnings.
func Inspect(xml []byte, opts *Options) (*Discovered, error) {
	var dom libvirtxml.Domain
	if err := unmarshal(xml, &dom); err != nil {
		return nil, &Refusal{Domain: "?", What: "xml", Reason: fmt.Sprintf("unreadable domain XML: %v", err)}
	}
	name := dom.Name
	refuse := func(what, reason, fix string) error {
		return &Refusal{Domain: printable(name), What: what, Reason: reason, Fix: fix}
	}
	if err := names.Check("vm", name); err != nil {
		return nil, refuse("name", err.Error(), "rename the domain (virsh domrename) to letters, digits, '.', '_' and '-'")
	}
	if dom.Type != "kvm" && dom.Type != "qemu" {
		return nil, refuse("xml", fmt.Sprintf("domain type %q", dom.Type), "AX protects QEMU domains (<domain type='kvm'> or 'qemu')")
	}
	if dom.ID == nil || *dom.ID < 1 {
		return nil, refuse("state", "the XML is not a running domain's (no id)", "start the domain and read its live XML (virsh dumpxml, not --inactive)")
	}
	if uuid(dom.UUID) == "" {
		return nil, refuse("xml", fmt.Sprintf("domain UUID %q", text(dom.UUID)), "")
	}
	d := &Discovered{ID: *dom.ID, UUID: dom.UUID, Guest: api.Guest{Name: name}}
	if dom.OS != nil && dom.OS.Type != nil {
		d.Machine = dom.OS.Type.Machine
	}
	if err := d.vcpus(&dom); err != nil {
		return nil, refuse("xml", err.Error(), "")
	}
	d.Guest.VCPUs = d.VCPUs
	mib, err := memoryMiB(dom.Memory)
	if err != nil {
		return nil, refuse("memory", err.Error(), "")
	}
	d.Guest.RAMMiB = mib
	if d.Guest.RAMFile, err = ramFile(&dom, opts.memoryBackingDir()); err != nil {
		return nil, err
	}
	if dom.Devices == nil {
		return nil, refuse("network", "no devices", "give the domain a virtio <interface type='bridge'> or 'ethernet' with a <target dev='TAP'/>")
	}
	dirs := opts.dirs()
	if r := d.disks(dom.Devices.Disks, dirs); r != nil {
		r.Domain = name
		return nil, r
	}
	if r := d.network(dom.Devices.Interfaces); r != nil {
		r.Domain = name
		return nil, r
	}
	if r := d.agent(dom.Devices, dirs); r != nil {
		r.Domain = name
		return nil, r
	}
	if r := d.console(dom.Devices, dirs); r != nil {
		r.Domain = name
		return nil, r
	}
	if dom.Metadata != nil {
		if r := d.metadata(dom.Metadata.XML); r != nil {
			r.Domain = name
			return nil, r
		}
	}
	return d, nil
}

// ramFile is where libvirt keeps the RAM of the running domain dom, the
// file of its one memory backend, named after the backend in a directory
// of the domain's own: qemuGetMemoryBackingPath in libvirt's qemu_conf.c,
// and the mem-path seen on libvirt 9.0's QEMU command line.
func ramFile(dom *libvirtxml.Domain, memDir string) (string, error) {
	backend, r := memoryBackend(dom)
	if r != nil {
		r.Domain = printable(dom.Name)
		return "", r
	}
	refuse := func(err error) error {
		return &Refusal{Domain: printable(dom.Name), What: "memory", Reason: err.Error()}
	}
	if err := names.Check("vm", dom.Name); err != nil {
		return "", refuse(err)
	}
	if dom.ID == nil || *dom.ID < 1 {
		return "", refuse(errors.New("the domain is not running"))
	}
	short := strconv.Itoa(*dom.ID) + "-" + dom.Name[:min(len(dom.Name), shortNameMax)]
	dir, err := names.Join(memDir, "domain", short)
	if err != nil {
		return "", refuse(err)
	}
	p, err := names.Join(dir, "memory backend", backend)
	if err != nil {
		return "", refuse(err)
	}
	return p, nil
}

// unmarshal parses a domain XML. libvirtxml is a large hand-written
// decoder fed with bytes from the host's libvirtd (or a test): a panic in
// it is a refusal of that XML, not the end of axd.
func unmarshal(xml []byte, dom *libvirtxml.Domain) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("the XML decoder failed on it: %v", p)
		}
	}()
	return dom.Unmarshal(string(xml))
}

// printable is s for an error message, quoted if it is not a plain name.
func printable(s string) string {
	if names.Check("vm", s) == nil {
		return s
	}
	return strconv.Quote(s)
}

func (d *Discovered) vcpus(dom *libvirtxml.Domain) error {
	if dom.VCPU == nil || dom.VCPU.Value < 1 || dom.VCPU.Value > maxVCPUs {
		return errors.New("no <vcpu> count of 1..4096")
	}
	d.VCPUs = int(dom.VCPU.Value)
	if c := dom.VCPU.Current; c > 0 && c < dom.VCPU.Value {
		d.VCPUs = int(c)
	}
	return nil
}

// memoryMiB is the domain's <memory> in MiB.
func memoryMiB(m *libvirtxml.DomainMemory) (int, error) {
	if m == nil {
		return 0, errors.New("no <memory>")
	}
	scale, ok := units[m.Unit]
	if !ok {
		return 0, fmt.Errorf("<memory> unit %q", m.Unit)
	}
	const mib = 1 << 20
	v := uint64(m.Value)
	if v > maxRAMMiB*mib/scale {
		return 0, fmt.Errorf("<memory> of %d %s, AX protects at most %d MiB", m.Value, m.Unit, maxRAMMiB)
	}
	b := v * scale
	if b == 0 || b%mib != 0 {
		return 0, fmt.Errorf("<memory> of %d bytes is not a whole number of MiB", b)
	}
	return int(b / mib), nil
}

// units are libvirt's memory units (virScaleInteger): "" is KiB.
var units = map[string]uint64{
	"": 1 << 10, "b": 1, "bytes": 1,
	"KB": 1e3, "k": 1 << 10, "KiB": 1 << 10,
	"MB": 1e6, "M": 1 << 20, "MiB": 1 << 20,
	"GB": 1e9, "G": 1 << 30, "GiB": 1 << 30,
	"TB": 1e12, "T": 1 << 40, "TiB": 1 << 40,
}

// memoryBackend returns the id of the one memory backend holding the
// guest's RAM, which libvirt also uses as its file's name: the machine's
// default RAM id ("pc.ram" on x86) without NUMA cells, "ram-node0" with
// one cell.
func memoryBackend(dom *libvirtxml.Domain) (string, *Refusal) {
	mb := dom.MemoryBacking
	if mb == nil || mb.MemorySource == nil {
		return "", &Refusal{What: "memory", Reason: "its RAM is anonymous memory, not a file", Fix: memoryFix}
	}
	if mb.MemoryHugePages != nil {
		return "", &Refusal{What: "memory", Reason: "its RAM is on hugepages (hugetlbfs), not a shared file AX can read",
			Fix: "remove <hugepages/> from <memoryBacking> (Nova: unset hw:mem_page_size) and use " + sharedFileMemory}
	}
	if t := mb.MemorySource.Type; t != "file" {
		return "", &Refusal{What: "memory", Reason: fmt.Sprintf("its RAM is <source type='%s'/>, not a file", t), Fix: memoryFix}
	}
	shared := mb.MemoryAccess != nil && mb.MemoryAccess.Mode == "shared"
	if dom.Devices != nil {
		for _, m := range dom.Devices.Memorydevs {
			return "", &Refusal{What: "numa", Reason: fmt.Sprintf("it has a <memory model='%s'> device, a second memory backend", m.Model),
				Fix: "remove the memory devices: AX protects a guest whose RAM is one backend"}
		}
	}
	var cells []libvirtxml.DomainCell
	if dom.CPU != nil && dom.CPU.Numa != nil {
		cells = dom.CPU.Numa.Cell
	}
	switch len(cells) {
	case 0:
		if !shared {
			return "", &Refusal{What: "memory", Reason: "its RAM file is private to QEMU (no <access mode='shared'/>): the guest's writes never reach the file", Fix: memoryFix}
		}
		if dom.OS == nil || dom.OS.Type == nil || dom.OS.Type.Arch != "" && dom.OS.Type.Arch != "x86_64" && dom.OS.Type.Arch != "i686" {
			return "", &Refusal{What: "xml", Reason: "not an x86 guest", Fix: "AX protects x86 guests (<os><type arch='x86_64'>)"}
		}
		// QEMU's default-ram-id of every x86 machine (pc-*, q35).
		return "pc.ram", nil
	case 1:
		switch cells[0].MemAccess {
		case "shared":
		case "":
			if !shared {
				return "", &Refusal{What: "memory", Reason: "its RAM file is private to QEMU (no <access mode='shared'/>)", Fix: memoryFix}
			}
		default:
			return "", &Refusal{What: "memory", Reason: fmt.Sprintf("its NUMA cell has memAccess='%s'", cells[0].MemAccess),
				Fix: "set <cell memAccess='shared'> or drop memAccess and use " + sharedFileMemory}
		}
		// libvirt names a cell's backend by its index, not its id.
		return "ram-node0", nil
	default:
		return "", &Refusal{What: "numa", Reason: fmt.Sprintf("its RAM is %d NUMA cells, one memory backend each", len(cells)),
			Fix: "give the guest one NUMA cell or none (Nova: hw:numa_nodes=1): AX replicates one RAM file"}
	}
}

// disks takes the guest's writable file disks, skips cdroms and refuses
// what AX cannot replicate.
func (d *Discovered) disks(disks []libvirtxml.DomainDisk, dirs []string) *Refusal {
	for i, dk := range disks {
		target := fmt.Sprintf("#%d", i)
		if dk.Target != nil && names.Check("disk", dk.Target.Dev) == nil {
			target = dk.Target.Dev
		}
		switch dk.Device {
		case "cdrom":
			d.Skipped = append(d.Skipped, fmt.Sprintf("cdrom %s: read-only, not replicated (the partner needs the same image at the same path)", target))
			continue
		case "", "disk":
		default:
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s is a %s", target, printable(dk.Device)),
				Fix: "AX replicates <disk device='disk'> (and skips cdroms): detach it"}
		}
		src := dk.Source
		if src == nil || src.File == nil {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s is not a file (%s)", target, diskKind(src)),
				Fix: "AX replicates <disk type='file'> images only: move it to a local raw or qcow2 file (Nova: images_type=raw or qcow2, not rbd or lvm; no Cinder volumes)"}
		}
		if dk.Shareable != nil {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s is <shareable/>: another guest writes it too", target),
				Fix: "detach the shared disk (Nova: a multiattach volume)"}
		}
		format := ""
		if dk.Driver != nil {
			format = dk.Driver.Type
		}
		if format != "raw" && format != "qcow2" {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s has format %s", target, printable(format)),
				Fix: "AX replicates raw and qcow2 images: <driver name='qemu' type='raw'/> or 'qcow2'"}
		}
		if dk.Target == nil || dk.Target.Bus != "virtio" {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s is not on the virtio bus", target),
				Fix: "use <target dev='vdX' bus='virtio'/> (Nova: hw_disk_bus=virtio)"}
		}
		if src.Index == 0 {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s has no <source index=…>: libvirt did not open it as -blockdev nodes, so AX cannot name its node", target),
				Fix: "run libvirt ≥ 6.0 with QEMU ≥ 4.2 and read the live XML of the running domain"}
		}
		node := fmt.Sprintf("libvirt-%d-format", src.Index)
		if err := names.CheckNode(node); err != nil {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s: %v", target, err)}
		}
		path := src.File.File
		if err := names.CheckPath("disk", path, dirs...); err != nil {
			return &Refusal{What: "disk", Reason: fmt.Sprintf("disk %s: %v", target, err),
				Fix: "keep images in a directory axd allows (--libvirt-dir)"}
		}
		for _, o := range d.Guest.Disks {
			if o.Node == node {
				return &Refusal{What: "disk", Reason: fmt.Sprintf("two disks with <source index='%d'>", src.Index)}
			}
		}
		d.Guest.Disks = append(d.Guest.Disks, api.Disk{Node: node, Path: path, Format: format, Plain: true})
	}
	if len(d.Guest.Disks) > maxDisks {
		return &Refusal{What: "disk", Reason: fmt.Sprintf("%d disks, AX protects at most %d", len(d.Guest.Disks), maxDisks)}
	}
	return nil
}

// diskKind names a disk source that is not a file, for a refusal.
func diskKind(src *libvirtxml.DomainDiskSource) string {
	switch {
	case src == nil:
		return "no source"
	case src.Block != nil:
		return "a block device"
	case src.Network != nil:
		if p := src.Network.Protocol; names.Check("protocol", p) == nil {
			return "a network disk, protocol " + p
		}
		return "a network disk"
	case src.Volume != nil:
		return "a storage pool volume"
	case src.NVME != nil:
		return "an NVMe device"
	case src.VHostUser != nil:
		return "vhost-user"
	case src.Dir != nil:
		return "a directory"
	}
	return "no file source"
}

// network takes the guest's one tap. AX holds the guest's output on it,
// so a guest with none, or with a NIC that is not a tap, is refused.
func (d *Discovered) network(ifaces []libvirtxml.DomainInterface) *Refusal {
	const fix = "AX protects a guest with exactly one virtio NIC on a tap: <interface type='bridge'> (or 'ethernet') with <target dev='TAP'/> and <model type='virtio'/>"
	for i, ifc := range ifaces {
		kind := interfaceType(ifc.Source)
		switch kind {
		case "bridge", "ethernet", "network":
		default:
			return &Refusal{What: "network", Reason: fmt.Sprintf("interface #%d is <interface type='%s'>, not a tap AX can hold output on", i, kind), Fix: fix}
		}
		if ifc.Target == nil || ifc.Target.Dev == "" {
			return &Refusal{What: "network", Reason: fmt.Sprintf("interface #%d has no <target dev=…/> (is this the live XML?)", i), Fix: fix}
		}
		tap := ifc.Target.Dev
		if err := names.CheckInterface("tap", tap); err != nil {
			return &Refusal{What: "network", Reason: err.Error(), Fix: fix}
		}
		if ifc.Model == nil || ifc.Model.Type != "virtio" {
			return &Refusal{What: "network", Reason: fmt.Sprintf("interface %s is not virtio", tap), Fix: "use <model type='virtio'/> (Nova: hw_vif_model=virtio)"}
		}
		if ifc.MAC == nil {
			return &Refusal{What: "network", Reason: fmt.Sprintf("interface %s has no <mac address=…/>", tap), Fix: fix}
		}
		hw, err := net.ParseMAC(ifc.MAC.Address)
		if err != nil || len(hw) != 6 || hw[0]&1 != 0 {
			return &Refusal{What: "network", Reason: fmt.Sprintf("interface %s has MAC %q, not a unicast Ethernet address", tap, ifc.MAC.Address), Fix: fix}
		}
		if d.Guest.Tap != "" {
			return &Refusal{What: "network", Reason: fmt.Sprintf("it has two NICs (%s, %s): AX holds the output of one", d.Guest.Tap, tap), Fix: fix}
		}
		d.Guest.Tap, d.Guest.MAC = tap, hw.String()
		if ifc.Source != nil && ifc.Source.Bridge != nil {
			d.Bridge = ifc.Source.Bridge.Bridge
		}
		if ifc.Driver == nil || ifc.Driver.Host == nil || ifc.Driver.Host.CSum != "off" {
			d.Warnings = append(d.Warnings, fmt.Sprintf("interface %s: the guest may send checksum-offloaded and segmented frames, which FT's output gate cannot release; add <driver><host csum='off'/></driver>", tap))
		}
	}
	if d.Guest.Tap == "" {
		return &Refusal{What: "network", Reason: "it has no tap", Fix: fix}
	}
	return nil
}

// interfaceType is the type attribute of an <interface>, which libvirtxml
// keeps as the one non-nil field of its source.
func interfaceType(s *libvirtxml.DomainInterfaceSource) string {
	switch {
	case s == nil:
		return "no source"
	case s.Bridge != nil:
		return "bridge"
	case s.Ethernet != nil:
		return "ethernet"
	case s.Network != nil:
		return "network"
	case s.Direct != nil:
		return "direct"
	case s.Hostdev != nil:
		return "hostdev"
	case s.VHostUser != nil:
		return "vhostuser"
	case s.User != nil:
		return "user"
	case s.VDPA != nil:
		return "vdpa"
	}
	return "other"
}

// agent finds the in-guest agent's transport: vsock, or the virtio-serial
// port named qemu.AgentPortName on a unix socket.
func (d *Discovered) agent(devs *libvirtxml.DomainDeviceList, dirs []string) *Refusal {
	if v := devs.VSock; v != nil && v.CID != nil && v.CID.Address != "" {
		cid, err := strconv.ParseUint(v.CID.Address, 10, 32)
		if err != nil || cid < 3 || cid == 1<<32-1 {
			return &Refusal{What: "agent", Reason: fmt.Sprintf("vsock CID %q is not a guest CID", v.CID.Address)}
		}
		d.Guest.VsockCID = uint32(cid)
	}
	for _, ch := range devs.Channels {
		if ch.Target == nil || ch.Target.VirtIO == nil || ch.Target.VirtIO.Name != qemu.AgentPortName {
			continue
		}
		if ch.Source == nil || ch.Source.UNIX == nil {
			return &Refusal{What: "agent", Reason: "the agent's channel is not a unix socket",
				Fix: "use <channel type='unix'><source mode='bind'/><target type='virtio' name='" + qemu.AgentPortName + "'/></channel>"}
		}
		if err := names.CheckPath("agent socket", ch.Source.UNIX.Path, dirs...); err != nil {
			return &Refusal{What: "agent", Reason: err.Error()}
		}
		d.Guest.Agent = ch.Source.UNIX.Path
	}
	return nil
}

// console finds the serial console's log: a <serial type='file'>, or the
// <log file=…> Nova gives its pty serial.
func (d *Discovered) console(devs *libvirtxml.DomainDeviceList, dirs []string) *Refusal {
	for _, s := range devs.Serials {
		path := ""
		switch {
		case s.Source != nil && s.Source.File != nil:
			path = s.Source.File.Path
		case s.Log != nil:
			path = s.Log.File
		default:
			continue
		}
		if err := names.CheckPath("console", path, dirs...); err != nil {
			return &Refusal{What: "console", Reason: err.Error()}
		}
		d.Guest.Console = path
		return nil
	}
	return nil
}
