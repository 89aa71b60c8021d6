package replication

import (
	"bufio"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"

	"github.com/axproject/ax/ax/durable"
)

// The journal is one append-only file of records. Each record is a 32-byte
// header, the data, and a CRC32C (Castagnoli) of header and data:
//
//	magic "AXJ1" | kind u8 | 3 zero bytes | epoch u64 | disk u32 | length u32 | offset u64 | data | crc u32
//
// all little-endian. A write record carries one guest disk write of 1 to
// JournalMaxWrite bytes; a commit record (disk, length and offset zero) says
// every write of its epoch or earlier is to be on the disks. Recovery trusts
// the file up to the first record that does not check out — a crash leaves at
// most a torn tail, because nothing after a record is synced before it — and
// cuts it there. The commit record is synced before the first of its writes
// touches a disk, so a disk never holds a write the file does not show
// committed, and replaying the committed writes, absolute offsets all, is
// always safe.
const (
	// JournalMaxWrite bounds one journaled write; a length beyond it in a
	// header can only be a torn or foreign record.
	JournalMaxWrite = 32 << 20

	journalHeaderSize  = 32
	journalTrailerSize = 4
	journalCommitSize  = journalHeaderSize + journalTrailerSize

	journalKindWrite  = 1
	journalKindCommit = 2

	// journalCompactAt is how many bytes of applied records the file may
	// carry before Commit rewrites it: compacting on every commit would
	// cost a file creation, two fsyncs and a rename per checkpoint.
	journalCompactAt = 64 << 20
	journalBufSize   = 1 << 20
)

var journalMagic = [4]byte{'A', 'X', 'J', '1'}

var (
	// ErrJournalEpoch reports a write or commit out of epoch order: a write
	// of an epoch already committed or older than one already journaled, or
	// a commit of an epoch not after the last.
	ErrJournalEpoch = errors.New("replication: journal epoch out of order")
	// ErrJournalUnknownDisk reports a write to a disk the journal was not
	// opened with.
	ErrJournalUnknownDisk = errors.New("replication: journal write to an unknown disk")
	// ErrJournalCorrupt reports a journal whose records check out one by one
	// but do not make sense together, or a record that changed on disk after
	// it was written. No crash produces one; the journal is not used.
	ErrJournalCorrupt = errors.New("replication: journal corrupt")
)

// JournalDisk is a replica disk the journal applies writes to (*os.File
// satisfies it).
type JournalDisk interface {
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
}

var _ JournalDisk = (*os.File)(nil)

// JournalDepth is what the journal holds that is not yet on the disks.
type JournalDepth struct {
	Records     int    // pending writes
	Bytes       int64  // their data bytes
	OldestEpoch uint64 // of the oldest pending write, 0 when none
	NewestEpoch uint64 // of the newest pending write, 0 when none
	FileBytes   int64  // size of the journal file, applied records not yet compacted included
}

// JournalRecovery says what OpenJournal had to do to the file.
type JournalRecovery struct {
	// Reapplied counts committed writes applied to the disks again because
	// the previous process may have stopped before they were all applied.
	Reapplied int
	// TruncatedAt is the offset of the first torn or corrupt record, where
	// the file was cut, or -1 when the file was whole.
	TruncatedAt int64
	// TruncatedBytes is how many bytes were cut.
	TruncatedBytes int64
	// Reason says what was wrong with the record at TruncatedAt.
	Reason string
}

// journalEntry locates one pending write in the file; its data stays there,
// so a backlog costs the heap 32 bytes a write.
type journalEntry struct {
	pos    int64 // start of the record
	epoch  uint64
	offset uint64
	disk   uint32
	length uint32
}

func (e journalEntry) recordSize() int64 {
	return journalHeaderSize + int64(e.length) + journalTrailerSize
}

