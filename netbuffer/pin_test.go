package netbuffer_test

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/axproject/ax/netbuffer"
)

// pinnedLab is a lab with tcx and a pin directory.
func pinnedLab(t *testing.T) (*lab, string) {
	t.Helper()
	l := newLab(t, false)
	requireTCX(t)
	return l, pinDir(t)
}

// attachPinned attaches (or adopts) the gate pinned in dir; the test's end
// detaches it unless it was left.
func attachPinned(t testing.TB, dir string, cfg netbuffer.Config) *netbuffer.Gate {
	t.Helper()
	cfg.PinDir = dir
	return attach(t, nil, cfg) // tcx, as a pinned gate must be
}

// pinned lists the gate's pins in dir.
func pinned(t testing.TB, dir string) []string {
	t.Helper()
	var have []string
	for _, name := range netbuffer.PinNames {
		if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
			have = append(have, name)
		}
	}
	return have
}

func expectDetached(t testing.TB, g *netbuffer.Gate, after string) {
	t.Helper()
	for name, err := range map[string]error{
		"Release": g.Release(1), "NextEpoch": g.NextEpoch(99), "Discard": g.Discard(), "Open": g.Open(), "Hold": g.Hold(),
	} {
		if !errors.Is(err, netbuffer.ErrDetached) {
			t.Errorf("%s after %s: %v, want ErrDetached", name, after, err)
		}
	}
}

// TestIntegrationPinnedLeaveHolds: after Leave no process holds the gate,
// and still nothing the guest sends gets out, even though the gate was
// open when it was left: the ring buffer fills, then the kernel drops and
// counts. The next process finds the first frames, in order.
func TestIntegrationPinnedLeaveHolds(t *testing.T) {
	l, dir := pinnedLab(t)
	g := attachPinned(t, dir, netbuffer.Config{RingBytes: 4096})
	if g.Adopted() {
		t.Fatal("a new gate says it was adopted")
	}
	if have := pinned(t, dir); !slices.Equal(have, netbuffer.PinNames) {
		t.Fatalf("pinned %v, want %v", have, netbuffer.PinNames)
	}
	fi, err := os.Stat(dir)
	must(t, err)
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("pin directory mode %v, want 0700", fi.Mode().Perm())
	}
	opened := frames(3, "open")
	must(t, g.Open())
	l.send(t, opened...)
	l.expect(t, "open gate", opened...)

	must(t, g.Leave())
	must(t, g.Leave()) // twice is fine
	expectDetached(t, g, "Leave")
	if n := tcxPrograms(t, l.ifindex); n != 1 {
		t.Fatalf("%d tcx programs on the tap after Leave, want 1", n)
	}
	const n = 100
	fs := frames(n, "absent")
	l.send(t, fs...)
	l.expectNone(t, quiet, "no process holds the gate")

	g2 := attachPinned(t, dir, netbuffer.Config{})
	if !g2.Adopted() {
		t.Fatal("the pinned gate was not adopted")
	}
	st := g2.Stats() // the ring buffer is read in when Attach returns
	held, full := st.HeldFrames, st.Dropped[netbuffer.DropRingFull]
	t.Logf("a 4 KiB ring buffer carried %d of %d frames; %d dropped full", held, n, full)
	if held == 0 || held == n || uint64(held)+full != n || st.Open {
		t.Fatalf("held %d, dropped (ring full) %d, open %v: want 0 < held < %d, held + dropped = %d, shut", held, full, st.Open, n, n)
	}
	must(t, g2.Release(1))
	l.expect(t, "Release(1) after adoption", fs[:held]...)
}

