// Package ft is the primary side of statepointing: the epoch loop that
// pauses a VM, collects its dirty pages and device state, and streams checkpoints.
package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/ax/qemu"
)

// PageSize is the unit of RAM replication.
const PageSize = dirty.PageSize

// Checkpoint is one epoch's state: the pages dirtied since the previous
// checkpoint and the CPU and device state, all taken while the VM was paused.
type Checkpoint struct {
	Epoch       uint64
	PFNs        []uint64 // ascending
	Pages       []byte   // len(PFNs)*PageSize, page i at i*PageSize
	DeviceState []byte
	// ConsoleOffset is the size of the VM's console log at the pause (-1
	// when unknown): the guest's output up to there belongs to this epoch.
	ConsoleOffset int64
	PausedAt      time.Time
	Pause         time.Duration // stop → cont
}

// Stream carries a VM's checkpoints to its secondary, in order. Sends block
// while the link is slow: that is the loop's backpressure.
type Stream interface {
	// BeginSync starts the initial synchronisation: onBase says the pages
	// not sent are those the replica holds already (Config.Base); without
	// it the replica starts from zeros.
	BeginSync(onBase bool) error
	// SendSync sends initial-synchronisation pages taken while the VM runs.
	SendSync(pfns []uint64, pages []byte) error
	// SyncDone ends the initial synchronisation.
	SyncDone() error
	// SendCheckpoint sends one whole checkpoint.
	SendCheckpoint(cp *Checkpoint) error
	// Acks delivers the epochs the secondary committed, in order; it is
	// closed when the stream fails (Err then says why).
	Acks() <-chan uint64
	Err() error
}

// OutputGate holds the guest's output until the checkpoint covering it has
// committed (the netbuffer). Nil when the VM has none.
type OutputGate interface {
	// NextEpoch tags output from now on with epoch; called while paused.
	NextEpoch(epoch uint64) error
	// Release lets out everything tagged with epochs ≤ epoch.
	Release(epoch uint64) error
}

// rebaser is implemented by trackers whose baseline is the content the
// replica holds (hashing): pages sent while the VM runs are rebased on the
// bytes actually sent, so a page that changes and changes back between the
// scan and the copy is not missed.
type rebaser interface {
	Rebase(pfns []uint64, pages []byte)
}

// baseliner is implemented by trackers that can start from the content the
// replica holds (hashing): their first scan reports only what differs.
type baseliner interface {
	SetBaseline(hashes []uint64) error
}

// Config tunes the loop.
type Config struct {
	Interval    time.Duration // checkpoint period, pause to pause; default 50 ms
	MaxInFlight int           // checkpoints sent but not committed; default 2
	// StateDir is where QEMU writes device state (tmpfs); default os.TempDir().
	StateDir string
	// Console is the VM's console log, recorded per checkpoint (optional).
	Console string
	// SyncRounds bounds the pre-copy rounds of the initial sync; default 5.
	SyncRounds int
	// SyncBatch is the number of pages per initial-sync frame; default 256.
	SyncBatch int
	// Base is what the secondary's replica holds, one hash per page
	// (dirty.PageHash), when it keeps that content for the initial
	// sync: only the pages whose hash differs are sent. nil: the replica
	// starts from zeros, and every data page is sent.
	Base []uint64
	// FirstEpoch is the first checkpoint's epoch (default 1). Epochs only
	// grow over a VM's protection, across reconnections, because the
	// output gate's tags do.
	FirstEpoch uint64
}

// EpochStats is reported after every checkpoint is taken.
type EpochStats struct {
	Epoch      uint64
	Pause      time.Duration
	Scan       time.Duration // dirty-page scan inside the pause
	DevSave    time.Duration
	DirtyPages int
	Bytes      int // pages plus device state
}

// Observer receives the loop's events; any field may be nil.
type Observer struct {
	SyncProgress func(sent, total int)
	Epoch        func(EpochStats)
	Commit       func(epoch uint64, latency time.Duration)
}

// Loop checkpoints one VM.
type Loop struct {
	cfg     Config
	mon     qemu.Monitor
	tracker dirty.Tracker
	ram     *RAM
	stream  Stream
	gate    OutputGate
	obs     Observer
	log     *slog.Logger

	finishReq chan chan FinishResult

	mu        sync.Mutex
	taken     uint64 // last epoch taken
	committed uint64 // last epoch acknowledged
	pausedAt  map[uint64]time.Time
}

