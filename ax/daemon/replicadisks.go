package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/replication/bufpool"
)

// Disk replication, secondary side.

// replicaDisks holds a VM's replica disks on the secondary: raw files of the
// sizes the guest sees, written at once (HA) or, at FT, held until the
// checkpoint of their epoch commits.
//
// At FT a write is held in memory (the stage) while the stage has room and
// the file journal holds nothing; otherwise it goes to the journal. So every
// staged write precedes every journaled one, and a commit applies the
// staged writes of its epoch and earlier, then the journal's. The stage
// spares the commit path the journal's copies and fsyncs; the journal keeps
// a backlog larger than the stage (a slow checkpoint under heavy writes) out
// of memory.
type replicaDisks struct {
	mu      sync.Mutex
	dir     string
	files   []*os.File
	sizes   []int64
	journal *replication.Journal
	level   string // "" until the primary says the disks are in sync, then ha or ft
	// prepared: a promotion made the files what the VM starts from
	// (prepare); a later attempt after a failed one starts from them as
	// they are.
	prepared bool

	stage      []stagedWrite
	stageBytes int64 // buffer bytes the stage holds
	stageLimit int64
	committed  uint64 // the last FT epoch committed
}

// stagedWrite is one FT write held in memory until its checkpoint commits,
// or a range to zero (zero set, no data).
type stagedWrite struct {
	epoch uint64
	disk  uint32
	off   int64
	data  []byte // in buf
	buf   *[]byte
	zero  int64
}

// defaultStageLimit bounds the memory one VM's staged writes take: a
// second of writes at 64 MB/s, or an epoch's at 1.3 GB/s.
const defaultStageLimit = 64 << 20

var (
	_ replication.DiskSink   = (*replicaDisks)(nil)
	_ replication.DiskHasher = (*replicaDisks)(nil)
)

func replicaDiskPath(dir string, i int) string {
	return filepath.Join(dir, fmt.Sprintf("disk%d.raw", i))
}

// openReplicaDisks opens (creating or resizing) the replica disks in dir and
// starts an empty journal: what the files hold is the base of the new
// stream's disk sync (RangeHashes), which sends only the ranges that differ.
func openReplicaDisks(dir string, sizes []int64) (*replicaDisks, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	r := &replicaDisks{dir: dir, sizes: sizes, stageLimit: defaultStageLimit}
	disks := map[uint32]replication.JournalDisk{}
	for i, size := range sizes {
		f, err := os.OpenFile(replicaDiskPath(dir, i), os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = f.Truncate(size)
		}
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("replica disk %d: %w", i, err)
		}
		r.files = append(r.files, f)
		disks[uint32(i)] = f
	}
	jpath := filepath.Join(dir, "disk.journal")
	os.Remove(jpath)
	os.Remove(filepath.Join(dir, committedFile)) // a new stream writes them again
	j, err := replication.OpenJournal(jpath, disks)
	if err != nil {
		r.Close()
		return nil, err
	}
	r.journal = j
	return r, nil
}

func (r *replicaDisks) Write(epoch uint64, w replication.DiskWrite) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if int(w.Disk) >= len(r.files) {
		return fmt.Errorf("disk write to disk %d of %d", w.Disk, len(r.files))
	}
	if end := w.Offset + uint64(len(w.Data)); end > uint64(r.sizes[w.Disk]) {
		return fmt.Errorf("disk write to disk %d at %d..%d beyond its %d bytes", w.Disk, w.Offset, end, r.sizes[w.Disk])
	}
	if r.level != replication.StreamLevelFT {
		_, err := r.files[w.Disk].WriteAt(w.Data, int64(w.Offset))
		return err
	}
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if r.journal.Depth().Records > 0 || r.stageBytes+int64(len(w.Data)) > r.stageLimit {
		return r.journal.Append(epoch, w) // it checks the epoch order too
	}
	buf := bufpool.Get(len(w.Data))
	copy(*buf, w.Data)
	r.stage = append(r.stage, stagedWrite{epoch: epoch, disk: w.Disk, off: int64(w.Offset), data: *buf, buf: buf})
	r.stageBytes += int64(cap(*buf))
	return nil
}