// TestIntegrationPinnedAdoptAfterLeave: the frames captured while no
// process held the gate are held by the next one with their epochs and
// released by Release of their epoch, in order; the frames the first
// process held in memory are dropped (DropLeft), never sent.
func TestIntegrationPinnedAdoptAfterLeave(t *testing.T) {
	l, dir := pinnedLab(t)
	g1 := attachPinned(t, dir, netbuffer.Config{FirstEpoch: 3})
	inMemory := frames(3, "in-memory")
	l.send(t, inMemory...)
	must(t, g1.Release(0)) // into the gate's memory
	must(t, g1.NextEpoch(4))
	must(t, g1.Leave())
	if st := g1.Stats(); st.Dropped[netbuffer.DropLeft] != 3 || st.HeldFrames != 0 {
		t.Errorf("after Leave: left %d, held %d; want 3, 0", st.Dropped[netbuffer.DropLeft], st.HeldFrames)
	}
	must(t, g1.Detach()) // after Leave: nothing
	if have := pinned(t, dir); len(have) != len(netbuffer.PinNames) {
		t.Fatalf("Detach after Leave removed pins: %v left", have)
	}
	absent := frames(5, "absent")
	l.send(t, absent...)
	l.expectNone(t, quiet, "left gate")

	start := time.Now()
	g2 := attachPinned(t, dir, netbuffer.Config{FirstEpoch: 100}) // FirstEpoch is the new gate's only
	t.Logf("adopted in %v", time.Since(start))
	if !g2.Adopted() {
		t.Fatal("not adopted")
	}
	if st := g2.Stats(); st.Epoch != 4 || st.Open || st.HeldFrames != len(absent) {
		t.Fatalf("adopted at epoch %d, open %v, holding %d frames; want 4, shut, %d", st.Epoch, st.Open, st.HeldFrames, len(absent))
	}
	if err := g2.NextEpoch(3); err == nil {
		t.Error("NextEpoch(3) at epoch 4 succeeded")
	}
	must(t, g2.Release(3))
	l.expectNone(t, quiet, "Release(3) with frames of epoch 4")
	must(t, g2.NextEpoch(5))
	later := frames(2, "later")
	l.send(t, later...)
	must(t, g2.Release(4))
	l.expect(t, "Release(4)", absent...)
	must(t, g2.Release(5))
	l.expect(t, "Release(5)", later...)
	st := g2.Stats()
	if st.CapturedFrames != 7 || st.ReleasedFrames != 7 || st.HeldFrames != 0 || st.Dropped[netbuffer.DropLeft] != 3 {
		t.Errorf("adopted gate's stats %+v: want 7 captured and released, none held, 3 left", st)
	}
	for _, r := range []netbuffer.DropReason{netbuffer.DropRingFull, netbuffer.DropDiscarded, netbuffer.DropInject} {
		if st.Dropped[r] != 0 {
			t.Errorf("dropped %d (%s)", st.Dropped[r], r)
		}
	}

	// Leave the adopted gate, Detach it (nothing), adopt it again.
	must(t, g2.Leave())
	must(t, g2.Detach())
	expectDetached(t, g2, "Leave and Detach")
	g3 := attachPinned(t, dir, netbuffer.Config{})
	if st := g3.Stats(); !g3.Adopted() || st.Epoch != 5 || st.Dropped[netbuffer.DropLeft] != 3 {
		t.Fatalf("adopted again %v at epoch %d with %d left; want true, 5, 3", g3.Adopted(), st.Epoch, st.Dropped[netbuffer.DropLeft])
	}
	must(t, g3.Detach())
	if have := pinned(t, dir); len(have) != 0 {
		t.Errorf("pins left after Detach: %v", have)
	}
	if n := tcxPrograms(t, l.ifindex); n != 0 {
		t.Errorf("%d tcx programs left on the tap", n)
	}
	free := frames(3, "free")
	l.send(t, free...)
	l.expect(t, "after Detach", free...)
}

