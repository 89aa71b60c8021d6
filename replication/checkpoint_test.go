package replication

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

const testRAMPages = 64 // 256 KiB of guest RAM

// checkpointFrames returns the frames WriteCheckpoint sends for a checkpoint
// through a Writer and Reader limited to maxPayload.
func checkpointFrames(t testing.TB, epoch uint64, pages []Page, dev []byte, maxPayload int) []Frame {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf, maxPayload)
	if err := w.WriteCheckpoint(epoch, pages, dev); err != nil {
		t.Fatal(err)
	}
	frames, err := decodeAll(t, buf.Bytes(), maxPayload)
	if err != nil {
		t.Fatal(err)
	}
	return frames
}

// feed gives frames to a until one fails or a checkpoint completes.
func feed(a *CheckpointAssembler, frames []Frame) (*Checkpoint, error) {
	for i, f := range frames {
		cp, err := a.Add(f)
		if err != nil || cp != nil {
			if cp != nil && i != len(frames)-1 {
				panic("checkpoint completed before its last frame")
			}
			return cp, err
		}
	}
	return nil, nil
}

func devState(epoch uint64, n int) []byte {
	return bytes.Repeat([]byte{byte(epoch), 0xd5}, n/2)
}

func TestAssemblerCompletes(t *testing.T) {
	pages := testPages(5, 10)
	pages[2].PFN = 60 // a run, a jump, a run
	dev := devState(3, 10000)
	// Two pages per frame and 4 KiB device chunks: several frames of each.
	frames := checkpointFrames(t, 3, pages, dev, 4+2*pageRecordSize)
	a := NewCheckpointAssembler(testRAMPages*PageSize, 2, 0)
	cp, err := feed(a, frames)
	if err != nil {
		t.Fatal(err)
	}
	if cp == nil {
		t.Fatal("no checkpoint after CheckpointEnd")
	}
	if cp.Epoch() != 3 || cp.PageCount() != 5 || !bytes.Equal(cp.DeviceState(), dev) {
		t.Fatalf("checkpoint epoch %d, %d pages, %d device bytes", cp.Epoch(), cp.PageCount(), len(cp.DeviceState()))
	}
	for i, p := range pages {
		if got := cp.Page(i); got.PFN != p.PFN || !bytes.Equal(got.Data, p.Data) {
			t.Errorf("page %d differs", i)
		}
	}
	if _, ok := a.Pending(); ok {
		t.Error("assembler still pending after a complete checkpoint")
	}
	// The next epoch works; the same one again does not.
	if cp, err := feed(a, checkpointFrames(t, 4, nil, dev, 0)); err != nil || cp == nil {
		t.Fatalf("checkpoint 4 with no pages: %v, %v", cp, err)
	}
	if _, err := feed(a, checkpointFrames(t, 4, nil, dev, 0)); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("checkpoint 4 again: %v, want ErrStaleEpoch", err)
	}
}

