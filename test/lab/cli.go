package lab

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/axproject/ax/test/image"
)

const cliUsage = `usage: axctl lab <command> [flags]

  up       create the lab's hosts and networks, boot a guest on host a, start axd
           on a and b and the witness on w
  down     remove everything the lab made (safe to repeat, also after a crash)
  status   show what the lab has and whether it still runs
  demo     up, ledger client, FT protection, host a killed, guest resumed on b, down;
           ends with a key=value summary
  bench    time lab up, guest boot to first ack and teardown over --runs cycles
  bench-ft FT's pause, epochs/s, guest slowdown, bytes per page, failover time; then
           pause, slowdown and failover of a libvirt domain in the same run (÷ AX-started)
  bench-disk guest disk write throughput and latency at none, HA and FT; then a
           libvirt domain's (its disk on the mirror path) in the same run (÷ AX-started)
  bench-restart axd restarted (primary, secondary) → protected again; planned failover
           → running on the partner and protected back; axd killed → guest stopped
  bench-witness failover time (host killed → guest running on the partner) with the
           single axd witness and with the 3-member etcd witness, side by side

flags (all commands):
  --prefix NAME     lab name; labs with different prefixes run side by side (default ax)
flags (up, demo):
  --kernel FILE     guest kernel (default: download Debian's linux-image-cloud-amd64)
  --modules DIR     the kernel's lib/modules/<version> directory, with --kernel
  --accel MODE      auto, kvm or tcg (default auto: kvm only where it really works)
  --ram MIB         guest RAM (default 256)
  --dirty MIBPS     memory dirtier rate in the guest (default 0: off; demo: 4)
  --disk MIB        give the guest a virtio-blk disk its ledger keeps its records on, so
                    they survive an HA failover (default 0: a memory-only ledger)
  --disk-format F   raw (default) or qcow2
  --guest-bin DIR   where ax-workload is (default: beside axctl)
  --no-guest        (up) create hosts and networks only
  --libvirt         (up) run a libvirtd on a and b, the guest as a Nova-shaped libvirt
                    domain started on a and defined on b, and axd --libvirt on both
  --keep            (demo) leave the lab up at the end
  --psk             (up, demo, bench-ft, bench-disk) daemons in PSK mode (one pre-shared key)
                    instead of TLS mode with the lab's CA
  --witness KIND    (up, demo, bench-ft, bench-disk, bench-restart) axd (default: axd --witness
                    on w) or etcd (a 3-member etcd cluster on w1, w2, w3, TLS with client
                    certificates)
  --records N       (demo) ledger records to append (default 100)
  --rate N          (demo) appends per second (default 50)
  --run-for D       (demo) protected running time before host a is killed (default 10s)
  --runs N          (bench, bench-restart, bench-witness) cycles to time (default 3)
  --window D        (bench-ft) length of each measuring window (default 8s)
  --json            (status) machine-readable output`

type labFlags struct {
	prefix, kernel, modules, accel, guestBin, cacheDir string
	ram, diskMiB                                       int
	diskFormat, witness                                string
	dirty                                              float64
	noGuest, keep, json, psk, libvirt                  bool
	records, runs                                      int
	rate                                               float64
	runFor, window                                     time.Duration
}

