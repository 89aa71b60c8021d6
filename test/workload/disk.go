package workload

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The disk-backed ledger keeps record seq in block seq of a raw disk.
//
//	block 0      header: "AXLEDGER", version u32, block size u32, ledger id u64, CRC32C u32
//	block seq    record: "AXLEDREC", ledger id u64, seq u64, text length u32, CRC32C u32, text
//
// Integers are little endian; a CRC32C covers every field before it and, in a
// record, the text; the rest of a block is zero. The ledger id, drawn when the
// header is written, keeps records of an earlier ledger on a reused disk from
// being loaded as this one's.
const (
	// BlockSize is the size of one ledger block on disk, and the alignment
	// of O_DIRECT transfers.
	BlockSize = 4096
	// MaxDiskText is the longest record text a disk block holds.
	MaxDiskText = BlockSize - recordHeaderLen
	// MinDiskSize is the smallest disk a ledger accepts: the header and one record.
	MinDiskSize = 2 * BlockSize

	headerMagic     = "AXLEDGER"
	recordMagic     = "AXLEDREC"
	diskVersion     = 1
	headerLen       = 28
	recordHeaderLen = 32
	// readChunk blocks are read per transfer when loading or checking.
	readChunk = 64
)

var (
	// ErrDiskFull is returned by Append when every block of the disk holds a record.
	ErrDiskFull = errors.New("disk full")
	// ErrNoDisk is returned by CheckDisk on a memory-only ledger.
	ErrNoDisk = errors.New("no disk")

	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// blockDevice is the ledger's disk; tests give a file or a fake.
type blockDevice interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes completed writes durable.
	Sync() error
	// Size returns the device's size in bytes.
	Size() (int64, error)
	Close() error
}

// fileDevice is a disk opened with O_DIRECT, so reads come from the disk and
// not the guest's page cache.
type fileDevice struct {
	f  *os.File
	fd int
}

var _ blockDevice = (*fileDevice)(nil)

func openFileDevice(path string) (*fileDevice, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
	if errors.Is(err, unix.EINVAL) {
		// Only a file system without O_DIRECT (tmpfs before Linux 6.6,
		// where tests' temporary files live) refuses it; the ledger then
		// reads through the page cache. A block device always takes it.
		f, err = os.OpenFile(path, os.O_RDWR, 0)
	}
	if err != nil {
		return nil, err
	}
	return &fileDevice{f: f, fd: int(f.Fd())}, nil
}

func (d *fileDevice) ReadAt(p []byte, off int64) (int, error)  { return d.f.ReadAt(p, off) }
func (d *fileDevice) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }
func (d *fileDevice) Close() error                             { return d.f.Close() }

// Sync flushes the disk's write cache: O_DIRECT bypasses only the page cache.
func (d *fileDevice) Sync() error {
	for {
		err := unix.Fdatasync(d.fd)
		if err != unix.EINTR {
			return err
		}
	}
}

// Size seeks to the end: Stat reports 0 bytes for a block device.
func (d *fileDevice) Size() (int64, error) { return d.f.Seek(0, io.SeekEnd) }

// alignedBlocks returns n zeroed blocks whose first byte is BlockSize aligned,
// as O_DIRECT requires of buffers.
func alignedBlocks(n int) []byte {
	buf := make([]byte, n*BlockSize+BlockSize)
	skip := (BlockSize - int(uintptr(unsafe.Pointer(&buf[0]))&(BlockSize-1))) & (BlockSize - 1)
	return buf[skip : skip+n*BlockSize : skip+n*BlockSize]
}

// diskLog is the disk under a ledger.
type diskLog struct {
	mu       sync.Mutex // one writer, so blocks stay gap-free; held by CheckDisk
	dev      blockDevice
	name     string
	id       uint64
	capacity uint64 // record blocks: 1 … capacity
	buf      []byte // one aligned block for writes, under mu
	closed   bool
}

// OpenLedger opens the disk at path, loads the records it holds and returns
// a ledger whose appends are on that disk before they are acknowledged. A
// disk without a ledger header gets one, and starts empty.
func OpenLedger(path string, log *slog.Logger) (*Ledger, error) {
	dev, err := openFileDevice(path)
	if err != nil {
		return nil, fmt.Errorf("ledger: disk %w (attach the disk, or run without --disk)", err)
	}
	l, err := openDiskLedger(dev, path, log)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return l, nil
}

