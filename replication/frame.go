package replication

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"strconv"
)

// Wire constants. Every integer on the wire, in the header and in payloads, is
// little-endian: both ends are x86-64 or arm64 hosts, and it keeps the codec
// free of byte swaps on the paths that move guest memory.
const (
	// Magic opens every frame; a stream that does not start with it is not ours.
	Magic uint16 = 0xA7F1
	// FrameVersion is the version of the framing itself (header and trailer).
	FrameVersion uint8 = 1
	// HeaderSize is the fixed frame header: magic, version, type, flags, length, epoch.
	HeaderSize = 2 + 1 + 1 + 2 + 4 + 8
	// TrailerSize is the CRC32C that follows the payload.
	TrailerSize = 4
	// MaxPayload is the default bound on a frame's payload. A reader refuses a
	// larger length before allocating anything for it.
	MaxPayload = 8 << 20
	// PageSize is the size of one guest page on the wire.
	PageSize = 4096
)

// FrameType says what a frame's payload is.
type FrameType uint8

// Frame types. Zero is deliberately not a valid type.
const (
	TypeHello           FrameType = iota + 1 // client → server: version range, vm, nonce
	TypeChallenge                            // server → client: server nonce, server proof
	TypeResponse                             // client → server: client proof
	TypeWelcome                              // server → client: negotiated version
	TypeReject                               // either way: handshake refused, no detail
	TypeSyncPages                            // primary → secondary: initial-sync pages
	TypeSyncDone                             // primary → secondary: initial sync complete
	TypeCheckpointBegin                      // primary → secondary: checkpoint N starts
	TypeCheckpointPages                      // primary → secondary: pages of checkpoint N
	TypeDeviceState                          // primary → secondary: a chunk of N's device state
	TypeCheckpointEnd                        // primary → secondary: N complete, with its digest
	TypeDiskWrite                            // primary → secondary: one guest disk write
	TypeEpochBoundary                        // primary → secondary: disk writes so far belong to ≤ N
	TypeHeartbeat                            // both ways: liveness and progress
	TypeAck                                  // secondary → primary: checkpoint N committed
	TypeSpec                                 // primary → secondary: the VM's spec (JSON), after the handshake
	TypeMarker                               // primary → secondary: facts about checkpoint N (console offset)
	TypeBye                                  // primary → secondary: protection ended, drop the replica
	TypeHandover                             // primary → secondary: planned switch, take over after N
	TypeWriteAck                             // secondary → primary: the first N ordered frames (disk writes, levels) are done
	TypeLevel                                // primary → secondary: the VM's level changes (ha, ft) on this stream
	TypeAccept                               // secondary → primary: the spec is accepted, the replica is open
	TypeRefuse                               // secondary → primary: the spec is refused, with the reason
	TypeDiskZero                             // primary → secondary: a guest disk range reads as zeroes (below FT)
	TypeBase                                 // secondary → primary, after Accept: hashes of the pages the replica holds
	TypeSyncBegin                            // primary → secondary: an initial sync starts, on the base or from zeros
	TypeRestart                              // primary → secondary: axd restarts, keep the replica, no takeover for D; echoed back when understood

	typeLimit // first invalid value
)

var frameTypeNames = [...]string{
	TypeHello:           "Hello",
	TypeChallenge:       "Challenge",
	TypeResponse:        "Response",
	TypeWelcome:         "Welcome",
	TypeReject:          "Reject",
	TypeSyncPages:       "SyncPages",
	TypeSyncDone:        "SyncDone",
	TypeCheckpointBegin: "CheckpointBegin",
	TypeCheckpointPages: "CheckpointPages",
	TypeDeviceState:     "DeviceState",
	TypeCheckpointEnd:   "CheckpointEnd",
	TypeDiskWrite:       "DiskWrite",
	TypeEpochBoundary:   "EpochBoundary",
	TypeHeartbeat:       "Heartbeat",
	TypeAck:             "Ack",
	TypeSpec:            "Spec",
	TypeMarker:          "Marker",
	TypeBye:             "Bye",
	TypeHandover:        "Handover",
	TypeWriteAck:        "WriteAck",
	TypeLevel:           "Level",
	TypeAccept:          "Accept",
	TypeRefuse:          "Refuse",
	TypeDiskZero:        "DiskZero",
	TypeBase:            "Base",
	TypeSyncBegin:       "SyncBegin",
	TypeRestart:         "Restart",
}

// Valid reports whether t is a frame type this version of the protocol knows.
func (t FrameType) Valid() bool { return t > 0 && t < typeLimit }

