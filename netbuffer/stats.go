package netbuffer

import (
	"time"

	"github.com/axproject/ax/bpf"
)

// DropReason says why a frame was dropped instead of held.
type DropReason string

const (
	// DropRingFull: the kernel ring buffer was full (the gate fell behind;
	// raise Config.RingBytes).
	DropRingFull DropReason = "ring_full"
	// DropTooBig: longer than the largest frame re-injection accepts
	// (Gate.MaxFrame; lower the guest's MTU).
	DropTooBig DropReason = "too_big"
	// DropGSO: a segmentation-offload super-frame; the guest's virtio-net
	// must not use offloads (QEMU: virtio-net-pci,csum=off).
	DropGSO DropReason = "gso"
	// DropCopy: the kernel could not copy the frame.
	DropCopy DropReason = "copy"
	// DropFull: Config.MaxBytes or MaxFrames was reached.
	DropFull DropReason = "full"
	// DropInject: re-injection failed; the frame is lost.
	DropInject DropReason = "inject"
	// DropDiscarded: held, then thrown away by Discard or Detach.
	DropDiscarded DropReason = "discarded"
	// DropMalformed: a ring buffer record did not parse (a bug).
	DropMalformed DropReason = "malformed"
	// DropLeft: held in memory by a process when it left a pinned gate
	// (Leave), hence never released; counted by the gate that left and by
	// the gates that adopt it later.
	DropLeft DropReason = "left"
)

// kernelReasons maps ax_gate's drop counters to reasons.
var kernelReasons = [...]DropReason{
	bpf.GateDropReasonDROP_RING_FULL: DropRingFull,
	bpf.GateDropReasonDROP_TOO_BIG:   DropTooBig,
	bpf.GateDropReasonDROP_GSO:       DropGSO,
	bpf.GateDropReasonDROP_COPY:      DropCopy,
}

// userReasons are counted by the gate itself.
var userReasons = [...]DropReason{DropFull, DropInject, DropDiscarded, DropMalformed, DropLeft}

const (
	userFull = iota
	userInject
	userDiscarded
	userMalformed
	userLeft
)

// Stats is a snapshot of a gate's counters; counters count since Attach.
// An adopted gate's drops counted by the kernel (DropRingFull, DropTooBig,
// DropGSO, DropCopy) and DropLeft count since the gate was first attached,
// across the processes that held it and the time none did; its other
// counters count since it was adopted.
type Stats struct {
	Epoch          uint64 // tag of frames captured now
	Open           bool   // passing everything
	HeldFrames     int
	HeldBytes      int
	CapturedFrames uint64
	CapturedBytes  uint64
	ReleasedFrames uint64
	ReleasedBytes  uint64
	Dropped        map[DropReason]uint64
}

// Stats returns the gate's counters. It works after Detach and Leave too.
func (g *Gate) Stats() Stats {
	g.stateMu.Lock()
	st := Stats{Epoch: g.state.Epoch, Open: g.state.Open != 0}
	g.stateMu.Unlock()
	st.HeldFrames = int(g.heldFrames.Load())
	st.HeldBytes = int(g.heldBytes.Load())
	st.CapturedFrames = g.captured.Load()
	st.CapturedBytes = g.capturedBytes.Load()
	st.ReleasedFrames = g.released.Load()
	st.ReleasedBytes = g.releasedBytes.Load()
	st.Dropped = make(map[DropReason]uint64, len(kernelReasons)+len(userReasons))
	for i, r := range userReasons {
		st.Dropped[r] = g.drops[i].Load()
	}
	k := g.kernelDrops()
	for i, n := range k.gate {
		st.Dropped[kernelReasons[i]] += n
	}
	st.Dropped[DropInject] += k.markFailures
	return st
}

// kernelCounts are the drops counted by the BPF programs.
type kernelCounts struct {
	gate         [len(kernelReasons)]uint64 // ax_gate, by reason
	markFailures uint64                     // ax_release could not mark a frame
}

// kernelDrops sums ax_gate's per-CPU drop counters and reads ax_release's.
func (g *Gate) kernelDrops() kernelCounts {
	g.finalMu.Lock()
	defer g.finalMu.Unlock()
	if g.objs.AxDrops == nil || g.rel.AxReleaseFail == nil || g.detached() {
		return g.final
	}
	var out kernelCounts
	var perCPU []uint64
	for i := range kernelReasons {
		if err := g.objs.AxDrops.Lookup(uint32(i), &perCPU); err != nil {
			return g.final
		}
		for _, n := range perCPU {
			out.gate[i] += n
		}
	}
	if err := g.rel.AxReleaseFail.Lookup(uint32(0), &out.markFailures); err != nil {
		return g.final
	}
	g.final = out
	return out
}

// warnDrops logs, at most every 10 s, that frames were dropped, with what
// to do about it.
func (g *Gate) warnDrops() {
	if time.Since(g.warnedAt) < 10*time.Second {
		return
	}
	st := g.Stats()
	var total uint64
	args := []any{}
	for _, r := range append(kernelReasons[:], DropFull, DropInject, DropMalformed) {
		if n := st.Dropped[r]; n > 0 {
			total += n
			args = append(args, string(r), n)
		}
	}
	if total == g.warned {
		return
	}
	g.warned, g.warnedAt = total, time.Now()
	args = append(args, "hint", hint(st.Dropped))
	g.log.Warn("netbuffer: frames dropped", args...)
}

func hint(d map[DropReason]uint64) string {
	switch {
	case d[DropGSO] > 0:
		return "the guest sends offloaded frames: start its virtio-net with csum=off"
	case d[DropTooBig] > 0:
		return "the guest's MTU is too large for re-injection"
	case d[DropRingFull] > 0:
		return "raise Config.RingBytes"
	case d[DropFull] > 0:
		return "raise Config.MaxBytes/MaxFrames or checkpoint more often"
	}
	return ""
}

func (g *Gate) warn(msg string, args ...any) {
	if time.Since(g.warnedAt) < 10*time.Second {
		return
	}
	g.warnedAt = time.Now()
	g.log.Warn("netbuffer: "+msg, args...)
}
