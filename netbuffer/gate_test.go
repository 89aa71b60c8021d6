package netbuffer_test

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"math"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/axproject/ax/ax/ft"
	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/test/testenv"
)

var _ ft.OutputGate = (*netbuffer.Gate)(nil)

// modes are the two ways a gate attaches; each integration test runs in both.
var modes = []struct {
	name    string
	clsact  bool
	require func(testing.TB)
}{
	{"tcx", false, requireTCX},
	{"clsact", true, requireClsact},
}

func forEachMode(t *testing.T, f func(t *testing.T, l *lab, cfg netbuffer.Config)) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			l := newLab(t, false)
			m.require(t)
			f(t, l, netbuffer.Config{ForceClsact: m.clsact})
		})
	}
}

func attach(t testing.TB, l *lab, cfg netbuffer.Config) *netbuffer.Gate {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	g, err := netbuffer.Attach(tapName, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Detach() })
	want := netbuffer.ModeTCX
	if cfg.ForceClsact {
		want = netbuffer.ModeClsact
	}
	if g.Mode() != want {
		t.Fatalf("attached with %s, want %s", g.Mode(), want)
	}
	return g
}

const quiet = 150 * time.Millisecond // long enough for a leaked frame to show

func TestIntegrationHoldUntilRelease(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		var (
			mu     sync.Mutex
			delays []time.Duration
		)
		cfg.Observer = func(d time.Duration) { mu.Lock(); delays = append(delays, d); mu.Unlock() }
		g := attach(t, l, cfg)
		if !g.Anchored() {
			t.Error("ax_release is not anchored (the log says why)")
		}

		e1, e2 := frames(5, "epoch1"), frames(5, "epoch2")
		l.send(t, e1...)
		l.expectNone(t, quiet, "epoch 1 before any release")
		must(t, g.NextEpoch(2))
		l.send(t, e2...)
		l.expectNone(t, quiet, "epoch 2 before any release")

		must(t, g.Release(1))
		l.expect(t, "Release(1)", e1...)
		must(t, g.Release(1))
		l.expectNone(t, quiet, "Release(1) again")
		must(t, g.Release(2))
		l.expect(t, "Release(2)", e2...)

		st := g.Stats()
		if st.CapturedFrames != 10 || st.ReleasedFrames != 10 || st.HeldFrames != 0 || st.HeldBytes != 0 || st.Epoch != 2 {
			t.Errorf("stats = %+v", st)
		}
		for r, n := range st.Dropped {
			if n != 0 {
				t.Errorf("dropped %d (%s)", n, r)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if len(delays) != 10 || delays[0] < quiet {
			t.Errorf("release delays %v: want 10, the first ≥ %v", delays, quiet)
		}
	})
}

// TestIntegrationReleaseDrainsRing releases right after the guest wrote,
// while the frames are still in the ring buffer: Release must release
// them in this call, not the next.
func TestIntegrationReleaseDrainsRing(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		for round := range 8 {
			fs := frames(50, "round"+string(rune('a'+round)))
			l.send(t, fs...)
			epoch := uint64(round + 1)
			must(t, g.NextEpoch(epoch+1))
			before := g.Stats().ReleasedFrames
			must(t, g.Release(epoch))
			if got := g.Stats().ReleasedFrames - before; got != 50 {
				t.Fatalf("round %d: Release released %d frames, want 50", round, got)
			}
			l.expect(t, "release", fs...)
		}
	})
}

func TestIntegrationProtocols(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		fs := [][]byte{
			arpRequest(),
			udp4(peerMAC, []byte("over IPv4")),
			udp6(peerMAC, []byte("over IPv6")),
			vlanTagged(frame(0, "vlan")),
		}
		// What the peer sees without a gate (the sniffer sees VLAN tags
		// stripped, for one) is what it must see after a release.
		l.send(t, fs...)
		want := l.recv(t, len(fs), time.Second)
		if len(want) != len(fs) {
			t.Fatalf("without a gate %d of %d frames arrived", len(want), len(fs))
		}

		g := attach(t, l, cfg)
		l.send(t, fs...)
		l.expectNone(t, quiet, "ARP, IPv4, IPv6, VLAN before release")
		must(t, g.Release(1))
		l.expect(t, "release", want...)
	})
}

