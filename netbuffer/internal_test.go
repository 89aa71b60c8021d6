package netbuffer

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/axproject/ax/bpf"
)

func TestQueueOrderAndRecycling(t *testing.T) {
	q := newQueue(4096)
	rng := rand.New(rand.NewPCG(1, 2))
	var want [][]byte // what the queue should hold, oldest first
	next := 0
	for step := range 20000 {
		if rng.IntN(3) != 0 || len(want) == 0 {
			f := make([]byte, 4+rng.IntN(1500))
			binary.LittleEndian.PutUint32(f, uint32(next))
			next++
			q.push(uint64(step), 0, f)
			want = append(want, f)
		} else {
			e, ok := q.front()
			if !ok || !bytes.Equal(e.data, want[0]) {
				t.Fatalf("step %d: front is %x…, want %x…", step, head(e.data), head(want[0]))
			}
			q.pop()
			want = want[1:]
		}
		if q.frames != len(want) {
			t.Fatalf("step %d: %d frames, want %d", step, q.frames, len(want))
		}
	}
	n := 0
	for _, f := range want {
		n += len(f)
	}
	if q.bytes != n {
		t.Fatalf("%d bytes, want %d", q.bytes, n)
	}
	if frames, bytes := q.clear(); frames != len(want) || bytes != n || q.frames != 0 || q.bytes != 0 {
		t.Fatalf("clear: %d frames %d bytes, left %d/%d", frames, bytes, q.frames, q.bytes)
	}
	if _, ok := q.front(); ok {
		t.Fatal("front after clear")
	}
}

func head(b []byte) []byte { return b[:min(len(b), 4)] }

// TestQueueSteadyStateAllocatesNothing: holding and releasing in rounds
// (what the FT loop does) reuses the chunks and the entry slice.
func TestQueueSteadyStateAllocatesNothing(t *testing.T) {
	q := newQueue(64 << 10)
	f := make([]byte, 1500)
	round := func() {
		for range 100 {
			q.push(1, 0, f)
		}
		for range 100 {
			q.pop()
		}
	}
	round()
	round()
	if n := testing.AllocsPerRun(100, round); n != 0 {
		t.Errorf("%v allocations per round", n)
	}
}

func TestQueueFrameLargerThanChunk(t *testing.T) {
	q := newQueue(1024)
	big := bytes.Repeat([]byte{7}, 3000)
	q.push(1, 0, []byte{1})
	q.push(1, 0, big)
	q.pop()
	if e, _ := q.front(); !bytes.Equal(e.data, big) {
		t.Fatal("big frame corrupted")
	}
}

func TestDecodeRecord(t *testing.T) {
	frame := []byte("a frame from the guest")
	rec := makeRecord(9, 1234, 1, 3, 4, frame)
	r, err := decodeRecord(rec)
	if err != nil {
		t.Fatal(err)
	}
	if r.epoch != 9 || r.tstamp != 1234 || r.flags != 1 || r.csumStart != 3 || r.csumOffset != 4 || !bytes.Equal(r.frame, frame) {
		t.Fatalf("decoded %+v", r)
	}
	for _, bad := range [][]byte{
		nil,
		rec[:bpf.FrameHdrSize-1],
		rec[:bpf.FrameHdrSize],      // length 0
		rec[:len(rec)-1],            // shorter than its length says
		append(bytes.Clone(rec), 0), // longer
	} {
		if _, err := decodeRecord(bad); err == nil {
			t.Errorf("decoded a malformed record of %d bytes", len(bad))
		}
	}
}