// IsCheckpoint reports whether frames of type t belong to a checkpoint and go
// to a CheckpointAssembler.
func (t FrameType) IsCheckpoint() bool {
	switch t {
	case TypeCheckpointBegin, TypeCheckpointPages, TypeDeviceState, TypeCheckpointEnd:
		return true
	}
	return false
}

func (t FrameType) String() string {
	if t.Valid() {
		return frameTypeNames[t]
	}
	return "FrameType(" + strconv.Itoa(int(t)) + ")"
}

// Frame is one unit on the replication stream.
type Frame struct {
	Type FrameType
	// Epoch is the FT epoch the frame belongs to; zero during the handshake.
	Epoch   uint64
	Payload []byte
}

// Sentinel errors a *FrameError wraps. Whatever the reason, the caller drops
// the connection: the stream cannot be trusted past a bad frame.
var (
	ErrBadMagic       = errors.New("bad magic")
	ErrBadVersion     = errors.New("unsupported frame version")
	ErrReservedFlags  = errors.New("reserved flags set")
	ErrUnknownType    = errors.New("unknown frame type")
	ErrTooLarge       = errors.New("payload too large")
	ErrChecksum       = errors.New("checksum mismatch")
	ErrMalformed      = errors.New("malformed payload")
	ErrUnexpectedType = errors.New("unexpected frame type")
)

// FrameError reports a frame, or a payload inside one, that failed a check.
type FrameError struct {
	Reason string // what was wrong, with the values seen
	Err    error  // one of the sentinel errors above
}

func (e *FrameError) Error() string { return "replication: bad frame: " + e.Reason }

func (e *FrameError) Unwrap() error { return e.Err }

func frameErr(sentinel error, format string, args ...any) *FrameError {
	return &FrameError{Reason: sentinel.Error() + ": " + fmt.Sprintf(format, args...), Err: sentinel}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// bufferSize is the stream buffer on each side: large enough that a full page
// frame goes out in a handful of writes, small enough to keep per-VM memory low.
const bufferSize = 256 << 10

func clampMax(maxPayload int) uint32 {
	if maxPayload <= 0 {
		return MaxPayload
	}
	if maxPayload > math.MaxUint32-HeaderSize-TrailerSize {
		return math.MaxUint32 - HeaderSize - TrailerSize
	}
	return uint32(maxPayload)
}

// Reader reads frames from a stream. It is not safe for concurrent use.
type Reader struct {
	r   io.Reader
	max uint32
	hdr [HeaderSize]byte
	buf []byte // payload followed by the CRC trailer; reused across frames
	err error  // sticky: after a bad or short frame the stream is out of step
}

// NewReader returns a Reader that refuses payloads larger than maxPayload
// (MaxPayload when maxPayload <= 0). It buffers r and may read ahead, so use
// one Reader for the rest of the connection.
func NewReader(r io.Reader, maxPayload int) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, bufferSize), max: clampMax(maxPayload)}
}

// newExactReader reads no byte beyond the frames it returns; the handshake
// uses it so the connection can be handed to a buffered Reader afterwards.
func newExactReader(r io.Reader, maxPayload int) *Reader {
	return &Reader{r: r, max: clampMax(maxPayload)}
}

// ReadFrame reads and verifies the next frame. The returned Payload is valid
// only until the next call to ReadFrame; copy what must outlive it.
//
// It returns io.EOF if the stream ends cleanly between frames, an error
// wrapping io.ErrUnexpectedEOF if it ends inside one, and a *FrameError if the
// frame fails a check. Every error is final: later calls return it again.
func (r *Reader) ReadFrame() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.readFrame()
	if err != nil {
		r.err = err
	}
	return f, err
}