func TestIntegrationLimits(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		cfg.MaxFrames = 4
		g := attach(t, l, cfg)
		fs := frames(6, "limit")
		l.send(t, fs...)
		must(t, g.Release(0)) // nothing is that old: drains the ring, releases nothing
		l.expectNone(t, quiet, "full gate")
		st := g.Stats()
		if st.HeldFrames != 4 || st.Dropped[netbuffer.DropFull] != 2 || st.ReleasedFrames != 0 {
			t.Fatalf("held %d, dropped full %d, released %d; want 4, 2, 0", st.HeldFrames, st.Dropped[netbuffer.DropFull], st.ReleasedFrames)
		}
		must(t, g.Release(1))
		l.expect(t, "release", fs[:4]...)

		// The byte bound: room for two 1000-byte frames.
		must(t, g.Detach())
		cfg.MaxFrames, cfg.MaxBytes = 0, 2*(1000+48)
		g = attach(t, l, cfg)
		big := [][]byte{padded(frame(0, "big"), 1000), padded(frame(1, "big"), 1000), padded(frame(2, "big"), 1000)}
		l.send(t, big...)
		must(t, g.Release(0))
		l.expectNone(t, quiet, "full gate")
		if st := g.Stats(); st.HeldFrames != 2 || st.HeldBytes != 2000 || st.Dropped[netbuffer.DropFull] != 1 {
			t.Fatalf("held %d frames, %d bytes, dropped full %d; want 2, 2000, 1", st.HeldFrames, st.HeldBytes, st.Dropped[netbuffer.DropFull])
		}
		must(t, g.Release(1))
		l.expect(t, "release", big[:2]...)
	})
}

func TestIntegrationDetachRestoresPath(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		l.send(t, frames(3, "held")...)
		l.expectNone(t, quiet, "gate attached")
		must(t, g.Detach())
		must(t, g.Detach()) // twice is fine
		fs := frames(3, "free")
		l.send(t, fs...)
		l.expect(t, "after Detach", fs...)
		st := g.Stats()
		if st.Dropped[netbuffer.DropDiscarded] != 3 || st.HeldFrames != 0 {
			t.Errorf("after Detach: discarded %d, held %d; want 3, 0", st.Dropped[netbuffer.DropDiscarded], st.HeldFrames)
		}
		for name, err := range map[string]error{
			"Release": g.Release(1), "NextEpoch": g.NextEpoch(9), "Discard": g.Discard(), "Open": g.Open(), "Hold": g.Hold(),
		} {
			if !errors.Is(err, netbuffer.ErrDetached) {
				t.Errorf("%s after Detach: %v, want ErrDetached", name, err)
			}
		}
	})
}

// TestIntegrationConcurrentLoop drives the gate as the FT loop does while
// the guest keeps sending: epochs advance and commit, lagging, and every
// frame comes out once, in order.
func TestIntegrationConcurrentLoop(t *testing.T) {
	testenv.RequireLong(t)
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		const n = 2000
		fs := frames(n, "stream")
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			for i, f := range fs {
				if _, err := l.tap.Write(f); err != nil {
					t.Errorf("write to tap: %v", err)
					return
				}
				if i%100 == 99 {
					time.Sleep(time.Millisecond) // spread over many epochs
				}
			}
		}()
		epoch := uint64(1)
		for running := true; running; epoch++ {
			select {
			case <-sent:
				running = false
			case <-time.After(2 * time.Millisecond):
			}
			must(t, g.NextEpoch(epoch+1)) // "paused": what follows is epoch+1
			if epoch > 2 {
				must(t, g.Release(epoch-2)) // the secondary lags two checkpoints
			}
		}
		must(t, g.Release(epoch))
		t.Logf("%d epochs", epoch)
		l.expect(t, "the stream", fs...)
		if st := g.Stats(); st.CapturedFrames != n || st.ReleasedFrames != n || st.HeldFrames != 0 {
			t.Errorf("captured %d, released %d, held %d; want %d, %d, 0", st.CapturedFrames, st.ReleasedFrames, st.HeldFrames, n, n)
		}
	})
}

// TestIntegrationTapGoesAway: QEMU exits, the tap with it; Release then
// fails, counting what it could not send, and Detach still cleans up.
func TestIntegrationTapGoesAway(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		l.send(t, frames(3, "orphan")...)
		must(t, g.Release(0)) // into the queue
		must(t, l.tap.Close())
		if _, err := net.InterfaceByName(tapName); err == nil {
			t.Fatal("the tap outlived its descriptor")
		}
		if err := g.Release(1); err == nil {
			t.Error("Release to a vanished tap succeeded")
		}
		if st := g.Stats(); st.Dropped[netbuffer.DropInject] != 3 || st.HeldFrames != 0 {
			t.Errorf("dropped (inject) %d, held %d; want 3, 0", st.Dropped[netbuffer.DropInject], st.HeldFrames)
		}
		must(t, g.Detach())
	})
}

