package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/replication/nbd"
)

// Disk replication, primary side: the guest's QEMU mirrors each protected
// disk (blockdev-mirror, copy-mode write-blocking) to an NBD export this axd
// serves; every write the mirror makes becomes a DiskWrite on the VM's
// replication stream, in order with the checkpoints.

// diskChunk bounds one DiskWrite's data, well under the frame bound.
const diskChunk = 1 << 20

// zeroChunk is what write-zeroes requests are replicated with.
var zeroChunk = make([]byte, diskChunk)

// diskRepl is one stream's disk replication.
type diskRepl struct {
	d      *Daemon
	vm     string
	sender *replication.Sender
	mon    *qemu.QMP
	disks  []qemu.Disk
	sizes  []int64
	ctx    context.Context

	// mu orders level switches against writes: a write reads how it must
	// complete and puts itself on the stream under the read lock, so it is
	// either before a level frame or sees the level after it.
	mu    sync.RWMutex
	wait  bool   // a guest write completes only once the partner has it (not FT)
	epoch uint64 // the FT epoch writes belong to

	exports []string
	started []int // disks whose export, target and job exist
}

func newDiskRepl(ctx context.Context, d *Daemon, vm string, sender *replication.Sender, mon *qemu.QMP, disks []qemu.Disk, sizes []int64) *diskRepl {
	return &diskRepl{d: d, vm: vm, sender: sender, mon: mon, disks: disks, sizes: sizes, ctx: ctx, wait: true}
}

// Names of what disk replication adds to QEMU and to the NBD server.
func targetNode(node string) string     { return "ax-target-" + node }
func mirrorJob(node string) string      { return "ax-mirror-" + node }
func exportName(vm, node string) string { return vm + "/" + node }

// diskSizes asks QEMU for the size the guest sees of each disk.
func diskSizes(ctx context.Context, mon *qemu.QMP, disks []qemu.Disk) ([]int64, error) {
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
	for i, dk := range r.disks {
		r.clearLeftovers(ctx, dk.Node)
		name := exportName(r.vm, dk.Node)
		if err := r.d.nbd.AddExport(name, &diskExport{r: r, idx: uint32(i), size: r.sizes[i]}); err != nil {
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
	r.mon.DeleteNode(ctx, targetNode(node))
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
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, i := range r.started {
		node := r.disks[i].Node
		// force: a ready mirror is abandoned at once instead of waiting
		// for a final sync to a partner that may be gone.
		if err := r.mon.CancelJob(ctx, mirrorJob(node), true); err == nil {
			r.awaitJobGone(ctx, mirrorJob(node))
		}
		r.mon.DeleteNode(ctx, targetNode(node))
	}
	for _, name := range r.exports {
		r.d.nbd.RemoveExport(name)
	}
	r.started, r.exports = nil, nil
}

// setLevel switches how writes complete and tells the secondary, in order
// with them; it returns the level frame's ordered count.
func (r *diskRepl) setLevel(level string, epoch uint64) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n, err := r.sender.SetLevel(level)
	if err != nil {
		return 0, err
	}
	r.wait, r.epoch = level != replication.StreamLevelFT, epoch
	return n, nil
}

// nextEpoch tags writes from now on with epoch (called while the guest is
// paused, so no write is in flight).
func (r *diskRepl) nextEpoch(epoch uint64) {
	r.mu.Lock()
	r.epoch = epoch
	r.mu.Unlock()
}

// write replicates one guest write. Outside FT it returns only once the
// partner has it: the guest's write (and so its flush) completes after
// that. In FT the checkpoint that follows it on the stream covers it, and
// output commit holds whatever the guest says about it until then.
func (r *diskRepl) write(idx uint32, p []byte, off int64) error {
	wait, err := r.startWrite(idx, p, off)
	if err != nil {
		return err
	}
	return wait()
}

// startWrite puts one guest write on the stream and returns what waits for it
// to be done: the partner's acknowledgement outside FT, nothing at FT.
func (r *diskRepl) startWrite(idx uint32, p []byte, off int64) (func() error, error) {
	r.mu.RLock()
	wait, epoch := r.wait, r.epoch
	var last uint64
	var err error
	for len(p) > 0 && err == nil {
		n := min(len(p), diskChunk)
		last, err = r.sender.SendDiskWrite(epoch, replication.DiskWrite{Disk: idx, Offset: uint64(off), Data: p[:n]})
		p, off = p[n:], off+int64(n)
	}
	r.mu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("replicate disk write: %w", err)
	}
	if !wait {
		return func() error { return nil }, nil
	}
	return func() error { return r.sender.WaitOrdered(r.ctx, last) }, nil
}

// flush waits until the partner has every write made so far.
func (r *diskRepl) flush() error {
	return r.sender.WaitOrdered(r.ctx, r.sender.Ordered())
}

// diskExport is one disk's NBD export: writes only (the mirror never reads
// its target).
type diskExport struct {
	r    *diskRepl
	idx  uint32
	size int64
}

var _ nbd.AsyncBackend = (*diskExport)(nil)

