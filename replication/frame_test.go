package replication

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"testing"
)

// encode returns the wire bytes of frames written with a Writer.
func encode(t testing.TB, frames ...Frame) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	for _, f := range frames {
		if err := w.WriteFrame(f); err != nil {
			t.Fatalf("WriteFrame(%s): %v", f.Type, err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// decodeAll reads frames until the stream ends, copying each payload.
func decodeAll(t testing.TB, data []byte, maxPayload int) ([]Frame, error) {
	t.Helper()
	r := NewReader(bytes.NewReader(data), maxPayload)
	var out []Frame
	for {
		f, err := r.ReadFrame()
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			return out, err
		}
		f.Payload = bytes.Clone(f.Payload)
		out = append(out, f)
	}
}

func TestFrameRoundTrip(t *testing.T) {
	big := bytes.Repeat([]byte{0xab}, MaxPayload)
	var frames []Frame
	for ft := TypeHello; ft < typeLimit; ft++ {
		frames = append(frames, Frame{Type: ft, Epoch: uint64(ft) * 1000, Payload: []byte(ft.String())})
	}
	frames = append(frames,
		Frame{Type: TypeHeartbeat},                           // empty payload
		Frame{Type: TypeDeviceState, Epoch: 1, Payload: big}, // exactly the limit
		Frame{Type: TypeAck, Epoch: math.MaxUint64, Payload: []byte{1}},
	)
	got, err := decodeAll(t, encode(t, frames...), 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(frames) {
		t.Fatalf("read %d frames, wrote %d", len(got), len(frames))
	}
	for i := range frames {
		if got[i].Type != frames[i].Type || got[i].Epoch != frames[i].Epoch || !bytes.Equal(got[i].Payload, frames[i].Payload) {
			t.Errorf("frame %d: got %s epoch %d %d bytes, want %s epoch %d %d bytes", i,
				got[i].Type, got[i].Epoch, len(got[i].Payload), frames[i].Type, frames[i].Epoch, len(frames[i].Payload))
		}
	}
}

func TestFrameTypeString(t *testing.T) {
	for _, tc := range []struct {
		t    FrameType
		want string
	}{
		{TypeHello, "Hello"},
		{TypeSyncPages, "SyncPages"},
		{TypeCheckpointEnd, "CheckpointEnd"},
		{TypeAck, "Ack"},
		{0, "FrameType(0)"},
		{TypeDiskZero, "DiskZero"},
		{TypeSyncBegin, "SyncBegin"},
		{TypeRestart, "Restart"},
		{typeLimit, fmt.Sprintf("FrameType(%d)", uint8(typeLimit))},
		{255, "FrameType(255)"},
	} {
		if got := tc.t.String(); got != tc.want {
			t.Errorf("FrameType(%d).String() = %q, want %q", uint8(tc.t), got, tc.want)
		}
	}
}

func TestReadFrameRejects(t *testing.T) {
	good := encode(t, Frame{Type: TypeAck, Epoch: 7, Payload: []byte("12345678")})
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	withLen := func(n uint32) []byte {
		return mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[6:], n); return b })
	}
	for _, tc := range []struct {
		name string
		data []byte
		max  int
		want error
	}{
		{"bad magic", mutate(func(b []byte) []byte { b[0] ^= 1; return b }), 0, ErrBadMagic},
		{"bad version", mutate(func(b []byte) []byte { b[2] = 2; return b }), 0, ErrBadVersion},
		{"type zero", mutate(func(b []byte) []byte { b[3] = 0; return b }), 0, ErrUnknownType},
		{"type past the last", mutate(func(b []byte) []byte { b[3] = uint8(typeLimit); return b }), 0, ErrUnknownType},
		{"reserved flags", mutate(func(b []byte) []byte { b[5] = 0x80; return b }), 0, ErrReservedFlags},
		{"over the default limit", withLen(MaxPayload + 1), 0, ErrTooLarge},
		{"over a configured limit", good, 4, ErrTooLarge},
		{"length 4 GiB", withLen(math.MaxUint32), 0, ErrTooLarge},
		{"flipped payload bit", mutate(func(b []byte) []byte { b[HeaderSize] ^= 0x10; return b }), 0, ErrChecksum},
		{"flipped epoch bit", mutate(func(b []byte) []byte { b[12] ^= 0x01; return b }), 0, ErrChecksum},
		{"flipped trailer bit", mutate(func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b }), 0, ErrChecksum},
		{"length one short", mutate(func(b []byte) []byte { b[6]--; return b }), 0, ErrChecksum},
		{"truncated header", good[:HeaderSize-1], 0, io.ErrUnexpectedEOF},
		{"truncated payload", good[:HeaderSize+3], 0, io.ErrUnexpectedEOF},
		{"missing trailer", good[:len(good)-TrailerSize], 0, io.ErrUnexpectedEOF},
		{"garbage", []byte("GET / HTTP/1.1\r\nHost: example\r\n\r\n"), 0, ErrBadMagic},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.data), tc.max)
			_, err := r.ReadFrame()
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadFrame error = %v, want %v", err, tc.want)
			}
			var fe *FrameError
			if errors.As(err, &fe) && fe.Reason == "" {
				t.Errorf("FrameError without a reason: %#v", fe)
			}
			if tc.want != io.ErrUnexpectedEOF && !errors.As(err, &fe) {
				t.Errorf("error %v is not a *FrameError", err)
			}
			if errors.Is(tc.want, ErrTooLarge) && r.buf != nil {
				t.Errorf("reader allocated %d bytes for a frame it refused", cap(r.buf))
			}
			if _, again := r.ReadFrame(); again != err {
				t.Errorf("second ReadFrame = %v, want the same error %v", again, err)
			}
		})
	}
}

