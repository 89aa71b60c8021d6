package netbuffer

import (
	"encoding/binary"
	"fmt"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/axproject/ax/bpf"
)

// releaseUpTo re-injects held frames of epochs ≤ upTo, oldest first.
func (g *Gate) releaseUpTo(upTo uint64) error {
	if e, ok := g.q.front(); !ok || e.epoch > upTo {
		g.warnDrops()
		return nil
	}
	// One CPU for the whole release: re-injected frames are queued to the
	// CPU's backlog on their way through the bridge, and frames queued on
	// different CPUs may overtake each other.
	defer pinCPU()()
	var first error
	for {
		n, err := g.releaseBatch(upTo)
		if err != nil && first == nil {
			first = err
		}
		if n == 0 {
			break
		}
	}
	g.setHeld()
	g.warnDrops()
	return first
}

// Layout of struct batch (release.c), shared with ax_release by mmap.
const (
	batchFrames   = len(bpf.ReleaseBatch{}.Off)
	batchOffCount = int(unsafe.Offsetof(bpf.ReleaseBatch{}.Count))
	batchOffNext  = int(unsafe.Offsetof(bpf.ReleaseBatch{}.Next))
	batchOffOff   = int(unsafe.Offsetof(bpf.ReleaseBatch{}.Off))
	batchOffLen   = int(unsafe.Offsetof(bpf.ReleaseBatch{}.Len))
	batchOffBytes = int(unsafe.Offsetof(bpf.ReleaseBatch{}.Bytes))
	// A frame starts at most this far into Bytes (ax_release's bound).
	batchLastOff = len(bpf.ReleaseBatch{}.Bytes) - bpf.MaxFrame
)

// releaseBatch sends the next frames of epochs ≤ upTo, as many as fit in
// ax_batch, with one run of ax_release; it pops them and returns how many.
func (g *Gate) releaseBatch(upTo uint64) (int, error) {
	n, off, longest := 0, 0, 0
	for n < batchFrames && off <= batchLastOff {
		e, ok := g.q.at(n)
		if !ok || e.epoch > upTo {
			break
		}
		copy(g.batch[batchOffBytes+off:], e.data)
		binary.NativeEndian.PutUint32(g.batch[batchOffOff+4*n:], uint32(off))
		binary.NativeEndian.PutUint32(g.batch[batchOffLen+4*n:], uint32(len(e.data)))
		off += len(e.data)
		longest = max(longest, len(e.data))
		n++
	}
	if n == 0 {
		return 0, nil
	}
	binary.NativeEndian.PutUint32(g.batch[batchOffCount:], uint32(n))
	binary.NativeEndian.PutUint32(g.batch[batchOffNext:], 0)

	// The packet the kernel starts from: ax_release resizes and fills it.
	data := g.zeros[:max(longest, 64)]
	binary.NativeEndian.PutUint32(g.xdpCtx[4:], uint32(len(data))) // data_end
	failedBefore := g.releaseFailures()
	// One run for the batch. Should the kernel interrupt it (EINTR),
	// cilium/ebpf runs it again and ax_release carries on from next.
	// (One run per frame would avoid the RCU waits of an unanchored gate,
	// but each run sets up and tears down a page pool: at thousands of
	// runs a second the kernel's deferred pool releases swamp the host.)
	_, runErr := g.rel.AxRelease.Run(&ebpf.RunOptions{
		Data: data, Context: g.xdpCtx[:], Repeat: uint32(n), Flags: unix.BPF_F_TEST_XDP_LIVE_FRAMES,
	})
	// How far ax_release got, whatever Run says.
	sent := min(int(binary.NativeEndian.Uint32(g.batch[batchOffNext:])), n)
	failed := int(g.releaseFailures() - failedBefore) // counted by ax_release
	var now uint64
	if g.cfg.Observer != nil {
		now = monotonicNow()
	}
	for k := range n {
		e, _ := g.q.front()
		if k < sent {
			g.releasedBytes.Add(uint64(len(e.data)))
			if g.cfg.Observer != nil && now > e.tstamp {
				g.cfg.Observer(time.Duration(now - e.tstamp))
			}
		}
		g.q.pop()
	}
	g.released.Add(uint64(max(sent-failed, 0)))
	g.drops[userInject].Add(uint64(n - sent))
	if runErr != nil {
		return n, fmt.Errorf("netbuffer: re-inject %d frames: %w", n-sent, runErr)
	}
	return n, nil
}

func (g *Gate) releaseFailures() uint64 {
	var n uint64
	_ = g.rel.AxReleaseFail.Lookup(uint32(0), &n)
	return n
}

// pinCPU pins the calling (locked) thread to the CPU it runs on and
// returns the function that restores its affinity.
func pinCPU() func() {
	var orig unix.CPUSet
	if unix.SchedGetaffinity(0, &orig) != nil {
		return func() {}
	}
	var cpu uint32
	if _, _, e := unix.RawSyscall(unix.SYS_GETCPU, uintptr(unsafe.Pointer(&cpu)), 0, 0); e != 0 {
		return func() {}
	}
	var one unix.CPUSet
	one.Set(int(cpu))
	if unix.SchedSetaffinity(0, &one) != nil {
		return func() {}
	}
	return func() { _ = unix.SchedSetaffinity(0, &orig) }
}

func monotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