// TestIntegrationPinnedCarriesFrames: many frames sent while no process
// held the gate, all released in order after adoption.
func TestIntegrationPinnedCarriesFrames(t *testing.T) {
	l, dir := pinnedLab(t)
	g := attachPinned(t, dir, netbuffer.Config{FirstEpoch: 7})
	must(t, g.Leave())
	var fs [][]byte
	for i := range 2000 {
		fs = append(fs, padded(frame(i, "carried"), 60+(i*397)%1455))
	}
	l.send(t, fs...)
	l.expectNone(t, quiet, "left gate")
	start := time.Now()
	g2 := attachPinned(t, dir, netbuffer.Config{})
	adopt := time.Since(start)
	if held := g2.Stats().HeldFrames; held != len(fs) {
		t.Fatalf("the adopted gate holds %d frames, want %d", held, len(fs))
	}
	must(t, g2.Release(6))
	l.expectNone(t, quiet, "Release(6)")
	must(t, g2.Release(7))
	l.expect(t, "Release(7)", fs...)
	st := g2.Stats()
	t.Logf("adopted in %v; carried %d frames (%d bytes)", adopt, st.CapturedFrames, st.CapturedBytes)
	if st.CapturedFrames != uint64(len(fs)) || st.ReleasedFrames != uint64(len(fs)) {
		t.Errorf("captured %d, released %d; want %d", st.CapturedFrames, st.ReleasedFrames, len(fs))
	}
}

// TestIntegrationPinnedNotAdoptable: pins that do not make a gate for this
// tap are refused, changing nothing: the tap stays held, the pins stay as
// they are, no descriptor stays open. Unpin removes them; then Attach
// makes a new gate.
func TestIntegrationPinnedNotAdoptable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(t *testing.T, dir string)
		want    string // in the error
	}{
		{"other tap", nil, "ifindex"},
		{"unknown version", setMeta(netbuffer.MetaSlotVer, 99), "format version 99"},
		{"wrong mark", setMeta(netbuffer.MetaSlotMark, 0x1234567), "release mark"},
		{"missing map", remove(netbuffer.PinDrops), "load ax_drops"},
		{"no meta", remove(netbuffer.PinMeta), "no meta"},
		{"meta replaced", replaceMeta, "not an array of uint64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, dir := pinnedLab(t)
			g := attachPinned(t, dir, netbuffer.Config{})
			must(t, g.Leave())
			ifname := tapName
			if tc.corrupt != nil {
				tc.corrupt(t, dir)
			} else {
				other := openTap(t, "axtap1", false)
				t.Cleanup(func() { other.Close() })
				ifname = "axtap1"
			}
			pins := pinned(t, dir)
			meta := readMeta(t, dir)
			fds := bpfFDs(t)

			_, err := netbuffer.Attach(ifname, &netbuffer.Config{PinDir: dir})
			if !errors.Is(err, netbuffer.ErrNotAdoptable) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Attach: %v; want ErrNotAdoptable saying %q", err, tc.want)
			}
			t.Logf("refused: %v", err)
			if have := pinned(t, dir); !slices.Equal(have, pins) {
				t.Errorf("pins %v after the refusal, %v before", have, pins)
			}
			if m := readMeta(t, dir); !slices.Equal(m, meta) {
				t.Errorf("meta %v after the refusal, %v before", m, meta)
			}
			if after := bpfFDs(t); !mapsEqual(after, fds) {
				t.Errorf("descriptors %v after the refusal, %v before", after, fds)
			}
			l.send(t, frames(2, "held")...)
			l.expectNone(t, quiet, "refused adoption")

			must(t, netbuffer.Unpin(dir))
			must(t, netbuffer.Unpin(dir)) // nothing there: fine
			if n := tcxPrograms(t, l.ifindex); n != 0 {
				t.Fatalf("%d tcx programs on the tap after Unpin", n)
			}
			free := frames(2, "unpinned")
			l.send(t, free...)
			l.expect(t, "after Unpin", free...)
			g = attachPinned(t, dir, netbuffer.Config{})
			if g.Adopted() {
				t.Error("Attach after Unpin adopted something")
			}
			l.send(t, free...)
			l.expectNone(t, quiet, "new gate")
		})
	}
}

