package vm

import "sync"

// Epochs numbers one VM's checkpoints across all its streams; it is the one
// owner of that number. Epochs only grow: the partner's replica, the output
// gate and the disk journal all compare them, and an epoch reused by a new
// stream could release output, or apply a disk write, that belongs to a
// checkpoint the partner never committed.
type Epochs struct {
	mu        sync.Mutex
	next      uint64 // first epoch of the next stream
	taken     uint64 // last checkpoint taken
	committed uint64 // last checkpoint the partner acknowledged
	// floor is what the state store holds: above every epoch taken (and
	// the one the gate tags next), so that after a crash the next stream
	// starts above them all. Raised a block at a time.
	floor uint64
}

// epochBlock is how far the stored floor is raised at a time: one store
// write per 4096 checkpoints (about 3.5 minutes at 50 ms).
const epochBlock = 4096

// RestoreEpochs returns the counter of a VM whose next stream must start at
// floor or above (the state store's Floor, after a restart or a crash).
func RestoreEpochs(floor uint64) *Epochs {
	floor = max(floor, 1)
	return &Epochs{next: floor, floor: floor}
}

// Start returns the first epoch of a new stream.
func (e *Epochs) Start() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.next = max(e.next, 1)
	return e.next
}

// Took records that checkpoint n was taken. It reports whether Floor rose,
// so the record holding it must be written again.
func (e *Epochs) Took(n uint64) (save bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.taken = max(e.taken, n)
	if n+2 > e.floor {
		e.floor = n + 2 + epochBlock
		return true
	}
	return false
}

// Floor is the first epoch a stream may use after a crash (for the store).
func (e *Epochs) Floor() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return max(e.next, e.floor, 1)
}

// Committed records that the partner committed checkpoint n.
func (e *Epochs) Committed(n uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.committed = max(e.committed, n)
}

// Ended records that a stream ended after its checkpoint lastTaken. The
// next stream starts two above it: once checkpoint lastTaken was taken the
// output gate already tagged the guest's output with lastTaken+1, a
// checkpoint the partner may have begun to receive, so the next stream's
// first checkpoint must be above that too.
func (e *Epochs) Ended(lastTaken uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.next = max(e.next, lastTaken+2)
}

// Status returns the last epoch taken and committed, for axctl status; both
// are of the current stream's numbering (0 before its first checkpoint).
func (e *Epochs) Status() (taken, committed uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.taken, e.committed
}

// Reset forgets the current stream's progress (a new stream or level).
func (e *Epochs) Reset() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.taken, e.committed = 0, 0
}

// Next returns the first epoch the next stream may use.
func (e *Epochs) Next() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return max(e.next, 1)
}