// NewLoop prepares the loop; Run starts it.
func NewLoop(cfg Config, mon qemu.Monitor, tracker dirty.Tracker, ram *RAM, stream Stream, gate OutputGate, obs Observer, log *slog.Logger) *Loop {
	if cfg.Interval <= 0 {
		cfg.Interval = 50 * time.Millisecond
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 2
	}
	if cfg.StateDir == "" {
		cfg.StateDir = os.TempDir()
	}
	if cfg.SyncRounds <= 0 {
		cfg.SyncRounds = 5
	}
	if cfg.SyncBatch <= 0 {
		cfg.SyncBatch = 256
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.FirstEpoch == 0 {
		cfg.FirstEpoch = 1
	}
	return &Loop{cfg: cfg, mon: mon, tracker: tracker, ram: ram, stream: stream, gate: gate, obs: obs, log: log,
		pausedAt: map[uint64]time.Time{}, finishReq: make(chan chan FinishResult),
		taken: cfg.FirstEpoch - 1, committed: cfg.FirstEpoch - 1}
}

// FinishResult is the outcome of Finish.
type FinishResult struct {
	Epoch uint64 // the final checkpoint, committed on the secondary
	Err   error
}

// ErrFinished ends Run after a successful Finish: the VM is left paused and
// its final state is committed on the secondary.
var ErrFinished = errors.New("ft: finished for a planned switch")

// Finish asks the running loop for a final checkpoint taken with the VM
// left paused, and waits until the secondary committed it (planned
// failover). Run then returns ErrFinished.
func (l *Loop) Finish(ctx context.Context) (uint64, error) {
	reply := make(chan FinishResult, 1)
	select {
	case l.finishReq <- reply:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	select {
	case r := <-reply:
		return r.Epoch, r.Err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// Taken returns the last epoch taken.
func (l *Loop) Taken() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.taken
}

// Committed returns the last epoch the secondary acknowledged.
func (l *Loop) Committed() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.committed
}

// ErrVMPaused is returned when the loop found the VM paused by someone else.
var ErrVMPaused = errors.New("ft: the VM is not running")

// Run synchronises the replica, then checkpoints every interval until ctx
// ends or the stream fails. It never leaves the VM paused: any error after
// a Stop is followed by a Cont.
func (l *Loop) Run(ctx context.Context) error {
	if err := l.initialSync(ctx); err != nil {
		return err
	}
	acks := l.stream.Acks()
	timer := time.NewTimer(0)
	defer timer.Stop()
	var finishing chan FinishResult
	for {
		// Wait for the interval (or a finish request), then for fewer than
		// MaxInFlight checkpoints in flight; acks are taken meanwhile.
		ready := false
		for !ready || l.inFlight() >= l.cfg.MaxInFlight {
			var tick <-chan time.Time
			var finish chan chan FinishResult
			if !ready {
				tick, finish = timer.C, l.finishReq
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case n, ok := <-acks:
				if !ok {
					return fmt.Errorf("ft: replication stream: %w", l.stream.Err())
				}
				l.commit(n)
			case <-tick:
				ready = true
			case finishing = <-finish:
				ready = true
			}
		}
		cp, st, err := l.take(ctx, finishing != nil)
		if err == nil && finishing == nil && ctx.Err() != nil {
			err = ctx.Err() // stopped during the pause: nothing waits for this checkpoint
		}
		if err != nil {
			if finishing != nil {
				finishing <- FinishResult{Err: err}
			}
			return err
		}
		if l.obs.Epoch != nil {
			l.obs.Epoch(st)
		}
		if err := l.stream.SendCheckpoint(cp); err != nil {
			err = fmt.Errorf("ft: send checkpoint %d: %w", cp.Epoch, err)
			if finishing != nil {
				finishing <- FinishResult{Err: err}
			}
			return err
		}
		if finishing != nil {
			return l.awaitFinal(ctx, cp.Epoch, acks, finishing)
		}
		// Interval is the checkpoint period, pause to pause: the next pause
		// comes Interval after this one began (at once if that is past), so
		// output waits at most about one Interval plus the commit.
		timer.Reset(max(0, l.cfg.Interval-time.Since(cp.PausedAt)))
	}
}

// awaitFinal waits for the final checkpoint's commit; the VM stays paused.
func (l *Loop) awaitFinal(ctx context.Context, epoch uint64, acks <-chan uint64, reply chan FinishResult) error {
	for l.Committed() < epoch {
		select {
		case <-ctx.Done():
			reply <- FinishResult{Err: ctx.Err()}
			return ctx.Err()
		case n, ok := <-acks:
			if !ok {
				err := fmt.Errorf("ft: replication stream: %w", l.stream.Err())
				reply <- FinishResult{Err: err}
				return err
			}
			l.commit(n)
		}
	}
	reply <- FinishResult{Epoch: epoch}
	return ErrFinished
}

// inFlight is the number of checkpoints taken but not yet committed.
func (l *Loop) inFlight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return int(l.taken - l.committed)
}

// commit records the secondary's ack of epoch (and so of every earlier
// one) and releases the output those checkpoints cover.
func (l *Loop) commit(epoch uint64) {
	l.mu.Lock()
	if epoch <= l.committed || epoch > l.taken {
		// An ack of nothing new, or of a checkpoint never sent: releasing
		// on the latter would let output out before its checkpoint.
		l.mu.Unlock()
		return
	}
	latency := time.Since(l.pausedAt[epoch])
	for e := l.committed + 1; e <= epoch; e++ {
		delete(l.pausedAt, e)
	}
	l.committed = epoch
	l.mu.Unlock()
	if l.gate != nil {
		if err := l.gate.Release(epoch); err != nil {
			l.log.Warn("output release failed", "epoch", epoch, "err", err)
		}
	}
	if l.obs.Commit != nil {
		l.obs.Commit(epoch, latency)
	}
}

// take pauses the VM and takes the next checkpoint.
func (l *Loop) take(ctx context.Context, stayPaused bool) (cp *Checkpoint, st EpochStats, err error) {
	l.mu.Lock()
	epoch := l.taken + 1
	l.mu.Unlock()
	devPath := filepath.Join(l.cfg.StateDir, fmt.Sprintf("devstate.%d", epoch))
	defer os.Remove(devPath)

	// A pause, once begun, is taken whole: its commands are not cut off
	// when the loop is stopped (a level change, protection ending), only
	// bounded. A Stop abandoned half-way may still pause the guest with no
	// Cont to follow, and the loop is checked for its end before and after.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := l.mon.Stop(qctx); err != nil {
		return nil, st, fmt.Errorf("ft: pause: %w", err)
	}
	defer func() {
		// Resume the guest whatever happened (but after a final checkpoint
		// that went well); the pause ends here.
		if stayPaused && err == nil {
			return
		}
		// Its own timeout: the pause's may be spent.
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer ccancel()
		if cerr := l.mon.Cont(cctx); cerr != nil && err == nil {
			err = fmt.Errorf("ft: resume: %w", cerr)
		}
		if cp != nil {
			cp.Pause = time.Since(t0)
			st.Pause = cp.Pause
		}
	}()
	cp = &Checkpoint{Epoch: epoch, PausedAt: t0, ConsoleOffset: -1}
	if l.cfg.Console != "" {
		if fi, err := os.Stat(l.cfg.Console); err == nil {
			cp.ConsoleOffset = fi.Size()
		}
	}
	t1 := time.Now()
	// The page list goes out with the checkpoint, so each epoch has its own.
	pfns, err := l.tracker.Scan(nil)
	if err != nil {
		return nil, st, fmt.Errorf("ft: dirty scan: %w", err)
	}
	st.Scan = time.Since(t1)
	cp.PFNs = pfns
	cp.Pages = make([]byte, len(pfns)*PageSize)
	for i, pfn := range pfns {
		if err := l.ram.ReadPage(pfn, cp.Pages[i*PageSize:(i+1)*PageSize]); err != nil {
			return nil, st, err
		}
	}
	t2 := time.Now()
	if err := l.mon.SaveDeviceState(qctx, devPath); err != nil {
		return nil, st, fmt.Errorf("ft: save device state: %w", err)
	}
	if cp.DeviceState, err = os.ReadFile(devPath); err != nil {
		return nil, st, fmt.Errorf("ft: read device state: %w", err)
	}
	st.DevSave = time.Since(t2)
	if l.gate != nil {
		// Output from here on belongs to the next epoch.
		if err := l.gate.NextEpoch(epoch + 1); err != nil {
			return nil, st, fmt.Errorf("ft: output epoch switch: %w", err)
		}
	}
	l.mu.Lock()
	l.taken = epoch
	l.pausedAt[epoch] = t0
	l.mu.Unlock()
	st.Epoch, st.DirtyPages, st.Bytes = epoch, len(pfns), len(cp.Pages)+len(cp.DeviceState)
	return cp, st, nil
}

