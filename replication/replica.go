package replication

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/ax/durable"
)

// Files of a replica directory.
const (
	ramFile      = "ram"        // guest RAM, exactly ramSize bytes, sparse; QEMU's mem-path at failover
	stateFile    = "state.json" // what the files hold; replaced atomically
	devStateFile = "devstate"   // device state of the committed epoch; replaced atomically
)

// Replica states as recorded in state.json.
const (
	stateEmpty     = "empty"     // nothing synced yet
	stateSyncing   = "syncing"   // initial sync under way, or done and awaiting the first checkpoint
	stateApplying  = "applying"  // checkpoint Epoch half written: the files are inconsistent
	stateCommitted = "committed" // the files hold checkpoint Epoch whole
	stateSeeded    = "seeded"    // the RAM file holds an earlier copy of the VM's RAM (SeedReplica): a base, never promoted
)

var (
	// ErrReplicaTorn reports a replica whose files are inconsistent: it died
	// while syncing or applying a checkpoint. It needs a full resync
	// (ResetReplica) and must not be used for failover.
	ErrReplicaTorn = errors.New("replication: replica torn, needs full resync")
	// ErrNotSynced reports a checkpoint or sync step out of order: checkpoints
	// apply only after the initial sync completed.
	ErrNotSynced = errors.New("replication: replica not synced")
	// ErrRAMSizeMismatch reports a replica directory kept for a VM of another RAM size.
	ErrRAMSizeMismatch = errors.New("replication: replica RAM size mismatch")
)

type replicaState struct {
	Version int    `json:"version"`
	RAMSize int64  `json:"ram_size"`
	State   string `json:"state"`
	Epoch   uint64 `json:"epoch"`
}

// Replica is the secondary's copy of one VM: its RAM as a file QEMU can map at
// failover, the device state of the last committed checkpoint, and a state
// record that says whether the two are consistent. Its methods are safe for
// concurrent use; stop feeding it before a failover reads its files.
type Replica struct {
	dir     string
	ramSize int64

	mu        sync.Mutex
	ram       *os.File
	state     replicaState // as on disk
	synced    bool         // SyncDone accepted since BeginSync
	syncPages uint64       // pages written since BeginSync
	torn      bool         // a write failed midway; the files are not to be trusted
	scratch   []byte

	// crash, when set by tests, is called at each stage of Apply; an error
	// stops Apply there as a crash would.
	crash func(stage string) error
}