// Main runs `axctl lab …`.
func Main(ctx context.Context, args []string, out io.Writer, log *slog.Logger) error {
	if len(args) == 0 {
		return errors.New(cliUsage)
	}
	cmd := args[0]
	var f labFlags
	fs := flag.NewFlagSet("lab "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&f.prefix, "prefix", "ax", "")
	fs.StringVar(&f.kernel, "kernel", "", "")
	fs.StringVar(&f.modules, "modules", "", "")
	fs.StringVar(&f.accel, "accel", "auto", "")
	fs.StringVar(&f.guestBin, "guest-bin", "", "")
	fs.StringVar(&f.cacheDir, "cache-dir", image.DefaultCacheDir, "")
	fs.IntVar(&f.ram, "ram", 256, "")
	fs.IntVar(&f.diskMiB, "disk", 0, "")
	fs.StringVar(&f.diskFormat, "disk-format", "raw", "")
	fs.Float64Var(&f.dirty, "dirty", 0, "")
	fs.BoolVar(&f.noGuest, "no-guest", false, "")
	fs.BoolVar(&f.keep, "keep", false, "")
	fs.BoolVar(&f.psk, "psk", false, "")
	fs.StringVar(&f.witness, "witness", WitnessAxd, "")
	fs.BoolVar(&f.libvirt, "libvirt", false, "")
	fs.BoolVar(&f.json, "json", false, "")
	fs.IntVar(&f.records, "records", 100, "")
	fs.IntVar(&f.runs, "runs", 3, "")
	fs.DurationVar(&f.runFor, "run-for", 10*time.Second, "")
	fs.DurationVar(&f.window, "window", 8*time.Second, "")
	fs.Float64Var(&f.rate, "rate", 50, "")
	if cmd == "help" || cmd == "-h" || cmd == "--help" {
		fmt.Fprintln(out, cliUsage)
		return nil
	}
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("lab %s: %v (see: axctl lab help)", cmd, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("lab %s: unexpected argument %q (see: axctl lab help)", cmd, fs.Arg(0))
	}
	dirtySet := false
	fs.Visit(func(fl *flag.Flag) { dirtySet = dirtySet || fl.Name == "dirty" })
	if cmd == "demo" && !dirtySet {
		f.dirty = 4 // the demo runs the memory dirtier unless told otherwise
	}
	if f.diskMiB < 0 || f.diskMiB > 1<<20 {
		return fmt.Errorf("lab %s: --disk takes a size in MiB (0: no disk), not %d", cmd, f.diskMiB)
	}
	switch f.diskFormat {
	case "raw", "qcow2":
	default:
		return fmt.Errorf("lab %s: --disk-format must be raw or qcow2, not %q", cmd, f.diskFormat)
	}
	switch f.witness {
	case WitnessAxd, WitnessEtcd:
	default:
		return fmt.Errorf("lab %s: --witness must be %s or %s, not %q", cmd, WitnessAxd, WitnessEtcd, f.witness)
	}
	switch f.accel {
	case "auto", "kvm", "tcg":
	default:
		return fmt.Errorf("lab %s: --accel must be auto, kvm or tcg, not %q", cmd, f.accel)
	}
	if f.kernel == "" && f.modules != "" {
		return fmt.Errorf("lab %s: --modules goes with --kernel", cmd)
	}
	l, err := Open(Config{Prefix: f.prefix, Log: log})
	if err != nil {
		return err
	}
	switch cmd {
	case "up":
		return cliUp(ctx, l, f, out, log)
	case "down":
		s, _ := l.State()
		if err := l.Down(ctx); err != nil {
			return err
		}
		if left := l.Leftovers(s); len(left) > 0 {
			return fmt.Errorf("lab down: still present: %s", strings.Join(left, ", "))
		}
		fmt.Fprintf(out, "lab %s is down\n", l.Prefix)
		return nil
	case "status":
		return cliStatus(l, f, out)
	case "demo":
		return Demo(ctx, l, f.demoConfig(), out, log)
	case "bench":
		return Bench(ctx, l, f, f.runs, out, log)
	case "bench-disk":
		return BenchDisk(ctx, l, f, out, log)
	case "bench-restart":
		if !dirtySet {
			f.dirty = 4
		}
		return BenchRestart(ctx, l, f, max(f.runs, 1), out, log)
	case "bench-ft":
		if !dirtySet {
			f.dirty = 4
		}
		return BenchFT(ctx, l, f, f.window, out, log)
	case "bench-witness":
		if !dirtySet {
			f.dirty = 4
		}
		return BenchWitness(ctx, l, f, max(f.runs, 1), out, log)
	}
	return fmt.Errorf("lab: unknown command %q (see: axctl lab help)", cmd)
}

