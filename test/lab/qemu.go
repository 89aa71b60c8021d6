package lab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
)

// QEMUBinary is the emulator the lab runs.
const QEMUBinary = qemu.Binary

// AgentPortName is the virtio-serial port the in-guest agent opens.
const AgentPortName = qemu.AgentPortName

// DetectAccel returns "kvm" when KVM can really run guests here, else "tcg".
// A /dev/kvm node alone is not enough: nested setups expose one whose guests
// never start, so the CPU must also advertise hardware virtualisation.
func DetectAccel() string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	f.Close()
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || qemu.HardwareVirt(cpuinfo) == "" {
		return "tcg"
	}
	return "kvm"
}

// GuestConfig chooses a lab guest's image and behaviour.
type GuestConfig struct {
	Name    string  // default "vm1"
	Host    string  // default HostA
	RAMMiB  int     // default 256
	Kernel  string  // from image.Build
	Initrd  string  // from image.Build
	Accel   string  // "", "auto", "kvm", "tcg"
	Dirty   float64 // memory dirtier rate, MiB/s (0: off)
	TickMS  int     // console tick interval, default 100
	Index   int     // guest number on the public segment, default 1
	Console string  // console log path; default in the VM's state directory
	// RAMFile, when set, is an existing RAM file to use (a replica).
	RAMFile string
	// Incoming starts QEMU with -incoming defer (see qemu.Guest.Incoming).
	Incoming bool
	// Cmdline is appended to the guest kernel's command line (e.g. ax.flood=1).
	Cmdline string
	// DiskMiB, when set, gives the guest a virtio-blk disk (/dev/vda) of
	// this size that its ledger keeps its records on (ax.disk).
	DiskMiB int
	// DiskFormat is the disk image's format: raw (default) or qcow2.
	DiskFormat string
	// DiskPlain attaches the disk without AX's quorum node (as libvirt
	// would): replication keeps the write-blocking mirror.
	DiskPlain bool
}

