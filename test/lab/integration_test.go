package lab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/test/image"
	"github.com/axproject/ax/test/testenv"
	"github.com/axproject/ax/test/workload"
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// guestBinaries builds ax-workload (static) once per test binary.
func guestBinaries(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "ax-lab-bin-")
		if binErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/", "github.com/axproject/ax/test/cmd/ax-workload", "github.com/axproject/ax/cmd/ax-agent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build ax-workload: %v: %s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

func requireLab(t *testing.T) {
	t.Helper()
	testenv.RequireLong(t)
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip", "apt-get install iproute2")
	testenv.RequireCommand(t, QEMUBinary, "make deps, or apt-get install qemu-system-x86")
}

func rootLinks(t *testing.T) string {
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}

func testImage(t *testing.T) *image.Image {
	t.Helper()
	dir := guestBinaries(t)
	img, err := image.Build(context.Background(), LabImage(image.Config{Binaries: []string{filepath.Join(dir, "ax-workload"), filepath.Join(dir, "ax-agent")}}))
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	return img
}

// TestIntegrationLabLedger is the foundation's end-to-end check: lab up, a
// guest booted under QEMU, 100 ledger records appended and read back from the
// client host through the public segment, and a teardown that leaves nothing.
func TestIntegrationLabLedger(t *testing.T) {
	requireLab(t)
	before := rootLinks(t)
	ctx := context.Background()
	l, err := Open(Config{Prefix: "itlab", Log: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx) // a leftover from an earlier crashed run of this test
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	var state *State
	t.Cleanup(func() {
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("down: %v", err)
		}
		if left := l.Leftovers(state); len(left) > 0 {
			t.Errorf("teardown left: %s", strings.Join(left, ", "))
		}
		if after := rootLinks(t); after != before {
			t.Errorf("links in the root namespace changed:\nbefore %s\nafter  %s", before, after)
		}
	})
	// A second lab with the same prefix is refused while this one is up.
	l2, _ := Open(Config{Prefix: "itlab"})
	if err := l2.Up(ctx); !errors.Is(err, ErrLabUp) {
		t.Fatalf("second up: err = %v, want ErrLabUp", err)
	}

	img := testImage(t)
	start := time.Now()
	vm, err := l.StartGuest(ctx, GuestConfig{Kernel: img.Kernel, Initrd: img.Initrd})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitServing(ctx, vm, 120*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest serving %.1fs after QEMU start (%s)", time.Since(start).Seconds(), vm.Accel)
	state, _ = l.State()

	// The RAM is the shared named file of the FT recipe, on tmpfs.
	if st, err := os.Stat(vm.RAMFile); err != nil || st.Size() != 256<<20 {
		t.Fatalf("RAM file %s: %v", vm.RAMFile, err)
	}

	rec := filepath.Join(l.StateDir, "client.rec")
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	bin := filepath.Join(guestBinaries(t), "ax-workload")
	out, err := l.runWorkload(ctx, HostC, bin, "client", "--addr", addr, "--rate", "200", "--count", "100", "--record", rec)
	if err != nil {
		t.Fatal(err)
	}
	if field(out, "acked") != "100" {
		t.Fatalf("client: %s", out)
	}
	out, err = l.runWorkload(ctx, HostC, bin, "verify", "--addr", addr, "--record", rec)
	if err != nil || field(out, "verified") != "100" {
		t.Fatalf("verify: %s %v", out, err)
	}
	// Read back in-process from the client's namespace too.
	var recs []string
	err = l.InNetns(HostC, func() error {
		var err error
		recs, err = workload.List(ctx, addr, 10*time.Second)
		return err
	})
	if err != nil || len(recs) != 100 {
		t.Fatalf("list: %d records, %v", len(recs), err)
	}
	// Hosts a and b reach each other on the replication link, and a, b, w
	// on management; the client does not reach the replication link.
	for _, p := range []struct {
		from, to, addr string
		want           bool
	}{
		{HostA, HostB, HostAddrs[HostB].Repl, true},
		{HostB, HostA, HostAddrs[HostA].Repl, true},
		{HostW, HostA, HostAddrs[HostA].Mgmt, true},
		{HostA, HostW, HostAddrs[HostW].Mgmt, true},
		{HostC, HostA, HostAddrs[HostA].Repl, false},
	} {
		if err := reach(ctx, l, p.from, p.to, p.addr); (err == nil) != p.want {
			t.Errorf("TCP from %s to %s (%s): err = %v, want reachable=%v", p.from, p.to, p.addr, err, p.want)
		}
	}
	if tick, err := LastTick(vm.Console); err != nil || tick == 0 {
		t.Errorf("no tick on the console: %d %v", tick, err)
	}
}

// TestIntegrationStaleAndFailedLabs covers a lab left behind by a crash and a
// guest that fails to boot: each is reported clearly and removed completely.
func TestIntegrationStaleAndFailedLabs(t *testing.T) {
	requireLab(t)
	ctx := context.Background()
	l, _ := Open(Config{Prefix: "itstale"})
	l.Down(ctx)
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Down(context.Background()) })
	// A kernel QEMU cannot load: the guest dies and the error says so.
	bogus := filepath.Join(t.TempDir(), "vmlinuz")
	os.WriteFile(bogus, []byte("garbage"), 0o644)
	vm, err := l.StartGuest(ctx, GuestConfig{Kernel: bogus, Initrd: bogus})
	if err == nil {
		err = l.WaitServing(ctx, vm, 30*time.Second)
	}
	if err == nil || !strings.Contains(err.Error(), "QEMU exited") {
		t.Fatalf("bogus kernel: err = %v, want QEMU exited", err)
	}
	// Simulate a crash of the lab command: forget the in-memory state, as a
	// new process would, and kill a process the lab recorded.
	sleeper := exec.Command("sleep", "600")
	sleeper.Start()
	ticks, _, _ := procStat(sleeper.Process.Pid)
	st, _ := l.State()
	st.Procs = append(st.Procs, Proc{Name: "sleeper", PID: sleeper.Process.Pid, StartTicks: ticks})
	st.save()
	sleeper.Process.Signal(syscall.SIGKILL)
	sleeper.Wait()

	fresh, _ := Open(Config{Prefix: "itstale"})
	err = fresh.Up(ctx)
	if !errors.Is(err, ErrStaleLab) || !strings.Contains(err.Error(), "axctl lab down --prefix itstale") {
		t.Fatalf("up over a stale lab: err = %v, want ErrStaleLab with the remedy", err)
	}
	if err := fresh.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if left := fresh.Leftovers(st); len(left) > 0 {
		t.Fatalf("down left: %v", left)
	}
	if err := fresh.Down(ctx); err != nil {
		t.Fatalf("second down: %v", err)
	}
}

