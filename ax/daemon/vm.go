package daemon

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/monitor/agent"
	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/replication"
)

// vmState is one VM known to this host, as primary, secondary or local.
type vmState struct {
	name string

	mu    sync.Mutex
	spec  api.VMSpec
	level string
	peer  string
	// st is the protection state; only Daemon.fire changes it, and the
	// alarm with it.
	st      vm.State
	alarm   string
	tracker string
	// epochs numbers the VM's checkpoints (the primary's, or on a
	// secondary those it received).
	epochs *vm.Epochs

	// primary
	prot       *protection            // its stream loop and guard, while it is a primary
	finish     chan chan finishResult // planned failover request
	lastCommit time.Time
	pause      time.Duration
	pauses     []time.Duration // recent, for the median
	scans      []time.Duration
	devSaves   []time.Duration
	dirtyTotal uint64
	dirty      int
	sent       uint64
	rateAt     time.Time
	rateBytes  uint64
	rate       float64
	syncSent   int
	syncTotal  int
	// leaseUntil: the end of the VM's lease as last renewed here (zero:
	// none renewed yet).
	leaseUntil time.Time

	// in-guest agent of a VM running here
	agent       *agent.Monitor
	agentCancel context.CancelFunc

	// secondary
	replica       *replication.Replica
	consoleOffset int64
	silentSince   time.Time
	lastTakeover  time.Time
	waitNoted     bool // the wait for the witness is in the event log
	watched       bool // a watchReplica runs for it
	streamEndedAt time.Time
	// restartUntil: the primary's axd restarts (it said so, Restart) and
	// the replica is not promoted before this.
	restartUntil time.Time

	// primary: level changes and the first stream's answer
	levelCh       chan levelReq
	accepted      chan error
	retry         chan struct{} // a level change while no stream runs: attempt now
	force         bool
	disks         *diskRepl // while a stream runs
	diskBytesSeen uint64    // of disks' stream, already counted in the metric
	diskSyncDone  int64
	diskSyncTotal int64

	// secondary: replica disks, and whether they are in sync (HA-ready)
	replicaDisks *replicaDisks
	haReady      bool

	// primary: the output gate, attached while protected at FT
	gate *netbuffer.Gate

	// primary, across axd's planned restart: whether the partner confirmed
	// it (it keeps the replica and waits), and the guard process the
	// stopping axd left holding the guest, for the next axd to dismiss.
	restartConfirmed bool
	leftGuard        int
	// partnerBackBy: the partner's axd restarts and keeps the replica;
	// until then a lost stream holds the output and reconnects.
	partnerBackBy time.Time

	// intent: the level the operator declared (ft, ha, or none) towards
	// declaredPeer. It outlives failovers: while the VM runs here below
	// it, axd protects it again by itself (intent.go). unprotectedSince is
	// when a VM so declared last stopped being protected (zero while it is,
	// or when none is declared).
	declared         string
	declaredPeer     string
	unprotectedSince time.Time
	reprotecting     bool          // an attempt runs
	reprotectAt      time.Time     // the next attempt, not before
	reprotectWait    time.Duration // after a failed attempt
	reprotectErr     string        // the last attempt's failure, logged once
}

// declaresLevel reports whether an operator declared v FT or HA (v.mu
// held): axd then keeps it protected, and counts the time it is not.
func (v *vmState) declaresLevel() bool {
	return v.declared == api.LevelFT || v.declared == api.LevelHA
}

// newVM returns a VM in state st.
func newVM(name string, st vm.State) *vmState {
	return &vmState{name: name, st: st, level: api.LevelNone, declared: api.LevelNone, consoleOffset: -1, epochs: &vm.Epochs{}}
}

type finishResult struct {
	epoch uint64
	err   error
}

func (v *vmState) role() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.st.Role()
}

func (v *vmState) state() vm.State {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.st
}

func (v *vmState) set(fn func(v *vmState)) {
	v.mu.Lock()
	defer v.mu.Unlock()
	fn(v)
}