// Journal holds the guest disk writes the secondary received until the
// checkpoint of their epoch commits, then applies them to the replica disks;
// at failover it either drops the uncommitted ones (FT resume) or applies
// them all (crash-consistent restart). Its methods are safe for concurrent
// use; Commit holds the journal while it applies, so Append waits for it.
//
// After an I/O error the journal refuses further work: what is on disk is
// consistent, what is in memory may not be. Close it and open it again;
// recovery starts from the file.
type Journal struct {
	path      string
	disks     map[uint32]JournalDisk
	compactAt int64

	mu           sync.Mutex
	f            *os.File
	w            *bufio.Writer
	size         int64 // of the file, buffered records included
	durable      int64 // of the file, known to be on disk
	committed    uint64
	last         uint64 // newest epoch journaled or committed; writes may not go below it
	pending      []journalEntry
	pendingBytes int64 // record bytes of the pending writes
	dataBytes    int64 // data bytes of the pending writes
	hdr          [journalHeaderSize + journalTrailerSize]byte
	buf          []byte // one record read back for applying
	broken       error
	recovery     JournalRecovery
}

// OpenJournal opens the journal at path, creating it if there is none, for
// writes to disks, keyed by DiskWrite.Disk. It recovers from a crash at any
// point: it cuts a torn or corrupt tail, applies again the committed writes
// the previous process may not have finished applying, and keeps the rest
// pending. Recovered says what it did.
func OpenJournal(path string, disks map[uint32]JournalDisk) (*Journal, error) {
	j := &Journal{
		path:      path,
		disks:     make(map[uint32]JournalDisk, len(disks)),
		compactAt: journalCompactAt,
		recovery:  JournalRecovery{TruncatedAt: -1},
	}
	for id, d := range disks {
		if d == nil {
			return nil, fmt.Errorf("replication: open journal %s: disk %d is nil", path, id)
		}
		j.disks[id] = d
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("replication: open journal: %w", err)
	}
	// A compaction interrupted before its rename leaves this behind; the
	// journal itself is still the old file, whole.
	if err := os.Remove(j.tmpPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("replication: open journal %s: remove stale compaction: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("replication: open journal: %w", err)
	}
	j.f = f
	j.w = bufio.NewWriterSize(f, journalBufSize)
	err = durable.SyncDir(dir)
	if err == nil {
		err = j.recover()
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("replication: open journal %s: %w", path, err)
	}
	return j, nil
}

func (j *Journal) tmpPath() string { return j.path + ".tmp" }

// recover scans the file, cuts its torn tail and applies what is committed.
func (j *Journal) recover() error {
	fi, err := j.f.Stat()
	if err != nil {
		return err
	}
	end := fi.Size()
	writes, valid, reason, err := j.scan(end)
	if err != nil {
		return err
	}
	if valid < end {
		// Nothing after a torn record was ever synced (Sync covers the
		// whole file), so cutting there loses nothing acknowledged.
		if err := j.f.Truncate(valid); err != nil {
			return fmt.Errorf("cut torn tail at %d: %w", valid, err)
		}
		j.recovery.TruncatedAt, j.recovery.TruncatedBytes, j.recovery.Reason = valid, end-valid, reason
	}
	// If only the process died, what we read may still be in the page
	// cache alone, a commit record among it: it must reach the disk
	// before the writes it commits do.
	if err := durable.Fdatasync(j.f); err != nil {
		return err
	}
	j.durable = valid
	if _, err := j.f.Seek(valid, io.SeekStart); err != nil {
		return err
	}
	j.size = valid
	n := journalCommittedPrefix(writes, j.committed)
	if err := j.apply(writes[:n]); err != nil {
		return err
	}
	j.recovery.Reapplied = n
	j.pending = slices.Clone(writes[n:])
	for _, e := range j.pending {
		j.pendingBytes += e.recordSize()
		j.dataBytes += int64(e.length)
	}
	j.last = max(j.last, j.committed)
	return j.maybeCompact(false)
}

// journalCommittedPrefix returns how many of entries epoch commits: write
// epochs never decrease, so they are a prefix.
func journalCommittedPrefix(entries []journalEntry, epoch uint64) int {
	return sort.Search(len(entries), func(i int) bool { return entries[i].epoch > epoch })
}

// scan reads records up to end and returns the writes found, where the
// valid records end, and why the next one (if any) was rejected. Records that
// are whole but contradict each other are an error: that is no crash.
func (j *Journal) scan(end int64) (writes []journalEntry, valid int64, reason string, err error) {
	br := bufio.NewReaderSize(io.NewSectionReader(j.f, 0, end), journalBufSize)
	crc := crc32.New(castagnoli)
	copyBuf := make([]byte, 64<<10)
	hdr := j.hdr[:journalHeaderSize]
	var pos int64
	for pos < end {
		if end-pos < journalCommitSize {
			return writes, pos, fmt.Sprintf("%d bytes, shorter than a record", end-pos), nil
		}
		if _, err := io.ReadFull(br, hdr); err != nil {
			return nil, 0, "", fmt.Errorf("read record at %d: %w", pos, err)
		}
		kind, e, why := journalParseHeader(hdr)
		if why != "" {
			return writes, pos, why, nil
		}
		e.pos = pos
		size := e.recordSize()
		if size > end-pos {
			return writes, pos, fmt.Sprintf("record of %d bytes runs past the end of the file", size), nil
		}
		crc.Reset()
		crc.Write(hdr)
		if _, err := io.CopyBuffer(crc, io.LimitReader(br, int64(e.length)), copyBuf); err != nil {
			return nil, 0, "", fmt.Errorf("read record at %d: %w", pos, err)
		}
		var sum [journalTrailerSize]byte
		if _, err := io.ReadFull(br, sum[:]); err != nil {
			return nil, 0, "", fmt.Errorf("read record at %d: %w", pos, err)
		}
		if got, want := crc.Sum32(), le.Uint32(sum[:]); got != want {
			return writes, pos, fmt.Sprintf("checksum %#08x, want %#08x", got, want), nil
		}
		switch kind {
		case journalKindCommit:
			if e.epoch <= j.committed {
				return nil, 0, "", fmt.Errorf("%w: commit of epoch %d at %d after commit of epoch %d", ErrJournalCorrupt, e.epoch, pos, j.committed)
			}
			j.committed = e.epoch
		case journalKindWrite:
			if e.epoch <= j.committed || e.epoch < j.last {
				return nil, 0, "", fmt.Errorf("%w: write of epoch %d at %d after commit of epoch %d and a write of epoch %d", ErrJournalCorrupt, e.epoch, pos, j.committed, j.last)
			}
			if _, ok := j.disks[e.disk]; !ok {
				return nil, 0, "", fmt.Errorf("%w: record at %d writes disk %d; open the journal with every disk it was written for", ErrJournalUnknownDisk, pos, e.disk)
			}
			j.last = e.epoch
			writes = append(writes, e)
		}
		pos += size
	}
	return writes, pos, "", nil
}

// journalParseHeader checks what can be checked before the data is read —
// above all the length, so a torn header cannot make us read gigabytes — and
// returns why the record is rejected, or "".
func journalParseHeader(b []byte) (kind byte, e journalEntry, why string) {
	if [4]byte(b[:4]) != journalMagic {
		return 0, e, fmt.Sprintf("bad magic %q", b[:4])
	}
	kind = b[4]
	if b[5]|b[6]|b[7] != 0 {
		return 0, e, "reserved header bytes not zero"
	}
	e = journalEntry{epoch: le.Uint64(b[8:]), disk: le.Uint32(b[16:]), length: le.Uint32(b[20:]), offset: le.Uint64(b[24:])}
	switch kind {
	case journalKindCommit:
		if e.disk != 0 || e.length != 0 || e.offset != 0 {
			return 0, e, "commit record with disk, length or offset set"
		}
	case journalKindWrite:
		if e.length == 0 || e.length > JournalMaxWrite {
			return 0, e, fmt.Sprintf("write of %d bytes, want 1..%d", e.length, JournalMaxWrite)
		}
		if e.offset > math.MaxInt64-uint64(e.length) {
			return 0, e, fmt.Sprintf("write of %d bytes at offset %d overflows", e.length, e.offset)
		}
	default:
		return 0, e, fmt.Sprintf("unknown record kind %d", kind)
	}
	return kind, e, ""
}

func journalPutHeader(b []byte, kind byte, epoch uint64, disk uint32, length uint32, offset uint64) {
	copy(b, journalMagic[:])
	b[4], b[5], b[6], b[7] = kind, 0, 0, 0
	le.PutUint64(b[8:], epoch)
	le.PutUint32(b[16:], disk)
	le.PutUint32(b[20:], length)
	le.PutUint64(b[24:], offset)
}

// Append journals write w of epoch. It copies w.Data, so the caller may reuse
// it. The write is durable only after Sync or Commit. Epochs must not
// decrease from one write to the next and must be after the last committed
// one.
func (j *Journal) Append(epoch uint64, w DiskWrite) error {
	n := len(w.Data)
	if n == 0 || n > JournalMaxWrite {
		return fmt.Errorf("replication: journal append: disk %d offset %d: %d bytes, want 1..%d", w.Disk, w.Offset, n, JournalMaxWrite)
	}
	if w.Offset > math.MaxInt64-uint64(n) {
		return fmt.Errorf("replication: journal append: disk %d: write of %d bytes at offset %d overflows", w.Disk, n, w.Offset)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.usable(); err != nil {
		return err
	}
	if _, ok := j.disks[w.Disk]; !ok {
		return fmt.Errorf("%w: disk %d, the journal has %d disks", ErrJournalUnknownDisk, w.Disk, len(j.disks))
	}
	if epoch <= j.committed {
		return fmt.Errorf("%w: write of epoch %d, epoch %d already committed", ErrJournalEpoch, epoch, j.committed)
	}
	if epoch < j.last {
		return fmt.Errorf("%w: write of epoch %d after epoch %d", ErrJournalEpoch, epoch, j.last)
	}
	hdr := j.hdr[:journalHeaderSize]
	journalPutHeader(hdr, journalKindWrite, epoch, w.Disk, uint32(n), w.Offset)
	sum := crc32.Update(crc32.Checksum(hdr, castagnoli), castagnoli, w.Data)
	e := journalEntry{pos: j.size, epoch: epoch, offset: w.Offset, disk: w.Disk, length: uint32(n)}
	if err := j.writeRecord(hdr, w.Data, sum); err != nil {
		return j.fail(fmt.Errorf("append epoch %d: %w", epoch, err))
	}
	j.size += e.recordSize()
	j.pending = append(j.pending, e)
	j.pendingBytes += e.recordSize()
	j.dataBytes += int64(n)
	j.last = epoch
	return nil
}

func (j *Journal) writeRecord(hdr, data []byte, sum uint32) error {
	if _, err := j.w.Write(hdr); err != nil {
		return err
	}
	if _, err := j.w.Write(data); err != nil {
		return err
	}
	var t [journalTrailerSize]byte
	le.PutUint32(t[:], sum)
	_, err := j.w.Write(t[:])
	return err
}

// Sync makes everything appended durable. axd does not call it — a commit
// syncs what it applies, and uncommitted writes die with a secondary that
// crashes anyway — but a Sync'd journal recovers them all.
func (j *Journal) Sync() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.usable(); err != nil {
		return err
	}
	if err := j.syncLocked(); err != nil {
		return j.fail(fmt.Errorf("sync: %w", err))
	}
	return nil
}

func (j *Journal) syncLocked() error {
	if err := j.w.Flush(); err != nil {
		return err
	}
	if err := durable.Fdatasync(j.f); err != nil {
		return err
	}
	j.durable = j.size
	return nil
}

// Commit records durably that checkpoint epoch committed, then applies every
// journaled write of that epoch or earlier to its disk in arrival order,
// syncs those disks and drops the writes from the journal. Once it returns,
// the disks hold the checkpoint's writes; if the process dies in between,
// OpenJournal finishes the job.
func (j *Journal) Commit(epoch uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.usable(); err != nil {
		return err
	}
	if epoch <= j.committed {
		return fmt.Errorf("%w: commit of epoch %d, epoch %d already committed", ErrJournalEpoch, epoch, j.committed)
	}
	if err := j.commitLocked(epoch, false); err != nil {
		return j.fail(fmt.Errorf("commit epoch %d: %w", epoch, err))
	}
	return nil
}

func (j *Journal) commitLocked(epoch uint64, compact bool) error {
	hdr := j.hdr[:journalHeaderSize]
	journalPutHeader(hdr, journalKindCommit, epoch, 0, 0, 0)
	if err := j.writeRecord(hdr, nil, crc32.Checksum(hdr, castagnoli)); err != nil {
		return err
	}
	j.size += journalCommitSize
	// The commit must be on disk before its first write reaches a disk:
	// otherwise a crash could leave a disk holding a write that recovery
	// treats as uncommitted and an FT resume would keep by mistake.
	if err := j.syncLocked(); err != nil {
		return err
	}
	j.committed = epoch
	j.last = max(j.last, epoch)
	n := journalCommittedPrefix(j.pending, epoch)
	if err := j.apply(j.pending[:n]); err != nil {
		return err
	}
	for _, e := range j.pending[:n] {
		j.pendingBytes -= e.recordSize()
		j.dataBytes -= int64(e.length)
	}
	j.pending = append(j.pending[:0], j.pending[n:]...)
	return j.maybeCompact(compact)
}

// apply writes entries to their disks in order and syncs the disks written.
// Each record is checked again as it is read back: a record that changed on
// disk since it was written must not reach the replica.
func (j *Journal) apply(entries []journalEntry) error {
	if len(entries) == 0 {
		return nil
	}
	if j.durable < j.size {
		// The commit record may not be on disk yet; see commitLocked.
		return fmt.Errorf("apply %d writes: journal synced to %d of %d bytes", len(entries), j.durable, j.size)
	}
	var touched []uint32
	for _, e := range entries {
		size := e.recordSize()
		if int64(cap(j.buf)) < size {
			j.buf = make([]byte, size)
		}
		rec := j.buf[:size]
		if _, err := j.f.ReadAt(rec, e.pos); err != nil {
			return fmt.Errorf("read back write of epoch %d at %d: %w", e.epoch, e.pos, err)
		}
		body := rec[:size-journalTrailerSize]
		if crc32.Checksum(body, castagnoli) != le.Uint32(rec[size-journalTrailerSize:]) {
			return fmt.Errorf("%w: write of epoch %d at %d changed on disk since it was journaled", ErrJournalCorrupt, e.epoch, e.pos)
		}
		data := body[journalHeaderSize:]
		n, err := j.disks[e.disk].WriteAt(data, int64(e.offset))
		if err == nil && n < len(data) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return fmt.Errorf("apply write of epoch %d to disk %d at offset %d: %w", e.epoch, e.disk, e.offset, err)
		}
		if !slices.Contains(touched, e.disk) {
			touched = append(touched, e.disk)
		}
	}
	slices.Sort(touched)
	for _, id := range touched {
		if err := j.disks[id].Sync(); err != nil {
			return fmt.Errorf("sync disk %d: %w", id, err)
		}
	}
	return nil
}

