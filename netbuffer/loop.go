package netbuffer

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/vishvananda/netns"

	"github.com/axproject/ax/bpf"
)

// loop owns the ring buffer reader and the queue: it captures frames as
// they arrive and serves requests, in one goroutine so that capture and
// release never interleave out of order. It runs on a thread in the tap's
// network namespace, which BPF_PROG_RUN resolves ingress_ifindex in.
func (g *Gate) loop(ready chan<- error) {
	defer close(g.done)
	runtime.LockOSThread()
	moved, err := enterNetns(g.ns)
	if !moved && err == nil {
		defer runtime.UnlockOSThread()
	} // else the thread stays locked and ends with the goroutine
	ready <- err
	if err != nil {
		return
	}
	var rec ringbuf.Record
	for n := 0; ; n++ {
		err := g.rd.ReadInto(&rec)
		switch {
		case err == nil:
			g.capture(rec.RawSample)
			if n%64 == 0 { // a steady stream must not starve Release
				g.serve(&rec)
			}
		case errors.Is(err, ringbuf.ErrFlushed), errors.Is(err, os.ErrDeadlineExceeded):
			g.serve(&rec)
		case errors.Is(err, os.ErrClosed):
			frames, _ := g.q.clear()
			if g.leaving.Load() {
				g.leftNow = frames
				g.drops[userLeft].Add(uint64(frames))
			} else {
				g.drops[userDiscarded].Add(uint64(frames))
			}
			g.setHeld()
			return
		default:
			g.warn("ring buffer read failed", "err", err)
			time.Sleep(10 * time.Millisecond)
			g.serve(&rec) // Release must not wait forever
		}
	}
}

// enterNetns moves the locked thread into ns unless it is there already.
func enterNetns(ns netns.NsHandle) (moved bool, err error) {
	cur, err := netns.Get()
	if err != nil {
		return false, fmt.Errorf("netbuffer: network namespace: %w", err)
	}
	defer cur.Close()
	if cur.Equal(ns) {
		return false, nil
	}
	if err := netns.Set(ns); err != nil {
		return true, fmt.Errorf("netbuffer: enter the tap's network namespace: %w", err)
	}
	return true, nil
}

// serve answers pending requests, each after draining the ring buffer of
// everything committed before the request was taken.
func (g *Gate) serve(rec *ringbuf.Record) {
	for {
		select {
		case r := <-g.reqs:
			g.drain(rec)
			r.done <- g.handle(r)
		default:
			return
		}
	}
}

// drain reads the ring buffer until it is empty, without waiting.
func (g *Gate) drain(rec *ringbuf.Record) {
	g.rd.SetDeadline(time.Unix(1, 0)) // in the past: poll, don't wait
	for g.rd.ReadInto(rec) == nil {
		g.capture(rec.RawSample)
	}
	g.rd.SetDeadline(time.Time{})
}

func (g *Gate) handle(r request) error {
	switch r.op {
	case opRelease:
		return g.releaseUpTo(r.upTo)
	case opDiscard:
		frames, _ := g.q.clear()
		g.drops[userDiscarded].Add(uint64(frames))
		g.setHeld()
		return nil
	case opDrain:
		return nil // serve drained the ring buffer
	case opOpen:
		relErr := g.releaseUpTo(math.MaxUint64)
		if err := g.setOpen(true); err != nil {
			return errors.Join(relErr, err)
		}
		// Frames captured between the release and the switch.
		var rec ringbuf.Record
		g.drain(&rec)
		return errors.Join(relErr, g.releaseUpTo(math.MaxUint64))
	}
	return fmt.Errorf("netbuffer: unknown request %d", r.op)
}

// capture moves one ring buffer record to the queue.
func (g *Gate) capture(sample []byte) {
	r, err := decodeRecord(sample)
	if err != nil {
		g.drops[userMalformed].Add(1)
		return
	}
	g.captured.Add(1)
	g.capturedBytes.Add(uint64(len(r.frame)))
	q := g.q
	if q.frames+1 > g.cfg.MaxFrames || q.bytes+len(r.frame)+(q.frames+1)*entryOverhead > g.cfg.MaxBytes {
		g.drops[userFull].Add(1)
		return
	}
	data := q.push(r.epoch, r.tstamp, r.frame)
	if r.flags&uint32(bpf.GateFrameFlagFRAME_CSUM_PARTIAL) != 0 {
		completeChecksum(data, r.csumStart, r.csumOffset)
	}
	g.setHeld()
}

func (g *Gate) setHeld() {
	g.heldFrames.Store(int64(g.q.frames))
	g.heldBytes.Store(int64(g.q.bytes))
}
