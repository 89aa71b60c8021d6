package daemon

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/replication/bufpool"
	"github.com/axproject/ax/replication/nbd"
)

// Disk replication, primary side: the guest's QEMU mirrors each protected
// disk (blockdev-mirror, copy-mode write-blocking) to an NBD export this axd
// serves; every write the mirror makes becomes a DiskWrite on the VM's
// replication stream, in order with the checkpoints. Below FT such a write
// completes only once the partner has it: QEMU's mirror does not pass the
// guest's flushes on, so waiting for each write is what makes a flush mean
// the data is on the partner.
//
// Once a disk is in sync, a disk whose guest-facing node is a quorum node
// (as the QMP driver sets disks up) moves from the mirror to a second quorum
// child reading the same kind of export: QEMU then writes the disk and the
// export in parallel and sends the guest's flushes to the export too. A
// write through the child completes as soon as it is on the stream; a flush
// (or a FUA write) waits until the partner has everything before it — the
// guest's durability points, not each write, pay the round trip.
//
// The partner's replica disks outlive a stream (a link cut, an axd restart,
// a failover), so the mirror's copy need not cross the link whole: when the
// stream opens the partner sends the hash of every 64 KiB range of its
// replica, and until the disks are in sync a write or zero range is sent
// only for the ranges whose content the replica does not hold already
// (diskResync).

// diskChunk bounds one DiskWrite's data, well under the frame bound.
const diskChunk = 1 << 20

// zeroChunk is what write-zeroes requests are replicated with.
var zeroChunk = make([]byte, diskChunk)

// diskRepl is one stream's disk replication.
type diskRepl struct {
	d      *Daemon
	vm     string
	sender *replication.Sender
	mon    hv.Block
	disks  []api.Disk
	sizes  []int64
	ctx    context.Context
	// cancel ends ctx: stop first releases writes and flushes waiting for
	// the partner, so QEMU can drain the replication child.
	cancel context.CancelFunc

	// mu orders level switches against writes: a write reads how it must
	// complete and puts itself on the stream under the read lock, so it is
	// either before a level frame or sees the level after it.
	mu    sync.RWMutex
	wait  bool   // a guest write completes only once the partner has it (not FT)
	epoch uint64 // the FT epoch writes belong to

	pid      int // QEMU's (0: unknown): the one process the exports admit besides root's
	exports  []string
	started  []int // disks whose export, target and job exist
	children []int // disks replicated through a quorum child

	// queue holds guest writes, in order, until the pump has put them on
	// the stream: a write's NBD reply need not wait for the TCP send.
	queue    chan queuedWrite
	pumpDone chan struct{}
	enqMu    sync.Mutex // orders sequence numbers with queue positions
	queued   uint64     // writes ever queued; a write's seq is its position
	sentMu   sync.Mutex
	sent     uint64        // writes the pump has put on the stream
	sentN    uint64        // the stream's ordered count just after the last of them
	sentErr  error         // why the pump stopped, once it has
	sentCh   chan struct{} // made by a waiter, closed when sent moves
	// boundaries (under enqMu): for each checkpoint taken, the writes
	// queued before its pause ended — they must be on the stream before it.
	boundaries map[uint64]uint64

	// resync, until the disks are first in sync, compares writes with what
	// the partner's replica held when the stream opened and sends only
	// what differs (diskresync.go); it changes under enqMu. Nil without a
	// base, and once the disks are in sync: then nothing is compared.
	resync atomic.Pointer[diskResync]
	// What the sync on the base compared, and sent of it, in disk bytes.
	resyncCompared, resyncSent atomic.Int64

	nChildren atomic.Int32 // len(children), for status
}

// queueDepth bounds the writes waiting for the pump (each at most diskChunk).
const queueDepth = 32

// queuedWrite is one guest write waiting for the pump.
type queuedWrite struct {
	seq   uint64
	epoch uint64
	w     replication.DiskWrite
	buf   *[]byte // the bufpool buffer w.Data lives in, if any
	zero  int64   // when set, no data: this many bytes from w.Offset read as zeroes
}