func (r *Reader) readFrame() (Frame, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		if err == io.EOF {
			return Frame{}, io.EOF
		}
		return Frame{}, fmt.Errorf("replication: read frame header: %w", err)
	}
	h := r.hdr[:]
	if m := binary.LittleEndian.Uint16(h[0:]); m != Magic {
		return Frame{}, frameErr(ErrBadMagic, "got %#04x, want %#04x", m, Magic)
	}
	if v := h[2]; v != FrameVersion {
		return Frame{}, frameErr(ErrBadVersion, "got %d, want %d", v, FrameVersion)
	}
	t := FrameType(h[3])
	if !t.Valid() {
		return Frame{}, frameErr(ErrUnknownType, "%d", h[3])
	}
	if fl := binary.LittleEndian.Uint16(h[4:]); fl != 0 {
		return Frame{}, frameErr(ErrReservedFlags, "%s frame has flags %#04x", t, fl)
	}
	n := binary.LittleEndian.Uint32(h[6:])
	if n > r.max {
		return Frame{}, frameErr(ErrTooLarge, "%s frame declares %d bytes, limit %d", t, n, r.max)
	}
	epoch := binary.LittleEndian.Uint64(h[10:])

	need := int(n) + TrailerSize
	if cap(r.buf) < need {
		r.buf = make([]byte, need)
	}
	buf := r.buf[:need]
	if _, err := io.ReadFull(r.r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, fmt.Errorf("replication: read %s frame of %d bytes: %w", t, n, err)
	}
	payload := buf[:n:n]
	sum := crc32.Update(crc32.Checksum(h, castagnoli), castagnoli, payload)
	if got := binary.LittleEndian.Uint32(buf[n:]); got != sum {
		return Frame{}, frameErr(ErrChecksum, "%s frame epoch %d: trailer %#08x, computed %#08x", t, epoch, got, sum)
	}
	return Frame{Type: t, Epoch: epoch, Payload: payload}, nil
}

// Writer writes frames to a stream through a buffer; nothing reaches the
// stream before Flush or a full buffer. Batch the frames of one checkpoint and
// flush once: it keeps the critical path free of small-write ping-pong.
// It is not safe for concurrent use.
type Writer struct {
	bw  *bufio.Writer
	max uint32
	hdr [HeaderSize]byte
	tmp [12]byte // page and disk-write record headers, kept off the heap
	crc uint32
	err error // sticky: a failed write leaves a partial frame on the stream
}

// NewWriter returns a Writer that refuses payloads larger than maxPayload
// (MaxPayload when maxPayload <= 0); set it no larger than the peer's limit.
func NewWriter(w io.Writer, maxPayload int) *Writer {
	return newWriterSize(w, maxPayload, bufferSize)
}

func newWriterSize(w io.Writer, maxPayload, size int) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, size), max: clampMax(maxPayload)}
}

// MaxPayload returns the largest payload this Writer sends in one frame.
func (w *Writer) MaxPayload() int { return int(w.max) }

// WriteFrame buffers one frame.
func (w *Writer) WriteFrame(f Frame) error {
	if err := w.begin(f.Type, f.Epoch, len(f.Payload)); err != nil {
		return err
	}
	w.part(f.Payload)
	return w.end()
}

// Flush sends everything buffered.
func (w *Writer) Flush() error {
	if w.err != nil {
		return w.err
	}
	if err := w.bw.Flush(); err != nil {
		w.err = fmt.Errorf("replication: flush frames: %w", err)
	}
	return w.err
}

// begin checks a frame and buffers its header; part and end complete it. A
// frame assembled from parts needs no contiguous payload copy.
func (w *Writer) begin(t FrameType, epoch uint64, n int) error {
	if w.err != nil {
		return w.err
	}
	if !t.Valid() {
		return frameErr(ErrUnknownType, "refusing to write type %d", uint8(t))
	}
	if n < 0 || uint64(n) > uint64(w.max) {
		return frameErr(ErrTooLarge, "refusing to write %s frame of %d bytes, limit %d", t, n, w.max)
	}
	h := w.hdr[:]
	binary.LittleEndian.PutUint16(h[0:], Magic)
	h[2] = FrameVersion
	h[3] = uint8(t)
	binary.LittleEndian.PutUint16(h[4:], 0)
	binary.LittleEndian.PutUint32(h[6:], uint32(n))
	binary.LittleEndian.PutUint64(h[10:], epoch)
	w.crc = 0
	w.part(h)
	return nil
}

func (w *Writer) part(p []byte) {
	if w.err != nil {
		return
	}
	w.crc = crc32.Update(w.crc, castagnoli, p)
	if _, err := w.bw.Write(p); err != nil {
		w.err = fmt.Errorf("replication: write frame: %w", err)
	}
}

func (w *Writer) end() error {
	t := w.tmp[:TrailerSize]
	binary.LittleEndian.PutUint32(t, w.crc)
	if w.err == nil {
		if _, err := w.bw.Write(t); err != nil {
			w.err = fmt.Errorf("replication: write frame: %w", err)
		}
	}
	return w.err
}

// Buffered says how many bytes have been read ahead and not yet returned as
// frames: zero means the peer has nothing more queued right now.
func (r *Reader) Buffered() int {
	if b, ok := r.r.(*bufio.Reader); ok {
		return b.Buffered()
	}
	return 0
}