func (f labFlags) imageConfig(log *slog.Logger) (image.Config, error) {
	var bins []string
	for _, name := range []string{"ax-workload", "ax-agent"} {
		bin, err := f.binary(name)
		if err != nil {
			return image.Config{}, err
		}
		bins = append(bins, bin)
	}
	return LabImage(image.Config{CacheDir: f.cacheDir, Kernel: f.kernel, Modules: f.modules, Binaries: bins, Log: log}), nil
}

// LabImage completes an image config with the lab guest's files.
func LabImage(c image.Config) image.Config {
	c.Files = map[string][]byte{"/etc/ax/agent.json": []byte(image.LabAgentConfig)}
	return c
}

func (f labFlags) demoConfig() DemoConfig {
	return DemoConfig{flags: f, Records: f.records, Rate: f.rate, Keep: f.keep, RunFor: f.runFor}
}

func cliUp(ctx context.Context, l *Lab, f labFlags, out io.Writer, log *slog.Logger) error {
	var icfg image.Config
	if !f.noGuest {
		var err error
		if icfg, err = f.imageConfig(log); err != nil {
			return err
		}
	}
	start := time.Now()
	if err := l.Up(ctx); err != nil {
		return err
	}
	fmt.Fprintf(out, "lab %s: hosts and networks up in %.1fs\n", l.Prefix, time.Since(start).Seconds())
	if f.libvirt {
		if err := startLibvirtds(ctx, l, out); err != nil {
			return errors.Join(err, l.Down(context.Background()))
		}
	}
	if f.noGuest {
		return nil
	}
	vm, err := bootGuest(ctx, l, f, icfg, out)
	if err == nil {
		err = startDaemons(ctx, l, f, vm)
	}
	if err != nil {
		if derr := l.Down(context.Background()); derr != nil {
			log.Error("lab cleanup after failure", "err", derr)
		}
		return err
	}
	fmt.Fprintf(out, "guest %s on host %s serves its ledger at %s:%d (from netns %s); console: %s\n",
		vm.Name, vm.Host, vm.IP, LedgerPort, l.Netns(HostC), vm.Console)
	fmt.Fprintf(out, "try: ip netns exec %s nc %s %d   then type APPEND hello\n", l.Netns(HostC), vm.IP, LedgerPort)
	name := vm.Name
	if vm.Domain != "" {
		name = vm.Domain
		fmt.Fprintf(out, "the guest is libvirt domain %s, running on a and defined on b; axd discovers it by name\n", vm.Domain)
	}
	wit := "the witness on w"
	if f.witness == WitnessEtcd {
		wit = "the etcd witness on w1, w2, w3"
	}
	fmt.Fprintf(out, "axd runs on a and b, %s; protect the guest with:\n  axctl --socket %s protect %s --level ft --peer b\n  axctl --socket %s status\n",
		wit, l.Socket(HostA), name, l.Socket(HostA))
	return nil
}

// startDaemons starts the witness and both hosts' axd, and defines the guest on its host.
func startDaemons(ctx context.Context, l *Lab, f labFlags, vm *VM) error {
	cfg, err := f.daemonConfig()
	if err != nil {
		return err
	}
	if err := l.StartDaemons(ctx, cfg); err != nil {
		return err
	}
	if vm.Domain != "" {
		return nil // libvirt's guest: axd --libvirt discovers it at protect
	}
	return l.DefineGuest(ctx, vm)
}

// daemonConfig is the daemons' configuration the flags select.
func (f labFlags) daemonConfig() (DaemonConfig, error) {
	axd, err := f.binary("axd")
	return DaemonConfig{Axd: axd, PSK: f.psk, Witness: f.witness, Libvirt: f.libvirt}, err
}