// free gives q's buffer back to the pool.
func (q *queuedWrite) free() {
	bufpool.Put(q.buf)
	q.buf = nil
}

// lag is how many writes the partner has not acknowledged yet: on the
// stream or still queued for it.
func (r *diskRepl) lag() uint64 { return r.sender.OrderedPending() + uint64(len(r.queue)) }

// mode says how the disks reach the partner: "quorum" (a write completes
// once queued, a flush waits for the partner), "mirror" (each write waits
// for the partner), "mixed", or "" before they are in sync.
func (r *diskRepl) mode() string {
	switch n := int(r.nChildren.Load()); {
	case len(r.disks) == 0:
		return ""
	case n == len(r.disks):
		return "quorum"
	case n > 0:
		return "mixed"
	}
	return "mirror"
}

// newDiskRepl starts the disk replication of a stream; base is what the
// partner's replica disks held when it opened (Sender.TakeDiskBase), nil
// when they were not hashed.
func newDiskRepl(ctx context.Context, d *Daemon, vm string, sender *replication.Sender, mon hv.Block, disks []api.Disk, sizes []int64, base [][]uint64) *diskRepl {
	r := makeDiskRepl(ctx, d, vm, sender, mon, disks, sizes)
	r.resync.Store(newDiskResync(base, sizes))
	go r.pump()
	return r
}

// makeDiskRepl is newDiskRepl without the pump.
func makeDiskRepl(ctx context.Context, d *Daemon, vm string, sender *replication.Sender, mon hv.Block, disks []api.Disk, sizes []int64) *diskRepl {
	ctx, cancel := context.WithCancel(ctx)
	return &diskRepl{d: d, vm: vm, sender: sender, mon: mon, disks: disks, sizes: sizes, ctx: ctx, cancel: cancel, wait: true,
		queue: make(chan queuedWrite, queueDepth), pumpDone: make(chan struct{}),
		boundaries: map[uint64]uint64{}}
}

// pump puts queued writes on the stream in queue order until the stream or
// ctx ends.
func (r *diskRepl) pump() {
	var err error
	defer func() {
		if err == nil {
			if err = r.sender.Err(); err == nil {
				err = errPumpStopped
			}
		}
		r.sentMu.Lock()
		r.sentErr = err
		r.sentMu.Unlock()
		close(r.pumpDone)
	}()
	for {
		var q queuedWrite
		select {
		case <-r.ctx.Done():
			return
		case <-r.sender.Done():
			return
		case q = <-r.queue:
		}
		var n uint64
		if q.zero > 0 {
			n, err = r.sender.SendDiskZero(q.epoch, replication.DiskZero{Disk: q.w.Disk, Offset: q.w.Offset, Length: uint64(q.zero)})
		} else {
			n, err = r.sender.SendDiskWrite(q.epoch, q.w)
		}
		q.free()
		if err != nil {
			return
		}
		r.sentMu.Lock()
		r.sent, r.sentN = q.seq, n
		if r.sentCh != nil { // someone waits: the common write has no waiter
			close(r.sentCh)
			r.sentCh = nil
		}
		r.sentMu.Unlock()
	}
}

// errPumpStopped: the stream ended with writes still queued.
var errPumpStopped = errors.New("disk replication stopped")

// enqueue gives q the next sequence number and queues it.
func (r *diskRepl) enqueue(q queuedWrite) (uint64, error) {
	r.enqMu.Lock()
	defer r.enqMu.Unlock()
	return r.enqueueLocked(q)
}

// enqueueLocked is enqueue with enqMu held.
func (r *diskRepl) enqueueLocked(q queuedWrite) (uint64, error) {
	q.seq = r.queued + 1
	if r.ctx.Err() != nil { // stopped: nothing will send it
		q.free()
		return 0, errPumpStopped
	}
	select {
	case r.queue <- q:
		r.queued = q.seq
		return q.seq, nil
	case <-r.pumpDone:
		q.free()
		return 0, r.pumpErr()
	}
}