// ApplyAll applies every journaled write in arrival order whatever its epoch,
// syncs the disks and empties the journal: the crash-consistent disk an HA
// restart boots from. It first commits the newest pending epoch, so a crash
// midway is finished by OpenJournal like any commit; Committed reports that
// epoch afterwards.
func (j *Journal) ApplyAll() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.usable(); err != nil {
		return err
	}
	if len(j.pending) == 0 {
		return nil
	}
	newest := j.pending[len(j.pending)-1].epoch
	if err := j.commitLocked(newest, true); err != nil {
		return j.fail(fmt.Errorf("apply all through epoch %d: %w", newest, err))
	}
	return nil
}

// Discard drops every write not committed, durably, for an FT resume from the
// last committed checkpoint, and returns how many it dropped.
func (j *Journal) Discard() (records int, err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.usable(); err != nil {
		return 0, err
	}
	records = len(j.pending)
	j.pending = j.pending[:0]
	j.pendingBytes, j.dataBytes = 0, 0
	j.last = j.committed
	// Only a rewritten file forgets them: a crash must not bring back
	// writes the resumed guest has since written over.
	if err := j.maybeCompact(true); err != nil {
		return 0, j.fail(fmt.Errorf("discard %d writes: %w", records, err))
	}
	return records, nil
}