func (e *diskExport) Size() int64 { return e.size }

func (e *diskExport) ReadAt(p []byte, off int64) error {
	return fmt.Errorf("the replication target is write-only: %w", nbd.ErrNotSupported)
}

func (e *diskExport) WriteAt(p []byte, off int64, fua bool) error { return e.r.write(e.idx, p, off) }

// WriteAtAsync lets the NBD server start the mirror's next write while this
// one waits for the partner: with several guest writes in flight their
// round trips overlap.
func (e *diskExport) WriteAtAsync(p []byte, off int64, fua bool) (func() error, error) {
	return e.r.startWrite(e.idx, p, off)
}

// WriteZeroes replicates zeroes as data: simple, and the secondary's disk
// needs no special case (a sparse-aware frame is a later optimisation).
func (e *diskExport) WriteZeroes(off, length int64, fua bool) error {
	// Acknowledgements come in stream order: waiting for the last chunk
	// waits for them all, one round trip for the whole range.
	wait := func() error { return nil }
	for length > 0 {
		n := min(length, diskChunk)
		w, err := e.r.startWrite(e.idx, zeroChunk[:n], off)
		if err != nil {
			return err
		}
		wait, off, length = w, off+n, length-n
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

// Secondary side.

// replicaDisks holds a VM's replica disks on the secondary: raw files of the
// sizes the guest sees, written at once (HA) or through the journal (FT).
type replicaDisks struct {
	mu      sync.Mutex
	dir     string
	files   []*os.File
	sizes   []int64
	journal *replication.Journal
	level   string // "" until the primary says the disks are in sync, then ha or ft
}

var _ replication.DiskSink = (*replicaDisks)(nil)

func replicaDiskPath(dir string, i int) string {
	return filepath.Join(dir, fmt.Sprintf("disk%d.raw", i))
}

// openReplicaDisks opens (creating or resizing) the replica disks in dir and
// starts an empty journal: a new stream resynchronises every disk in full.
func openReplicaDisks(dir string, sizes []int64) (*replicaDisks, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	r := &replicaDisks{dir: dir, sizes: sizes}
	disks := map[uint32]replication.JournalDisk{}
	for i, size := range sizes {
		f, err := os.OpenFile(replicaDiskPath(dir, i), os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = f.Truncate(size)
		}
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("replica disk %d: %w", i, err)
		}
		r.files = append(r.files, f)
		disks[uint32(i)] = f
	}
	jpath := filepath.Join(dir, "disk.journal")
	os.Remove(jpath)
	j, err := replication.OpenJournal(jpath, disks)
	if err != nil {
		r.Close()
		return nil, err
	}
	r.journal = j
	return r, nil
}

func (r *replicaDisks) Write(epoch uint64, w replication.DiskWrite) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if int(w.Disk) >= len(r.files) {
		return fmt.Errorf("disk write to disk %d of %d", w.Disk, len(r.files))
	}
	if end := w.Offset + uint64(len(w.Data)); end > uint64(r.sizes[w.Disk]) {
		return fmt.Errorf("disk write to disk %d at %d..%d beyond its %d bytes", w.Disk, w.Offset, end, r.sizes[w.Disk])
	}
	if r.level == replication.StreamLevelFT {
		return r.journal.Append(epoch, w)
	}
	_, err := r.files[w.Disk].WriteAt(w.Data, int64(w.Offset))
	return err
}

// errDisksClosed: the replica's disks were closed (the VM left or was promoted).
var errDisksClosed = errors.New("replica disks closed")

func (r *replicaDisks) Commit(epoch uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if r.level != replication.StreamLevelFT {
		return nil
	}
	return r.journal.Commit(epoch)
}

// SetLevel: leaving FT applies everything journaled — the memory replica
// is dropped, and the disk as the guest wrote it is what HA boots from.
func (r *replicaDisks) SetLevel(level string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if r.level == replication.StreamLevelFT && level != replication.StreamLevelFT {
		if err := r.journal.ApplyAll(); err != nil {
			return err
		}
	}
	r.level = level
	return nil
}

// prepare readies the disks for the guest to run on them: resuming from a
// committed checkpoint drops writes of later epochs; booting afresh (HA)
// applies every write received, in order — a crash-consistent disk.
func (r *replicaDisks) prepare(resume bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	var err error
	if resume {
		_, err = r.journal.Discard()
	} else {
		err = r.journal.ApplyAll()
	}
	for _, f := range r.files {
		if serr := f.Sync(); err == nil {
			err = serr
		}
	}
	return err
}

// depth is what the journal holds for commits to come.
func (r *replicaDisks) depth() replication.JournalDepth {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return replication.JournalDepth{}
	}
	return r.journal.Depth()
}

// Close closes the files and journal; safe twice.
func (r *replicaDisks) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	for _, f := range r.files {
		if cerr := f.Close(); cerr != nil && !errors.Is(cerr, os.ErrClosed) && err == nil {
			err = cerr
		}
	}
	r.files = nil
	if r.journal != nil {
		r.journal.Close()
		r.journal = nil
	}
	return err
}