func (r *diskRepl) pumpErr() error {
	r.sentMu.Lock()
	defer r.sentMu.Unlock()
	return r.sentErr
}

// awaitSent returns once the pump has put write seq (and every write
// before it) on the stream, with the stream's ordered count then.
func (r *diskRepl) awaitSent(seq uint64) (uint64, error) {
	for {
		r.sentMu.Lock()
		sent, n, err := r.sent, r.sentN, r.sentErr
		if sent < seq && err == nil && r.sentCh == nil {
			r.sentCh = make(chan struct{})
		}
		ch := r.sentCh
		r.sentMu.Unlock()
		if sent >= seq {
			if seq == 0 {
				n = r.sender.Ordered() // nothing was ever queued
			}
			return n, nil
		}
		if err != nil {
			return 0, err
		}
		select {
		case <-ch:
		case <-r.pumpDone:
		}
	}
}

// drain returns once every write queued so far is on the stream, with the
// stream's ordered count then.
func (r *diskRepl) drain() (uint64, error) {
	r.enqMu.Lock()
	seq := r.queued
	r.enqMu.Unlock()
	return r.awaitSent(seq)
}

// Names of what disk replication adds to QEMU and to the NBD server.
func targetNode(node string) string          { return "ax-target-" + node }
func childNode(node string) string           { return "ax-child-" + node }
func mirrorJob(node string) string           { return "ax-mirror-" + node }
func exportName(vm, node string) string      { return vm + "/" + node }
func childExportName(vm, node string) string { return vm + "/" + node + "/child" }

// diskSizes asks QEMU for the size the guest sees of each disk.
func diskSizes(ctx context.Context, mon hv.Block, disks []api.Disk) ([]int64, error) {
	sizes := make([]int64, len(disks))
	for i, dk := range disks {
		n, err := mon.NodeSize(ctx, dk.Node)
		if err != nil {
			return nil, err
		}
		sizes[i] = n
	}
	return sizes, nil
}

// start exports each disk and starts its mirror.
func (r *diskRepl) start(ctx context.Context) error {
	if err := openNBDTo(r.d.cfg.StateDir, r.d.nbdSocket(), r.pid); err != nil {
		return err
	}
	for i, dk := range r.disks {
		r.clearLeftovers(ctx, dk.Node)
		name := exportName(r.vm, dk.Node)
		if err := r.d.nbd.AddExportFor(name, &diskExport{r: r, idx: uint32(i), size: r.sizes[i]}, r.pid); err != nil {
			return fmt.Errorf("disk %s: %w", dk.Node, err)
		}
		r.exports = append(r.exports, name)
		if err := r.mon.AddNBDTarget(ctx, targetNode(dk.Node), r.d.nbdSocket(), name); err != nil {
			return fmt.Errorf("disk %s: replication target: %w", dk.Node, err)
		}
		if err := r.mon.Mirror(ctx, mirrorJob(dk.Node), dk.Node, targetNode(dk.Node)); err != nil {
			r.mon.DeleteNode(ctx, targetNode(dk.Node))
			return fmt.Errorf("disk %s: mirror: %w", dk.Node, err)
		}
		r.started = append(r.started, i)
	}
	return nil
}

// clearLeftovers removes a mirror and target an earlier stream left behind
// (its axd stopped without cleaning up).
func (r *diskRepl) clearLeftovers(ctx context.Context, node string) {
	if jobs, err := r.mon.BlockJobs(ctx); err == nil {
		for _, j := range jobs {
			if j.ID == mirrorJob(node) {
				r.mon.CancelJob(ctx, j.ID, true)
				r.awaitJobGone(ctx, j.ID)
			}
		}
	}
	r.mon.RemoveQuorumChild(ctx, node, childNode(node))
	r.mon.DeleteNode(ctx, childNode(node))
	r.mon.DeleteNode(ctx, targetNode(node))
}