func TestAssemblerRejects(t *testing.T) {
	const epoch = 5
	pages := testPages(4, 0)
	dev := devState(epoch, 3000)
	max := 4 + 2*pageRecordSize
	base := func(t *testing.T) []Frame { return checkpointFrames(t, epoch, pages, dev, max) }
	// base: Begin, Pages(2), Pages(2), Dev, End
	for _, tc := range []struct {
		name     string
		frames   func(t *testing.T) []Frame
		last     uint64
		maxBytes int64
		want     error
	}{
		{"pages before begin", func(t *testing.T) []Frame { return base(t)[1:] }, 0, 0, ErrBadCheckpoint},
		{"end before begin", func(t *testing.T) []Frame { f := base(t); return f[len(f)-1:] }, 0, 0, ErrBadCheckpoint},
		{"duplicate begin", func(t *testing.T) []Frame { f := base(t); return slices.Insert(f, 1, f[0]) }, 0, 0, ErrBadCheckpoint},
		{"frame of another epoch", func(t *testing.T) []Frame {
			f := base(t)
			f[1].Epoch = epoch + 1
			return f
		}, 0, 0, ErrBadCheckpoint},
		{"epoch equal to committed", base, epoch, 0, ErrStaleEpoch},
		{"epoch before committed", base, epoch + 10, 0, ErrStaleEpoch},
		{"too large", base, 0, 4*PageSize + 2999, ErrCheckpointTooLarge},
		{"huge page count", func(t *testing.T) []Frame {
			return []Frame{CheckpointBegin{Epoch: epoch, PageCount: 1 << 62, DeviceStateLen: 1}.Frame()}
		}, 0, 0, ErrCheckpointTooLarge},
		{"huge device state", func(t *testing.T) []Frame {
			return []Frame{CheckpointBegin{Epoch: epoch, PageCount: 1, DeviceStateLen: 1<<64 - 1}.Frame()}
		}, 0, 0, ErrCheckpointTooLarge},
		{"no device state", func(t *testing.T) []Frame {
			return []Frame{CheckpointBegin{Epoch: epoch, PageCount: 1}.Frame()}
		}, 0, 0, ErrBadCheckpoint},
		{"pfn outside RAM", func(t *testing.T) []Frame {
			p := testPages(4, 0)
			p[3].PFN = testRAMPages
			return checkpointFrames(t, epoch, p, dev, max)
		}, 0, 0, ErrBadCheckpoint},
		{"huge pfn", func(t *testing.T) []Frame {
			p := testPages(4, 0)
			p[0].PFN = 1<<64 - 1
			return checkpointFrames(t, epoch, p, dev, max)
		}, 0, 0, ErrBadCheckpoint},
		{"a pages frame lost", func(t *testing.T) []Frame { return slices.Delete(base(t), 2, 3) }, 0, 0, ErrBadCheckpoint},
		{"a pages frame twice", func(t *testing.T) []Frame { f := base(t); return slices.Insert(f, 2, f[1]) }, 0, 0, ErrBadCheckpoint},
		{"device state lost", func(t *testing.T) []Frame { return slices.Delete(base(t), 3, 4) }, 0, 0, ErrBadCheckpoint},
		{"device state twice", func(t *testing.T) []Frame { f := base(t); return slices.Insert(f, 3, f[3]) }, 0, 0, ErrBadCheckpoint},
		{"empty device state frame", func(t *testing.T) []Frame {
			f := base(t)
			return slices.Insert(f, 3, Frame{Type: TypeDeviceState, Epoch: epoch})
		}, 0, 0, ErrBadCheckpoint},
		{"pages after device state", func(t *testing.T) []Frame {
			f := base(t)
			f[2], f[3] = f[3], f[2]
			return f
		}, 0, 0, ErrBadCheckpoint},
		{"end disagrees with begin", func(t *testing.T) []Frame {
			f := base(t)
			e, _ := DecodeCheckpointEnd(f[4])
			e.PageCount = 3
			f[4] = e.Frame()
			return f
		}, 0, 0, ErrBadCheckpoint},
		{"flipped byte in a page", func(t *testing.T) []Frame {
			f := base(t)
			f[2].Payload[4+8+100] ^= 1
			return f
		}, 0, 0, ErrDigestMismatch},
		{"flipped byte in a pfn", func(t *testing.T) []Frame {
			f := base(t)
			f[1].Payload[4] ^= 1 // pfn 0 becomes 1: still in RAM
			return f
		}, 0, 0, ErrDigestMismatch},
		{"flipped byte in device state", func(t *testing.T) []Frame {
			f := base(t)
			f[3].Payload[0] ^= 1
			return f
		}, 0, 0, ErrDigestMismatch},
		{"pages reordered", func(t *testing.T) []Frame {
			f := base(t)
			f[1], f[2] = f[2], f[1]
			return f
		}, 0, 0, ErrDigestMismatch},
		{"not a checkpoint frame", func(t *testing.T) []Frame {
			f := base(t)
			return slices.Insert(f, 1, Ack{Epoch: epoch}.Frame())
		}, 0, 0, ErrUnexpectedType},
		{"malformed begin", func(t *testing.T) []Frame {
			return []Frame{{Type: TypeCheckpointBegin, Epoch: epoch, Payload: []byte{1}}}
		}, 0, 0, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := NewCheckpointAssembler(testRAMPages*PageSize, tc.last, tc.maxBytes)
			cp, err := feed(a, tc.frames(t))
			if !errors.Is(err, tc.want) {
				t.Fatalf("error = %v, want %v", err, tc.want)
			}
			if cp != nil {
				t.Fatal("a checkpoint came out of bad frames")
			}
			// Once wrong, the assembler accepts nothing more, not even a
			// good checkpoint: the stream is to be dropped.
			if cp, err := feed(a, checkpointFrames(t, 1000, nil, dev, 0)); err == nil || cp != nil {
				t.Fatalf("assembler accepted a checkpoint after an error: %v", err)
			}
		})
	}
}

func TestAssemblerMemoryBound(t *testing.T) {
	dev := devState(1, 100)
	pages := testPages(8, 0)
	exact := int64(len(pages)*PageSize + len(dev))
	if cp, err := feed(NewCheckpointAssembler(testRAMPages*PageSize, 0, exact), checkpointFrames(t, 1, pages, dev, 0)); err != nil || cp == nil {
		t.Fatalf("checkpoint of exactly the bound: %v", err)
	}
	if _, err := feed(NewCheckpointAssembler(testRAMPages*PageSize, 0, exact-1), checkpointFrames(t, 1, pages, dev, 0)); !errors.Is(err, ErrCheckpointTooLarge) {
		t.Fatalf("checkpoint one byte over the bound: %v, want ErrCheckpointTooLarge", err)
	}
}
