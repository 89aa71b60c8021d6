package replication

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"math"
)

// Typed payloads. Each Decode function checks the frame type, the exact
// payload length and, where the payload repeats the epoch, that it agrees with
// the header; any failure is a *FrameError wrapping ErrMalformed or
// ErrUnexpectedType, and the caller drops the connection.

const pageRecordSize = 8 + PageSize

// Page is one guest page: its frame number in guest RAM and PageSize bytes.
type Page struct {
	PFN  uint64
	Data []byte
}

// PagesPerFrame returns how many pages fit in one frame of at most maxPayload
// bytes (MaxPayload when maxPayload <= 0).
func PagesPerFrame(maxPayload int) int {
	return int((clampMax(maxPayload) - 4) / pageRecordSize)
}

// AppendPages appends a pages payload to dst: count uint32, then per page
// pfn uint64 and PageSize bytes.
func AppendPages(dst []byte, pages []Page) ([]byte, error) {
	if len(pages) == 0 || len(pages) > math.MaxUint32 {
		return dst, fmt.Errorf("replication: encode pages: %d pages, want 1..%d", len(pages), uint32(math.MaxUint32))
	}
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(pages)))
	for i, p := range pages {
		if len(p.Data) != PageSize {
			return dst, fmt.Errorf("replication: encode pages: page %d (pfn %d) has %d bytes, want %d", i, p.PFN, len(p.Data), PageSize)
		}
		dst = binary.LittleEndian.AppendUint64(dst, p.PFN)
		dst = append(dst, p.Data...)
	}
	return dst, nil
}

// DecodePages decodes a SyncPages or CheckpointPages frame. The pages' Data
// alias f.Payload.
func DecodePages(f Frame) ([]Page, error) {
	if f.Type != TypeSyncPages && f.Type != TypeCheckpointPages {
		return nil, frameErr(ErrUnexpectedType, "%s frame where pages were expected", f.Type)
	}
	p := f.Payload
	if len(p) < 4 {
		return nil, frameErr(ErrMalformed, "%s payload of %d bytes has no page count", f.Type, len(p))
	}
	n := binary.LittleEndian.Uint32(p)
	// Checked against the payload length before allocating, so a forged
	// count cannot make us allocate more than the frame bound allows.
	if n == 0 || uint64(len(p)-4) != uint64(n)*pageRecordSize {
		return nil, frameErr(ErrMalformed, "%s payload of %d bytes declares %d pages", f.Type, len(p), n)
	}
	pages := make([]Page, n)
	p = p[4:]
	for i := range pages {
		pages[i] = Page{PFN: binary.LittleEndian.Uint64(p), Data: p[8:pageRecordSize:pageRecordSize]}
		p = p[pageRecordSize:]
	}
	return pages, nil
}

// WritePages buffers pages as frames of type t (SyncPages or CheckpointPages),
// as many per frame as the Writer's payload limit allows, without copying
// them into an intermediate payload.
func (w *Writer) WritePages(t FrameType, epoch uint64, pages []Page) error {
	if t != TypeSyncPages && t != TypeCheckpointPages {
		return fmt.Errorf("replication: write pages as %s: not a pages frame type", t)
	}
	return w.writePages(t, epoch, pages, nil)
}

// checkPages validates pages before any of them is buffered, so a bad page
// never leaves half a frame or half a checkpoint on the stream.
func (w *Writer) checkPages(pages []Page) error {
	if len(pages) > 0 && w.max < 4+pageRecordSize {
		return fmt.Errorf("replication: write pages: payload limit %d cannot hold one page", w.max)
	}
	for i, p := range pages {
		if len(p.Data) != PageSize {
			return fmt.Errorf("replication: write pages: page %d (pfn %d) has %d bytes, want %d", i, p.PFN, len(p.Data), PageSize)
		}
	}
	return nil
}

func (w *Writer) writePages(t FrameType, epoch uint64, pages []Page, digest hash.Hash) error {
	if err := w.checkPages(pages); err != nil {
		return err
	}
	per := int((w.max - 4) / pageRecordSize)
	b := w.tmp[:8]
	for len(pages) > 0 {
		chunk := pages[:min(per, len(pages))]
		pages = pages[len(chunk):]
		if err := w.begin(t, epoch, 4+len(chunk)*pageRecordSize); err != nil {
			return err
		}
		binary.LittleEndian.PutUint32(b, uint32(len(chunk)))
		w.part(b[:4])
		for _, p := range chunk {
			binary.LittleEndian.PutUint64(b, p.PFN)
			w.part(b)
			w.part(p.Data)
			if digest != nil {
				digest.Write(b)
				digest.Write(p.Data)
			}
		}
		if err := w.end(); err != nil {
			return err
		}
	}
	return nil
}