// attachChildren moves each in-sync disk whose node is a quorum node from
// its mirror to a quorum child; other disks keep their mirror.
func (r *diskRepl) attachChildren(ctx context.Context) error {
	for _, i := range r.started {
		node := r.disks[i].Node
		if drv, err := r.mon.NodeDriver(ctx, node); err != nil || drv != "quorum" {
			continue
		}
		name := childExportName(r.vm, node)
		if err := r.d.nbd.AddExportFor(name, &diskExport{r: r, idx: uint32(i), size: r.sizes[i], child: true}, r.pid); err != nil {
			return fmt.Errorf("disk %s: %w", node, err)
		}
		r.exports = append(r.exports, name)
		if err := r.mon.AddNBDTarget(ctx, childNode(node), r.d.nbdSocket(), name); err != nil {
			return fmt.Errorf("disk %s: replication child: %w", node, err)
		}
		if err := r.mon.AddQuorumChild(ctx, node, childNode(node)); err != nil {
			r.mon.DeleteNode(ctx, childNode(node))
			return fmt.Errorf("disk %s: replication child: %w", node, err)
		}
		r.children = append(r.children, i)
		r.nChildren.Add(1)
		// Every write now reaches the export through the child. Cancelling
		// a ready mirror completes it without switching the guest over;
		// writes in flight through it still reach the partner in order.
		if err := r.mon.CancelJob(ctx, mirrorJob(node), false); err != nil {
			return fmt.Errorf("disk %s: end the mirror: %w", node, err)
		}
		r.awaitJobGone(ctx, mirrorJob(node))
		r.mon.DeleteNode(ctx, targetNode(node))
		r.d.nbd.RemoveExport(exportName(r.vm, node))
	}
	return nil
}

func (r *diskRepl) awaitJobGone(ctx context.Context, id string) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		jobs, err := r.mon.BlockJobs(ctx)
		if err != nil {
			return
		}
		found := false
		for _, j := range jobs {
			found = found || j.ID == id
		}
		if !found {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitReady returns once every mirror has copied the whole disk and mirrors
// each write synchronously, reporting progress meanwhile.
func (r *diskRepl) waitReady(ctx context.Context, progress func(done, total int64)) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		jobs, err := r.mon.BlockJobs(ctx)
		if err != nil {
			return err
		}
		var done, total int64
		ready := 0
		for _, i := range r.started {
			id := mirrorJob(r.disks[i].Node)
			var job *qemu.BlockJob
			for k := range jobs {
				if jobs[k].ID == id {
					job = &jobs[k]
				}
			}
			if job == nil {
				if err := r.sender.Err(); err != nil {
					return err
				}
				return fmt.Errorf("disk %s: the mirror ended before the disk was in sync (see QEMU's log)", r.disks[i].Node)
			}
			done, total = done+job.Offset, total+job.Len
			if job.Ready {
				ready++
			}
		}
		progress(done, total)
		if ready == len(r.started) {
			r.endResync()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.sender.Done():
			return r.sender.Err()
		case <-t.C:
		}
	}
}

// stop ends the mirrors (the guest keeps its own disks) and the exports.
func (r *diskRepl) stop() {
	// A flush still waiting for a partner that is gone (or was told Bye)
	// fails now: the guest's own disk has it, and removing the child below
	// waits for QEMU's requests to it.
	r.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, i := range r.children {
		node := r.disks[i].Node
		if err := r.mon.RemoveQuorumChild(ctx, node, childNode(node)); err != nil {
			r.d.log.Warn("disk replication: remove quorum child", "vm", r.vm, "disk", node, "err", err)
		}
		r.mon.DeleteNode(ctx, childNode(node))
	}
	for _, i := range r.started {
		node := r.disks[i].Node
		// force: a ready mirror is abandoned at once instead of waiting
		// for a final sync to a partner that may be gone.
		if err := r.mon.CancelJob(ctx, mirrorJob(node), true); err == nil {
			r.awaitJobGone(ctx, mirrorJob(node))
		} else {
			r.d.log.Warn("disk replication: cancel mirror", "vm", r.vm, "disk", node, "err", err)
		}
		// A target node left behind keeps an NBD client reconnecting to
		// an export that is about to go.
		if err := r.mon.DeleteNode(ctx, targetNode(node)); err != nil {
			r.d.log.Warn("disk replication: remove mirror target", "vm", r.vm, "disk", node, "err", err)
		}
	}
	for _, name := range r.exports {
		r.d.nbd.RemoveExport(name)
	}
	r.started, r.exports, r.children = nil, nil, nil
	r.nChildren.Store(0)
}