// Zero makes a range of a replica disk read as zeroes — at once, or at FT
// when epoch commits: a hole punched in the file keeps the replica as sparse
// as the guest's disk; where the file system cannot punch, zeroes are
// written. At FT the range is staged (it takes no memory), or, behind
// writes already journaled, journaled as zero data.
func (r *replicaDisks) Zero(epoch uint64, z replication.DiskZero) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if int(z.Disk) >= len(r.files) {
		return fmt.Errorf("disk zero range on disk %d of %d", z.Disk, len(r.files))
	}
	if end := z.Offset + z.Length; end > uint64(r.sizes[z.Disk]) {
		return fmt.Errorf("disk zero range on disk %d at %d..%d beyond its %d bytes", z.Disk, z.Offset, end, r.sizes[z.Disk])
	}
	if r.level != replication.StreamLevelFT {
		return zeroRange(r.files[z.Disk], int64(z.Offset), int64(z.Length))
	}
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if r.journal.Depth().Records == 0 {
		r.stage = append(r.stage, stagedWrite{epoch: epoch, disk: z.Disk, off: int64(z.Offset), zero: int64(z.Length)})
		return nil
	}
	for off, n := z.Offset, z.Length; n > 0; {
		k := min(n, uint64(len(zeroChunk)), replication.JournalMaxWrite)
		if err := r.journal.Append(epoch, replication.DiskWrite{Disk: z.Disk, Offset: off, Data: zeroChunk[:k]}); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// zeroRange punches a hole over n bytes of f at off, or writes zeroes there
// when the file system cannot.
func zeroRange(f *os.File, off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return err
	}
	for n > 0 {
		k := min(n, int64(len(zeroChunk)))
		if _, err := f.WriteAt(zeroChunk[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// checkEpoch refuses an FT write of an epoch already committed or older
// than the newest staged one.
func (r *replicaDisks) checkEpoch(epoch uint64) error {
	if epoch <= r.committed {
		return fmt.Errorf("%w: write of epoch %d, epoch %d already committed", replication.ErrJournalEpoch, epoch, r.committed)
	}
	if n := len(r.stage); n > 0 && epoch < r.stage[n-1].epoch {
		return fmt.Errorf("%w: write of epoch %d after epoch %d", replication.ErrJournalEpoch, epoch, r.stage[n-1].epoch)
	}
	return nil
}

// errDisksClosed: the replica's disks were closed (the VM left or was promoted).
var errDisksClosed = errors.New("replica disks closed")

func (r *replicaDisks) Commit(epoch uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if r.level != replication.StreamLevelFT {
		return nil
	}
	if epoch <= r.committed {
		return fmt.Errorf("%w: commit of epoch %d, epoch %d already committed", replication.ErrJournalEpoch, epoch, r.committed)
	}
	if err := r.applyStage(epoch); err != nil {
		return err
	}
	r.committed = epoch
	if r.journal.Depth().Records == 0 {
		// Nothing spilled: no commit record to write and sync, and the
		// files hold exactly the epochs up to this one.
		return r.markCommitted(epoch)
	}
	os.Remove(filepath.Join(r.dir, committedFile)) // the journal holds some: unknown after a restart
	return r.journal.Commit(epoch)
}

// committedFile records the FT epoch the disk files hold whole (written
// after the epoch's writes): an axd that restarts may resume the replica
// from its committed checkpoint only if its disks are at that same epoch.
const committedFile = "committed-epoch"

func (r *replicaDisks) markCommitted(epoch uint64) error {
	tmp := filepath.Join(r.dir, committedFile+".tmp")
	if err := os.WriteFile(tmp, []byte(strconv.FormatUint(epoch, 10)), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(r.dir, committedFile))
}

// disksCommittedEpoch is the FT epoch the replica disks in dir hold whole
// (0: unknown).
func disksCommittedEpoch(dir string) uint64 {
	b, err := os.ReadFile(filepath.Join(dir, committedFile))
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseUint(string(b), 10, 64)
	return n
}

// applyStage writes the staged writes of epoch and earlier to their disks,
// in arrival order, and drops them from the stage.
func (r *replicaDisks) applyStage(epoch uint64) error {
	n := 0
	for ; n < len(r.stage) && r.stage[n].epoch <= epoch; n++ {
		s := r.stage[n]
		if s.zero > 0 {
			if err := zeroRange(r.files[s.disk], s.off, s.zero); err != nil {
				return fmt.Errorf("apply zero range of epoch %d to disk %d at offset %d: %w", s.epoch, s.disk, s.off, err)
			}
			continue
		}
		k, err := r.files[s.disk].WriteAt(s.data, s.off)
		if err == nil && k < len(s.data) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return fmt.Errorf("apply write of epoch %d to disk %d at offset %d: %w", s.epoch, s.disk, s.off, err)
		}
	}
	r.dropStage(n)
	return nil
}

// dropStage forgets the first n staged writes.
func (r *replicaDisks) dropStage(n int) {
	for _, s := range r.stage[:n] {
		if s.buf != nil {
			r.stageBytes -= int64(cap(*s.buf))
			bufpool.Put(s.buf)
		}
	}
	r.stage = append(r.stage[:0], r.stage[n:]...)
}

// SetLevel: leaving FT applies everything held — the memory replica is
// dropped, and the disk as the guest wrote it is what HA boots from.
func (r *replicaDisks) SetLevel(level string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return errDisksClosed
	}
	if r.level == replication.StreamLevelFT && level != replication.StreamLevelFT {
		if err := r.applyAll(); err != nil {
			return err
		}
	}
	r.level = level
	return nil
}

// applyAll applies every write held, staged then journaled, whatever its
// epoch.
func (r *replicaDisks) applyAll() error {
	if n := len(r.stage); n > 0 {
		if err := r.applyStage(r.stage[n-1].epoch); err != nil {
			return err
		}
	}
	return r.journal.ApplyAll()
}

// prepare readies the disks for the guest to run on them: resuming from a
// committed checkpoint drops writes of later epochs; booting afresh (HA)
// applies every write received, in order — a crash-consistent disk.
func (r *replicaDisks) prepare(resume bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.prepared {
		return nil
	}
	if r.journal == nil {
		return errDisksClosed
	}
	var err error
	if resume {
		r.dropStage(len(r.stage)) // every commit applied its staged writes
		_, err = r.journal.Discard()
	} else {
		err = r.applyAll()
	}
	for _, f := range r.files {
		if serr := f.Sync(); err == nil {
			err = serr
		}
	}
	r.prepared = err == nil
	return err
}

// hashChunk is how much of a replica disk RangeHashes reads at once.
const hashChunk = 4 << 20

// RangeHashes hashes every replication.DiskBaseRange bytes of each replica
// disk, as the files hold them now: when a stream opens nothing else
// writes them. Chunks the file has no data in (holes) are not read.
func (r *replicaDisks) RangeHashes(ctx context.Context) ([][]uint64, error) {
	r.mu.Lock()
	files, sizes := slices.Clone(r.files), r.sizes
	r.mu.Unlock()
	if files == nil {
		return nil, errDisksClosed
	}
	buf := make([]byte, hashChunk)
	hashes := make([][]uint64, len(files))
	for i, f := range files {
		h, err := rangeHashes(ctx, f, sizes[i], buf)
		if err != nil {
			return nil, fmt.Errorf("hash replica disk %d: %w", i, err)
		}
		hashes[i] = h
	}
	return hashes, nil
}

// zeroRangeHash is the hash of a whole range of zeroes.
var zeroRangeHash = dirty.PageHash(zeroChunk[:replication.DiskBaseRange])

// rangeHashes hashes f's first size bytes, range by range, reading them
// len(buf) bytes (a multiple of the range) at a time.
func rangeHashes(ctx context.Context, f *os.File, size int64, buf []byte) ([]uint64, error) {
	const span = replication.DiskBaseRange
	hashes := make([]uint64, 0, replication.DiskRanges(size))
	for off := int64(0); off < size; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		b := buf[:min(int64(len(buf)), size-off)]
		if hole(f, off, int64(len(b))) {
			for p := 0; p < len(b); p += span {
				if n := min(span, len(b)-p); n == span {
					hashes = append(hashes, zeroRangeHash)
				} else {
					hashes = append(hashes, dirty.PageHash(zeroChunk[:n]))
				}
			}
			continue
		}
		if _, err := f.ReadAt(b, off); err != nil {
			return nil, err
		}
		for p := 0; p < len(b); p += span {
			hashes = append(hashes, dirty.PageHash(b[p:min(p+span, len(b))]))
		}
	}
	return hashes, nil
}

// hole reports whether f holds no data in n bytes from off (it reads as
// zeroes there). Where the file system cannot say, it answers no.
func hole(f *os.File, off, n int64) bool {
	data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true // no data from off to the end of the file
	}
	return err == nil && data >= off+n
}

// depth is what the stage and journal hold for commits to come.
func (r *replicaDisks) depth() replication.JournalDepth {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		return replication.JournalDepth{}
	}
	d := r.journal.Depth()
	if n := len(r.stage); n > 0 {
		d.Records += n
		for _, s := range r.stage {
			d.Bytes += int64(len(s.data))
		}
		d.OldestEpoch = r.stage[0].epoch
		if d.NewestEpoch == 0 {
			d.NewestEpoch = r.stage[n-1].epoch
		}
	}
	return d
}

// Close closes the files and journal and frees the stage; safe twice.
func (r *replicaDisks) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	for _, f := range r.files {
		if cerr := f.Close(); cerr != nil && !errors.Is(cerr, os.ErrClosed) && err == nil {
			err = cerr
		}
	}
	r.files = nil
	if r.journal != nil {
		r.journal.Close()
		r.journal = nil
	}
	r.dropStage(len(r.stage))
	return err
}