// WriteCheckpoint sends checkpoint epoch whole: CheckpointBegin, the pages,
// the device state split to fit the payload limit, and CheckpointEnd with the
// SHA-256 of the page records and device state in that order. It flushes at
// the end: the primary waits for the Ack next.
func (w *Writer) WriteCheckpoint(epoch uint64, pages []Page, deviceState []byte) error {
	if len(deviceState) == 0 {
		return fmt.Errorf("replication: write checkpoint %d: no device state", epoch)
	}
	if err := w.checkPages(pages); err != nil {
		return fmt.Errorf("replication: write checkpoint %d: %w", epoch, err)
	}
	begin := CheckpointBegin{Epoch: epoch, PageCount: uint64(len(pages)), DeviceStateLen: uint64(len(deviceState))}
	if err := w.WriteFrame(begin.Frame()); err != nil {
		return err
	}
	digest := sha256.New()
	if err := w.writePages(TypeCheckpointPages, epoch, pages, digest); err != nil {
		return err
	}
	digest.Write(deviceState)
	for rest := deviceState; len(rest) > 0; {
		chunk := rest[:min(len(rest), int(w.max))]
		rest = rest[len(chunk):]
		if err := w.WriteFrame(Frame{Type: TypeDeviceState, Epoch: epoch, Payload: chunk}); err != nil {
			return err
		}
	}
	end := CheckpointEnd{Epoch: epoch, PageCount: begin.PageCount, DeviceStateLen: begin.DeviceStateLen}
	digest.Sum(end.Digest[:0])
	if err := w.WriteFrame(end.Frame()); err != nil {
		return err
	}
	return w.Flush()
}

func expect(f Frame, t FrameType, size int) error {
	if f.Type != t {
		return frameErr(ErrUnexpectedType, "%s frame where %s was expected", f.Type, t)
	}
	if len(f.Payload) != size {
		return frameErr(ErrMalformed, "%s payload is %d bytes, want %d", t, len(f.Payload), size)
	}
	return nil
}

func expectEpoch(f Frame, payloadEpoch uint64) error {
	if f.Epoch != payloadEpoch {
		return frameErr(ErrMalformed, "%s header epoch %d, payload epoch %d", f.Type, f.Epoch, payloadEpoch)
	}
	return nil
}

var le = binary.LittleEndian

// SyncDone ends the initial sync: RAMSize is the primary's guest RAM size and
// Pages the number of pages it sent in SyncPages frames.
type SyncDone struct {
	RAMSize uint64
	Pages   uint64
}

// Frame encodes d.
func (d SyncDone) Frame() Frame {
	p := le.AppendUint64(make([]byte, 0, 16), d.RAMSize)
	return Frame{Type: TypeSyncDone, Payload: le.AppendUint64(p, d.Pages)}
}

// DecodeSyncDone decodes a SyncDone frame.
func DecodeSyncDone(f Frame) (SyncDone, error) {
	if err := expect(f, TypeSyncDone, 16); err != nil {
		return SyncDone{}, err
	}
	return SyncDone{RAMSize: le.Uint64(f.Payload), Pages: le.Uint64(f.Payload[8:])}, nil
}

// CheckpointBegin announces checkpoint Epoch and its size.
type CheckpointBegin struct {
	Epoch          uint64
	PageCount      uint64
	DeviceStateLen uint64
}

// Frame encodes b.
func (b CheckpointBegin) Frame() Frame {
	p := make([]byte, 0, 24)
	p = le.AppendUint64(p, b.Epoch)
	p = le.AppendUint64(p, b.PageCount)
	p = le.AppendUint64(p, b.DeviceStateLen)
	return Frame{Type: TypeCheckpointBegin, Epoch: b.Epoch, Payload: p}
}

// DecodeCheckpointBegin decodes a CheckpointBegin frame.
func DecodeCheckpointBegin(f Frame) (CheckpointBegin, error) {
	if err := expect(f, TypeCheckpointBegin, 24); err != nil {
		return CheckpointBegin{}, err
	}
	b := CheckpointBegin{Epoch: le.Uint64(f.Payload), PageCount: le.Uint64(f.Payload[8:]), DeviceStateLen: le.Uint64(f.Payload[16:])}
	return b, expectEpoch(f, b.Epoch)
}