// setLevel switches how writes complete and tells the secondary, in order
// with them; it returns the level frame's ordered count.
func (r *diskRepl) setLevel(level string, epoch uint64) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, err := r.drain(); err != nil {
		return 0, err
	}
	n, err := r.sender.SetLevel(level)
	if err != nil {
		return 0, err
	}
	r.wait, r.epoch = level != replication.StreamLevelFT, epoch
	return n, nil
}

// nextEpoch tags writes from now on with epoch; it is called while the guest
// is paused, after the pause that takes checkpoint epoch-1, so every write of
// that checkpoint is queued: the checkpoint goes on the stream after them
// (awaitBoundary), once the guest runs again.
func (r *diskRepl) nextEpoch(epoch uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.enqMu.Lock()
	r.boundaries[epoch-1] = r.queued
	r.enqMu.Unlock()
	r.epoch = epoch
}

// awaitBoundary returns once every write made before checkpoint epoch's
// pause ended is on the stream.
func (r *diskRepl) awaitBoundary(epoch uint64) error {
	r.enqMu.Lock()
	seq, ok := r.boundaries[epoch]
	delete(r.boundaries, epoch)
	r.enqMu.Unlock()
	if !ok {
		return nil
	}
	_, err := r.awaitSent(seq)
	return err
}

// startWrite puts one guest write on the stream and returns what waits for
// it to be done: the partner's acknowledgement when durable is set and the
// level is below FT, nil otherwise. In FT the checkpoint that follows it
// on the stream covers it, and output commit holds whatever the guest says
// about it until then.
//
// The write is copied into the pump's queue (zeroChunk, never written, is
// not): it is on the stream, in order, before any later flush, level frame
// or epoch switch.
func (r *diskRepl) startWrite(idx uint32, p []byte, off int64, durable bool) (func() error, error) {
	return r.queueWrite(idx, p, nil, off, durable)
}

// startTakenWrite is startWrite of a write whose buffer, the NBD server's,
// the queue keeps instead of copying (at most diskChunk bytes); it is
// released once sent.
func (r *diskRepl) startTakenWrite(idx uint32, p *[]byte, off int64, durable bool) (func() error, error) {
	return r.queueWrite(idx, *p, p, off, durable)
}

func (r *diskRepl) queueWrite(idx uint32, p []byte, taken *[]byte, off int64, durable bool) (func() error, error) {
	r.mu.RLock()
	wait, epoch := r.wait && durable, r.epoch
	seq, err := r.enqueueWrite(idx, p, taken, off, epoch)
	r.mu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("replicate disk write: %w", err)
	}
	if !wait || seq == 0 {
		return nil, nil // done: nothing to wait for (or nothing sent)
	}
	return r.partnerHas(seq), nil
}