func (v *vmState) status() api.VMStatus {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := api.VMStatus{
		Name: v.name, Level: v.level, Role: v.st.Role(), Peer: v.peer, State: v.st.String(), Alarm: v.alarm,
		Tracker: v.tracker, LastCommit: v.lastCommit,
		PauseMS: ms(v.pause), DirtyPages: v.dirty, BytesPerSec: v.rate,
		SyncSent: v.syncSent, SyncTotal: v.syncTotal, ConsoleOffset: v.consoleOffset, Console: v.spec.Guest.Console,
	}
	if v.st.Role() != api.RoleSecondary {
		s.Declared, s.DeclaredPeer = v.declared, v.declaredPeer
		if !v.unprotectedSince.IsZero() {
			s.UnprotectedS = time.Since(v.unprotectedSince).Seconds()
		}
	}
	if !v.lastCommit.IsZero() {
		s.CommitAgeMS = ms(time.Since(v.lastCommit))
	}
	if !v.leaseUntil.IsZero() && s.Role == api.RolePrimary {
		s.LeaseExpires, s.LeaseLeftMS = v.leaseUntil, ms(max(time.Until(v.leaseUntil), 0))
	}
	s.Epoch, s.Committed = v.epochs.Status()
	s.PauseP50MS, s.PauseP99MS = quantile(v.pauses, 0.5), quantile(v.pauses, 0.99)
	s.ScanP50MS, s.DevSaveP50MS = quantile(v.scans, 0.5), quantile(v.devSaves, 0.5)
	s.DirtyTotal, s.BytesTotal = v.dirtyTotal, v.sent
	s.Agent, s.Apps = agentStatus(v.agent)
	s.Disks = len(v.spec.Guest.Disks)
	s.DiskSyncDone, s.DiskSyncTotal = v.diskSyncDone, v.diskSyncTotal
	if v.disks != nil {
		s.DiskBytes, s.DiskLag, s.DiskMode = v.disks.sender.DiskBytesSent(), v.disks.lag(), v.disks.mode()
		s.DiskResyncCompared, s.DiskResyncSent = v.disks.resyncCompared.Load(), v.disks.resyncSent.Load()
	}
	if v.replicaDisks != nil {
		dp := v.replicaDisks.depth()
		s.JournalWrites, s.JournalBytes = dp.Records, dp.Bytes
	}
	s.Output = "not held"
	if v.gate != nil {
		st := v.gate.Stats()
		s.Output, s.HeldFrames = "held", st.HeldFrames
		if st.Open {
			s.Output = "open"
		}
	}
	return s
}

// quantile returns the q-quantile of ds in milliseconds (0 if empty).
func quantile(ds []time.Duration, q float64) float64 {
	if len(ds) == 0 {
		return 0
	}
	p := append([]time.Duration(nil), ds...)
	sort.Slice(p, func(i, j int) bool { return p[i] < p[j] })
	return ms(p[min(len(p)-1, int(q*float64(len(p))))])
}

// keep appends d to a window of the most recent 1024 values.
func keep(w []time.Duration, d time.Duration) []time.Duration {
	w = append(w, d)
	if len(w) > 1024 {
		w = w[len(w)-1024:]
	}
	return w
}

// notePause records one checkpoint's pause and size. It reports whether
// the VM's record must be saved (the epochs' stored floor rose).
func (v *vmState) notePause(epoch uint64, pause, scan, devSave time.Duration, dirty, bytes int) (save bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	save = v.epochs.Took(epoch)
	v.pause, v.dirty = pause, dirty
	v.pauses, v.scans, v.devSaves = keep(v.pauses, pause), keep(v.scans, scan), keep(v.devSaves, devSave)
	v.dirtyTotal += uint64(dirty)
	v.sent += uint64(bytes)
	if now := time.Now(); now.Sub(v.rateAt) >= time.Second {
		if !v.rateAt.IsZero() {
			v.rate = float64(v.sent-v.rateBytes) / now.Sub(v.rateAt).Seconds()
		}
		v.rateAt, v.rateBytes = now, v.sent
	}
	return save
}