// CheckpointEnd closes checkpoint Epoch. Digest is the SHA-256 of every page
// record (pfn as 8 little-endian bytes, then the page) in the order sent,
// followed by the device state.
type CheckpointEnd struct {
	Epoch          uint64
	PageCount      uint64
	DeviceStateLen uint64
	Digest         [sha256.Size]byte
}

// Frame encodes e.
func (e CheckpointEnd) Frame() Frame {
	p := make([]byte, 0, 24+sha256.Size)
	p = le.AppendUint64(p, e.Epoch)
	p = le.AppendUint64(p, e.PageCount)
	p = le.AppendUint64(p, e.DeviceStateLen)
	return Frame{Type: TypeCheckpointEnd, Epoch: e.Epoch, Payload: append(p, e.Digest[:]...)}
}

// DecodeCheckpointEnd decodes a CheckpointEnd frame.
func DecodeCheckpointEnd(f Frame) (CheckpointEnd, error) {
	if err := expect(f, TypeCheckpointEnd, 24+sha256.Size); err != nil {
		return CheckpointEnd{}, err
	}
	e := CheckpointEnd{Epoch: le.Uint64(f.Payload), PageCount: le.Uint64(f.Payload[8:]), DeviceStateLen: le.Uint64(f.Payload[16:])}
	copy(e.Digest[:], f.Payload[24:])
	return e, expectEpoch(f, e.Epoch)
}

// DiskWrite is one guest write to protected disk number Disk (the order in
// which the VM's protected disks were configured) at byte Offset.
type DiskWrite struct {
	Disk   uint32
	Offset uint64
	Data   []byte
}

const diskWriteHeader = 4 + 8

// Frame encodes d, copying Data; Writer.WriteDiskWrite avoids the copy.
func (d DiskWrite) Frame(epoch uint64) Frame {
	p := make([]byte, 0, diskWriteHeader+len(d.Data))
	p = le.AppendUint32(p, d.Disk)
	p = le.AppendUint64(p, d.Offset)
	return Frame{Type: TypeDiskWrite, Epoch: epoch, Payload: append(p, d.Data...)}
}

// WriteDiskWrite buffers d as a DiskWrite frame of epoch without copying its
// data into an intermediate payload.
func (w *Writer) WriteDiskWrite(epoch uint64, d DiskWrite) error {
	if len(d.Data) == 0 {
		return fmt.Errorf("replication: write disk write: disk %d offset %d: no data", d.Disk, d.Offset)
	}
	if err := w.begin(TypeDiskWrite, epoch, diskWriteHeader+len(d.Data)); err != nil {
		return err
	}
	b := w.tmp[:diskWriteHeader]
	le.PutUint32(b, d.Disk)
	le.PutUint64(b[4:], d.Offset)
	w.part(b)
	w.part(d.Data)
	return w.end()
}

// DecodeDiskWrite decodes a DiskWrite frame. Data aliases f.Payload.
func DecodeDiskWrite(f Frame) (DiskWrite, error) {
	if f.Type != TypeDiskWrite {
		return DiskWrite{}, frameErr(ErrUnexpectedType, "%s frame where %s was expected", f.Type, TypeDiskWrite)
	}
	p := f.Payload
	if len(p) <= diskWriteHeader {
		return DiskWrite{}, frameErr(ErrMalformed, "%s payload of %d bytes carries no data", f.Type, len(p))
	}
	d := DiskWrite{Disk: le.Uint32(p), Offset: le.Uint64(p[4:]), Data: p[diskWriteHeader:]}
	if d.Offset > math.MaxInt64-uint64(len(d.Data)) {
		return DiskWrite{}, frameErr(ErrMalformed, "%s at offset %d of %d bytes overflows", f.Type, d.Offset, len(d.Data))
	}
	return d, nil
}

// DiskZero says a range of protected disk number Disk reads as zeroes from
// now on: the guest wrote zeroes or discarded it. Like a DiskWrite it
// belongs to the frame's epoch (at FT it waits for that checkpoint).
type DiskZero struct {
	Disk   uint32
	Offset uint64
	Length uint64
}

const diskZeroSize = 4 + 8 + 8

// Frame encodes z.
func (z DiskZero) Frame(epoch uint64) Frame {
	p := make([]byte, diskZeroSize)
	le.PutUint32(p, z.Disk)
	le.PutUint64(p[4:], z.Offset)
	le.PutUint64(p[12:], z.Length)
	return Frame{Type: TypeDiskZero, Epoch: epoch, Payload: p}
}

