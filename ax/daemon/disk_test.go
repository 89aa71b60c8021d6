package daemon

import (
	"bytes"
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/replication"
)

func readDisk(t *testing.T, r *replicaDisks, i int, off, n int64) []byte {
	t.Helper()
	b, err := os.ReadFile(replicaDiskPath(r.dir, i))
	if err != nil {
		t.Fatal(err)
	}
	return b[off : off+n]
}

// The secondary's disks: applied at once before FT and at HA, held at FT
// until the epoch commits (in memory, or in the journal when the stage has
// no room); leaving FT applies what is held; a resume drops uncommitted
// epochs and a fresh boot keeps every write.
func TestReplicaDisksLevels(t *testing.T) {
	for _, tc := range []struct {
		resume bool
		limit  int64
	}{{true, defaultStageLimit}, {false, defaultStageLimit}, {true, 0}, {false, 0}} {
		resume := tc.resume
		r, err := openReplicaDisks(t.TempDir(), []int64{1 << 16, 1 << 16})
		if err != nil {
			t.Fatal(err)
		}
		r.stageLimit = tc.limit
		w := func(epoch uint64, disk uint32, off uint64, s string) {
			t.Helper()
			if err := r.Write(epoch, replication.DiskWrite{Disk: disk, Offset: off, Data: []byte(s)}); err != nil {
				t.Fatal(err)
			}
		}
		w(0, 0, 0, "sync") // during the initial sync: at once
		if got := readDisk(t, r, 0, 0, 4); string(got) != "sync" {
			t.Fatalf("initial-sync write not applied: %q", got)
		}
		r.SetLevel(replication.StreamLevelFT)
		w(5, 1, 100, "e5")
		w(6, 1, 200, "e6")
		if got := readDisk(t, r, 1, 100, 2); !bytes.Equal(got, []byte{0, 0}) {
			t.Fatalf("FT write applied before its commit: %q", got)
		}
		if err := r.Commit(5); err != nil {
			t.Fatal(err)
		}
		if got := readDisk(t, r, 1, 100, 2); string(got) != "e5" {
			t.Fatalf("epoch 5 not applied on commit: %q", got)
		}
		if d := r.depth(); d.Records != 1 {
			t.Fatalf("journal depth %+v, want the one write of epoch 6", d)
		}
		if err := r.prepare(resume); err != nil {
			t.Fatal(err)
		}
		want := []byte("e6")
		if resume {
			want = []byte{0, 0} // the guest resumes at epoch 5: epoch 6 never happened
		}
		if got := readDisk(t, r, 1, 200, 2); !bytes.Equal(got, want) {
			t.Fatalf("resume=%v: epoch 6 write reads %q, want %q", resume, got, want)
		}
		r.Close()
		r.Close()
		if err := r.Write(7, replication.DiskWrite{Data: []byte("x")}); err == nil {
			t.Fatal("write after close accepted")
		}
	}
}

func TestReplicaDisksLeavingFTAppliesJournal(t *testing.T) {
	for _, limit := range []int64{defaultStageLimit, 0} {
		replicaDisksLeavingFT(t, limit)
	}
}

func replicaDisksLeavingFT(t *testing.T, limit int64) {
	r, err := openReplicaDisks(t.TempDir(), []int64{4096})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.stageLimit = limit
	r.SetLevel(replication.StreamLevelFT)
	r.Write(3, replication.DiskWrite{Offset: 10, Data: []byte("held")})
	if err := r.SetLevel(replication.StreamLevelHA); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 10, 4); string(got) != "held" {
		t.Fatalf("leaving FT did not apply the journal: %q", got)
	}
	r.Write(0, replication.DiskWrite{Offset: 20, Data: []byte("now")})
	if got := readDisk(t, r, 0, 20, 3); string(got) != "now" {
		t.Fatalf("HA write not applied at once: %q", got)
	}
	for _, bad := range []replication.DiskWrite{
		{Disk: 1, Data: []byte("x")},
		{Offset: 4095, Data: []byte("xy")},
	} {
		if err := r.Write(0, bad); err == nil || !strings.Contains(err.Error(), "disk") {
			t.Errorf("write %d@%d accepted: %v", bad.Disk, bad.Offset, err)
		}
	}
}