// maybeCompact rewrites the file as one commit record and the pending writes
// when forced, or when the applied records outweigh both the threshold and
// the copying it costs.
func (j *Journal) maybeCompact(force bool) error {
	garbage := j.size - j.pendingBytes
	base := int64(0)
	if j.committed > 0 {
		base = journalCommitSize
	}
	if garbage <= base || !force && (garbage < j.compactAt || garbage < j.pendingBytes) {
		return nil
	}
	return j.compact()
}

// compact writes the committed epoch and the pending records to a new file
// and renames it over the journal: a crash leaves either file whole.
func (j *Journal) compact() error {
	if err := j.w.Flush(); err != nil {
		return err
	}
	nf, err := os.OpenFile(j.tmpPath(), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("compact: %w", err)
	}
	moved := make([]journalEntry, len(j.pending))
	size, err := j.writeCompacted(nf, moved)
	if err == nil {
		err = durable.Fdatasync(nf)
	}
	if err == nil {
		err = os.Rename(j.tmpPath(), j.path)
	}
	if err != nil {
		nf.Close()
		os.Remove(j.tmpPath())
		return fmt.Errorf("compact: %w", err)
	}
	old := j.f
	j.f, j.size, j.durable, j.pending = nf, size, size, moved
	j.w.Reset(nf)
	old.Close()
	if err := durable.SyncDir(filepath.Dir(j.path)); err != nil {
		return fmt.Errorf("compact: %w", err)
	}
	return nil
}

