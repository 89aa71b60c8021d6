package replication

import (
	"context"
	"errors"
	"fmt"
	"unicode/utf8"
)

// Ordered frames — disk writes and level changes — are counted by both ends
// in stream order; the secondary acknowledges "the first N are done" with one
// WriteAck, coalesced when several arrive together. A primary that must not
// let a guest write complete before the partner has it (HA) waits for its
// count; a level change waits for its own.

// WriteAck says the first N ordered frames of the stream are done on the
// secondary: disk writes written (HA) or journaled (FT), level changes made.
type WriteAck struct{ N uint64 }

// Frame encodes a.
func (a WriteAck) Frame() Frame {
	return Frame{Type: TypeWriteAck, Payload: le.AppendUint64(make([]byte, 0, 8), a.N)}
}

// DecodeWriteAck decodes a WriteAck frame.
func DecodeWriteAck(f Frame) (WriteAck, error) {
	if err := expect(f, TypeWriteAck, 8); err != nil {
		return WriteAck{}, err
	}
	return WriteAck{N: le.Uint64(f.Payload)}, nil
}

// Levels a stream can carry. A stream starts at the level in the VM's spec.
const (
	StreamLevelHA = "ha" // disk writes applied as they arrive
	StreamLevelFT = "ft" // disk writes journaled per epoch, applied on commit
)

// LevelChange switches the stream's level.
type LevelChange struct{ Level string }

// Frame encodes c.
func (c LevelChange) Frame() Frame { return Frame{Type: TypeLevel, Payload: []byte(c.Level)} }

// DecodeLevelChange decodes a Level frame; only known levels pass.
func DecodeLevelChange(f Frame) (LevelChange, error) {
	if f.Type != TypeLevel {
		return LevelChange{}, frameErr(ErrUnexpectedType, "%s frame where %s was expected", f.Type, TypeLevel)
	}
	switch l := string(f.Payload); l {
	case StreamLevelHA, StreamLevelFT:
		return LevelChange{Level: l}, nil
	}
	return LevelChange{}, frameErr(ErrMalformed, "unknown level %q", f.Payload)
}

// MaxRefuseReason bounds the reason a secondary gives for refusing a VM.
const MaxRefuseReason = 1024

// RefusedError is a secondary's refusal of a VM, with its reason (for
// example: not enough capacity promised).
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "partner refused the VM: " + e.Reason }

// ErrRefused matches any *RefusedError with errors.Is.
var ErrRefused = errors.New("partner refused the VM")

// Is makes errors.Is(err, ErrRefused) true for a refusal.
func (e *RefusedError) Is(target error) bool { return target == ErrRefused }

// refuseFrame encodes a refusal, its reason cut to the bound.
func refuseFrame(reason string) Frame {
	if len(reason) > MaxRefuseReason {
		reason = reason[:MaxRefuseReason]
	}
	return Frame{Type: TypeRefuse, Payload: []byte(reason)}
}

// decodeRefuse decodes a Refuse frame's reason.
func decodeRefuse(f Frame) (*RefusedError, error) {
	if len(f.Payload) > MaxRefuseReason || !utf8.Valid(f.Payload) {
		return nil, frameErr(ErrMalformed, "refusal reason of %d bytes", len(f.Payload))
	}
	return &RefusedError{Reason: string(f.Payload)}, nil
}

// DiskSink is where a secondary puts a VM's disk writes.
type DiskSink interface {
	// Write takes one guest disk write made in epoch (FT) — at level ha it
	// is applied at once, at level ft journaled until its epoch commits.
	Write(epoch uint64, w DiskWrite) error
	// Commit is called when checkpoint epoch has been applied, before the
	// primary is told: the epoch's writes are applied now.
	Commit(epoch uint64) error
	// Zero makes a range read as zeroes, applied like a Write of epoch.
	Zero(epoch uint64, z DiskZero) error
	// SetLevel switches between applying at once and journaling.
	SetLevel(level string) error
}