// StartGuest launches a guest's QEMU in its host's namespace with a tap on
// the host's public bridge. It returns once QEMU runs; WaitServing waits for
// the guest's ledger.
func (l *Lab) StartGuest(ctx context.Context, cfg GuestConfig) (*VM, error) {
	if err := checkPrereqs(true); err != nil {
		return nil, err
	}
	if err := l.loadState(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	if cfg.Kernel == "" || cfg.Initrd == "" {
		return nil, errors.New("start guest: no image (build one with the image package)")
	}
	for _, v := range l.state.VMs {
		if v.Name == cfg.Name && v.Host == cfg.Host {
			return nil, fmt.Errorf("start guest: lab %q already has a guest %s", l.Prefix, cfg.Name)
		}
	}
	dir := filepath.Join(l.StateDir, cfg.Name+"-"+cfg.Host)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(l.ShmDir, 0o755); err != nil {
		return nil, err
	}
	if !contains(l.state.Files, l.ShmDir) {
		if err := l.recordFile(l.ShmDir); err != nil {
			return nil, err
		}
	}
	ipAddr := cfg.guestIP()
	spec := api.Guest{
		Name:    cfg.Name,
		RAMMiB:  cfg.RAMMiB,
		RAMFile: filepath.Join(l.ShmDir, cfg.Name+"-"+cfg.Host+".ram"),
		Console: cfg.Console,
		Agent:   filepath.Join(dir, "agent.sock"),
		Tap:     fmt.Sprintf("tap-%s", cfg.Name),
		MAC:     fmt.Sprintf("52:54:00:a7:00:%02x", cfg.Index),
		Boot:    api.Boot{Kernel: cfg.Kernel, Initrd: cfg.Initrd},
		QEMU: api.QEMU{
			QMP:     filepath.Join(dir, "qmp.sock"),
			PIDFile: filepath.Join(dir, "qemu.pid"),
			Accel:   cfg.Accel,
		},
	}
	if cfg.RAMFile != "" {
		spec.RAMFile = cfg.RAMFile
	}
	if vhostVsock() {
		spec.VsockCID = l.vsockCID(cfg.Index)
	}
	if spec.Console == "" {
		spec.Console = filepath.Join(dir, "console.log")
	}
	spec.Append = cfg.kernelCmdline()
	if cfg.DiskMiB > 0 {
		d, err := l.makeDisk(ctx, cfg)
		if err != nil {
			return nil, err
		}
		spec.Disks = []api.Disk{d}
	}
	ns := l.Netns(cfg.Host)
	if err := l.addTap(ctx, cfg.Host, spec.Tap); err != nil {
		return nil, err
	}
	launch := qemu.GuestFor(spec)
	launch.Incoming = cfg.Incoming
	pid, err := l.startLogged(cfg.Host, "qemu "+cfg.Name+"@"+cfg.Host, filepath.Join(dir, "qemu.log"), QEMUBinary, launch.Args()...)
	if err != nil {
		return nil, err
	}
	vm := VM{
		Spec: spec,
		Name: cfg.Name, Host: cfg.Host, Netns: ns, PID: pid,
		QMP: spec.QMP, Console: spec.Console, Agent: spec.Agent, RAMFile: spec.RAMFile, RAMMiB: spec.RAMMiB,
		Tap: spec.Tap, MAC: spec.MAC, IP: ipAddr, Accel: spec.Accel,
	}
	l.state.VMs = append(l.state.VMs, vm)
	if err := l.state.save(); err != nil {
		return nil, err
	}
	return &vm, nil
}

// addTap makes a guest's tap on host h's public bridge.
func (l *Lab) addTap(ctx context.Context, h, tap string) error {
	ns := l.Netns(h)
	if err := ip(ctx, "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"); err != nil {
		return err
	}
	return ip(ctx, "-n", ns, "link", "set", tap, "master", PublicBridge, "up")
}

// setDefaults fills in what cfg leaves unset.
func (cfg *GuestConfig) setDefaults() {
	if cfg.Name == "" {
		cfg.Name = "vm1"
	}
	if cfg.Host == "" {
		cfg.Host = HostA
	}
	if cfg.RAMMiB == 0 {
		cfg.RAMMiB = 256
	}
	if cfg.TickMS == 0 {
		cfg.TickMS = 100
	}
	if cfg.Index == 0 {
		cfg.Index = 1
	}
	if cfg.Accel == "" || cfg.Accel == "auto" {
		cfg.Accel = DetectAccel()
	}
}

// guestIP is the guest's address on the public segment.
func (cfg GuestConfig) guestIP() string { return fmt.Sprintf("10.77.0.%d", 9+cfg.Index) }

// kernelCmdline is the command line the lab's guest image reads (see
// test/image's init): console, address, dirtier, tick, disk.
func (cfg GuestConfig) kernelCmdline() string {
	s := fmt.Sprintf("console=ttyS0 quiet panic=-1 ax.ip=%s/24 ax.dirty=%g ax.tick=%dms", cfg.guestIP(), cfg.Dirty, cfg.TickMS)
	if cfg.DiskMiB > 0 {
		s += " ax.disk=/dev/vda"
	}
	if cfg.Cmdline != "" {
		s += " " + cfg.Cmdline
	}
	return s
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// WaitServing waits until the guest's ledger answers PING from the client
// host, which proves boot, network and workload all work. On timeout or a
// dead QEMU it returns the last console lines.
func (l *Lab) WaitServing(ctx context.Context, vm *VM, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	for {
		if err := l.pingLedger(ctx, addr); err == nil {
			return nil
		}
		if isZombie(vm.PID) {
			return fmt.Errorf("guest %s: QEMU exited; %s", vm.Name, consoleTail(vm.Console, 10))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("guest %s not serving after %s; %s", vm.Name, timeout, consoleTail(vm.Console, 10))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (l *Lab) pingLedger(ctx context.Context, addr string) error {
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	conn, err := l.DialFrom(dctx, HostC, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("PING\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "PONG" {
		return fmt.Errorf("ledger answered %q", line)
	}
	return nil
}

// consoleTail returns the last n lines of a console log, for error messages.
func consoleTail(path string, n int) string { return "console " + fileTail(path, n) }

// fileTail returns the last n lines of a file (a console, a daemon's log),
// for error messages.
func fileTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return path + " ends:\n  " + strings.Join(lines, "\n  ")
}

// LastTick returns the highest AXTICK value on a console log (0 if none).
func LastTick(console string) (uint64, error) {
	data, err := os.ReadFile(console)
	if err != nil {
		return 0, err
	}
	var last uint64
	for _, line := range bytes.Split(data, []byte("\n")) {
		if v, ok := tickOf(line); ok && v > last {
			last = v
		}
	}
	return last, nil
}

// vhostVsock reports whether guests can have a vsock device here.
func vhostVsock() bool {
	f, err := os.OpenFile("/dev/vhost-vsock", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// vsockCID gives guest index a context ID unique to this lab: CIDs are
// global to the machine, and labs with other prefixes may run beside it.
func (l *Lab) vsockCID(index int) uint32 {
	h := uint32(2166136261)
	for _, c := range []byte(l.Prefix) {
		h = (h ^ uint32(c)) * 16777619
	}
	return 1000 + (h%100000)*16 + uint32(index)
}

// makeDisk creates a guest's empty disk image on the lab's tmpfs.
func (l *Lab) makeDisk(ctx context.Context, cfg GuestConfig) (api.Disk, error) {
	format := cfg.DiskFormat
	if format == "" {
		format = "raw"
	}
	path := filepath.Join(l.ShmDir, cfg.Name+"-"+cfg.Host+".disk."+format)
	os.Remove(path)
	switch format {
	case "raw":
		f, err := os.Create(path)
		if err == nil {
			err = f.Truncate(int64(cfg.DiskMiB) << 20)
			f.Close()
		}
		if err != nil {
			return api.Disk{}, fmt.Errorf("guest disk: %w", err)
		}
	case "qcow2":
		out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", path, fmt.Sprintf("%dM", cfg.DiskMiB)).CombinedOutput()
		if err != nil {
			return api.Disk{}, fmt.Errorf("guest disk: qemu-img create: %v: %s (qemu-img is in Debian's qemu-utils)", err, strings.TrimSpace(string(out)))
		}
	default:
		return api.Disk{}, fmt.Errorf("guest disk: format %q: use raw or qcow2", format)
	}
	return api.Disk{Node: "disk0", Path: path, Format: format, Plain: cfg.DiskPlain}, nil
}