// OpenReplica opens the replica in dir for a VM of ramSize bytes, creating dir,
// a sparse RAM file and the state record if there are none. A replica that was
// interrupted while syncing or applying a checkpoint is reported as
// ErrReplicaTorn; ResetReplica starts it over.
func OpenReplica(dir string, ramSize int64) (*Replica, error) {
	if ramSize <= 0 || ramSize%PageSize != 0 {
		return nil, fmt.Errorf("replication: open replica %s: ram size %d is not a positive multiple of %d", dir, ramSize, PageSize)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("replication: open replica: %w", err)
	}
	r := &Replica{dir: dir, ramSize: ramSize}
	data, err := os.ReadFile(r.path(stateFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := r.create(); err != nil {
			return nil, fmt.Errorf("replication: create replica %s: %w", dir, err)
		}
		return r, nil
	case err != nil:
		return nil, fmt.Errorf("replication: open replica %s: %w", dir, err)
	}
	if err := json.Unmarshal(data, &r.state); err != nil {
		return nil, fmt.Errorf("%w: %s: unreadable state record: %v", ErrReplicaTorn, dir, err)
	}
	st := r.state
	if st.RAMSize != ramSize {
		return nil, fmt.Errorf("%w: %s holds %d bytes of RAM, the VM has %d (reset the replica to reuse the directory)", ErrRAMSizeMismatch, dir, st.RAMSize, ramSize)
	}
	switch st.State {
	case stateEmpty:
		r.ram, err = os.OpenFile(r.path(ramFile), os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = zero(r.ram, ramSize)
		}
	case stateSeeded:
		r.ram, err = os.OpenFile(r.path(ramFile), os.O_RDWR, 0)
		if err == nil {
			err = r.checkRAMSize()
		}
		if err != nil {
			err = fmt.Errorf("%w: %s: seeded: %w", ErrReplicaTorn, dir, err)
		}
	case stateCommitted:
		r.ram, err = os.OpenFile(r.path(ramFile), os.O_RDWR, 0)
		if err == nil {
			err = r.checkCommittedFiles()
		}
		if err != nil {
			err = fmt.Errorf("%w: %s: committed epoch %d: %w", ErrReplicaTorn, dir, st.Epoch, err)
		}
	case stateSyncing:
		err = fmt.Errorf("%w: %s was interrupted during initial sync", ErrReplicaTorn, dir)
	case stateApplying:
		err = fmt.Errorf("%w: %s was interrupted applying checkpoint %d", ErrReplicaTorn, dir, st.Epoch)
	default:
		err = fmt.Errorf("%w: %s: unknown state %q", ErrReplicaTorn, dir, st.State)
	}
	if err != nil {
		if r.ram != nil {
			r.ram.Close()
		}
		if !errors.Is(err, ErrReplicaTorn) {
			err = fmt.Errorf("replication: open replica %s: %w", dir, err)
		}
		return nil, err
	}
	r.removeTemps()
	return r, nil
}

// SeedReplica puts a copy of from — the RAM file of the VM's earlier copy on
// this host (the old primary's, once its partner took the VM over) — where a
// replica of the VM will be opened in dir, unless dir holds a replica
// already: the next stream's initial sync then starts on it as its base
// (PageHashes), and sends only the pages the VM changed since. A seeded
// replica is never promoted: it becomes usable only by a sync and a
// checkpoint like any other. It reports whether it seeded.
func SeedReplica(dir string, ramSize int64, from string) (bool, error) {
	if _, err := os.Stat(filepath.Join(dir, stateFile)); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return false, err // a replica is there: its own content is the base
	}
	src, err := os.Open(from)
	if err != nil {
		return false, fmt.Errorf("replication: seed replica %s: %w", dir, err)
	}
	defer src.Close()
	if fi, err := src.Stat(); err != nil || !fi.Mode().IsRegular() || fi.Size() != ramSize {
		return false, fmt.Errorf("replication: seed replica %s: %s is not a regular file of %d bytes", dir, from, ramSize)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("replication: seed replica %s: %w", dir, err)
	}
	r := &Replica{dir: dir, ramSize: ramSize}
	tmp := r.path(ramFile + ".tmp")
	dst, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return false, fmt.Errorf("replication: seed replica %s: %w", dir, err)
	}
	_, err = io.Copy(dst, src) // copy_file_range where the filesystem has it
	if err == nil {
		err = durable.Fdatasync(dst)
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, r.path(ramFile))
	}
	if err == nil {
		err = r.writeState(stateSeeded, 0)
	}
	if err != nil {
		os.Remove(tmp)
		return false, fmt.Errorf("replication: seed replica %s: %w", dir, err)
	}
	return true, nil
}

// SeedAge reports, for a directory holding a seeded replica (SeedReplica)
// that no sync has started on, how long ago it was seeded.
func SeedAge(dir string) (time.Duration, bool) {
	fi, err := os.Stat(filepath.Join(dir, stateFile))
	if err != nil {
		return 0, false
	}
	data, err := os.ReadFile(filepath.Join(dir, stateFile))
	var st replicaState
	if err != nil || json.Unmarshal(data, &st) != nil || st.State != stateSeeded {
		return 0, false
	}
	return time.Since(fi.ModTime()), true
}

// ResetReplica discards whatever dir holds and opens an empty replica there.
func ResetReplica(dir string, ramSize int64) (*Replica, error) {
	// The state record goes first: a reset interrupted after it leaves a
	// directory that opens as new, never one that looks committed.
	for _, name := range []string{stateFile, devStateFile} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("replication: reset replica %s: %w", dir, err)
		}
	}
	return OpenReplica(dir, ramSize)
}