// DiskHasher is a DiskSink that can say what its disks hold: the base of
// the primary's disk sync, which then sends only the ranges that differ.
type DiskHasher interface {
	// RangeHashes returns, for each disk in order, the hash
	// (dirty.PageHash) of each DiskBaseRange bytes of it, the last range
	// short when the disk's size is not a multiple of it. It returns
	// ctx's error once ctx ends.
	RangeHashes(ctx context.Context) ([][]uint64, error)
}

// SendDiskWrite puts one guest disk write made in epoch on the stream and
// returns its ordered count, for WaitOrdered.
func (s *Sender) SendDiskWrite(epoch uint64, d DiskWrite) (uint64, error) {
	return s.sendOrdered(func() error { return s.w.WriteDiskWrite(epoch, d) }, len(d.Data))
}

// SendDiskZero puts a range that now reads as zeroes, made in epoch, on the
// stream and returns its ordered count, for WaitOrdered.
func (s *Sender) SendDiskZero(epoch uint64, z DiskZero) (uint64, error) {
	return s.sendOrdered(func() error { return s.w.WriteFrame(z.Frame(epoch)) }, 0)
}

// sendOrdered writes one ordered frame, carrying diskBytes of guest data,
// and returns its ordered count.
func (s *Sender) sendOrdered(write func() error, diskBytes int) (uint64, error) {
	var n uint64
	err := s.write(func() error {
		if err := write(); err != nil {
			return err
		}
		s.ordered++
		s.diskBytes += uint64(diskBytes)
		n = s.ordered
		return nil
	}, true)
	return n, err
}

// SetLevel tells the secondary the VM's level on this stream changed and
// returns its ordered count: once acknowledged, every earlier disk write is
// done under the old level and every later one under the new.
func (s *Sender) SetLevel(level string) (uint64, error) {
	if level != StreamLevelHA && level != StreamLevelFT {
		return 0, fmt.Errorf("replication: unknown stream level %q", level)
	}
	return s.sendOrdered(func() error { return s.w.WriteFrame(LevelChange{Level: level}.Frame()) }, 0)
}

// WaitOrdered returns once the secondary has acknowledged the first n
// ordered frames, or with the stream's error, or ctx's.
func (s *Sender) WaitOrdered(ctx context.Context, n uint64) error {
	for {
		s.ackMu.Lock()
		done, ch := s.ackedN >= n, s.ackCh
		s.ackMu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-s.done:
			// An ack may have raced the end of the stream.
			s.ackMu.Lock()
			done = s.ackedN >= n
			s.ackMu.Unlock()
			if done {
				return nil
			}
			if err := s.Err(); err != nil {
				return err
			}
			return errors.New("replication: stream closed")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// DiskBytesSent counts guest disk bytes handed to the stream.
func (s *Sender) DiskBytesSent() uint64 {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.diskBytes
}

// OrderedPending is how many ordered frames the secondary has not yet
// acknowledged: the disk replication lag, in writes.
func (s *Sender) OrderedPending() uint64 {
	s.wmu.Lock()
	sent := s.ordered
	s.wmu.Unlock()
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	if s.ackedN > sent {
		return 0
	}
	return sent - s.ackedN
}

func (s *Sender) noteWriteAck(a WriteAck) error {
	s.wmu.Lock()
	sent := s.ordered
	s.wmu.Unlock()
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	if a.N < s.ackedN || a.N > sent {
		return fmt.Errorf("replication: write ack for %d ordered frames, %d sent and %d acknowledged", a.N, sent, s.ackedN)
	}
	if a.N > s.ackedN {
		s.ackedN = a.N
		close(s.ackCh)
		s.ackCh = make(chan struct{})
	}
	return nil
}

// Ordered is how many ordered frames have been sent.
func (s *Sender) Ordered() uint64 {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.ordered
}

// Done is closed when the stream has ended (Err says why).
func (s *Sender) Done() <-chan struct{} { return s.done }