// enqueueWrite queues a write — during a sync on a base, only the parts of
// it the partner's replica does not hold — and returns the sequence number
// of the last write queued, 0 when nothing was.
func (r *diskRepl) enqueueWrite(idx uint32, p []byte, taken *[]byte, off int64, epoch uint64) (uint64, error) {
	if r.resync.Load() == nil {
		return r.enqueueChunks(idx, p, taken, off, epoch, r.enqueue)
	}
	r.enqMu.Lock()
	defer r.enqMu.Unlock()
	rs := r.resync.Load()
	if rs == nil { // the sync ended meanwhile
		return r.enqueueChunks(idx, p, taken, off, epoch, r.enqueueLocked)
	}
	spans := rs.write(idx, off, p)
	r.resyncCompared.Add(int64(len(p)))
	if taken != nil && (len(spans) != 1 || spans[0].n != int64(len(p))) {
		bufpool.Put(taken) // the parts sent are copied
		taken = nil
	}
	var seq uint64
	for _, sp := range spans {
		r.resyncSent.Add(sp.n)
		n, err := r.enqueueChunks(idx, p[sp.off-off:sp.off-off+sp.n], taken, sp.off, epoch, r.enqueueLocked)
		if err != nil {
			return 0, err
		}
		seq = n
	}
	return seq, nil
}

// enqueueChunks queues p as writes of at most diskChunk bytes, with enq,
// and returns the sequence number of the last.
func (r *diskRepl) enqueueChunks(idx uint32, p []byte, taken *[]byte, off int64, epoch uint64, enq func(queuedWrite) (uint64, error)) (uint64, error) {
	var seq uint64
	for len(p) > 0 {
		n := min(len(p), diskChunk)
		q := queuedWrite{epoch: epoch, w: replication.DiskWrite{Disk: idx, Offset: uint64(off), Data: p[:n]}}
		switch {
		case taken != nil:
			q.buf = taken
		case &p[0] != &zeroChunk[0]:
			q.buf = bufpool.Get(n)
			q.w.Data = *q.buf
			copy(q.w.Data, p[:n])
		}
		p, off = p[n:], off+int64(n)
		var err error
		if seq, err = enq(q); err != nil {
			return 0, err
		}
	}
	return seq, nil
}

// partnerHas returns what waits until the partner has acknowledged queued
// write seq.
func (r *diskRepl) partnerHas(seq uint64) func() error {
	return func() error {
		n, err := r.awaitSent(seq)
		if err != nil {
			return fmt.Errorf("replicate disk write: %w", err)
		}
		return r.sender.WaitOrdered(r.ctx, n)
	}
}

// startZero puts a range that now reads as zeroes on the stream, like
// startWrite.
func (r *diskRepl) startZero(idx uint32, off, length int64, durable bool) (func() error, error) {
	r.mu.RLock()
	wait, epoch := r.wait && durable, r.epoch
	seq, err := r.enqueueZero(idx, off, length, epoch)
	r.mu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("replicate disk zeroes: %w", err)
	}
	if !wait || seq == 0 {
		return nil, nil
	}
	return r.partnerHas(seq), nil
}

// enqueueZero is enqueueWrite of a zero range.
func (r *diskRepl) enqueueZero(idx uint32, off, length int64, epoch uint64) (uint64, error) {
	zero := func(off, n int64) queuedWrite {
		return queuedWrite{epoch: epoch, w: replication.DiskWrite{Disk: idx, Offset: uint64(off)}, zero: n}
	}
	if r.resync.Load() == nil {
		return r.enqueue(zero(off, length))
	}
	r.enqMu.Lock()
	defer r.enqMu.Unlock()
	rs := r.resync.Load()
	if rs == nil {
		return r.enqueueLocked(zero(off, length))
	}
	r.resyncCompared.Add(length)
	var seq uint64
	for _, sp := range rs.zero(idx, off, length) {
		r.resyncSent.Add(sp.n)
		var err error
		if seq, err = r.enqueueLocked(zero(sp.off, sp.n)); err != nil {
			return 0, err
		}
	}
	return seq, nil
}

// endResync stops comparing writes with the base once the disks are in
// sync (the base only holds for the stream's first sync, and the guest's
// writes from now on are not hashed), and reports what the sync sent of
// what it compared.
func (r *diskRepl) endResync() {
	r.enqMu.Lock()
	rs := r.resync.Swap(nil)
	r.enqMu.Unlock()
	if rs == nil || r.d == nil {
		return
	}
	compared, sent := r.resyncCompared.Load(), r.resyncSent.Load()
	r.d.metrics.DiskResyncCompared.WithLabelValues(r.vm).Add(float64(compared))
	r.d.metrics.DiskResyncSkipped.WithLabelValues(r.vm).Add(float64(compared - sent))
	r.d.event(r.vm, "disk", fmt.Sprintf("disk resync: sent %.1f MiB of %.1f MiB compared, the partner's replica held the rest",
		float64(sent)/(1<<20), float64(compared)/(1<<20)))
}