func setMeta(slot int, v uint64) func(*testing.T, string) {
	return func(t *testing.T, dir string) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, netbuffer.PinMeta), nil)
		must(t, err)
		defer m.Close()
		must(t, m.Update(uint32(slot), v, ebpf.UpdateAny))
	}
}

func remove(name string) func(*testing.T, string) {
	return func(t *testing.T, dir string) { must(t, os.Remove(filepath.Join(dir, name))) }
}

// replaceMeta pins a map of another shape as meta.
func replaceMeta(t *testing.T, dir string) {
	remove(netbuffer.PinMeta)(t, dir)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	must(t, err)
	defer m.Close()
	must(t, m.Pin(filepath.Join(dir, netbuffer.PinMeta)))
}

// readMeta returns the meta map's slots, nil if there is no meta map of
// that shape.
func readMeta(t testing.TB, dir string) []uint64 {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, netbuffer.PinMeta), nil)
	if err != nil {
		return nil
	}
	defer m.Close()
	var vs []uint64
	for i := range netbuffer.MetaSlots {
		var v uint64
		if m.Lookup(uint32(i), &v) != nil {
			return nil
		}
		vs = append(vs, v)
	}
	return vs
}

func mapsEqual(a, b map[string]int) bool {
	for k := range a {
		if a[k] != b[k] {
			return false
		}
	}
	for k := range b {
		if a[k] != b[k] {
			return false
		}
	}
	return true
}

// TestIntegrationPinnedInUse: one Gate at a time holds a pinned gate;
// Unpin cannot pull it from under the one that does.
func TestIntegrationPinnedInUse(t *testing.T) {
	l, dir := pinnedLab(t)
	g := attachPinned(t, dir, netbuffer.Config{})
	if _, err := netbuffer.Attach(tapName, &netbuffer.Config{PinDir: dir}); !errors.Is(err, netbuffer.ErrInUse) {
		t.Errorf("a second Attach: %v, want ErrInUse", err)
	}
	if err := netbuffer.Unpin(dir); !errors.Is(err, netbuffer.ErrInUse) {
		t.Errorf("Unpin under a gate: %v, want ErrInUse", err)
	}
	fs := frames(2, "still")
	l.send(t, fs...)
	l.expectNone(t, quiet, "held")
	must(t, g.Release(1))
	l.expect(t, "release", fs...)
	must(t, g.Detach())
	g = attachPinned(t, dir, netbuffer.Config{})
	if g.Adopted() {
		t.Error("adopted a detached gate")
	}
}

// TestIntegrationPinnedTapGoesAway: QEMU exits and the tap goes while no
// process holds the gate: the pins hold nothing now. A new tap of the same
// name is another device: its Attach refuses them; Unpin clears them.
func TestIntegrationPinnedTapGoesAway(t *testing.T) {
	l, dir := pinnedLab(t)
	g := attachPinned(t, dir, netbuffer.Config{})
	l.send(t, frames(2, "orphan")...)
	must(t, g.Leave())
	must(t, l.tap.Close())
	tap := openTap(t, tapName, false)
	t.Cleanup(func() { tap.Close() })
	if _, err := netbuffer.Attach(tapName, &netbuffer.Config{PinDir: dir}); !errors.Is(err, netbuffer.ErrNotAdoptable) {
		t.Fatalf("Attach to the new tap: %v, want ErrNotAdoptable", err)
	} else {
		t.Logf("refused: %v", err)
	}
	must(t, netbuffer.Unpin(dir))
	if have := pinned(t, dir); len(have) != 0 {
		t.Fatalf("pins left after Unpin: %v", have)
	}
	g = attachPinned(t, dir, netbuffer.Config{})
	if g.Adopted() {
		t.Error("adopted the gate of a tap that is gone")
	}

	// Detach of a pinned gate whose tap went away.
	must(t, tap.Close())
	must(t, g.Detach())
	if have := pinned(t, dir); len(have) != 0 {
		t.Errorf("pins left after Detach: %v", have)
	}
}

