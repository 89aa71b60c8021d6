package netbuffer_test

import (
	"fmt"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/axproject/ax/netbuffer"
)

// BenchmarkGate sends batches of frames from the "guest" through the tap
// and the bridge to the peer, ungated and gated (captured, held, released
// with one Release per batch), side by side. An iteration is one batch.
//
//	frames/s       end to end, guest write to peer receive
//	ns/release     Release's share per frame: ring drain and re-injection
//
// gated-unanchored is the fallback without the dispatcher anchor.
func BenchmarkGate(b *testing.B) {
	const batch = 256
	for _, size := range []int{64, 1514} {
		fs := make([][]byte, batch)
		for i := range fs {
			fs[i] = padded(frame(i, "bench"), size)
		}
		b.Run(fmt.Sprintf("ungated/%dB", size), func(b *testing.B) {
			l := newLab(b, false)
			b.ResetTimer()
			for b.Loop() {
				l.send(b, fs...)
				if got := l.recv(b, batch, time.Second); len(got) != batch {
					b.Fatalf("%d of %d frames arrived", len(got), batch)
				}
			}
			b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "frames/s")
		})
		b.Run(fmt.Sprintf("gated/%dB", size), func(b *testing.B) { benchGated(b, fs, true) })
		b.Run(fmt.Sprintf("gated-unanchored/%dB", size), func(b *testing.B) { benchGated(b, fs, false) })
	}
}

func benchGated(b *testing.B, fs [][]byte, anchored bool) {
	l := newLab(b, false)
	requireTCX(b)
	netbuffer.SetNoAnchor(!anchored)
	defer netbuffer.SetNoAnchor(false)
	g, err := netbuffer.Attach(tapName, &netbuffer.Config{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer g.Detach()
	if g.Anchored() != anchored {
		b.Fatalf("anchored %v, want %v", g.Anchored(), anchored)
	}
	var inRelease time.Duration
	epoch := uint64(1)
	b.ResetTimer()
	for b.Loop() {
		l.send(b, fs...)
		must(b, g.NextEpoch(epoch+1))
		t0 := time.Now()
		must(b, g.Release(epoch))
		inRelease += time.Since(t0)
		epoch++
		if got := l.recv(b, len(fs), time.Second); len(got) != len(fs) {
			b.Fatalf("%d of %d frames arrived", len(got), len(fs))
		}
	}
	b.ReportMetric(float64(b.N*len(fs))/b.Elapsed().Seconds(), "frames/s")
	b.ReportMetric(float64(inRelease.Nanoseconds())/float64(b.N*len(fs)), "ns/release")
	if st := g.Stats(); st.ReleasedFrames != uint64(b.N*len(fs)) {
		b.Fatalf("released %d, want %d (stats %+v)", st.ReleasedFrames, b.N*len(fs), st)
	}
}

// BenchmarkHeldMemory measures the heap a held frame costs: each iteration
// holds 1000 more frames, all released at the end.
func BenchmarkHeldMemory(b *testing.B) {
	const perIter = 1000
	for _, size := range []int{64, 1514} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			l := newLab(b, false)
			requireTCX(b)
			g, err := netbuffer.Attach(tapName, &netbuffer.Config{
				MaxFrames: 1 << 30, MaxBytes: 1 << 30, RingBytes: 64 << 20,
				Log: slog.New(slog.DiscardHandler),
			})
			if err != nil {
				b.Fatal(err)
			}
			defer g.Detach()
			f := padded(frame(0, "held"), size)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			b.ResetTimer()
			for b.Loop() {
				for range perIter {
					l.send(b, f)
				}
				must(b, g.Release(0)) // drain the ring buffer, release nothing
			}
			b.StopTimer()
			runtime.GC()
			runtime.ReadMemStats(&after)
			held := g.Stats().HeldFrames
			if held != b.N*perIter {
				b.Fatalf("held %d frames, want %d", held, b.N*perIter)
			}
			b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(held), "heapB/held-frame")
			must(b, g.Discard())
		})
	}
}

// BenchmarkAttach times what a restarted axd waits for before it holds a
// VM's output again: making a gate (Attach, then Detach; unpinned and
// pinned) against adopting a pinned one (Leave, then Attach), side by
// side. For adopt-1000, Attach also reads in 1000 frames captured while no
// process held the gate.
func BenchmarkAttach(b *testing.B) {
	discard := slog.New(slog.DiscardHandler)
	setup := func(b *testing.B) (*lab, *netbuffer.Config) {
		l := newLab(b, false)
		requireTCX(b)
		return l, &netbuffer.Config{PinDir: pinDir(b), Log: discard}
	}
	for _, pinned := range []bool{false, true} {
		name := "new"
		if pinned {
			name = "new-pinned"
		}
		b.Run(name, func(b *testing.B) {
			_, cfg := setup(b)
			if !pinned {
				cfg.PinDir = ""
			}
			for b.Loop() {
				g, err := netbuffer.Attach(tapName, cfg)
				must(b, err)
				must(b, g.Detach())
			}
		})
	}
	for _, waiting := range []int{0, 1000} {
		name := "adopt"
		if waiting > 0 {
			name = fmt.Sprintf("adopt-%d", waiting)
		}
		b.Run(name, func(b *testing.B) {
			l, cfg := setup(b)
			fs := frames(waiting, "waiting")
			g, err := netbuffer.Attach(tapName, cfg)
			must(b, err)
			for b.Loop() {
				must(b, g.Leave())
				b.StopTimer()
				l.send(b, fs...)
				b.StartTimer()
				g, err = netbuffer.Attach(tapName, cfg)
				must(b, err)
				if held := g.Stats().HeldFrames; !g.Adopted() || held != waiting {
					b.Fatalf("adopted %v, holding %d frames; want true, %d", g.Adopted(), held, waiting)
				}
				b.StopTimer()
				must(b, g.Discard())
				b.StartTimer()
			}
			must(b, g.Detach())
		})
	}
}