// writeCompacted writes the new file's content to nf and the pending writes'
// new positions to moved, copying runs of adjacent records in one go.
func (j *Journal) writeCompacted(nf *os.File, moved []journalEntry) (int64, error) {
	w := bufio.NewWriterSize(nf, journalBufSize)
	var size int64
	if j.committed > 0 {
		hdr := j.hdr[:journalHeaderSize]
		journalPutHeader(hdr, journalKindCommit, j.committed, 0, 0, 0)
		w.Write(hdr)
		w.Write(le.AppendUint32(nil, crc32.Checksum(hdr, castagnoli)))
		size = journalCommitSize
	}
	for i := 0; i < len(j.pending); {
		start := j.pending[i].pos
		end := start
		k := i
		for ; k < len(j.pending) && j.pending[k].pos == end; k++ {
			moved[k] = j.pending[k]
			moved[k].pos = size + end - start
			end += j.pending[k].recordSize()
		}
		if _, err := w.ReadFrom(io.NewSectionReader(j.f, start, end-start)); err != nil {
			return 0, err
		}
		size += end - start
		i = k
	}
	return size, w.Flush()
}

// fail marks the journal unusable after err: its memory may no longer match
// its file.
func (j *Journal) fail(err error) error {
	j.broken = err
	return fmt.Errorf("replication: journal %s: %w", j.path, err)
}