// flush waits until the partner has every write made so far, below FT.
func (r *diskRepl) flush() error {
	r.mu.RLock()
	wait := r.wait
	r.mu.RUnlock()
	if !wait {
		return nil
	}
	n, err := r.drain()
	if err != nil {
		return err
	}
	return r.sender.WaitOrdered(r.ctx, n)
}

// diskExport is one disk's NBD export: writes only (neither the mirror nor
// a fifo quorum reads its target).
type diskExport struct {
	r     *diskRepl
	idx   uint32
	size  int64
	child bool // a quorum child: flushes arrive, so writes need not wait
}

// durable says whether a write must be on the partner before it completes:
// always through the mirror, which never flushes its target; through a
// quorum child only when the guest asked for FUA.
func (e *diskExport) durable(fua bool) bool { return !e.child || fua }

var _ nbd.AsyncBackend = (*diskExport)(nil)

func (e *diskExport) Size() int64 { return e.size }

func (e *diskExport) ReadAt(p []byte, off int64) error {
	return fmt.Errorf("the replication target is write-only: %w", nbd.ErrNotSupported)
}

func (e *diskExport) WriteAt(p []byte, off int64, fua bool) error {
	wait, err := e.WriteAtAsync(p, off, fua)
	if err != nil || wait == nil {
		return err
	}
	return wait()
}

// WriteAtAsync lets the NBD server start the mirror's next write while this
// one waits for the partner: with several guest writes in flight their
// round trips overlap.
func (e *diskExport) WriteAtAsync(p []byte, off int64, fua bool) (func() error, error) {
	return e.r.startWrite(e.idx, p, off, e.durable(fua))
}

var _ nbd.BufferTaker = (*diskExport)(nil)

// TakeWrite queues the NBD server's own buffer rather than a copy of it;
// a write larger than one DiskWrite is copied as usual.
func (e *diskExport) TakeWrite(p *[]byte, off int64, fua bool) (func() error, error) {
	if len(*p) > diskChunk {
		defer bufpool.Put(p)
		return e.WriteAtAsync(*p, off, fua)
	}
	return e.r.startTakenWrite(e.idx, p, off, e.durable(fua))
}

// WriteZeroes replicates a range of zeroes as one DiskZero: the partner
// punches a hole (at FT once its checkpoint commits), so its replica stays as
// sparse as the guest's disk, the initial sync of a mostly empty disk sends
// little, and a guest's fstrim does not send its free space as data.
func (e *diskExport) WriteZeroes(off, length int64, fua bool) error {
	wait, err := e.r.startZero(e.idx, off, length, e.durable(fua))
	if err != nil || wait == nil {
		return err
	}
	return wait()
}

// Trim leaves the replica's blocks zeroed: what the guest reads after a
// discard is unspecified, zeroes included.
func (e *diskExport) Trim(off, length int64) error { return e.WriteZeroes(off, length, false) }

func (e *diskExport) Flush() error { return e.r.flush() }

// diskEpochGate keeps disk writes' epoch in step with the output gate's: the
// FT loop switches both while the guest is paused.
type diskEpochGate struct {
	gate *netbuffer.Gate
	disk *diskRepl
}

func (g diskEpochGate) NextEpoch(epoch uint64) error {
	if g.disk != nil {
		g.disk.nextEpoch(epoch)
	}
	if g.gate != nil {
		return g.gate.NextEpoch(epoch)
	}
	return nil
}

func (g diskEpochGate) Release(epoch uint64) error {
	if g.gate != nil {
		return g.gate.Release(epoch)
	}
	return nil
}