// TestIntegrationCLISideBySide runs two labs with different prefixes at once
// through the command line, each with a serving guest.
func TestIntegrationCLISideBySide(t *testing.T) {
	requireLab(t)
	ctx := context.Background()
	bin := guestBinaries(t)
	axdBinary(t) // up starts the daemons: axd beside the guest binaries
	testImage(t) // build once before the two labs race for it
	log := slog.New(slog.DiscardHandler)
	prefixes := []string{"itx", "ity"}
	for _, p := range prefixes {
		Main(ctx, []string{"down", "--prefix", p}, new(strings.Builder), log)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(prefixes))
	for i, p := range prefixes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out strings.Builder
			args := []string{"up", "--prefix", p, "--guest-bin", bin}
			if i == 0 {
				// The README's way to try HA by hand: a guest whose ledger
				// lives on a disk.
				args = append(args, "--disk", "32", "--disk-format", "qcow2")
			} else {
				// The README's way to try the etcd witness.
				args = append(args, "--witness", "etcd")
			}
			errs[i] = Main(ctx, args, &out, log)
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, p := range prefixes {
			if err := Main(context.Background(), []string{"down", "--prefix", p}, new(strings.Builder), log); err != nil {
				t.Errorf("down %s: %v", p, err)
			}
		}
	})
	for i, err := range errs {
		if err != nil {
			t.Fatalf("lab %s up: %v", prefixes[i], err)
		}
	}
	var out strings.Builder
	err := Main(ctx, []string{"up", "--prefix", "itx", "--guest-bin", bin}, &out, log)
	if err == nil || !strings.Contains(err.Error(), "already up") {
		t.Fatalf("second up: %v", err)
	}
	for _, p := range prefixes {
		var st strings.Builder
		if err := Main(ctx, []string{"status", "--prefix", p}, &st, log); err != nil || !strings.Contains(st.String(), "vm1") {
			t.Errorf("status %s: %v\n%s", p, err, st.String())
		}
		l, _ := Open(Config{Prefix: p})
		s, _ := l.State()
		if err := l.pingLedger(ctx, fmt.Sprintf("%s:%d", s.VMs[0].IP, LedgerPort)); err != nil {
			t.Errorf("lab %s guest not serving: %v", p, err)
		}
		disks := s.VMs[0].Spec.Disks
		switch {
		case p == "itx" && (len(disks) != 1 || disks[0].Format != "qcow2"):
			t.Errorf("lab %s up --disk 32 --disk-format qcow2: guest disks %+v", p, disks)
		case p == "itx" && !strings.Contains(s.VMs[0].Spec.Append, "ax.disk"):
			t.Errorf("lab %s: the ledger is not told to use its disk: %q", p, s.VMs[0].Spec.Append)
		case p != "itx" && len(disks) != 0:
			t.Errorf("lab %s up without --disk has disks %+v", p, disks)
		}
		want := "axd"
		if p == "ity" {
			want = "etcd"
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			st, err := l.Client(HostA).Status(ctx)
			if err == nil && st.WitnessHealth != nil && st.WitnessHealth.Kind == want && st.WitnessHealth.Quorum {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("lab %s: a's witness is not %s with quorum: %+v (%v)", p, want, st, err)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// reach listens on addr in host to's namespace and dials it from host from.
func reach(ctx context.Context, l *Lab, from, to, addr string) error {
	var ln net.Listener
	if err := l.InNetns(to, func() error {
		var err error
		ln, err = net.Listen("tcp", addr+":0")
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	conn, err := l.DialFrom(dctx, from, ln.Addr().String())
	if err != nil {
		return err
	}
	return conn.Close()
}
