package replication

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

const testRAMSize = testRAMPages * PageSize

// syncedReplica opens a replica in dir, syncs the lower half of its RAM and
// commits checkpoint 1.
func syncedReplica(t *testing.T, dir string) *Replica {
	t.Helper()
	r, err := OpenReplica(dir, testRAMSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if err := r.BeginSync(); err != nil {
		t.Fatal(err)
	}
	sync := testPages(testRAMPages/2, 0) // the upper half is never written
	if err := r.WriteSyncPages(sync); err != nil {
		t.Fatal(err)
	}
	if err := r.FinishSync(SyncDone{RAMSize: testRAMSize, Pages: uint64(len(sync))}); err != nil {
		t.Fatal(err)
	}
	if r.Usable() {
		t.Fatal("usable after the initial sync, before any checkpoint")
	}
	apply(t, r, NewCheckpointAssembler(testRAMSize, 0, 0), checkpointFrames(t, 1, testPages(3, 5), devState(1, 13000), 0))
	return r
}

func apply(t *testing.T, r *Replica, a *CheckpointAssembler, frames []Frame) {
	t.Helper()
	cp, err := feed(a, frames)
	if err != nil || cp == nil {
		t.Fatalf("assemble: %v, %v", cp, err)
	}
	if err := r.Apply(cp); err != nil {
		t.Fatal(err)
	}
}

// snapshot is the content a failover would use.
type snapshot struct {
	epoch    uint64
	ram, dev []byte
}

func take(t *testing.T, r *Replica) snapshot {
	t.Helper()
	ram, err := os.ReadFile(r.RAMPath())
	if err != nil {
		t.Fatal(err)
	}
	epoch, path := r.Committed()
	var dev []byte
	if path != "" {
		if dev, err = os.ReadFile(path); err != nil {
			t.Fatal(err)
		}
	}
	return snapshot{epoch, ram, dev}
}

func (s snapshot) mustEqual(t *testing.T, other snapshot) {
	t.Helper()
	if s.epoch != other.epoch || !bytes.Equal(s.ram, other.ram) || !bytes.Equal(s.dev, other.dev) {
		t.Fatalf("replica changed: epoch %d → %d, ram equal %v, device state equal %v",
			s.epoch, other.epoch, bytes.Equal(s.ram, other.ram), bytes.Equal(s.dev, other.dev))
	}
}

func TestReplicaLifecycle(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vm-1")
	r, err := OpenReplica(dir, testRAMSize)
	if err != nil {
		t.Fatal(err)
	}
	if r.Usable() {
		t.Fatal("new replica usable")
	}
	if e, p := r.Committed(); e != 0 || p != "" {
		t.Fatalf("new replica committed %d at %q", e, p)
	}
	fi, err := os.Stat(r.RAMPath())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != testRAMSize {
		t.Fatalf("ram file is %d bytes, want %d", fi.Size(), testRAMSize)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blocks*512 >= testRAMSize {
		t.Errorf("ram file is not sparse: %d bytes allocated", st.Blocks*512)
	}
	r.Close()

	r = syncedReplica(t, dir)
	if !r.Usable() {
		t.Fatal("not usable after the first checkpoint committed")
	}
	a := r.NewAssembler(0)
	p2 := testPages(2, 40)
	apply(t, r, a, checkpointFrames(t, 2, p2, devState(2, 9000), 0))

	want := make([]byte, testRAMSize)
	for _, p := range append(append(testPages(testRAMPages/2, 0), testPages(3, 5)...), p2...) {
		copy(want[p.PFN*PageSize:], p.Data)
	}
	got := take(t, r)
	if got.epoch != 2 || !bytes.Equal(got.ram, want) || !bytes.Equal(got.dev, devState(2, 9000)) {
		t.Fatalf("after checkpoint 2: epoch %d, ram as expected %v, device state as expected %v",
			got.epoch, bytes.Equal(got.ram, want), bytes.Equal(got.dev, devState(2, 9000)))
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	// The committed replica survives a restart of axd.
	r, err = OpenReplica(dir, testRAMSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if !r.Usable() {
		t.Fatal("committed replica not usable after reopening")
	}
	take(t, r).mustEqual(t, got)
	if leftovers, _ := filepath.Glob(filepath.Join(dir, "*.tmp")); len(leftovers) > 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}

	// A new initial sync discards it and starts from zeros.
	if err := r.BeginSync(); err != nil {
		t.Fatal(err)
	}
	if r.Usable() {
		t.Fatal("usable during a resync")
	}
	if s := take(t, r); !bytes.Equal(s.ram, make([]byte, testRAMSize)) || s.epoch != 0 {
		t.Fatal("resync did not start from zeroed RAM")
	}
}

func TestReplicaTornStream(t *testing.T) {
	r := syncedReplica(t, t.TempDir())
	before := take(t, r)
	wire := encode(t, checkpointFrames(t, 2, testPages(6, 20), devState(2, 20000), 4+2*pageRecordSize)...)
	// Cut the stream everywhere from inside Begin to inside End.
	for cut := 1; cut < len(wire); cut += 997 {
		a := r.NewAssembler(0)
		rd := NewReader(bytes.NewReader(wire[:cut]), 0)
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				if err != io.EOF && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("cut at %d: %v", cut, err)
				}
				break
			}
			cp, err := a.Add(f)
			if err != nil {
				t.Fatalf("cut at %d: %v", cut, err)
			}
			if cp != nil {
				t.Fatalf("cut at %d of %d: a checkpoint completed", cut, len(wire))
			}
		}
	}
	before.mustEqual(t, take(t, r))
	if !r.Usable() {
		t.Fatal("a torn stream made the replica unusable")
	}
}