func (j *Journal) usable() error {
	if j.f == nil {
		return fmt.Errorf("replication: journal %s: %w", j.path, os.ErrClosed)
	}
	if j.broken != nil {
		return fmt.Errorf("replication: journal %s is unusable after an earlier failure, close and reopen it: %w", j.path, j.broken)
	}
	return nil
}

// Depth returns what is journaled and not yet on the disks.
func (j *Journal) Depth() JournalDepth {
	j.mu.Lock()
	defer j.mu.Unlock()
	d := JournalDepth{Records: len(j.pending), Bytes: j.dataBytes, FileBytes: j.size}
	if len(j.pending) > 0 {
		d.OldestEpoch, d.NewestEpoch = j.pending[0].epoch, j.pending[len(j.pending)-1].epoch
	}
	return d
}

// Committed returns the last committed epoch, 0 when none ever was.
func (j *Journal) Committed() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.committed
}

// Recovered says what OpenJournal did to the file.
func (j *Journal) Recovered() JournalRecovery {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.recovery
}

// Close writes out buffered records and closes the file, without syncing:
// call Sync first for that. It is safe to call more than once.
func (j *Journal) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return nil
	}
	var err error
	if j.broken == nil {
		err = j.w.Flush()
	}
	if cerr := j.f.Close(); err == nil {
		err = cerr
	}
	j.f = nil
	if err != nil {
		return fmt.Errorf("replication: close journal %s: %w", j.path, err)
	}
	return nil
}