// DecodeDiskZero decodes a DiskZero frame.
func DecodeDiskZero(f Frame) (DiskZero, error) {
	if err := expect(f, TypeDiskZero, diskZeroSize); err != nil {
		return DiskZero{}, err
	}
	p := f.Payload
	z := DiskZero{Disk: le.Uint32(p), Offset: le.Uint64(p[4:]), Length: le.Uint64(p[12:])}
	if z.Length == 0 {
		return DiskZero{}, frameErr(ErrMalformed, "%s of no bytes", f.Type)
	}
	if z.Offset > math.MaxInt64 || z.Length > math.MaxInt64-z.Offset {
		return DiskZero{}, frameErr(ErrMalformed, "%s at offset %d of %d bytes overflows", f.Type, z.Offset, z.Length)
	}
	return z, nil
}

// EpochBoundary marks the disk-write boundary of the pause: every DiskWrite
// before it belongs to epoch Epoch or earlier.
type EpochBoundary struct{ Epoch uint64 }

// Frame encodes b.
func (b EpochBoundary) Frame() Frame {
	return Frame{Type: TypeEpochBoundary, Epoch: b.Epoch, Payload: le.AppendUint64(make([]byte, 0, 8), b.Epoch)}
}

// DecodeEpochBoundary decodes an EpochBoundary frame.
func DecodeEpochBoundary(f Frame) (EpochBoundary, error) {
	if err := expect(f, TypeEpochBoundary, 8); err != nil {
		return EpochBoundary{}, err
	}
	b := EpochBoundary{Epoch: le.Uint64(f.Payload)}
	return b, expectEpoch(f, b.Epoch)
}

// Heartbeat tells the peer the sender is alive and how far it has got.
type Heartbeat struct {
	SentUnixNano  int64  // sender's clock, for latency estimates only
	LastCommitted uint64 // last epoch the sender knows committed
}

// Frame encodes h.
func (h Heartbeat) Frame() Frame {
	p := le.AppendUint64(make([]byte, 0, 16), uint64(h.SentUnixNano))
	return Frame{Type: TypeHeartbeat, Epoch: h.LastCommitted, Payload: le.AppendUint64(p, h.LastCommitted)}
}

// DecodeHeartbeat decodes a Heartbeat frame.
func DecodeHeartbeat(f Frame) (Heartbeat, error) {
	if err := expect(f, TypeHeartbeat, 16); err != nil {
		return Heartbeat{}, err
	}
	return Heartbeat{SentUnixNano: int64(le.Uint64(f.Payload)), LastCommitted: le.Uint64(f.Payload[8:])}, nil
}

// Ack tells the primary that checkpoint Epoch and its disk writes committed
// on the secondary; the primary may then release that epoch's guest output.
type Ack struct{ Epoch uint64 }

// Frame encodes a.
func (a Ack) Frame() Frame {
	return Frame{Type: TypeAck, Epoch: a.Epoch, Payload: le.AppendUint64(make([]byte, 0, 8), a.Epoch)}
}

// DecodeAck decodes an Ack frame.
func DecodeAck(f Frame) (Ack, error) {
	if err := expect(f, TypeAck, 8); err != nil {
		return Ack{}, err
	}
	a := Ack{Epoch: le.Uint64(f.Payload)}
	return a, expectEpoch(f, a.Epoch)
}

// The base: what the secondary's replica holds when a stream opens, so that
// the primary's initial syncs send only what differs — one xxh3 hash
// (dirty.PageHash, the hash tracker's own) per page of its RAM, then one per
// DiskBaseRange bytes of each of its disks, in the order the VM's disks are
// configured (the last range of a disk is short when the disk's size is not
// a multiple of DiskBaseRange: its hash is of the bytes that exist).
//
// The Accept frame's payload says how many hashes follow: the number of
// pages (8 bytes), the number of disks (4 bytes, zero when the replica's
// disks were not hashed) and the number of ranges of each disk (8 bytes
// each). Base frames follow with the hashes of pages and disk ranges as one
// sequence, each frame starting with the index in it of its first hash, in
// order.

// DiskBaseRange is the span of a disk one base hash covers: the
// granularity of QEMU's mirror for raw images, so the mirror's copy writes
// whole ranges.
const DiskBaseRange = 64 << 10

// DiskRanges is how many base hashes cover a disk of size bytes.
func DiskRanges(size int64) uint64 {
	if size <= 0 {
		return 0
	}
	n := uint64(size / DiskBaseRange)
	if size%DiskBaseRange != 0 {
		n++
	}
	return n
}