func openDiskLedger(dev blockDevice, name string, log *slog.Logger) (*Ledger, error) {
	if log == nil {
		log = slog.Default()
	}
	size, err := dev.Size()
	if err != nil {
		return nil, fmt.Errorf("ledger: disk %s: size: %w", name, err)
	}
	if size < MinDiskSize {
		return nil, fmt.Errorf("ledger: disk %s holds %d bytes; give one of at least %d", name, size, MinDiskSize)
	}
	d := &diskLog{dev: dev, name: name, capacity: uint64(size)/BlockSize - 1, buf: alignedBlocks(1)}
	if _, err := dev.ReadAt(d.buf, 0); err != nil {
		return nil, fmt.Errorf("ledger: disk %s: read header: %w", name, err)
	}
	d.id, err = decodeHeader(d.buf)
	if errors.Is(err, errNoHeader) {
		return d.format()
	}
	if err != nil {
		return nil, fmt.Errorf("ledger: disk %s: %w (zero its first %d bytes to start an empty ledger)", name, err, BlockSize)
	}
	l := &Ledger{disk: d}
	err = d.readBlocks(1, d.capacity, func(seq uint64, block []byte) bool {
		text, err := decodeRecord(block, d.id, seq)
		if err != nil {
			if !allZero(block) {
				log.Info("ledger load stopped", "disk", name, "block", seq, "reason", err)
			}
			return false
		}
		l.records = append(l.records, text)
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("ledger: disk %s: load: %w", name, err)
	}
	return l, nil
}

// format writes a header with a new ledger id: an empty ledger.
func (d *diskLog) format() (*Ledger, error) {
	var id [8]byte
	rand.Read(id[:])
	d.id = binary.LittleEndian.Uint64(id[:])
	encodeHeader(d.buf, d.id)
	if _, err := d.dev.WriteAt(d.buf, 0); err != nil {
		return nil, fmt.Errorf("ledger: disk %s: write header: %w", d.name, err)
	}
	if err := d.dev.Sync(); err != nil {
		return nil, fmt.Errorf("ledger: disk %s: sync header: %w", d.name, err)
	}
	return &Ledger{disk: d}, nil
}

// write makes record seq durable in block seq. The caller holds d.mu.
func (d *diskLog) write(seq uint64, text string) error {
	if d.closed {
		return errors.New("disk: closed")
	}
	if len(text) > MaxDiskText {
		return fmt.Errorf("disk: record of %d bytes, a block holds %d", len(text), MaxDiskText)
	}
	if seq > d.capacity {
		return ErrDiskFull
	}
	encodeRecord(d.buf, d.id, seq, text)
	if _, err := d.dev.WriteAt(d.buf, int64(seq)*BlockSize); err != nil {
		return fmt.Errorf("disk: write block %d: %w", seq, err)
	}
	if err := d.dev.Sync(); err != nil {
		return fmt.Errorf("disk: sync block %d: %w", seq, err)
	}
	return nil
}

// readBlocks reads blocks first … last in chunks and hands each to fn until
// fn returns false.
func (d *diskLog) readBlocks(first, last uint64, fn func(seq uint64, block []byte) bool) error {
	buf := alignedBlocks(readChunk)
	for seq := first; seq <= last; {
		n := min(last-seq+1, readChunk)
		got, err := d.dev.ReadAt(buf[:n*BlockSize], int64(seq)*BlockSize)
		if got < int(n)*BlockSize {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("read block %d: %w", seq+uint64(got/BlockSize), err)
		}
		for i := range n {
			if !fn(seq+i, buf[i*BlockSize:(i+1)*BlockSize]) {
				return nil
			}
		}
		seq += n
	}
	return nil
}

// check reads the records back from the disk and compares them with recs,
// the ledger's memory. The caller holds d.mu.
func (d *diskLog) check(recs []string) error {
	n := uint64(len(recs))
	var diff error
	last := min(n+1, d.capacity)
	err := d.readBlocks(1, last, func(seq uint64, block []byte) bool {
		text, err := decodeRecord(block, d.id, seq)
		switch {
		case seq > n && err == nil:
			diff = fmt.Errorf("block %d holds a record; memory has %d", seq, n)
		case seq > n:
		case err != nil:
			diff = fmt.Errorf("block %d: %w", seq, err)
		case text != recs[seq-1]:
			diff = fmt.Errorf("block %d: text %.40q, memory has %.40q", seq, text, recs[seq-1])
		}
		return diff == nil
	})
	if err != nil {
		return err
	}
	return diff
}

func (d *diskLog) close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	return d.dev.Close()
}

var errNoHeader = errors.New("no ledger header")

func encodeHeader(b []byte, id uint64) {
	clear(b[:BlockSize])
	copy(b, headerMagic)
	binary.LittleEndian.PutUint32(b[8:], diskVersion)
	binary.LittleEndian.PutUint32(b[12:], BlockSize)
	binary.LittleEndian.PutUint64(b[16:], id)
	binary.LittleEndian.PutUint32(b[24:], crc32.Checksum(b[:24], castagnoli))
}