// When the stage is full, FT writes go to the journal, and stay there until
// the journal is empty again, so writes to the same block are applied in
// the order they came whichever holds them.
func TestReplicaDisksStageSpillsToJournal(t *testing.T) {
	r, err := openReplicaDisks(t.TempDir(), []int64{1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.stageLimit = 8 << 10 // two 4 KiB writes
	r.SetLevel(replication.StreamLevelFT)
	block := func(c byte) []byte { return bytes.Repeat([]byte{c}, 4096) }
	w := func(epoch, off uint64, c byte) {
		t.Helper()
		if err := r.Write(epoch, replication.DiskWrite{Offset: off, Data: block(c)}); err != nil {
			t.Fatal(err)
		}
	}
	at := func(off int64) byte { t.Helper(); return readDisk(t, r, 0, off, 1)[0] }
	commit := func(epoch uint64) {
		t.Helper()
		if err := r.Commit(epoch); err != nil {
			t.Fatal(err)
		}
	}
	w(5, 0, 'a')
	w(5, 4096, 'b')
	w(6, 0, 'c') // the stage is full: journaled
	if len(r.stage) != 2 || r.journal.Depth().Records != 1 {
		t.Fatalf("stage %d, journal %d; want 2 and 1", len(r.stage), r.journal.Depth().Records)
	}
	if d := r.depth(); d.Records != 3 || d.Bytes != 3*4096 || d.OldestEpoch != 5 || d.NewestEpoch != 6 {
		t.Fatalf("depth %+v", d)
	}
	commit(5)
	if at(0) != 'a' || at(4096) != 'b' {
		t.Fatalf("epoch 5 not applied: %c %c", at(0), at(4096))
	}
	w(7, 0, 'd') // the stage has room, but the journal holds an earlier write
	if len(r.stage) != 0 || r.journal.Depth().Records != 2 {
		t.Fatalf("stage %d, journal %d; want 0 and 2", len(r.stage), r.journal.Depth().Records)
	}
	commit(6)
	if at(0) != 'c' {
		t.Fatalf("epoch 6 reads %c at 0, want c", at(0))
	}
	commit(7)
	if at(0) != 'd' {
		t.Fatalf("epoch 7 reads %c at 0, want d", at(0))
	}
	w(8, 0, 'e') // the journal is empty: staged again
	if len(r.stage) != 1 {
		t.Fatalf("stage %d after the journal emptied, want 1", len(r.stage))
	}
	if err := r.Write(7, replication.DiskWrite{Offset: 0, Data: block('x')}); err == nil {
		t.Fatal("a write of a committed epoch was accepted")
	}
	if err := r.Commit(7); err == nil {
		t.Fatal("a second commit of epoch 7 was accepted")
	}
	if err := r.prepare(true); err != nil {
		t.Fatal(err)
	}
	if at(0) != 'd' || r.depth().Records != 0 || r.stageBytes != 0 {
		t.Fatalf("resume kept uncommitted epoch 8: reads %c, depth %+v, stage bytes %d", at(0), r.depth(), r.stageBytes)
	}
}

// A zero range punches a hole in the replica below FT (the replica stays
// sparse) and is refused past the disk's end; at FT it is held like a write
// until its checkpoint commits — staged, or journaled as zero data behind
// writes already journaled — and dropped by a resume before that.
func TestReplicaDisksZeroPunchesHoles(t *testing.T) {
	r, err := openReplicaDisks(t.TempDir(), []int64{4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.SetLevel(replication.StreamLevelHA)
	if err := r.Write(0, replication.DiskWrite{Offset: 0, Data: bytes.Repeat([]byte{7}, 4<<20)}); err != nil {
		t.Fatal(err)
	}
	allocated := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(replicaDiskPath(r.dir, 0), &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	full := allocated()
	if err := r.Zero(0, replication.DiskZero{Offset: 1 << 20, Length: 2 << 20}); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 1<<20, 2<<20); !bytes.Equal(got, make([]byte, 2<<20)) {
		t.Fatal("the zeroed range does not read as zeroes")
	}
	if got := readDisk(t, r, 0, 3<<20, 1); got[0] != 7 {
		t.Fatal("the zero range reached past its end")
	}
	if now := allocated(); now > full-(2<<20) {
		t.Errorf("the replica holds %d bytes after 2 MiB were zeroed, %d before: no hole punched", now, full)
	}
	if err := r.Zero(0, replication.DiskZero{Offset: 3 << 20, Length: 2 << 20}); err == nil {
		t.Error("a zero range past the disk's end was accepted")
	}
	r.SetLevel(replication.StreamLevelFT)
	if err := r.Zero(5, replication.DiskZero{Offset: 3 << 20, Length: 4096}); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 3<<20, 1); got[0] != 7 || len(r.stage) != 1 || r.stageBytes != 0 {
		t.Fatalf("FT zero range: disk reads %d before its commit, stage %d entries / %d bytes", got[0], len(r.stage), r.stageBytes)
	}
	if err := r.Commit(5); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 3<<20, 4097); !bytes.Equal(got[:4096], make([]byte, 4096)) || got[4096] != 7 {
		t.Fatal("the FT zero range was not applied at its commit, or reached past its end")
	}
	// Behind a journaled write, the range is journaled too, in order.
	r.stageLimit = 0
	if err := r.Write(6, replication.DiskWrite{Offset: 0, Data: []byte{9}}); err != nil {
		t.Fatal(err)
	}
	if err := r.Zero(6, replication.DiskZero{Offset: 0, Length: 8192}); err != nil {
		t.Fatal(err)
	}
	if len(r.stage) != 0 || r.journal.Depth().Records != 2 {
		t.Fatalf("stage %d, journal %d; want 0 and 2", len(r.stage), r.journal.Depth().Records)
	}
	if err := r.Commit(6); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 0, 1); got[0] != 0 {
		t.Fatalf("the zero range journaled after a write reads %d, want 0", got[0])
	}
	r.stageLimit = defaultStageLimit
	if err := r.Zero(7, replication.DiskZero{Offset: 3 << 20, Length: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := r.Zero(6, replication.DiskZero{Offset: 0, Length: 1}); err == nil {
		t.Error("a zero range of a committed epoch was accepted")
	}
	if err := r.prepare(true); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 3<<20+8192, 1); got[0] != 7 {
		t.Fatal("a resume applied the zero range of an uncommitted epoch")
	}
}

// wantRangeHashes hashes a replica disk the plain way: the whole file read,
// each range hashed.
func wantRangeHashes(t *testing.T, r *replicaDisks, i int) []uint64 {
	t.Helper()
	b := readDisk(t, r, i, 0, r.sizes[i])
	var hs []uint64
	for off := 0; off < len(b); off += replication.DiskBaseRange {
		hs = append(hs, dirty.PageHash(b[off:min(off+replication.DiskBaseRange, len(b))]))
	}
	return hs
}

// The base of a disk sync: one hash per range of each replica disk as the
// files hold them — written data, holes (never written, or punched) that
// read as zeroes, a short last range — kept when the disks are opened by
// the next stream.
func TestReplicaDisksRangeHashes(t *testing.T) {
	const r64 = replication.DiskBaseRange
	dir := t.TempDir()
	sizes := []int64{4*hashChunk + 5*r64 + 1000, 1000, 2 * r64} // chunk 3 of disk 0 is a hole
	r, err := openReplicaDisks(dir, sizes)
	if err != nil {
		t.Fatal(err)
	}
	r.SetLevel(replication.StreamLevelHA)
	data := func(c byte, n int) []byte { return bytes.Repeat([]byte{c}, n) }
	for _, w := range []replication.DiskWrite{
		{Disk: 0, Offset: 0, Data: data(1, 2*r64)},                             // two whole ranges
		{Disk: 0, Offset: 5*r64 + 4096, Data: data(2, 4096)},                   // a page in a hole
		{Disk: 0, Offset: hashChunk - 10, Data: data(3, 20)},                   // across two chunks
		{Disk: 0, Offset: uint64(sizes[0]) - 500, Data: data(4, 500)},          // the short last range
		{Disk: 0, Offset: 2*hashChunk + 7*r64, Data: data(5, hashChunk/2)},     // punched below
		{Disk: 2, Offset: 0, Data: append(data(6, r64), make([]byte, r64)...)}, // zeroes written
	} {
		if err := r.Write(0, w); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Zero(0, replication.DiskZero{Disk: 0, Offset: 2*hashChunk + 8*r64, Length: 4 * r64}); err != nil {
		t.Fatal(err)
	}
	check := func(r *replicaDisks) {
		t.Helper()
		got, err := r.RangeHashes(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(sizes) {
			t.Fatalf("hashes of %d disks, want %d", len(got), len(sizes))
		}
		for i := range sizes {
			if want := wantRangeHashes(t, r, i); !slices.Equal(got[i], want) {
				t.Errorf("disk %d: %d hashes, want %d: %x, want %x", i, len(got[i]), len(want), got[i], want)
			}
			if uint64(len(got[i])) != replication.DiskRanges(sizes[i]) {
				t.Errorf("disk %d: %d hashes for %d bytes", i, len(got[i]), sizes[i])
			}
		}
		zero := dirty.PageHash(make([]byte, r64))
		if got[0][2] != zero || got[0][hashChunk/r64+2] != zero || got[0][3*hashChunk/r64+9] != zero || got[2][1] != zero {
			t.Error("a range of zeroes does not hash as zeroes")
		}
		if got[1][0] != dirty.PageHash(make([]byte, 1000)) {
			t.Error("the short range of an empty disk does not hash as its 1000 zeroes")
		}
	}
	check(r)
	r.Close()
	if _, err := r.RangeHashes(context.Background()); err == nil {
		t.Error("closed disks hashed")
	}
	// The next stream opens the same files: they are its base.
	r, err = openReplicaDisks(dir, sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	check(r)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.RangeHashes(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("hashing after its context ended: %v", err)
	}
}