func (r *Replica) path(name string) string { return filepath.Join(r.dir, name) }

func (r *Replica) create() error {
	f, err := os.OpenFile(r.path(ramFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	err = zero(f, r.ramSize)
	if err == nil {
		err = os.Remove(r.path(devStateFile))
		if errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
	}
	if err == nil {
		r.removeTemps()
		err = r.writeState(stateEmpty, 0)
	}
	if err != nil {
		f.Close()
		return err
	}
	r.ram = f
	return nil
}

func (r *Replica) checkRAMSize() error {
	fi, err := r.ram.Stat()
	if err != nil {
		return err
	}
	if fi.Size() != r.ramSize {
		return fmt.Errorf("ram file is %d bytes, want %d", fi.Size(), r.ramSize)
	}
	return nil
}

func (r *Replica) checkCommittedFiles() error {
	if err := r.checkRAMSize(); err != nil {
		return err
	}
	if _, err := os.Stat(r.path(devStateFile)); err != nil {
		return fmt.Errorf("device state: %w", err)
	}
	return nil
}

// zero makes f exactly size bytes of zeros without writing them: a hole.
func zero(f *os.File, size int64) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	return f.Truncate(size)
}

// removeTemps removes what an interrupted write left behind.
func (r *Replica) removeTemps() {
	names, _ := filepath.Glob(filepath.Join(r.dir, "*.tmp"))
	for _, n := range names {
		os.Remove(n)
	}
}

// Close releases the RAM file. It is safe to call more than once.
func (r *Replica) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ram == nil {
		return nil
	}
	err := r.ram.Close()
	r.ram = nil
	return err
}

// RAMPath returns the RAM file, QEMU's mem-path when the replica is promoted.
func (r *Replica) RAMPath() string { return r.path(ramFile) }

// RAMSize returns the guest RAM size the replica holds.
func (r *Replica) RAMSize() int64 { return r.ramSize }

// Committed returns the last committed epoch and the file holding its device
// state, or 0 and "" when no checkpoint is committed.
func (r *Replica) Committed() (epoch uint64, devStatePath string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state.State != stateCommitted || r.torn {
		return 0, ""
	}
	return r.state.Epoch, r.path(devStateFile)
}

// Usable reports whether the replica holds a committed checkpoint whole and
// can be promoted: the initial sync and at least one checkpoint after it
// committed, and nothing since left the files half written.
func (r *Replica) Usable() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state.State == stateCommitted && !r.torn && r.ram != nil
}

// NewAssembler returns a CheckpointAssembler for this replica's RAM size that
// accepts only epochs after the one committed now.
func (r *Replica) NewAssembler(maxBytes int64) *CheckpointAssembler {
	r.mu.Lock()
	defer r.mu.Unlock()
	return NewCheckpointAssembler(r.ramSize, r.state.Epoch, maxBytes)
}

func (r *Replica) usableLocked() error {
	if r.ram == nil {
		return fmt.Errorf("replication: replica %s is closed", r.dir)
	}
	if r.torn {
		return fmt.Errorf("%w: %s: an earlier write failed midway", ErrReplicaTorn, r.dir)
	}
	return nil
}

// PageHashes returns the hash (dirty.PageHash) of every page the replica's RAM
// file holds now: the base a primary's initial sync compares its guest's
// RAM with, to send only the pages that differ (BeginSyncOnBase).
func (r *Replica) PageHashes() ([]uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usableLocked(); err != nil {
		return nil, err
	}
	const chunk = 256 * PageSize
	buf := make([]byte, chunk)
	hashes := make([]uint64, 0, r.ramSize/PageSize)
	for off := int64(0); off < r.ramSize; off += chunk {
		b := buf[:min(chunk, r.ramSize-off)]
		if _, err := r.ram.ReadAt(b, off); err != nil {
			return nil, fmt.Errorf("replication: hash the replica of %s: %w", r.dir, err)
		}
		for p := 0; p < len(b); p += PageSize {
			hashes = append(hashes, dirty.PageHash(b[p:p+PageSize]))
		}
	}
	return hashes, nil
}

