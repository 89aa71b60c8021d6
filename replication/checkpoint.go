package replication

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
)

// DefaultMaxCheckpointBytes bounds the pages and device state of one
// checkpoint held in memory when the caller sets no bound.
const DefaultMaxCheckpointBytes = 256 << 20

// Checkpoint errors. Whatever the error, the checkpoint is discarded, never
// applied, and the caller drops the connection.
var (
	// ErrBadCheckpoint reports frames that do not form a checkpoint: out of
	// order, of another epoch, with counts or lengths that disagree, or with
	// a page outside guest RAM.
	ErrBadCheckpoint = errors.New("replication: bad checkpoint")
	// ErrCheckpointTooLarge reports a checkpoint beyond the assembler's memory bound.
	ErrCheckpointTooLarge = errors.New("replication: checkpoint too large")
	// ErrStaleEpoch reports a checkpoint whose epoch is not after the last committed one.
	ErrStaleEpoch = errors.New("replication: stale checkpoint epoch")
	// ErrDigestMismatch reports a checkpoint whose content does not match its digest.
	ErrDigestMismatch = errors.New("replication: checkpoint digest mismatch")
)

// Checkpoint is one epoch's dirty pages and device state, complete and
// verified against its digest. Only a CheckpointAssembler makes one, and only
// such a checkpoint can be applied to a Replica.
type Checkpoint struct {
	epoch       uint64
	pfns        []uint64
	pages       []byte // page i is pages[i*PageSize:(i+1)*PageSize]
	deviceState []byte
	digest      [sha256.Size]byte
	verified    bool
}

// Epoch returns the checkpoint's epoch.
func (c *Checkpoint) Epoch() uint64 { return c.epoch }

// PageCount returns the number of page records, in the order they arrived.
func (c *Checkpoint) PageCount() int { return len(c.pfns) }

// Page returns page record i. Its Data belongs to the checkpoint.
func (c *Checkpoint) Page(i int) Page {
	return Page{PFN: c.pfns[i], Data: c.pages[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]}
}

// DeviceState returns the QEMU device state. It belongs to the checkpoint.
func (c *Checkpoint) DeviceState() []byte { return c.deviceState }

// Digest returns the verified SHA-256 of the checkpoint's content.
func (c *Checkpoint) Digest() [sha256.Size]byte { return c.digest }

// CheckpointAssembler collects the frames of one checkpoint after another from
// a replication stream: CheckpointBegin, any number of CheckpointPages, the
// DeviceState in one or more frames, CheckpointEnd. It holds at most its
// memory bound and yields a checkpoint only once all of it arrived and
// matched its digest. It is not safe for concurrent use.
type CheckpointAssembler struct {
	ramPages uint64
	last     uint64 // highest epoch committed or assembled; the next must exceed it
	max      uint64
	err      error // sticky: after an error the stream is not to be trusted

	active bool
	begin  CheckpointBegin
	pfns   []uint64
	pages  []byte
	dev    []byte
	digest hash.Hash
}

// NewCheckpointAssembler returns an assembler for a VM of ramSize bytes whose
// replica last committed epoch lastCommitted, holding at most maxBytes of
// pages and device state (DefaultMaxCheckpointBytes when maxBytes <= 0).
func NewCheckpointAssembler(ramSize int64, lastCommitted uint64, maxBytes int64) *CheckpointAssembler {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxCheckpointBytes
	}
	return &CheckpointAssembler{
		ramPages: uint64(max(ramSize, 0)) / PageSize,
		last:     lastCommitted,
		max:      uint64(maxBytes),
		digest:   sha256.New(),
	}
}

// Pending reports the epoch of a checkpoint begun but not yet complete; a
// stream that ends now tears it, and it is simply never applied.
func (a *CheckpointAssembler) Pending() (epoch uint64, ok bool) {
	return a.begin.Epoch, a.active
}

// Add takes the next checkpoint frame. It returns the checkpoint when f
// completes a verified one, nil while one is still arriving, and an error —
// final for this assembler — when the frames are wrong in any way.
func (a *CheckpointAssembler) Add(f Frame) (*Checkpoint, error) {
	if a.err != nil {
		return nil, a.err
	}
	cp, err := a.add(f)
	if err != nil {
		a.err = err
		a.drop()
	}
	return cp, err
}

func (a *CheckpointAssembler) drop() {
	a.active = false
	a.pfns, a.pages, a.dev = nil, nil, nil
}