func TestReadFrameEOF(t *testing.T) {
	r := NewReader(bytes.NewReader(nil), 0)
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("empty stream: %v, want io.EOF", err)
	}
}

func TestWriterRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    Frame
		want error
	}{
		{"type zero", Frame{}, ErrUnknownType},
		{"unknown type", Frame{Type: 200}, ErrUnknownType},
		{"too large", Frame{Type: TypeDeviceState, Payload: make([]byte, 65)}, ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := NewWriter(&buf, 64)
			if err := w.WriteFrame(tc.f); !errors.Is(err, tc.want) {
				t.Fatalf("WriteFrame = %v, want %v", err, tc.want)
			}
			// A refused frame leaves the stream usable and untouched.
			if err := w.WriteFrame(Ack{Epoch: 1}.Frame()); err != nil {
				t.Fatal(err)
			}
			w.Flush()
			got, err := decodeAll(t, buf.Bytes(), 0)
			if err != nil || len(got) != 1 || got[0].Type != TypeAck {
				t.Fatalf("stream after a refused frame: %v frames, err %v", len(got), err)
			}
		})
	}
}

// countingWriter counts the writes that would be syscalls on a socket.
type countingWriter struct {
	writes int
	bytes  int
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.writes++
	c.bytes += len(p)
	return len(p), nil
}

func TestWriterBatchesSmallFrames(t *testing.T) {
	var c countingWriter
	w := NewWriter(&c, 0)
	for i := range 100 {
		if err := w.WriteFrame(Heartbeat{SentUnixNano: int64(i), LastCommitted: uint64(i)}.Frame()); err != nil {
			t.Fatal(err)
		}
	}
	if c.writes != 0 {
		t.Fatalf("%d writes before Flush", c.writes)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if c.writes != 1 {
		t.Errorf("100 heartbeats took %d writes, want 1", c.writes)
	}
}

func TestWriterLargeCheckpointFewWrites(t *testing.T) {
	var c countingWriter
	w := NewWriter(&c, 0)
	pages := testPages(2048, 0)
	if err := w.WriteCheckpoint(1, pages, []byte("device")); err != nil {
		t.Fatal(err)
	}
	// 8 MiB through a 256 KiB buffer: about one write per buffer, no
	// write per page or per header.
	if max := c.bytes/bufferSize + 2; c.writes > max {
		t.Errorf("%d bytes took %d writes, want at most %d", c.bytes, c.writes, max)
	}
}

type failingWriter struct{ after int }

func (f *failingWriter) Write(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, errors.New("link down")
	}
	f.after--
	return len(p), nil
}

func TestWriterErrorIsSticky(t *testing.T) {
	w := NewWriter(&failingWriter{}, 0)
	w.WriteFrame(Ack{Epoch: 1}.Frame())
	if err := w.Flush(); err == nil {
		t.Fatal("Flush on a failing link succeeded")
	}
	if err := w.WriteFrame(Ack{Epoch: 2}.Frame()); err == nil {
		t.Fatal("WriteFrame after a failed flush succeeded")
	}
}
