package replication

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"reflect"
	"testing"
)

// testPages returns n pages with frame numbers first, first+1, …, each filled
// with a pattern that differs per page and per first.
func testPages(n int, first uint64) []Page {
	data := make([]byte, n*PageSize)
	for i := range data {
		data[i] = byte(i/PageSize*7 + i + int(first))
	}
	pages := make([]Page, n)
	for i := range pages {
		pages[i] = Page{PFN: first + uint64(i), Data: data[i*PageSize : (i+1)*PageSize]}
	}
	return pages
}

func TestPagesRoundTrip(t *testing.T) {
	pages := testPages(3, 40)
	pages[1].PFN = 7 // not in order: allowed
	payload, err := AppendPages(nil, pages)
	if err != nil {
		t.Fatal(err)
	}
	if len(payload) != 4+3*(8+PageSize) {
		t.Fatalf("payload is %d bytes", len(payload))
	}
	for _, ft := range []FrameType{TypeSyncPages, TypeCheckpointPages} {
		got, err := DecodePages(Frame{Type: ft, Payload: payload})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, pages) {
			t.Errorf("%s: decoded pages differ", ft)
		}
	}
}

func TestWritePagesSplitsFrames(t *testing.T) {
	var buf bytes.Buffer
	max := 4 + 3*pageRecordSize // three pages per frame
	w := NewWriter(&buf, max)
	pages := testPages(10, 100)
	if err := w.WritePages(TypeSyncPages, 0, pages); err != nil {
		t.Fatal(err)
	}
	w.Flush()
	frames, err := decodeAll(t, buf.Bytes(), max)
	if err != nil {
		t.Fatal(err)
	}
	if len(frames) != 4 {
		t.Fatalf("10 pages at 3 per frame made %d frames, want 4", len(frames))
	}
	var got []Page
	for _, f := range frames {
		p, err := DecodePages(f)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, p...)
	}
	if !reflect.DeepEqual(got, pages) {
		t.Error("pages differ after splitting")
	}
	if PagesPerFrame(max) != 3 || PagesPerFrame(0) != (MaxPayload-4)/pageRecordSize {
		t.Errorf("PagesPerFrame(%d) = %d, PagesPerFrame(0) = %d", max, PagesPerFrame(max), PagesPerFrame(0))
	}
}

func TestEncodePagesRefusesShortPage(t *testing.T) {
	pages := testPages(2, 0)
	pages[1].Data = pages[1].Data[:100]
	if _, err := AppendPages(nil, pages); err == nil {
		t.Error("AppendPages accepted a short page")
	}
	if _, err := AppendPages(nil, nil); err == nil {
		t.Error("AppendPages accepted no pages")
	}
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	if err := w.WritePages(TypeSyncPages, 0, pages); err == nil {
		t.Error("WritePages accepted a short page")
	}
	if err := w.WriteCheckpoint(1, pages, []byte("dev")); err == nil {
		t.Error("WriteCheckpoint accepted a short page")
	}
	if err := w.WritePages(TypeAck, 0, pages[:1]); err == nil {
		t.Error("WritePages accepted a non-pages frame type")
	}
	w.Flush()
	if buf.Len() != 0 {
		t.Errorf("refused writes left %d bytes on the stream", buf.Len())
	}
}