// TestIntegrationPinnedRefusals: what cannot be pinned says so at once.
func TestIntegrationPinnedRefusals(t *testing.T) {
	l, dir := pinnedLab(t)
	if _, err := netbuffer.Attach(tapName, &netbuffer.Config{PinDir: dir, ForceClsact: true}); !errors.Is(err, netbuffer.ErrPinNeedsTCX) {
		t.Errorf("PinDir with ForceClsact: %v, want ErrPinNeedsTCX", err)
	}
	plain := filepath.Join(t.TempDir(), "pins")
	if _, err := netbuffer.Attach(tapName, &netbuffer.Config{PinDir: plain}); err == nil || !strings.Contains(err.Error(), "not on a bpffs") {
		t.Errorf("PinDir off bpffs: %v, want an error saying so", err)
	}
	if _, err := os.Stat(plain); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused PinDir was made: %v", err)
	}
	if err := netbuffer.Unpin(plain); err != nil {
		t.Errorf("Unpin of a directory that does not exist: %v", err)
	}
	must(t, os.Mkdir(plain, 0o700))
	must(t, os.WriteFile(filepath.Join(plain, netbuffer.PinMeta), nil, 0o600))
	if err := netbuffer.Unpin(plain); err == nil {
		t.Error("Unpin off bpffs succeeded")
	}
	if _, err := os.Stat(filepath.Join(plain, netbuffer.PinMeta)); err != nil {
		t.Errorf("Unpin off bpffs removed a file: %v", err)
	}

	g := attach(t, l, netbuffer.Config{})
	fs := frames(2, "unpinned")
	l.send(t, fs...)
	if err := g.Leave(); err == nil {
		t.Error("Leave of a gate that is not pinned succeeded")
	}
	must(t, g.Release(1)) // the gate is still whole
	l.expect(t, "release", fs...)
}

// TestIntegrationPinnedWithoutTCX: on a kernel without tcx (Debian 12's
// 6.1, as in the Vagrant lab's boxes) a pinned gate is refused with
// ErrPinNeedsTCX — its failed attach once crashed axd on a nil link in the
// teardown — leaving no pin behind and the tap as it was; the same gate
// unpinned then holds (with clsact), which is what axd falls back to.
func TestIntegrationPinnedWithoutTCX(t *testing.T) {
	l := newLab(t, false)
	if probeTCX() == nil {
		t.Skip("this kernel has tcx; make test-guest-kernel runs this test on Debian's 6.1 kernel, which has none")
	}
	dir := pinDir(t)
	g, err := netbuffer.Attach(tapName, &netbuffer.Config{PinDir: dir})
	if !errors.Is(err, netbuffer.ErrPinNeedsTCX) {
		if g != nil {
			g.Detach()
		}
		t.Fatalf("pinned attach without tcx: %v, want ErrPinNeedsTCX", err)
	}
	if have := pinned(t, dir); len(have) > 0 {
		t.Errorf("the refused gate left pins: %v", have)
	}
	fs := frames(2, "refused")
	l.send(t, fs...)
	l.expect(t, "a refused gate holds nothing", fs...)

	g = attach(t, l, netbuffer.Config{ForceClsact: true}) // what tcx-less kernels get anyway
	if g.Pinned() {
		t.Error("an unpinned gate says it is pinned")
	}
	fs = frames(2, "unpinned")
	l.send(t, fs...)
	l.expectNone(t, quiet, "the unpinned gate holds")
	must(t, g.Release(1))
	l.expect(t, "release", fs...)
}