// maxBaseHashes is how many hashes one Base frame carries.
const maxBaseHashes = (MaxPayload - 8) / 8

// acceptFrame says the base that follows is of pages pages and, when disks
// is not empty, of len(disks[i]) ranges of each disk i.
func acceptFrame(pages uint64, disks [][]uint64) Frame {
	p := le.AppendUint64(make([]byte, 0, 12+8*len(disks)), pages)
	p = le.AppendUint32(p, uint32(len(disks)))
	for _, d := range disks {
		p = le.AppendUint64(p, uint64(len(d)))
	}
	return Frame{Type: TypeAccept, Payload: p}
}

// decodeAccept returns the number of pages and of each disk's ranges whose
// hashes follow, checked against what the primary knows: the RAM size and
// the sizes of its disks. Ranges is nil when the disks were not hashed.
func decodeAccept(f Frame, ramSize int64, diskSizes []int64) (pages uint64, ranges []uint64, err error) {
	if f.Type != TypeAccept {
		return 0, nil, frameErr(ErrUnexpectedType, "%s frame where %s was expected", f.Type, TypeAccept)
	}
	p := f.Payload
	if len(p) < 12 {
		return 0, nil, frameErr(ErrMalformed, "Accept payload of %d bytes", len(p))
	}
	pages, disks := le.Uint64(p), le.Uint32(p[8:])
	if pages != 0 && pages != uint64(ramSize/PageSize) {
		return 0, nil, frameErr(ErrMalformed, "base of %d pages for %d bytes of RAM", pages, ramSize)
	}
	if disks != 0 && uint64(disks) != uint64(len(diskSizes)) {
		return 0, nil, frameErr(ErrMalformed, "base of %d disks for a VM with %d", disks, len(diskSizes))
	}
	if uint64(len(p)) != 12+8*uint64(disks) {
		return 0, nil, frameErr(ErrMalformed, "Accept payload of %d bytes for %d disks", len(p), disks)
	}
	if disks == 0 {
		return pages, nil, nil
	}
	ranges = make([]uint64, disks) // as many as the primary's own disks
	for i := range ranges {
		ranges[i] = le.Uint64(p[12+8*i:])
		if want := DiskRanges(diskSizes[i]); ranges[i] != want {
			return 0, nil, frameErr(ErrMalformed, "base of %d ranges for disk %d of %d bytes, want %d", ranges[i], i, diskSizes[i], want)
		}
	}
	return pages, ranges, nil
}

// baseFrames encodes the hashes of pages, then of each disk's ranges, as
// Base frames.
func baseFrames(pages []uint64, disks [][]uint64) []Frame {
	total := len(pages)
	for _, d := range disks {
		total += len(d)
	}
	var fs []Frame
	var p []byte
	next := 0 // index of the next hash in the whole sequence
	add := func(h uint64) {
		if p == nil {
			n := min(maxBaseHashes, total-next)
			p = le.AppendUint64(make([]byte, 0, 8+8*n), uint64(next))
		}
		p = le.AppendUint64(p, h)
		next++
		if len(p) == 8+8*maxBaseHashes {
			fs, p = append(fs, Frame{Type: TypeBase, Payload: p}), nil
		}
	}
	for _, h := range pages {
		add(h)
	}
	for _, d := range disks {
		for _, h := range d {
			add(h)
		}
	}
	if p != nil {
		fs = append(fs, Frame{Type: TypeBase, Payload: p})
	}
	return fs
}

// decodeBase appends the hashes of Base frame f to base, which must hold
// exactly the hashes before f's first; total is how many there are in all.
func decodeBase(f Frame, base []uint64, total uint64) ([]uint64, error) {
	if f.Type != TypeBase {
		return base, frameErr(ErrUnexpectedType, "%s frame where Base was expected", f.Type)
	}
	if len(f.Payload) < 16 || len(f.Payload)%8 != 0 {
		return base, frameErr(ErrMalformed, "Base payload of %d bytes", len(f.Payload))
	}
	first, n := le.Uint64(f.Payload), uint64(len(f.Payload)/8-1)
	if first != uint64(len(base)) || n > total-first {
		return base, frameErr(ErrMalformed, "Base frame of hashes %d+%d after %d of %d", first, n, len(base), total)
	}
	for i := uint64(0); i < n; i++ {
		base = append(base, le.Uint64(f.Payload[8+8*i:]))
	}
	return base, nil
}