// TestRecordLayout: decodeRecord's offsets are struct frame_hdr's.
func TestRecordLayout(t *testing.T) {
	var h bpf.GateFrameHdr
	for _, c := range []struct {
		field     string
		got, want uintptr
	}{
		{"epoch", unsafe.Offsetof(h.Epoch), 0},
		{"tstamp", unsafe.Offsetof(h.Tstamp), 8},
		{"len", unsafe.Offsetof(h.Len), 16},
		{"flags", unsafe.Offsetof(h.Flags), 20},
		{"csum_start", unsafe.Offsetof(h.CsumStart), 24},
		{"csum_offset", unsafe.Offsetof(h.CsumOffset), 26},
	} {
		if c.got != c.want {
			t.Errorf("frame_hdr.%s at %d, the decoder reads it at %d", c.field, c.got, c.want)
		}
	}
}

func makeRecord(epoch, tstamp uint64, flags uint32, start, off uint16, frame []byte) []byte {
	b := make([]byte, bpf.FrameHdrSize, bpf.FrameHdrSize+len(frame))
	le := binary.LittleEndian
	le.PutUint64(b[0:], epoch)
	le.PutUint64(b[8:], tstamp)
	le.PutUint32(b[16:], uint32(len(frame)))
	le.PutUint32(b[20:], flags)
	le.PutUint16(b[24:], start)
	le.PutUint16(b[26:], off)
	return append(b, frame...)
}

// refSum is RFC 1071 done the slow, obvious way.
func refSum(b []byte) uint16 {
	var s uint32
	for i := 0; i < len(b); i += 2 {
		w := uint32(b[i]) << 8
		if i+1 < len(b) {
			w |= uint32(b[i+1])
		}
		s += w
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func TestOnesSum(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for n := range 200 {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if n%7 == 0 {
			for i := range b {
				b[i] = 0xff // carries everywhere
			}
		}
		if got, want := onesSum(b), refSum(b); got != want {
			t.Fatalf("len %d: %#04x, want %#04x", n, got, want)
		}
	}
}

func TestCompleteChecksum(t *testing.T) {
	// A UDP datagram whose checksum field holds the pseudo-header sum, as
	// a Linux guest hands it to a device that offloads checksums.
	const start, off = 34, 6
	f := make([]byte, 60)
	copy(f[start:], []byte{0x9c, 0x40, 0x9c, 0x41, 0, 26, 0, 0})
	copy(f[start+8:], "eighteen bytes....")
	pseudo := []byte{10, 0, 0, 1, 10, 0, 0, 2, 0, 17, 0, 26}
	seed := refSum(pseudo)
	f[start+off], f[start+off+1] = byte(seed>>8), byte(seed)
	if !completeChecksum(f, start, off) {
		t.Fatal("refused valid offsets")
	}
	l4 := f[start : start+26]
	if got := refSum(append(bytes.Clone(pseudo), l4...)); got != 0xffff {
		t.Fatalf("checksum does not verify: sum %#04x", got)
	}
	for _, c := range []struct{ start, off uint16 }{{60, 0}, {58, 2}, {59, 0}, {65535, 65535}} {
		g := bytes.Clone(f)
		if completeChecksum(g, c.start, c.off) || !bytes.Equal(g, f) {
			t.Errorf("start %d offset %d: out of the frame, yet accepted", c.start, c.off)
		}
	}
}

// FuzzRecord feeds ax_gate's record decoder and the checksum completion,
// which read a guest's bytes at kernel-given offsets, arbitrary input.
func FuzzRecord(f *testing.F) {
	f.Add(makeRecord(1, 2, 1, 34, 6, make([]byte, 60)))
	f.Add(makeRecord(1, 2, 0, 0, 0, []byte{1}))
	f.Add(makeRecord(1, 2, 1, 0xffff, 0xffff, make([]byte, 14)))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRecord(b)
		if err != nil {
			return
		}
		if len(r.frame) != len(b)-bpf.FrameHdrSize {
			t.Fatal(fmt.Sprintf("frame of %d bytes from a %d-byte record", len(r.frame), len(b)))
		}
		if r.flags&uint32(bpf.GateFrameFlagFRAME_CSUM_PARTIAL) != 0 {
			completeChecksum(r.frame, r.csumStart, r.csumOffset)
		}
	})
}
