package api

// Guest is what AX needs to know of a running VM, whichever hypervisor
// runs it: its memory, console, agent, network and disks, and how this
// host's hypervisor driver reaches it and (re)starts it. The partner gets
// it in the VM's spec and decides its own paths and tap before it starts a
// replica.
type Guest struct {
	// Name is the hypervisor's name for the VM (QEMU's -name); it may
	// differ from the spec's.
	Name   string `json:"name"`
	RAMMiB int    `json:"ram_mib"`
	// VCPUs is how many vCPUs the guest runs with (0: one); its partner
	// promises to run it with as many.
	VCPUs int `json:"vcpus,omitempty"`
	// RAMFile is the guest's memory as a shared named file (on tmpfs):
	// FT reads dirty pages from it and a replica resumes over its copy.
	RAMFile string `json:"ram_file"`
	Console string `json:"console"` // serial console log
	Agent   string `json:"agent"`   // the in-guest agent's virtio-serial port, a unix socket
	Tap     string `json:"tap"`     // the VM's network interface on this host; AX holds its output
	MAC     string `json:"mac"`

	// Embedded, so their fields sit in "guest" itself, where specs have
	// always had them.
	Boot
	QEMU

	// VsockCID, when set, is the context ID of the guest's vsock device
	// (the agent's preferred transport).
	VsockCID uint32 `json:"vsock_cid,omitempty"`
	// Disks are the guest's virtio-blk disks, in order (vda, vdb, …).
	Disks []Disk `json:"disks,omitempty"`
}

// Boot is a direct kernel boot: the kernel and initrd the hypervisor loads
// and the command line it gives them. The partner boots the same ones, so
// they must be in one of its image directories (axd --image-dir).
type Boot struct {
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd"`
	Append string `json:"append"` // kernel command line
}

// QEMU is how the QMP driver (ax/hv.QMP) reaches and starts a VM: another
// driver ignores these fields. A partner replaces the socket and PID file
// with its own before it starts a replica.
type QEMU struct {
	QMP     string `json:"qmp"` // the QMP unix socket
	PIDFile string `json:"pid_file"`
	Accel   string `json:"accel"` // "kvm" or "tcg"
}

// Disk is one guest disk: an image file opened as a block node the guest's
// virtio-blk device uses. AX mirrors the node to the partner, which keeps a
// raw replica of what the guest sees.
type Disk struct {
	// Node is the block node's name; the device refers to it, and it is
	// the same on the partner so device state loads there.
	Node   string `json:"node"`
	Path   string `json:"path"`
	Format string `json:"format"` // raw or qcow2
	// Plain attaches the device straight to the format node, as libvirt
	// does, instead of through a quorum node: replication then keeps the
	// write-blocking mirror, where every guest write waits for the partner.
	Plain bool `json:"plain,omitempty"`
}
