package qemu

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// Binary is the emulator AX starts for replicas.
const Binary = "qemu-system-x86_64"

// AgentPortName is the virtio-serial port the in-guest agent opens.
const AgentPortName = "org.axproject.agent.0"

// Guest is everything needed to start a VM's QEMU — and, on the partner
// host, an identical one that resumes from a replica. Production hosts get it
// from libvirt's domain; the lab fills it in.
type Guest struct {
	Name    string `json:"name"`
	RAMMiB  int    `json:"ram_mib"`
	RAMFile string `json:"ram_file"` // shared named file on tmpfs (memory-backend-file, share=on)
	QMP     string `json:"qmp"`      // QMP unix socket
	Console string `json:"console"`  // serial console log
	Agent   string `json:"agent"`    // virtio-serial agent unix socket
	PIDFile string `json:"pid_file"`
	Tap     string `json:"tap"`
	MAC     string `json:"mac"`
	Kernel  string `json:"kernel"`
	Initrd  string `json:"initrd"`
	Append  string `json:"append"` // kernel command line
	Accel   string `json:"accel"`  // "kvm" or "tcg"
	// Incoming starts QEMU waiting for device state (-incoming defer), to
	// resume a replica whose RAM file already holds the guest's memory.
	Incoming bool `json:"incoming"`
	// VsockCID, when set, gives the guest a vhost-vsock device with this
	// context ID (the agent's preferred transport); hosts without
	// /dev/vhost-vsock use the virtio-serial port only.
	VsockCID uint32 `json:"vsock_cid,omitempty"`
	// Disks are the guest's virtio-blk disks, in order (vda, vdb, …).
	Disks []Disk `json:"disks,omitempty"`
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
	// does, instead of through a quorum node: replication then keeps QEMU's
	// write-blocking mirror, where every guest write waits for the partner.
	Plain bool `json:"plain,omitempty"`
}

// blockdevArgs are the disk's block nodes. The device sits on a quorum node
// of one child, the disk itself: reads go to it alone (fifo), and
// replication adds its NBD target as a second child while the guest runs
// (AddQuorumChild). A Plain disk has no quorum node.
func (d Disk) blockdevArgs() []string {
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
		"-smp", "1",
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
		args = append(args, d.blockdevArgs()...)
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

// Launch starts QEMU for g in its own session (it outlives the caller),
// its output to logPath, and returns its PID.
func Launch(g Guest, logPath string) (int, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return 0, fmt.Errorf("qemu log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(Binary, g.Args()...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", Binary, err)
	}
	pid := cmd.Process.Pid
	go cmd.Wait() // reap it if it ends while we run
	return pid, nil
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
