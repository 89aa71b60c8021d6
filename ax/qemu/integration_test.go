package qemu_test

import (
	"context"
	"fmt"
	"github.com/axproject/ax/ax/qemu"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/test/image"
	"github.com/axproject/ax/test/lab"
	"github.com/axproject/ax/test/testenv"
)

func buildWorkload(t *testing.T) string {
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/axproject/ax/test/cmd/ax-workload")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build ax-workload: %v %s", err, out)
	}
	return filepath.Join(dir, "ax-workload")
}

func copyFile(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// TestIntegrationCheckpointResume runs DESIGN.md's recipe through this
// package against real QEMU: pause the guest on host a, save its device
// state, copy its RAM file; kill it; start a QEMU on host b over the copied
// RAM with -incoming defer, load the device state, resume. The guest must
// continue from the tick it had at the pause and still serve its ledger.
func TestIntegrationCheckpointResume(t *testing.T) {
	testenv.RequireLong(t)
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, lab.QEMUBinary, "make deps")
	ctx := context.Background()
	l, err := lab.Open(lab.Config{Prefix: "itqmp"})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx)
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Down(context.Background()) })
	img, err := image.Build(ctx, image.Config{Binaries: []string{buildWorkload(t)}})
	if err != nil {
		t.Fatal(err)
	}
	vm, err := l.StartGuest(ctx, lab.GuestConfig{Kernel: img.Kernel, Initrd: img.Initrd, Dirty: 4})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitServing(ctx, vm, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	conn, err := l.DialFrom(ctx, lab.HostC, fmt.Sprintf("%s:%d", vm.IP, lab.LedgerPort))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "APPEND before-checkpoint\n")
	buf := make([]byte, 64)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _ := conn.Read(buf)
	conn.Close()
	if !strings.HasPrefix(string(buf[:n]), "ACK 1") {
		t.Fatalf("append: %q", buf[:n])
	}
	time.Sleep(time.Second)

	mon, err := qemu.Dial(vm.QMP, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := mon.Stop(tctx); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(l.ShmDir, "devstate")
	t1 := time.Now()
	if err := mon.SaveDeviceState(tctx, dev); err != nil {
		t.Fatal(err)
	}
	t2 := time.Now()
	st, _ := os.Stat(dev)
	t.Logf("stop %.1f ms, device state %.1f ms, %d bytes", t1.Sub(t0).Seconds()*1000, t2.Sub(t1).Seconds()*1000, st.Size())
	if s, err := mon.Status(tctx); err != nil || s != "paused" {
		t.Fatalf("status %q %v", s, err)
	}
	tick, _ := lab.LastTick(vm.Console)
	replica := filepath.Join(l.ShmDir, "replica.ram")
	if err := copyFile(replica, vm.RAMFile); err != nil {
		t.Fatal(err)
	}
	// Host a dies.
	p, _ := os.FindProcess(vm.PID)
	p.Kill()
	l.CutLinks(ctx, lab.HostA)

	vmb, err := l.StartGuest(ctx, lab.GuestConfig{Host: lab.HostB, Kernel: img.Kernel, Initrd: img.Initrd, Dirty: 4, RAMFile: replica, Incoming: true})
	if err != nil {
		t.Fatal(err)
	}
	var monb *qemu.QMP
	for i := 0; i < 100; i++ {
		if monb, err = qemu.Dial(vmb.QMP, time.Second); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer monb.Close()
	t3 := time.Now()
	if err := qemu.LoadDeviceStateFile(tctx, monb, dev, filepath.Join(t.TempDir(), "incoming.sock")); err != nil {
		t.Fatal(err)
	}
	if err := monb.Cont(tctx); err != nil {
		t.Fatal(err)
	}
	if err := monb.Announce(tctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("load + cont %.1f ms", time.Since(t3).Seconds()*1000)
	if err := l.WaitServing(ctx, vmb, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	// The guest prints a tick every 100 ms; wait for the first on b.
	var data []byte
	first := uint64(0)
	for deadline := time.Now().Add(5 * time.Second); first == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		data, _ = os.ReadFile(vmb.Console)
		for _, line := range strings.Split(string(data), "\n") {
			if _, err := fmt.Sscanf(line, "AXTICK %d", &first); err == nil {
				break
			}
		}
	}
	t.Logf("tick at pause %d, first tick on b %d", tick, first)
	if first != tick+1 && first != tick {
		t.Fatalf("guest on b continued from tick %d, want %d (the tick at the checkpoint) + 1", first, tick)
	}
	for _, bad := range []string{"Oops", "BUG:", "general protection fault", "Kernel panic", "double fault"} {
		if strings.Contains(string(data), bad) {
			t.Fatalf("console on b shows %q:\n%s", bad, data)
		}
	}
	conn, err = l.DialFrom(ctx, lab.HostC, fmt.Sprintf("%s:%d", vmb.IP, lab.LedgerPort))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET 1\n")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _ = conn.Read(buf)
	if strings.TrimSpace(string(buf[:n])) != "REC 1 before-checkpoint" {
		t.Fatalf("ledger on b: %q", buf[:n])
	}
}