// startLibvirtds starts a libvirtd on each hypervisor host.
func startLibvirtds(ctx context.Context, l *Lab, out io.Writer) error {
	for _, h := range []string{HostA, HostB} {
		start := time.Now()
		if err := l.StartLibvirtd(ctx, h); err != nil {
			return err
		}
		fmt.Fprintf(out, "libvirtd on %s serving in %.1fs: virsh -c '%s'\n", h, time.Since(start).Seconds(), l.LibvirtURI(h))
	}
	return nil
}

// binary finds one of the project's binaries beside axctl (or in --guest-bin).
func (f labFlags) binary(name string) (string, error) {
	dir := f.guestBin
	if dir == "" {
		exe, err := os.Executable()
		if err != nil {
			return "", err
		}
		dir = filepath.Dir(exe)
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found in %s: run make build, or give --guest-bin DIR", name, dir)
	}
	return p, nil
}

func bootGuest(ctx context.Context, l *Lab, f labFlags, icfg image.Config, out io.Writer) (*VM, error) {
	img, err := image.Build(ctx, icfg)
	if err != nil {
		return nil, err
	}
	cfg := GuestConfig{Kernel: img.Kernel, Initrd: img.Initrd, Accel: f.accel, RAMMiB: f.ram, Dirty: f.dirty,
		DiskMiB: f.diskMiB, DiskFormat: f.diskFormat}
	var vm *VM
	if f.libvirt {
		if vm, err = l.DefineLibvirtGuest(ctx, cfg); err == nil {
			err = l.StartLibvirtGuest(ctx, vm, false)
		}
		if err == nil {
			// The partner's definition: AX never creates a domain from
			// XML a peer sent; Nova (here the lab) defines it on b.
			onB := cfg
			onB.Host = HostB
			_, err = l.DefineLibvirtGuest(ctx, onB)
		}
	} else {
		vm, err = l.StartGuest(ctx, cfg)
	}
	if err != nil {
		return nil, err
	}
	how := ""
	if vm.Domain != "" {
		how = " as libvirt domain " + vm.Domain
	}
	fmt.Fprintf(out, "guest %s booting on host %s%s (%s, %d MiB, RAM file %s, image %s)\n", vm.Name, vm.Host, how, vm.Accel, vm.RAMMiB, vm.RAMFile, img.Key)
	if err := l.WaitServing(ctx, vm, 120*time.Second); err != nil {
		return nil, err
	}
	return vm, nil
}

func cliStatus(l *Lab, f labFlags, out io.Writer) error {
	s, err := l.State()
	if err != nil {
		if errors.Is(err, ErrNoLab) {
			fmt.Fprintf(out, "lab %s is not up\n", l.Prefix)
			return nil
		}
		return err
	}
	if f.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	health := "up"
	if !l.allAlive(s) {
		health = "broken (something died; run: axctl lab down --prefix " + l.Prefix + ")"
	}
	fmt.Fprintf(out, "lab %s: %s, %s since %s\n", l.Prefix, s.Status, health, s.Created.Format(time.DateTime))
	fmt.Fprintf(out, "hosts: %s\n", strings.Join(s.Namespaces, " "))
	fmt.Fprintf(out, "%-6s %-5s %-8s %-6s %-12s %s\n", "GUEST", "HOST", "PID", "ALIVE", "IP", "CONSOLE")
	for _, vm := range s.VMs {
		alive := "no"
		for _, p := range s.Procs {
			if p.PID == vm.PID && p.alive() {
				alive = "yes"
			}
		}
		if vm.Domain != "" && vm.PID > 0 && !isZombie(vm.PID) {
			alive = "yes" // libvirtd's QEMU, not recorded as the lab's own
		}
		fmt.Fprintf(out, "%-6s %-5s %-8d %-6s %-12s %s\n", vm.Name, vm.Host, vm.PID, alive, vm.IP, vm.Console)
	}
	return nil
}