func (a *CheckpointAssembler) add(f Frame) (*Checkpoint, error) {
	if f.Type == TypeCheckpointBegin {
		return nil, a.start(f)
	}
	if !f.Type.IsCheckpoint() {
		return nil, frameErr(ErrUnexpectedType, "%s frame given to the checkpoint assembler", f.Type)
	}
	if !a.active {
		return nil, fmt.Errorf("%w: %s frame of epoch %d without CheckpointBegin", ErrBadCheckpoint, f.Type, f.Epoch)
	}
	epoch := a.begin.Epoch
	if f.Epoch != epoch {
		return nil, fmt.Errorf("%w: %s frame of epoch %d inside checkpoint %d", ErrBadCheckpoint, f.Type, f.Epoch, epoch)
	}
	switch f.Type {
	case TypeCheckpointPages:
		return nil, a.addPages(f)
	case TypeDeviceState:
		if len(f.Payload) == 0 {
			return nil, fmt.Errorf("%w: checkpoint %d: empty DeviceState frame", ErrBadCheckpoint, epoch)
		}
		if uint64(len(f.Payload)) > a.begin.DeviceStateLen-uint64(len(a.dev)) {
			return nil, fmt.Errorf("%w: checkpoint %d: device state exceeds the %d bytes announced", ErrBadCheckpoint, epoch, a.begin.DeviceStateLen)
		}
		a.dev = append(a.dev, f.Payload...)
		a.digest.Write(f.Payload)
		return nil, nil
	default: // TypeCheckpointEnd
		return a.finish(f)
	}
}

func (a *CheckpointAssembler) start(f Frame) error {
	b, err := DecodeCheckpointBegin(f)
	if err != nil {
		return err
	}
	if a.active {
		return fmt.Errorf("%w: CheckpointBegin of epoch %d while checkpoint %d is incomplete", ErrBadCheckpoint, b.Epoch, a.begin.Epoch)
	}
	if b.Epoch <= a.last {
		return fmt.Errorf("%w: checkpoint %d, last committed %d", ErrStaleEpoch, b.Epoch, a.last)
	}
	if b.DeviceStateLen == 0 {
		return fmt.Errorf("%w: checkpoint %d announces no device state", ErrBadCheckpoint, b.Epoch)
	}
	if b.PageCount > a.max/PageSize || b.DeviceStateLen > a.max-b.PageCount*PageSize {
		return fmt.Errorf("%w: checkpoint %d announces %d pages and %d bytes of device state, limit %d bytes",
			ErrCheckpointTooLarge, b.Epoch, b.PageCount, b.DeviceStateLen, a.max)
	}
	a.active = true
	a.begin = b
	// Sized once from the announcement, already bounded above, so the
	// buffers never grow and copy while pages stream in.
	a.pfns = make([]uint64, 0, b.PageCount)
	a.pages = make([]byte, 0, b.PageCount*PageSize)
	a.dev = make([]byte, 0, b.DeviceStateLen)
	a.digest.Reset()
	return nil
}

func (a *CheckpointAssembler) addPages(f Frame) error {
	epoch := a.begin.Epoch
	if len(a.dev) > 0 {
		return fmt.Errorf("%w: checkpoint %d: pages after device state", ErrBadCheckpoint, epoch)
	}
	pages, err := DecodePages(f)
	if err != nil {
		return err
	}
	if uint64(len(pages)) > a.begin.PageCount-uint64(len(a.pfns)) {
		return fmt.Errorf("%w: checkpoint %d: more than the %d pages announced", ErrBadCheckpoint, epoch, a.begin.PageCount)
	}
	for _, p := range pages {
		if p.PFN >= a.ramPages {
			return fmt.Errorf("%w: checkpoint %d: pfn %#x outside guest RAM of %d pages", ErrBadCheckpoint, epoch, p.PFN, a.ramPages)
		}
	}
	for _, p := range pages {
		a.pfns = append(a.pfns, p.PFN)
		a.pages = append(a.pages, p.Data...)
	}
	// The payload after the count is exactly the page records in order.
	a.digest.Write(f.Payload[4:])
	return nil
}

func (a *CheckpointAssembler) finish(f Frame) (*Checkpoint, error) {
	e, err := DecodeCheckpointEnd(f)
	if err != nil {
		return nil, err
	}
	b := a.begin
	if e.PageCount != b.PageCount || e.DeviceStateLen != b.DeviceStateLen {
		return nil, fmt.Errorf("%w: checkpoint %d: end says %d pages and %d device bytes, begin said %d and %d",
			ErrBadCheckpoint, b.Epoch, e.PageCount, e.DeviceStateLen, b.PageCount, b.DeviceStateLen)
	}
	if uint64(len(a.pfns)) != b.PageCount || uint64(len(a.dev)) != b.DeviceStateLen {
		return nil, fmt.Errorf("%w: checkpoint %d: received %d pages and %d device bytes, announced %d and %d",
			ErrBadCheckpoint, b.Epoch, len(a.pfns), len(a.dev), b.PageCount, b.DeviceStateLen)
	}
	var sum [sha256.Size]byte
	a.digest.Sum(sum[:0])
	if sum != e.Digest {
		return nil, fmt.Errorf("%w: checkpoint %d: computed %x, sender %x", ErrDigestMismatch, b.Epoch, sum[:8], e.Digest[:8])
	}
	cp := &Checkpoint{epoch: b.Epoch, pfns: a.pfns, pages: a.pages, deviceState: a.dev, digest: sum, verified: true}
	a.last = b.Epoch
	a.drop()
	return cp, nil
}
