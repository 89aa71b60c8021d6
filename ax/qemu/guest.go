package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/axproject/ax/ax/api"
)

// Binary is the emulator AX starts for replicas.
const Binary = "qemu-system-x86_64"

// AgentPortName is the virtio-serial port the in-guest agent opens.
const AgentPortName = "org.axproject.agent.0"

// Guest is the QEMU launcher's input: everything needed to start a VM's
// QEMU — and, on the partner host, an identical one that resumes from a
// replica. axd keeps the hypervisor-neutral api.Guest and makes this one
// with GuestFor when the QMP driver starts a VM.
type Guest struct {
	Name     string
	RAMMiB   int
	VCPUs    int    // 0: one
	RAMFile  string // shared named file on tmpfs (memory-backend-file, share=on)
	QMP      string // QMP unix socket
	Console  string // serial console log
	Agent    string // virtio-serial agent unix socket
	PIDFile  string
	Tap      string
	MAC      string
	Kernel   string
	Initrd   string
	Append   string // kernel command line
	Accel    string // "kvm" or "tcg"
	VsockCID uint32 // a vhost-vsock device with this context ID, when set (hosts without /dev/vhost-vsock leave it 0)
	Disks    []Disk // virtio-blk disks, in order (vda, vdb, …)
	// Incoming starts QEMU waiting for device state (-incoming defer), to
	// resume a replica whose RAM file already holds the guest's memory.
	Incoming bool
}

// Disk is one guest disk as the spec gives it; QEMU opens it with
// blockdevArgs.
type Disk = api.Disk

// GuestFor is the QEMU that runs g, booting (set Incoming to resume a
// replica instead).
func GuestFor(g api.Guest) Guest {
	return Guest{
		Name: g.Name, RAMMiB: g.RAMMiB, VCPUs: g.VCPUs, RAMFile: g.RAMFile, QMP: g.QMP,
		Console: g.Console, Agent: g.Agent, PIDFile: g.PIDFile, Tap: g.Tap, MAC: g.MAC,
		Kernel: g.Kernel, Initrd: g.Initrd, Append: g.Append, Accel: g.Accel,
		VsockCID: g.VsockCID, Disks: append([]Disk(nil), g.Disks...),
	}
}

// blockdevArgs are the disk's block nodes. The device sits on a quorum node
// of one child, the disk itself: reads go to it alone (fifo), and
// replication adds its NBD target as a second child while the guest runs
// (AddQuorumChild). A Plain disk has no quorum node.
func blockdevArgs(d Disk) []string {
	format := d.Format
	if format == "" {
		format = "raw"
	}
	file := fmt.Sprintf("driver=file,node-name=%s-file,filename=%s", d.Node, d.Path)
	if d.Plain {
		return []string{"-blockdev", file,
			"-blockdev", fmt.Sprintf("driver=%s,node-name=%s,file=%s-file", format, d.Node, d.Node)}
	}
	return []string{
		"-blockdev", file,
		"-blockdev", fmt.Sprintf("driver=%s,node-name=%s-fmt,file=%s-file", format, d.Node, d.Node),
		"-blockdev", fmt.Sprintf("driver=quorum,node-name=%s,vote-threshold=1,read-pattern=fifo,children.0=%s-fmt", d.Node, d.Node),
	}
}

// Args returns QEMU's command line for the spec. Both hosts must use the same
// machine and devices: the device state of one must load into the other.
func (g Guest) Args() []string {
	machine := "pc,accel=" + g.Accel + ",memory-backend=mem0"
	if g.Incoming {
		machine += ",suppress-vmdesc=on"
	}
	args := []string{
		"-name", g.Name + ",debug-threads=on",
		"-machine", machine,
		"-object", fmt.Sprintf("memory-backend-file,id=mem0,size=%dM,mem-path=%s,share=on", g.RAMMiB, g.RAMFile),
		"-m", fmt.Sprintf("%dM", g.RAMMiB),
		"-smp", strconv.Itoa(max(g.VCPUs, 1)),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", g.Kernel, "-initrd", g.Initrd, "-append", g.Append,
		"-chardev", "file,id=con0,path=" + g.Console, "-serial", "chardev:con0",
		"-qmp", "unix:" + g.QMP + ",server=on,wait=off",
		"-netdev", "tap,id=net0,ifname=" + g.Tap + ",script=no,downscript=no",
		// csum=off: the guest sends no checksum-offloaded or segmentation
		// super-frames, which the output gate could not re-inject.
		"-device", "virtio-net-pci,netdev=net0,romfile=,csum=off,mac=" + g.MAC,
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=agent0,path=" + g.Agent + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent0,name=" + AgentPortName,
		"-pidfile", g.PIDFile,
	}
	for i, d := range g.Disks {
		args = append(args, blockdevArgs(d)...)
		args = append(args, "-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=vd%d", d.Node, i))
	}
	if g.Accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	if g.VsockCID > 2 {
		args = append(args, "-device", fmt.Sprintf("vhost-vsock-pci,guest-cid=%d", g.VsockCID))
	}
	if g.Incoming {
		args = append(args, "-incoming", "defer", "-global", "migration.send-configuration=off")
	}
	return args
}

// HardwareVirt returns the CPU flag ("vmx" or "svm") in /proc/cpuinfo's
// text that lets KVM run guests, or "" without one: a /dev/kvm node alone
// is not enough, nested setups expose one whose guests never start.
func HardwareVirt(cpuinfo []byte) string {
	for _, line := range strings.Split(string(cpuinfo), "\n") {
		if !strings.HasPrefix(line, "flags") {
			continue
		}
		_, flags, _ := strings.Cut(line, ":")
		for _, f := range strings.Fields(flags) {
			if f == "vmx" || f == "svm" {
				return f
			}
		}
		return ""
	}
	return ""
}