// differingPages appends to dst every page of the RAM whose hash is not
// base's for it.
func (l *Loop) differingPages(dst, base []uint64, page []byte) ([]uint64, error) {
	for pfn := uint64(0); pfn < l.ram.Pages(); pfn++ {
		if err := l.ram.ReadPage(pfn, page); err != nil {
			return dst, err
		}
		if dirty.PageHash(page) != base[pfn] {
			dst = append(dst, pfn)
		}
	}
	return dst, nil
}

// initialSync copies the RAM to the secondary while the VM runs: a first
// round of every data page, then rounds of pages dirtied meanwhile, until
// the dirty set stops shrinking. The first checkpoint, taken paused, sends
// whatever is still dirty.
func (l *Loop) initialSync(ctx context.Context) error {
	rb, _ := l.tracker.(rebaser)
	var pfns []uint64
	total, sent := 0, 0
	prev := -1
	buf := make([]byte, l.cfg.SyncBatch*PageSize)
	base := l.cfg.Base
	if err := l.stream.BeginSync(base != nil); err != nil {
		return fmt.Errorf("ft: initial sync: %w", err)
	}
	if base != nil {
		if uint64(len(base)) != l.ram.Pages() {
			return fmt.Errorf("ft: the replica's base has %d pages, the guest %d", len(base), l.ram.Pages())
		}
		if bl, ok := l.tracker.(baseliner); ok {
			if err := bl.SetBaseline(base); err != nil {
				return fmt.Errorf("ft: initial sync: %w", err)
			}
			base = nil // the tracker's first scan compares
		}
	}
	for round := 0; round < l.cfg.SyncRounds; round++ {
		var err error
		if pfns, err = l.tracker.Scan(pfns[:0]); err != nil {
			return fmt.Errorf("ft: initial sync scan: %w", err)
		}
		if round == 0 && base != nil {
			// A tracker that cannot compare (soft-dirty) started tracking
			// with that scan; the first round sends every page, data or
			// not, whose content is not what the replica holds.
			if pfns, err = l.differingPages(pfns[:0], base, buf[:PageSize]); err != nil {
				return err
			}
		}
		if round == 0 {
			total = len(pfns)
		} else {
			total += len(pfns)
		}
		if prev >= 0 && len(pfns) >= prev {
			// Not converging: the paused checkpoint will carry the rest.
			// The pages of this scan must still be sent (the tracker has
			// forgotten them), so fall through once more.
			round = l.cfg.SyncRounds
		}
		prev = len(pfns)
		for i := 0; i < len(pfns); i += l.cfg.SyncBatch {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			batch := pfns[i:min(i+l.cfg.SyncBatch, len(pfns))]
			pages := buf[:len(batch)*PageSize]
			for j, pfn := range batch {
				if err := l.ram.ReadPage(pfn, pages[j*PageSize:(j+1)*PageSize]); err != nil {
					return err
				}
			}
			if rb != nil {
				rb.Rebase(batch, pages)
			}
			if err := l.stream.SendSync(batch, pages); err != nil {
				return fmt.Errorf("ft: initial sync: %w", err)
			}
			sent += len(batch)
			if l.obs.SyncProgress != nil {
				l.obs.SyncProgress(sent, total)
			}
		}
		if len(pfns) < 64 {
			break
		}
	}
	if err := l.stream.SyncDone(); err != nil {
		return fmt.Errorf("ft: initial sync: %w", err)
	}
	l.log.Info("initial sync sent", "pages", sent)
	return nil
}