func TestReplicaCorruptCheckpoint(t *testing.T) {
	r := syncedReplica(t, t.TempDir())
	before := take(t, r)
	frames := checkpointFrames(t, 2, testPages(4, 8), devState(2, 5000), 0)

	// Corrupted before framing (the CRC is right, the digest is not).
	bad := append([]Frame(nil), frames...)
	bad[1].Payload = bytes.Clone(bad[1].Payload)
	bad[1].Payload[4+8+4000] ^= 0x01
	if _, err := feed(r.NewAssembler(0), bad); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("flipped page byte: %v, want ErrDigestMismatch", err)
	}
	before.mustEqual(t, take(t, r))

	// Corrupted on the wire.
	wire := encode(t, frames...)
	wire[HeaderSize+24+TrailerSize+HeaderSize+4+8+100] ^= 0x40 // inside the first page
	got, err := decodeAll(t, wire, 0)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("flipped bit on the wire: %v, want ErrChecksum", err)
	}
	if cp, err := feed(r.NewAssembler(0), got); err != nil || cp != nil {
		t.Fatalf("frames before the bad one: %v, %v", cp, err)
	}
	before.mustEqual(t, take(t, r))
}

func TestReplicaRefusesPagesOutsideRAM(t *testing.T) {
	r := syncedReplica(t, t.TempDir())
	before := take(t, r)
	pages := testPages(2, testRAMPages-1) // the second is one past the end
	if _, err := feed(r.NewAssembler(0), checkpointFrames(t, 2, pages, devState(2, 100), 0)); !errors.Is(err, ErrBadCheckpoint) {
		t.Fatalf("checkpoint past the end of RAM: %v, want ErrBadCheckpoint", err)
	}
	// An assembler told the wrong RAM size still cannot get past Apply.
	cp, err := feed(NewCheckpointAssembler(2*testRAMSize, 1, 0), checkpointFrames(t, 2, pages, devState(2, 100), 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Apply(cp); !errors.Is(err, ErrBadCheckpoint) {
		t.Fatalf("Apply past the end of RAM: %v, want ErrBadCheckpoint", err)
	}
	before.mustEqual(t, take(t, r))
	if !r.Usable() {
		t.Fatal("a refused checkpoint made the replica unusable")
	}
	if err := r.BeginSync(); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteSyncPages(pages); err == nil {
		t.Fatal("sync page past the end of RAM accepted")
	}
	if fi, _ := os.Stat(r.RAMPath()); fi.Size() != testRAMSize {
		t.Fatalf("ram file grew to %d bytes", fi.Size())
	}
}

func TestReplicaRefusesOversizedCheckpoint(t *testing.T) {
	r := syncedReplica(t, t.TempDir())
	before := take(t, r)
	_, err := feed(r.NewAssembler(8*PageSize), checkpointFrames(t, 2, testPages(8, 0), devState(2, 100), 0))
	if !errors.Is(err, ErrCheckpointTooLarge) {
		t.Fatalf("checkpoint over the bound: %v, want ErrCheckpointTooLarge", err)
	}
	before.mustEqual(t, take(t, r))
}

func TestReplicaRefusesOldEpoch(t *testing.T) {
	r := syncedReplica(t, t.TempDir())
	a := r.NewAssembler(0)
	frames2 := checkpointFrames(t, 2, testPages(1, 9), devState(2, 100), 0)
	cp2, err := feed(a, frames2)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Apply(cp2); err != nil {
		t.Fatal(err)
	}
	before := take(t, r)
	for _, epoch := range []uint64{1, 2} {
		frames := checkpointFrames(t, epoch, testPages(1, 30), devState(epoch, 100), 0)
		if _, err := feed(r.NewAssembler(0), frames); !errors.Is(err, ErrStaleEpoch) {
			t.Errorf("replayed checkpoint %d: %v, want ErrStaleEpoch", epoch, err)
		}
	}
	// The same verified checkpoint applied twice.
	if err := r.Apply(cp2); !errors.Is(err, ErrStaleEpoch) {
		t.Errorf("checkpoint 2 applied again: %v, want ErrStaleEpoch", err)
	}
	before.mustEqual(t, take(t, r))
}

func TestReplicaApplyOrder(t *testing.T) {
	dir := t.TempDir()
	r, err := OpenReplica(dir, testRAMSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cp, err := feed(NewCheckpointAssembler(testRAMSize, 0, 0), checkpointFrames(t, 1, testPages(1, 0), devState(1, 10), 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Apply(cp); !errors.Is(err, ErrNotSynced) {
		t.Fatalf("checkpoint before any sync: %v, want ErrNotSynced", err)
	}
	if err := r.WriteSyncPages(testPages(1, 0)); !errors.Is(err, ErrNotSynced) {
		t.Fatalf("sync pages before BeginSync: %v, want ErrNotSynced", err)
	}
	if err := r.BeginSync(); err != nil {
		t.Fatal(err)
	}
	if err := r.Apply(cp); !errors.Is(err, ErrNotSynced) {
		t.Fatalf("checkpoint before SyncDone: %v, want ErrNotSynced", err)
	}
	if err := r.FinishSync(SyncDone{RAMSize: testRAMSize, Pages: 3}); err == nil {
		t.Fatal("SyncDone counting pages that never came accepted")
	}
	if err := r.FinishSync(SyncDone{RAMSize: 2 * testRAMSize}); !errors.Is(err, ErrRAMSizeMismatch) {
		t.Fatalf("SyncDone of another RAM size: %v, want ErrRAMSizeMismatch", err)
	}
	if err := r.Apply(&Checkpoint{epoch: 1}); !errors.Is(err, ErrBadCheckpoint) {
		t.Fatalf("unverified checkpoint: %v, want ErrBadCheckpoint", err)
	}
	if err := r.Apply(nil); !errors.Is(err, ErrBadCheckpoint) {
		t.Fatalf("nil checkpoint: %v, want ErrBadCheckpoint", err)
	}
	if err := r.FinishSync(SyncDone{RAMSize: testRAMSize}); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteSyncPages(testPages(1, 0)); !errors.Is(err, ErrNotSynced) {
		t.Fatalf("sync pages after SyncDone: %v, want ErrNotSynced", err)
	}
	if err := r.Apply(cp); err != nil {
		t.Fatal(err)
	}
	if !r.Usable() {
		t.Fatal("not usable after sync and checkpoint")
	}
}

func TestReplicaCrashDuringApply(t *testing.T) {
	for _, stage := range []string{"applying", "pages", "devstate"} {
		t.Run(stage, func(t *testing.T) {
			dir := t.TempDir()
			r := syncedReplica(t, dir)
			crash := errors.New("simulated crash")
			r.crash = func(s string) error {
				if s == stage {
					return crash
				}
				return nil
			}
			cp, err := feed(r.NewAssembler(0), checkpointFrames(t, 2, testPages(4, 50), devState(2, 7000), 0))
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Apply(cp); !errors.Is(err, crash) {
				t.Fatalf("Apply = %v, want the simulated crash", err)
			}
			// The running replica knows it is torn…
			if r.Usable() {
				t.Fatal("usable after an apply that stopped midway")
			}
			if e, p := r.Committed(); e != 0 || p != "" {
				t.Fatalf("torn replica claims epoch %d at %q", e, p)
			}
			if err := r.BeginSync(); !errors.Is(err, ErrReplicaTorn) {
				t.Fatalf("BeginSync on a torn replica: %v, want ErrReplicaTorn", err)
			}
			r.Close()

			// …and so does the next axd.
			if _, err := OpenReplica(dir, testRAMSize); !errors.Is(err, ErrReplicaTorn) {
				t.Fatalf("reopening: %v, want ErrReplicaTorn", err)
			}
			r, err = ResetReplica(dir, testRAMSize)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Usable() {
				t.Fatal("reset replica usable")
			}
			if s := take(t, r); !bytes.Equal(s.ram, make([]byte, testRAMSize)) {
				t.Fatal("reset replica's RAM not zeroed")
			}
			if _, err := os.Stat(filepath.Join(dir, devStateFile)); !os.IsNotExist(err) {
				t.Fatalf("reset replica kept its device state: %v", err)
			}
		})
	}
}

func TestOpenReplicaRefuses(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		size  int64
		want  error
	}{
		{"interrupted initial sync", func(t *testing.T, dir string) {
			r, _ := OpenReplica(dir, testRAMSize)
			r.BeginSync()
			r.WriteSyncPages(testPages(3, 0))
			r.Close()
		}, testRAMSize, ErrReplicaTorn},
		{"sync done, no checkpoint", func(t *testing.T, dir string) {
			r, _ := OpenReplica(dir, testRAMSize)
			r.BeginSync()
			r.FinishSync(SyncDone{RAMSize: testRAMSize})
			r.Close()
		}, testRAMSize, ErrReplicaTorn},
		{"unreadable state", func(t *testing.T, dir string) {
			syncedReplica(t, dir).Close()
			os.WriteFile(filepath.Join(dir, stateFile), []byte(`{"state":"comm`), 0o600)
		}, testRAMSize, ErrReplicaTorn},
		{"unknown state", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			os.WriteFile(filepath.Join(dir, stateFile), []byte(`{"version":1,"ram_size":262144,"state":"fine"}`), 0o600)
		}, testRAMSize, ErrReplicaTorn},
		{"committed without device state", func(t *testing.T, dir string) {
			syncedReplica(t, dir).Close()
			os.Remove(filepath.Join(dir, devStateFile))
		}, testRAMSize, ErrReplicaTorn},
		{"committed with a short ram file", func(t *testing.T, dir string) {
			syncedReplica(t, dir).Close()
			os.Truncate(filepath.Join(dir, ramFile), testRAMSize-PageSize)
		}, testRAMSize, ErrReplicaTorn},
		{"another ram size", func(t *testing.T, dir string) {
			syncedReplica(t, dir).Close()
		}, 2 * testRAMSize, ErrRAMSizeMismatch},
		{"ram size not whole pages", func(t *testing.T, dir string) {}, testRAMSize + 1, nil},
		{"no ram", func(t *testing.T, dir string) {}, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "vm")
			tc.setup(t, dir)
			r, err := OpenReplica(dir, tc.size)
			if err == nil {
				r.Close()
				t.Fatal("opened")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("OpenReplica = %v, want %v", err, tc.want)
			}
			t.Logf("OpenReplica: %v", err)
		})
	}
}