// BeginSync starts an initial sync: it discards the replica's content — a
// committed replica too: the stream it would have continued from is gone —
// and zeroes the RAM, so pages the primary skips as never written read as
// zeros. The replica is not usable until FinishSync and the first Apply.
func (r *Replica) BeginSync() error { return r.beginSync(false) }

// BeginSyncOnBase starts an initial sync over what the RAM file holds: the
// primary was given its PageHashes and sends only the pages that differ,
// so the file is kept as it is (nothing else wrote it since). The replica
// is not usable until FinishSync and the first Apply.
func (r *Replica) BeginSyncOnBase() error { return r.beginSync(true) }

func (r *Replica) beginSync(onBase bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usableLocked(); err != nil {
		return err
	}
	if err := r.writeState(stateSyncing, 0); err != nil {
		r.torn = true
		return fmt.Errorf("replication: begin sync of %s: %w", r.dir, err)
	}
	err := os.Remove(r.path(devStateFile))
	if (err == nil || errors.Is(err, fs.ErrNotExist)) && !onBase {
		err = zero(r.ram, r.ramSize)
	} else if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	if err != nil {
		r.torn = true
		return fmt.Errorf("replication: begin sync of %s: %w", r.dir, err)
	}
	r.synced, r.syncPages = false, 0
	return nil
}

// WriteSyncPages writes initial-sync pages straight into the RAM file.
func (r *Replica) WriteSyncPages(pages []Page) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usableLocked(); err != nil {
		return err
	}
	if r.state.State != stateSyncing || r.synced {
		return fmt.Errorf("%w: sync pages outside an initial sync (state %s)", ErrNotSynced, r.state.State)
	}
	limit := uint64(r.ramSize / PageSize)
	for _, p := range pages {
		if p.PFN >= limit {
			return fmt.Errorf("replication: sync page pfn %#x outside guest RAM of %d pages", p.PFN, limit)
		}
		if len(p.Data) != PageSize {
			return fmt.Errorf("replication: sync page pfn %#x has %d bytes, want %d", p.PFN, len(p.Data), PageSize)
		}
	}
	if err := r.writeRuns(pages); err != nil {
		r.torn = true
		return fmt.Errorf("replication: write sync pages to %s: %w", r.RAMPath(), err)
	}
	r.syncPages += uint64(len(pages))
	return nil
}