func TestDecodePagesRejects(t *testing.T) {
	one, _ := AppendPages(nil, testPages(1, 0))
	for _, tc := range []struct {
		name string
		f    Frame
		want error
	}{
		{"wrong type", Frame{Type: TypeDeviceState, Payload: one}, ErrUnexpectedType},
		{"empty", Frame{Type: TypeSyncPages}, ErrMalformed},
		{"count only", Frame{Type: TypeSyncPages, Payload: []byte{1, 0, 0, 0}}, ErrMalformed},
		{"zero count", Frame{Type: TypeSyncPages, Payload: []byte{0, 0, 0, 0}}, ErrMalformed},
		{"one byte short", Frame{Type: TypeSyncPages, Payload: one[:len(one)-1]}, ErrMalformed},
		{"one byte over", Frame{Type: TypeSyncPages, Payload: append(bytes.Clone(one), 0)}, ErrMalformed},
		{"count too high", Frame{Type: TypeSyncPages, Payload: append([]byte{2, 0, 0, 0}, one[4:]...)}, ErrMalformed},
		{"huge count", Frame{Type: TypeSyncPages, Payload: append([]byte{0xff, 0xff, 0xff, 0xff}, one[4:]...)}, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := DecodePages(tc.f); !errors.Is(err, tc.want) {
				t.Fatalf("DecodePages = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestTypedPayloadsRoundTrip(t *testing.T) {
	digest := sha256.Sum256([]byte("x"))
	for _, tc := range []struct {
		name   string
		frame  Frame
		decode func(Frame) (any, error)
		want   any
	}{
		{"SyncDone", SyncDone{RAMSize: 1 << 30, Pages: 12345}.Frame(),
			func(f Frame) (any, error) { return DecodeSyncDone(f) }, SyncDone{RAMSize: 1 << 30, Pages: 12345}},
		{"CheckpointBegin", CheckpointBegin{Epoch: 9, PageCount: 3, DeviceStateLen: 13000}.Frame(),
			func(f Frame) (any, error) { return DecodeCheckpointBegin(f) }, CheckpointBegin{Epoch: 9, PageCount: 3, DeviceStateLen: 13000}},
		{"CheckpointEnd", CheckpointEnd{Epoch: 9, PageCount: 3, DeviceStateLen: 13000, Digest: digest}.Frame(),
			func(f Frame) (any, error) { return DecodeCheckpointEnd(f) }, CheckpointEnd{Epoch: 9, PageCount: 3, DeviceStateLen: 13000, Digest: digest}},
		{"DiskWrite", DiskWrite{Disk: 2, Offset: 1 << 40, Data: []byte("sector")}.Frame(5),
			func(f Frame) (any, error) { return DecodeDiskWrite(f) }, DiskWrite{Disk: 2, Offset: 1 << 40, Data: []byte("sector")}},
		{"DiskZero", DiskZero{Disk: 1, Offset: 1 << 30, Length: 2 << 30}.Frame(0),
			func(f Frame) (any, error) { return DecodeDiskZero(f) }, DiskZero{Disk: 1, Offset: 1 << 30, Length: 2 << 30}},
		{"EpochBoundary", EpochBoundary{Epoch: 77}.Frame(),
			func(f Frame) (any, error) { return DecodeEpochBoundary(f) }, EpochBoundary{Epoch: 77}},
		{"Heartbeat", Heartbeat{SentUnixNano: -5, LastCommitted: 76}.Frame(),
			func(f Frame) (any, error) { return DecodeHeartbeat(f) }, Heartbeat{SentUnixNano: -5, LastCommitted: 76}},
		{"Ack", Ack{Epoch: 76}.Frame(),
			func(f Frame) (any, error) { return DecodeAck(f) }, Ack{Epoch: 76}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Through the codec, so header and payload travel together.
			frames, err := decodeAll(t, encode(t, tc.frame), 0)
			if err != nil {
				t.Fatal(err)
			}
			got, err := tc.decode(frames[0])
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
			// Strict lengths: one byte more or less is refused.
			long := tc.frame
			long.Payload = append(bytes.Clone(tc.frame.Payload), 0)
			if _, err := tc.decode(long); !errors.Is(err, ErrMalformed) && tc.name != "DiskWrite" {
				t.Errorf("payload one byte long: %v, want ErrMalformed", err)
			}
			short := tc.frame
			short.Payload = tc.frame.Payload[:len(tc.frame.Payload)-1]
			if tc.name == "DiskWrite" {
				short.Payload = tc.frame.Payload[:diskWriteHeader]
			}
			if _, err := tc.decode(short); !errors.Is(err, ErrMalformed) {
				t.Errorf("payload short: %v, want ErrMalformed", err)
			}
			other := tc.frame
			other.Type = TypeReject
			if _, err := tc.decode(other); !errors.Is(err, ErrUnexpectedType) {
				t.Errorf("wrong type: %v, want ErrUnexpectedType", err)
			}
		})
	}
}

func TestPayloadEpochMustMatchHeader(t *testing.T) {
	for _, tc := range []struct {
		name   string
		frame  Frame
		decode func(Frame) error
	}{
		{"CheckpointBegin", CheckpointBegin{Epoch: 9, DeviceStateLen: 1}.Frame(), func(f Frame) error { _, err := DecodeCheckpointBegin(f); return err }},
		{"CheckpointEnd", CheckpointEnd{Epoch: 9}.Frame(), func(f Frame) error { _, err := DecodeCheckpointEnd(f); return err }},
		{"EpochBoundary", EpochBoundary{Epoch: 9}.Frame(), func(f Frame) error { _, err := DecodeEpochBoundary(f); return err }},
		{"Ack", Ack{Epoch: 9}.Frame(), func(f Frame) error { _, err := DecodeAck(f); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.frame
			f.Epoch = 8
			if err := tc.decode(f); !errors.Is(err, ErrMalformed) {
				t.Fatalf("header epoch 8, payload 9: %v, want ErrMalformed", err)
			}
		})
	}
}

func TestDiskWriteZeroCopyMatchesFrame(t *testing.T) {
	d := DiskWrite{Disk: 1, Offset: 512, Data: bytes.Repeat([]byte{9}, 4096)}
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	if err := w.WriteDiskWrite(3, d); err != nil {
		t.Fatal(err)
	}
	w.Flush()
	if !bytes.Equal(buf.Bytes(), encode(t, d.Frame(3))) {
		t.Error("WriteDiskWrite and DiskWrite.Frame encode differently")
	}
	if err := w.WriteDiskWrite(3, DiskWrite{}); err == nil {
		t.Error("WriteDiskWrite accepted an empty write")
	}
	over := Frame{Type: TypeDiskWrite, Payload: append(le.AppendUint64(le.AppendUint32(nil, 0), 1<<63-2), 1, 2, 3)}
	if _, err := DecodeDiskWrite(over); !errors.Is(err, ErrMalformed) {
		t.Errorf("write past 2^63: %v, want ErrMalformed", err)
	}
}

// A zero range of no bytes, or one past 2^63, is refused.
func TestDiskZeroRejects(t *testing.T) {
	for _, z := range []DiskZero{{Length: 0}, {Offset: 1 << 63, Length: 1}, {Offset: 1<<63 - 2, Length: 3}} {
		if _, err := DecodeDiskZero(z.Frame(0)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%+v: %v, want ErrMalformed", z, err)
		}
	}
}