func TestIntegrationDiscard(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		l.send(t, frames(3, "doomed")...)
		must(t, g.Discard())
		must(t, g.Release(math.MaxUint64))
		l.expectNone(t, quiet, "discarded")
		if st := g.Stats(); st.Dropped[netbuffer.DropDiscarded] != 3 || st.HeldFrames != 0 {
			t.Errorf("discarded %d, held %d; want 3, 0", st.Dropped[netbuffer.DropDiscarded], st.HeldFrames)
		}
	})
}

func TestIntegrationOpenAndHold(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		held := frames(3, "held")
		l.send(t, held...)
		l.expectNone(t, quiet, "shut")
		must(t, g.Open())
		l.expect(t, "Open releases what is held", held...)
		open := frames(3, "open")
		l.send(t, open...)
		l.expect(t, "open gate", open...)
		must(t, g.Hold())
		again := frames(3, "again")
		l.send(t, again...)
		l.expectNone(t, quiet, "held again")
		must(t, g.Release(1))
		l.expect(t, "release", again...)
	})
}

func TestIntegrationEpochsNeverGoBack(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		cfg.FirstEpoch = 7
		g := attach(t, l, cfg)
		if err := g.NextEpoch(6); err == nil {
			t.Error("NextEpoch(6) after 7 succeeded")
		}
		must(t, g.NextEpoch(7))
		fs := frames(2, "seven")
		l.send(t, fs...)
		must(t, g.Release(6))
		l.expectNone(t, quiet, "Release(6) with epoch 7 frames")
		must(t, g.Release(7))
		l.expect(t, "Release(7)", fs...)
	})
}

// TestIntegrationNoLeaks attaches and detaches repeatedly: no BPF object
// may stay behind, in this process or on the tap.
func TestIntegrationNoLeaks(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		cfg.Log = slog.New(slog.NewTextHandler(t.Output(), nil))
		before := bpfFDs(t)
		for range 3 {
			g, err := netbuffer.Attach(tapName, &cfg)
			must(t, err)
			fs := frames(2, "cycle")
			l.send(t, fs...)
			must(t, g.Release(1))
			l.expect(t, "release", fs...)
			must(t, g.Detach())
			must(t, g.Detach())
		}
		after := bpfFDs(t)
		for k, n := range after {
			if n != before[k] {
				t.Errorf("%s descriptors: %d before, %d after", k, before[k], n)
			}
		}
		if n := tcxPrograms(t, l.ifindex); n != 0 {
			t.Errorf("%d tcx programs left on the tap", n)
		}
		if hasClsact(t, l.ifindex) {
			t.Error("clsact qdisc left on the tap")
		}
	})
}

// TestIntegrationClsactKeepsForeignQdisc: a clsact qdisc the gate did not
// add stays when it detaches.
func TestIntegrationClsactKeepsForeignQdisc(t *testing.T) {
	l := newLab(t, false)
	requireClsact(t)
	must(t, netlink.QdiscAdd(clsactOn(l.ifindex)))
	g := attach(t, l, netbuffer.Config{ForceClsact: true})
	must(t, g.Detach())
	if !hasClsact(t, l.ifindex) {
		t.Error("the gate removed a clsact qdisc it did not add")
	}
}

// TestIntegrationPartialChecksum: with virtio-net offloads (IFF_VNET_HDR),
// a frame whose checksum the guest left to the device goes out complete.
func TestIntegrationPartialChecksum(t *testing.T) {
	l := newLab(t, true)
	testenv.RequireFeature(t, "kfunc-cast-to-kern-ctx", netbuffer.CompletesChecksums(), "needs Linux ≥ 6.3")
	g := attach(t, l, anyMode(t))

	f := udp4(peerMAC, []byte("checksum left to the device"))
	const csumStart, csumOffset = 14 + 20, 6
	binary.BigEndian.PutUint16(f[csumStart+csumOffset:], pseudoHeaderSum4(f)) // as Linux guests leave it
	l.sendVnet(t, vnetHdr{flags: 1 /* NEEDS_CSUM */, csumStart: csumStart, csumOffset: csumOffset}, f)
	l.expectNone(t, quiet, "held")
	must(t, g.Release(1))
	got := l.recv(t, 2, 300*time.Millisecond)
	if len(got) != 1 {
		t.Fatalf("%d frames released, want 1: %s", len(got), describeAll(got))
	}
	if !udp4ChecksumOK(got[0]) {
		t.Errorf("released UDP frame has a bad checksum: % x", got[0])
	}
}