// TestIntegrationPinnedNoLeaks: attach, leave, adopt, leave, adopt, detach,
// three times over: no descriptor, goroutine, pin or program stays.
func TestIntegrationPinnedNoLeaks(t *testing.T) {
	l, dir := pinnedLab(t)
	cfg := &netbuffer.Config{PinDir: dir, Log: slog.New(slog.NewTextHandler(t.Output(), nil))}
	fds, goroutines := bpfFDs(t), runtime.NumGoroutine()
	for range 3 {
		g, err := netbuffer.Attach(tapName, cfg)
		must(t, err)
		l.send(t, frames(2, "left")...)
		must(t, g.Release(0))
		must(t, g.Leave())
		for _, last := range []bool{false, true} {
			g, err = netbuffer.Attach(tapName, cfg)
			must(t, err)
			if !g.Adopted() {
				t.Fatal("not adopted")
			}
			fs := frames(2, "cycle")
			l.send(t, fs...)
			must(t, g.Release(math.MaxUint64))
			l.expect(t, "release", fs...)
			if last {
				must(t, g.Detach())
			} else {
				must(t, g.Leave())
			}
		}
	}
	if after := bpfFDs(t); !mapsEqual(after, fds) {
		t.Errorf("descriptors %v after, %v before", after, fds)
	}
	if have := pinned(t, dir); len(have) != 0 {
		t.Errorf("pins left: %v", have)
	}
	if n := tcxPrograms(t, l.ifindex); n != 0 {
		t.Errorf("%d tcx programs left on the tap", n)
	}
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines {
		t.Errorf("%d goroutines after, %d before", n, goroutines)
	}
}

// holderEnv names the pin directory to TestPinnedHolderProcess.
const holderEnv = "AX_NETBUFFER_TEST_HOLDER"

// TestIntegrationPinnedSurvivesKill: the process holding a pinned gate is
// killed (SIGKILL, no Leave): the tap stays held, and the next process
// adopts the gate at the epoch the dead one set and releases what the
// guest sent meanwhile. What the dead process held in memory is lost,
// never sent.
func TestIntegrationPinnedSurvivesKill(t *testing.T) {
	l, dir := pinnedLab(t)
	// Started from this goroutine's thread, the holder is in the lab's
	// network namespace.
	cmd := exec.Command(os.Args[0], "-test.run=^TestPinnedHolderProcess$", "-test.v")
	cmd.Env = append(os.Environ(), holderEnv+"="+dir)
	cmd.Stderr = t.Output()
	stdin, err := cmd.StdinPipe()
	must(t, err)
	stdout, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	await := func(want string) {
		t.Helper()
		for lines.Scan() {
			if lines.Text() == want {
				return
			}
		}
		t.Fatalf("the holder ended before saying %q", want)
	}
	await("attached")
	inMemory := frames(3, "in-memory")
	l.send(t, inMemory...)
	_, err = stdin.Write([]byte("drain\n"))
	must(t, err)
	await("drained")
	must(t, cmd.Process.Kill())
	cmd.Wait()

	meanwhile := frames(4, "meanwhile")
	l.send(t, meanwhile...)
	l.expectNone(t, quiet, "holder killed")
	g := attachPinned(t, dir, netbuffer.Config{})
	if st := g.Stats(); !g.Adopted() || st.Epoch != 9 {
		t.Fatalf("adopted %v at epoch %d; want true, 9 (the holder's)", g.Adopted(), st.Epoch)
	}
	must(t, g.Release(9))
	l.expect(t, "Release(9) after the holder was killed", meanwhile...)
}

// TestPinnedHolderProcess is the process TestIntegrationPinnedSurvivesKill
// kills: it attaches a pinned gate, moves epoch 8 to epoch 9, drains the
// ring buffer when told, and waits to be killed (or ends when its stdin
// closes), never leaving or detaching the gate.
func TestPinnedHolderProcess(t *testing.T) {
	dir := os.Getenv(holderEnv)
	if dir == "" {
		t.Skip("run by TestIntegrationPinnedSurvivesKill")
	}
	must(t, rlimit.RemoveMemlock())
	g, err := netbuffer.Attach(tapName, &netbuffer.Config{PinDir: dir, FirstEpoch: 8})
	must(t, err)
	must(t, g.NextEpoch(9))
	fmt.Println("attached")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if in.Text() == "drain" {
			must(t, g.Release(0))
			fmt.Println("drained")
		}
	}
}