// writeRuns writes pages, gathering runs of consecutive frame numbers into one
// write each: the initial sync mostly sends RAM in order.
func (r *Replica) writeRuns(pages []Page) error {
	const maxRun = 256
	if r.scratch == nil {
		r.scratch = make([]byte, maxRun*PageSize)
	}
	for i := 0; i < len(pages); {
		j := i + 1
		for j < len(pages) && j-i < maxRun && pages[j].PFN == pages[j-1].PFN+1 {
			j++
		}
		buf := pages[i].Data
		if j-i > 1 {
			buf = r.scratch[:0]
			for _, p := range pages[i:j] {
				buf = append(buf, p.Data...)
			}
		}
		if _, err := r.ram.WriteAt(buf, int64(pages[i].PFN)*PageSize); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// FinishSync ends the initial sync. The replica becomes usable only when the
// first checkpoint after it commits: pages sent while the VM ran are not yet
// consistent with each other.
func (r *Replica) FinishSync(d SyncDone) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usableLocked(); err != nil {
		return err
	}
	if r.state.State != stateSyncing || r.synced {
		return fmt.Errorf("%w: SyncDone outside an initial sync (state %s)", ErrNotSynced, r.state.State)
	}
	if d.RAMSize != uint64(r.ramSize) {
		return fmt.Errorf("%w: primary has %d bytes of RAM, replica %d", ErrRAMSizeMismatch, d.RAMSize, r.ramSize)
	}
	if d.Pages != r.syncPages {
		return fmt.Errorf("replication: initial sync of %s: primary sent %d pages, replica wrote %d", r.dir, d.Pages, r.syncPages)
	}
	r.synced = true
	return nil
}

// Apply commits a verified checkpoint. It records "applying N" before touching
// the RAM file and "committed N" only once the pages and device state are on
// disk, so a crash anywhere in between leaves a replica that opens as torn
// rather than one that claims an epoch it does not hold.
func (r *Replica) Apply(cp *Checkpoint) error {
	if cp == nil || !cp.verified {
		return fmt.Errorf("%w: only a checkpoint from a CheckpointAssembler can be applied", ErrBadCheckpoint)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usableLocked(); err != nil {
		return err
	}
	switch {
	case r.state.State == stateSyncing && r.synced:
	case r.state.State == stateCommitted:
		if cp.epoch <= r.state.Epoch {
			return fmt.Errorf("%w: checkpoint %d, replica committed %d", ErrStaleEpoch, cp.epoch, r.state.Epoch)
		}
	default:
		return fmt.Errorf("%w: checkpoint %d before the initial sync completed", ErrNotSynced, cp.epoch)
	}
	limit := uint64(r.ramSize / PageSize)
	for _, pfn := range cp.pfns {
		if pfn >= limit {
			return fmt.Errorf("%w: checkpoint %d: pfn %#x outside guest RAM of %d pages", ErrBadCheckpoint, cp.epoch, pfn, limit)
		}
	}
	if err := r.apply(cp); err != nil {
		r.torn = true
		return fmt.Errorf("replication: apply checkpoint %d to %s: %w", cp.epoch, r.dir, err)
	}
	return nil
}

func (r *Replica) apply(cp *Checkpoint) error {
	if err := r.writeState(stateApplying, cp.epoch); err != nil {
		return err
	}
	if err := r.stage("applying"); err != nil {
		return err
	}
	// Pages arrive in the checkpoint's buffer back to back, so a run of
	// consecutive frame numbers is already one contiguous write.
	for i := 0; i < len(cp.pfns); {
		j := i + 1
		for j < len(cp.pfns) && cp.pfns[j] == cp.pfns[j-1]+1 {
			j++
		}
		if _, err := r.ram.WriteAt(cp.pages[i*PageSize:j*PageSize], int64(cp.pfns[i])*PageSize); err != nil {
			return fmt.Errorf("write pages: %w", err)
		}
		i = j
	}
	if err := durable.Fdatasync(r.ram); err != nil {
		return fmt.Errorf("sync ram: %w", err)
	}
	if err := r.stage("pages"); err != nil {
		return err
	}
	tmp := devStateFile + "." + strconv.FormatUint(cp.epoch, 10) + ".tmp"
	if err := r.replaceFile(tmp, devStateFile, cp.deviceState); err != nil {
		return fmt.Errorf("device state: %w", err)
	}
	if err := r.stage("devstate"); err != nil {
		return err
	}
	return r.writeState(stateCommitted, cp.epoch)
}

func (r *Replica) stage(name string) error {
	if r.crash != nil {
		return r.crash(name)
	}
	return nil
}

// writeState records state and epoch durably and atomically.
func (r *Replica) writeState(state string, epoch uint64) error {
	st := replicaState{Version: 1, RAMSize: r.ramSize, State: state, Epoch: epoch}
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := r.replaceFile(stateFile+".tmp", stateFile, append(data, '\n')); err != nil {
		return fmt.Errorf("record state %s %d: %w", state, epoch, err)
	}
	r.state = st
	return nil
}

// replaceFile writes data to tmp, syncs it and renames it over name, then
// syncs the directory so the rename itself survives a crash.
func (r *Replica) replaceFile(tmp, name string, data []byte) error {
	f, err := os.OpenFile(r.path(tmp), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err = f.Write(data); err == nil {
		err = durable.Fdatasync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(r.path(tmp), r.path(name))
	}
	if err == nil {
		err = durable.SyncDir(r.dir)
	}
	if err != nil {
		os.Remove(r.path(tmp))
	}
	return err
}