// TestIntegrationOffloadedFramesDropped: a segmentation-offload
// super-frame cannot be re-injected: it is dropped and counted, never
// passed, and the frames after it still go.
func TestIntegrationOffloadedFramesDropped(t *testing.T) {
	l := newLab(t, true)
	g := attach(t, l, anyMode(t))
	tcp := tcp4(peerMAC, make([]byte, 3000))
	l.sendVnet(t, vnetHdr{flags: 1, gsoType: 1 /* TCPV4 */, hdrLen: 54, gsoSize: 1000, csumStart: 34, csumOffset: 16}, tcp)
	after := frame(0, "after")
	l.send(t, after)
	l.expectNone(t, quiet, "held")
	must(t, g.Release(1))
	l.expect(t, "release", after)
	if n := g.Stats().Dropped[netbuffer.DropGSO]; n != 1 {
		t.Errorf("dropped %d GSO frames, want 1", n)
	}
}

// TestIntegrationFrameSizes: a frame as long as the gate can re-inject goes
// out; a longer one (jumbo) is dropped and counted, never passed.
func TestIntegrationFrameSizes(t *testing.T) {
	l := newLab(t, false)
	cfg := anyMode(t)
	for _, name := range []string{tapName, "axbr0", "axveth0", "axveth1"} {
		lk, err := netlink.LinkByName(name)
		must(t, err)
		must(t, netlink.LinkSetMTU(lk, 9000))
	}
	g := attach(t, l, cfg)
	if g.MaxFrame() < 1514 {
		t.Fatalf("MaxFrame %d: cannot even re-inject a standard frame", g.MaxFrame())
	}
	t.Logf("largest re-injectable frame: %d bytes", g.MaxFrame())
	largest := padded(frame(0, "largest"), g.MaxFrame())
	jumbo := padded(frame(1, "jumbo"), g.MaxFrame()+1)
	l.send(t, largest, jumbo)
	l.expectNone(t, quiet, "held")
	must(t, g.Release(1))
	l.expect(t, "release", largest)
	if n := g.Stats().Dropped[netbuffer.DropTooBig]; n != 1 {
		t.Errorf("dropped %d too-big frames, want 1", n)
	}
}

// TestIntegrationLargeRelease releases more frames than one batch holds,
// of all sizes, in order.
func TestIntegrationLargeRelease(t *testing.T) {
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		var fs [][]byte
		for i := range 1000 {
			fs = append(fs, padded(frame(i, "large"), 60+(i*397)%1455))
		}
		l.send(t, fs...)
		must(t, g.Release(1))
		l.expect(t, "release", fs...)
	})
}

// TestIntegrationUnanchoredRelease: where the dispatcher anchor cannot be
// set up, re-injection is slower but just as correct.
func TestIntegrationUnanchoredRelease(t *testing.T) {
	netbuffer.SetNoAnchor(true)
	t.Cleanup(func() { netbuffer.SetNoAnchor(false) })
	forEachMode(t, func(t *testing.T, l *lab, cfg netbuffer.Config) {
		g := attach(t, l, cfg)
		if g.Anchored() {
			t.Fatal("anchored, though told not to")
		}
		e1, e2 := frames(300, "epoch1"), frames(20, "epoch2")
		l.send(t, e1...)
		must(t, g.NextEpoch(2))
		l.send(t, e2...)
		must(t, g.Release(1))
		l.expect(t, "Release(1)", e1...)
		must(t, g.Release(2))
		l.expect(t, "Release(2)", e2...)
	})
}

// TestIntegrationReleaseFromAnyGoroutine: Release from goroutines that are
// not in the tap's namespace (the gate's own goroutine re-injects).
func TestIntegrationReleaseFromAnyGoroutine(t *testing.T) {
	l := newLab(t, false)
	g := attach(t, l, anyMode(t))
	fs := frames(4, "elsewhere")
	l.send(t, fs...)
	errc := make(chan error)
	go func() { errc <- g.Release(1) }() // an unlocked goroutine: the host's namespace
	must(t, <-errc)
	l.expect(t, "release", fs...)
}

func padded(f []byte, n int) []byte {
	for len(f) < n {
		f = append(f, byte(len(f)))
	}
	return f
}