// decodeHeader returns the ledger id of header block b, errNoHeader when b
// lacks the magic.
func decodeHeader(b []byte) (uint64, error) {
	if len(b) < headerLen || string(b[:8]) != headerMagic {
		return 0, errNoHeader
	}
	if crc := binary.LittleEndian.Uint32(b[24:]); crc != crc32.Checksum(b[:24], castagnoli) {
		return 0, errors.New("ledger header: bad CRC")
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != diskVersion {
		return 0, fmt.Errorf("ledger header: version %d, this ledger writes %d", v, diskVersion)
	}
	if bs := binary.LittleEndian.Uint32(b[12:]); bs != BlockSize {
		return 0, fmt.Errorf("ledger header: block size %d, this ledger uses %d", bs, BlockSize)
	}
	return binary.LittleEndian.Uint64(b[16:]), nil
}

// encodeRecord fills block b with record seq; the text must fit.
func encodeRecord(b []byte, id, seq uint64, text string) {
	clear(b[:BlockSize])
	copy(b, recordMagic)
	binary.LittleEndian.PutUint64(b[8:], id)
	binary.LittleEndian.PutUint64(b[16:], seq)
	binary.LittleEndian.PutUint32(b[24:], uint32(len(text)))
	copy(b[recordHeaderLen:], text)
	binary.LittleEndian.PutUint32(b[28:], recordCRC(b, len(text)))
}

func recordCRC(b []byte, n int) uint32 {
	crc := crc32.Update(0, castagnoli, b[:28])
	return crc32.Update(crc, castagnoli, b[recordHeaderLen:recordHeaderLen+n])
}

// decodeRecord returns the text of block b if it is record seq of ledger id.
// A zeroed block, a torn write or a stale block is an error.
func decodeRecord(b []byte, id, seq uint64) (string, error) {
	if len(b) != BlockSize {
		return "", fmt.Errorf("block of %d bytes, want %d", len(b), BlockSize)
	}
	if string(b[:8]) != recordMagic {
		return "", errors.New("no record")
	}
	n := binary.LittleEndian.Uint32(b[24:])
	if n > MaxDiskText {
		return "", fmt.Errorf("text length %d exceeds the block", n)
	}
	if crc := binary.LittleEndian.Uint32(b[28:]); crc != recordCRC(b, int(n)) {
		return "", errors.New("bad CRC")
	}
	if got := binary.LittleEndian.Uint64(b[8:]); got != id {
		return "", fmt.Errorf("record of ledger %#x, this is %#x", got, id)
	}
	if got := binary.LittleEndian.Uint64(b[16:]); got != seq {
		return "", fmt.Errorf("record %d, want %d", got, seq)
	}
	return string(b[recordHeaderLen : recordHeaderLen+n]), nil
}

func allZero(b []byte) bool {
	return len(bytes.TrimLeft(b, "\x00")) == 0
}

// fillChunk is the write size of FILL: large, sequential, O_DIRECT.
const fillChunk = 256 << 10

// Fill writes mib MiB of scratch data to the end of the disk in 256 KiB
// O_DIRECT writes from writers concurrent writers (the guest's queue depth),
// then flushes, and returns how long it took: the guest's sequential disk
// write throughput. The area must lie beyond the records.
func (l *Ledger) Fill(mib, writers int) (time.Duration, error) {
	if l.disk == nil {
		return 0, ErrNoDisk
	}
	if writers < 1 || writers > 16 {
		return 0, fmt.Errorf("fill: 1 to 16 writers, not %d", writers)
	}
	d := l.disk
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, errors.New("disk: closed")
	}
	size := int64(d.capacity+1) * BlockSize
	start := size - int64(mib)<<20
	used := int64(len(l.Snapshot())+1) * BlockSize
	if mib <= 0 || start < used+BlockSize {
		return 0, fmt.Errorf("fill: %d MiB does not fit between the %d records and the end of the disk", mib, used/BlockSize-1)
	}
	t0 := time.Now()
	errs := make(chan error, writers)
	for w := range writers {
		go func() {
			buf := alignedBlocks(fillChunk / BlockSize)
			for i := range buf {
				buf[i] = byte(i * 7)
			}
			for off := start + int64(w)*fillChunk; off < size; off += int64(writers) * fillChunk {
				if _, err := d.dev.WriteAt(buf, off); err != nil {
					errs <- fmt.Errorf("fill: write at %d: %w", off, err)
					return
				}
			}
			errs <- nil
		}()
	}
	var err error
	for range writers {
		if werr := <-errs; err == nil {
			err = werr
		}
	}
	if err != nil {
		return 0, err
	}
	if err := d.dev.Sync(); err != nil {
		return 0, fmt.Errorf("fill: sync: %w", err)
	}
	return time.Since(t0), nil
}
