package replication

import (
	"bytes"
	"io"
	"testing"
)

// BenchmarkWritePages measures framing full pages frames (CRC32C included)
// into a buffered stream.
func BenchmarkWritePages(b *testing.B) {
	pages := testPages(PagesPerFrame(0), 0)
	w := NewWriter(io.Discard, 0)
	b.SetBytes(int64(len(pages) * PageSize))
	b.ReportAllocs()
	for b.Loop() {
		if err := w.WritePages(TypeCheckpointPages, 1, pages); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkReadPages measures reading, checking and decoding full pages frames.
func BenchmarkReadPages(b *testing.B) {
	pages := testPages(PagesPerFrame(0), 0)
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	if err := w.WritePages(TypeCheckpointPages, 1, pages); err != nil {
		b.Fatal(err)
	}
	w.Flush()
	r := NewReader(&loop{data: buf.Bytes()}, 0)
	b.SetBytes(int64(len(pages) * PageSize))
	b.ReportAllocs()
	for b.Loop() {
		f, err := r.ReadFrame()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := DecodePages(f); err != nil {
			b.Fatal(err)
		}
	}
}

// loop replays data forever, like a peer that keeps sending.
type loop struct {
	data []byte
	off  int
}

func (l *loop) Read(p []byte) (int, error) {
	n := copy(p, l.data[l.off:])
	l.off = (l.off + n) % len(l.data)
	return n, nil
}

// BenchmarkAssembleCheckpoint measures receiving a checkpoint of 8 MiB of
// pages: framing checks, copying and the SHA-256 digest.
func BenchmarkAssembleCheckpoint(b *testing.B) {
	pages := testPages(2048, 0)
	frames := checkpointFrames(b, 1, pages, devState(1, 13000), 0)
	b.SetBytes(int64(len(pages) * PageSize))
	b.ReportAllocs()
	epoch := uint64(0)
	a := NewCheckpointAssembler(int64(len(pages))*PageSize, 0, 0)
	for b.Loop() {
		epoch++
		for _, f := range frames {
			f.Epoch = epoch
			switch f.Type {
			case TypeCheckpointBegin:
				bg, _ := DecodeCheckpointBegin(Frame{Type: f.Type, Epoch: 1, Payload: f.Payload})
				bg.Epoch = epoch
				f = bg.Frame()
			case TypeCheckpointEnd:
				e, _ := DecodeCheckpointEnd(Frame{Type: f.Type, Epoch: 1, Payload: f.Payload})
				e.Epoch = epoch
				f = e.Frame()
			}
			if _, err := a.Add(f); err != nil {
				b.Fatal(err)
			}
		}
	}
}
