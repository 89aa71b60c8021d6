package replication

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

// journalMemDisk is a replica disk in memory of at most limit bytes; it
// records syncs and can be made to fail.
type journalMemDisk struct {
	mu    sync.Mutex
	data  []byte
	limit int64
	syncs int
	fail  error
}

func newJournalMemDisk() *journalMemDisk { return &journalMemDisk{limit: 1 << 20} }

func (d *journalMemDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fail != nil {
		return 0, d.fail
	}
	if off < 0 || off+int64(len(p)) > d.limit {
		return 0, fmt.Errorf("write of %d bytes at %d beyond the %d-byte test disk", len(p), off, d.limit)
	}
	if end := int(off) + len(p); end > len(d.data) {
		d.data = append(d.data, make([]byte, end-len(d.data))...)
	}
	copy(d.data[off:], p)
	return len(p), nil
}

func (d *journalMemDisk) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.syncs++
	return d.fail
}

func (d *journalMemDisk) bytes() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.data)
}

type journalTestDisks [2]*journalMemDisk

func newJournalTestDisks() journalTestDisks {
	return journalTestDisks{newJournalMemDisk(), newJournalMemDisk()}
}

func (ds journalTestDisks) m() map[uint32]JournalDisk {
	return map[uint32]JournalDisk{0: ds[0], 1: ds[1]}
}

func (ds journalTestDisks) images() [2][]byte { return [2][]byte{ds[0].bytes(), ds[1].bytes()} }

func sameJournalImages(a, b [2][]byte) bool {
	return bytes.Equal(a[0], b[0]) && bytes.Equal(a[1], b[1])
}

// runOps runs ops on j, in order.
func runOps(t testing.TB, j *Journal, ops []journalOp) {
	t.Helper()
	for _, op := range ops {
		if err := op.run(j); err != nil {
			t.Fatalf("%+v: %v", op, err)
		}
	}
}

func openTestJournal(t testing.TB, path string, ds journalTestDisks) *Journal {
	t.Helper()
	j, err := OpenJournal(path, ds.m())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

// journalOp is one step of a scripted journal: a write when data is set,
// else a commit.
type journalOp struct {
	epoch  uint64
	disk   uint32
	offset uint64
	data   string
}

func (op journalOp) isWrite() bool { return op.data != "" }

func (op journalOp) run(j *Journal) error {
	if op.isWrite() {
		return j.Append(op.epoch, DiskWrite{Disk: op.disk, Offset: op.offset, Data: []byte(op.data)})
	}
	return j.Commit(op.epoch)
}

func jw(epoch uint64, disk uint32, offset uint64, data string) journalOp {
	return journalOp{epoch: epoch, disk: disk, offset: offset, data: data}
}

func jc(epoch uint64) journalOp { return journalOp{epoch: epoch} }

// journalModel is what a journal of ops should hold: the disks with the
// committed writes applied in order, the pending writes, the committed epoch.
type journalModel struct {
	images    [2][]byte
	committed uint64
	pending   []journalOp
}

func modelJournal(ops []journalOp, applyAll bool) journalModel {
	var m journalModel
	for _, op := range ops {
		if !op.isWrite() {
			m.committed = op.epoch
		}
	}
	for _, op := range ops {
		if !op.isWrite() {
			continue
		}
		if op.epoch > m.committed && !applyAll {
			m.pending = append(m.pending, op)
			continue
		}
		img := &m.images[op.disk]
		if end := int(op.offset) + len(op.data); end > len(*img) {
			*img = append(*img, make([]byte, end-len(*img))...)
		}
		copy((*img)[op.offset:], op.data)
	}
	return m
}

func (m journalModel) check(t *testing.T, j *Journal, ds journalTestDisks) {
	t.Helper()
	if got := ds.images(); !sameJournalImages(got, m.images) {
		t.Errorf("disks hold %q, want %q", got, m.images)
	}
	if got := j.Committed(); got != m.committed {
		t.Errorf("committed %d, want %d", got, m.committed)
	}
	want := JournalDepth{Records: len(m.pending)}
	for _, op := range m.pending {
		want.Bytes += int64(len(op.data))
	}
	if len(m.pending) > 0 {
		want.OldestEpoch, want.NewestEpoch = m.pending[0].epoch, m.pending[len(m.pending)-1].epoch
	}
	got := j.Depth()
	got.FileBytes = 0
	if got != want {
		t.Errorf("depth %+v, want %+v", got, want)
	}
}

// journalScript exercises overlapping writes, two disks, a commit with a
// later epoch's writes before it, and writes left pending at the end.
var journalScript = []journalOp{
	jw(1, 0, 0, "aaaaaaaa"),
	jw(1, 1, 8, "bbbb"),
	jw(1, 0, 2, "cc"),
	jw(2, 0, 4, "dddddd"),
	jc(1),
	jw(2, 1, 0, "eeeeeeeeeeee"),
	jc(2),
	jw(3, 0, 1, "f"),
	jw(4, 1, 10, "gggg"),
	jc(3),
	jw(4, 0, 0, "hh"),
	jw(5, 1, 0, "iii"),
}

// writeJournalScript runs ops against a fresh journal at path that never
// compacts, and returns where each op's record ends in the file.
func writeJournalScript(t testing.TB, path string, ops []journalOp) []int64 {
	t.Helper()
	ds := newJournalTestDisks()
	j, err := OpenJournal(path, ds.m())
	if err != nil {
		t.Fatal(err)
	}
	j.compactAt = math.MaxInt64
	ends := make([]int64, len(ops))
	for i, op := range ops {
		if err := op.run(j); err != nil {
			t.Fatalf("op %d %+v: %v", i, op, err)
		}
		ends[i] = j.Depth().FileBytes
	}
	if err := j.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	return ends
}

func TestJournalCommitApplies(t *testing.T) {
	tests := []struct {
		name string
		ops  []journalOp
	}{
		{"nothing committed", []journalOp{jw(1, 0, 0, "a"), jw(2, 1, 0, "b")}},
		{"commit applies its epoch only", []journalOp{jw(1, 0, 0, "aaaa"), jw(2, 0, 1, "b"), jc(1)}},
		{"commit applies earlier epochs", []journalOp{jw(1, 0, 0, "aa"), jw(2, 1, 0, "bb"), jw(3, 0, 4, "c"), jc(2)}},
		{"commit of an epoch without writes", []journalOp{jw(1, 0, 0, "a"), jc(1), jc(2), jw(3, 0, 0, "b")}},
		{"the last epoch there is", []journalOp{jw(1, 0, 0, "a"), jw(math.MaxUint64, 1, 0, "b"), jc(math.MaxUint64)}},
		{"overlapping writes keep arrival order", []journalOp{jw(1, 0, 0, "AAAA"), jw(1, 0, 2, "BB"), jw(2, 0, 0, "C"), jw(2, 0, 3, "DDD"), jc(2)}},
		{"later write in the same epoch wins", []journalOp{jw(1, 0, 0, "xxxx"), jw(1, 0, 0, "yy"), jc(1)}},
		{"script", journalScript},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ds := newJournalTestDisks()
			path := filepath.Join(t.TempDir(), "journal")
			j := openTestJournal(t, path, ds)
			runOps(t, j, tt.ops)
			m := modelJournal(tt.ops, false)
			m.check(t, j, ds)
			if err := j.Sync(); err != nil {
				t.Fatal(err)
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			// Reopening applies the committed writes again, which changes
			// nothing, and finds the same writes pending.
			j = openTestJournal(t, path, ds)
			m.check(t, j, ds)
		})
	}
}

func TestJournalOverlapOrder(t *testing.T) {
	ds := newJournalTestDisks()
	j := openTestJournal(t, filepath.Join(t.TempDir(), "journal"), ds)
	for _, op := range []journalOp{jw(1, 0, 0, "AAAA"), jw(1, 0, 2, "BB"), jw(2, 0, 0, "C")} {
		if err := op.run(j); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Commit(1); err != nil {
		t.Fatal(err)
	}
	if got := string(ds[0].bytes()); got != "AABB" {
		t.Errorf("after commit 1 the disk holds %q, want AABB: epoch 2 must wait", got)
	}
	if err := j.Commit(2); err != nil {
		t.Fatal(err)
	}
	if got := string(ds[0].bytes()); got != "CABB" {
		t.Errorf("after commit 2 the disk holds %q, want CABB", got)
	}
	if ds[1].syncs != 0 || ds[0].syncs != 2 {
		t.Errorf("disk syncs %d and %d, want 2 and 0: only written disks are synced", ds[0].syncs, ds[1].syncs)
	}
}

func TestJournalAppendCopiesData(t *testing.T) {
	ds := newJournalTestDisks()
	j := openTestJournal(t, filepath.Join(t.TempDir(), "journal"), ds)
	buf := []byte("good")
	if err := j.Append(1, DiskWrite{Disk: 0, Data: buf}); err != nil {
		t.Fatal(err)
	}
	copy(buf, "bad!")
	if err := j.Commit(1); err != nil {
		t.Fatal(err)
	}
	if got := string(ds[0].bytes()); got != "good" {
		t.Errorf("disk holds %q, want the data as appended", got)
	}
}

func TestJournalDiscard(t *testing.T) {
	ds := newJournalTestDisks()
	path := filepath.Join(t.TempDir(), "journal")
	j := openTestJournal(t, path, ds)
	ops := []journalOp{jw(1, 0, 0, "aaaa"), jc(1), jw(2, 0, 0, "bb"), jw(3, 1, 0, "c")}
	runOps(t, j, ops)
	n, err := j.Discard()
	if err != nil || n != 2 {
		t.Fatalf("Discard = %d, %v; want 2 records", n, err)
	}
	want := modelJournal(ops[:2], false)
	want.check(t, j, ds)
	// The resumed guest goes on from epoch 1; its writes journal again.
	if err := j.Append(2, DiskWrite{Disk: 1, Offset: 2, Data: []byte("z")}); err != nil {
		t.Fatalf("append after discard: %v", err)
	}
	if _, err := j.Discard(); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openTestJournal(t, path, ds)
	want.check(t, j, ds)
	if fi, err := os.Stat(path); err != nil || fi.Size() != journalCommitSize {
		t.Errorf("journal after discard: %v, %v; want one commit record", fi.Size(), err)
	}
}

func TestJournalApplyAll(t *testing.T) {
	tests := []struct {
		name string
		ops  []journalOp
	}{
		{"never committed", []journalOp{jw(1, 0, 0, "aaaa"), jw(1, 0, 1, "b"), jw(2, 1, 0, "cc"), jw(3, 0, 0, "d")}},
		{"after a commit", []journalOp{jw(1, 0, 0, "aaaa"), jc(1), jw(2, 0, 1, "b"), jw(3, 1, 0, "cc")}},
		{"nothing pending", []journalOp{jw(1, 0, 0, "aaaa"), jc(1)}},
		{"empty", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ds := newJournalTestDisks()
			path := filepath.Join(t.TempDir(), "journal")
			j := openTestJournal(t, path, ds)
			runOps(t, j, tt.ops)
			newest := j.Committed()
			if d := j.Depth(); d.Records > 0 {
				newest = d.NewestEpoch
			}
			if err := j.ApplyAll(); err != nil {
				t.Fatal(err)
			}
			want := modelJournal(tt.ops, true)
			want.committed = newest
			want.check(t, j, ds)
			j.Close()
			j = openTestJournal(t, path, ds)
			want.check(t, j, ds)
		})
	}
}

// TestJournalCrashAtEveryByte cuts a journal at every byte, as a crash
// before the data reached the disk could, and reopens it: the journal must
// come back as the state after the whole records in the cut file, never
// applying an epoch whose commit record is not whole.
func TestJournalCrashAtEveryByte(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full")
	ends := writeJournalScript(t, full, journalScript)
	data, err := os.ReadFile(full)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) != ends[len(ends)-1] {
		t.Fatalf("journal of %d bytes, records end at %d", len(data), ends[len(ends)-1])
	}
	for cut := 0; cut <= len(data); cut++ {
		whole := 0
		for whole < len(ends) && ends[whole] <= int64(cut) {
			whole++
		}
		valid := int64(0)
		if whole > 0 {
			valid = ends[whole-1]
		}
		t.Run(fmt.Sprint(cut), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "journal")
			if err := os.WriteFile(path, data[:cut], 0o600); err != nil {
				t.Fatal(err)
			}
			ds := newJournalTestDisks()
			j := openTestJournal(t, path, ds)
			want := modelJournal(journalScript[:whole], false)
			want.check(t, j, ds)
			rec := j.Recovered()
			if int64(cut) != valid && (rec.TruncatedAt != valid || rec.TruncatedBytes != int64(cut)-valid || rec.Reason == "") {
				t.Errorf("recovery %+v, want the tail cut at %d", rec, valid)
			}
			if int64(cut) == valid && rec.TruncatedAt != -1 {
				t.Errorf("recovery %+v of a whole journal", rec)
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			if fi, err := os.Stat(path); err != nil || fi.Size() != valid {
				t.Fatalf("journal of %d bytes after recovery, want %d", fi.Size(), valid)
			}
			// The same disks, already holding the committed writes,
			// reopen to the same state; then the HA path applies the rest.
			j = openTestJournal(t, path, ds)
			want.check(t, j, ds)
			if err := j.ApplyAll(); err != nil {
				t.Fatal(err)
			}
			all := modelJournal(journalScript[:whole], true)
			if got := ds.images(); !sameJournalImages(got, all.images) {
				t.Errorf("after ApplyAll disks hold %q, want %q", got, all.images)
			}
		})
	}
}

// TestJournalFlippedBit flips a bit in every byte of a journal in turn: the
// record holding it fails its checksum and the file is cut there.
func TestJournalFlippedBit(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full")
	ends := writeJournalScript(t, full, journalScript)
	data, err := os.ReadFile(full)
	if err != nil {
		t.Fatal(err)
	}
	for i := range data {
		rec := 0
		for ends[rec] <= int64(i) {
			rec++
		}
		start := int64(0)
		if rec > 0 {
			start = ends[rec-1]
		}
		for _, bit := range []byte{0x01, 0x80} {
			path := filepath.Join(t.TempDir(), "journal")
			bad := bytes.Clone(data)
			bad[i] ^= bit
			if err := os.WriteFile(path, bad, 0o600); err != nil {
				t.Fatal(err)
			}
			ds := newJournalTestDisks()
			j, err := OpenJournal(path, ds.m())
			if err != nil {
				t.Fatalf("byte %d bit %#x: %v", i, bit, err)
			}
			if r := j.Recovered(); r.TruncatedAt != start || r.TruncatedBytes != int64(len(data))-start {
				t.Errorf("byte %d bit %#x (record %d at %d): recovery %+v", i, bit, rec, start, r)
			}
			modelJournal(journalScript[:rec], false).check(t, j, ds)
			j.Close()
		}
	}
}

// journalRecord encodes one record, for crafting journals by hand.
func journalRecord(kind byte, epoch uint64, disk uint32, offset uint64, data string) []byte {
	b := make([]byte, journalHeaderSize, journalHeaderSize+len(data)+journalTrailerSize)
	journalPutHeader(b, kind, epoch, disk, uint32(len(data)), offset)
	b = append(b, data...)
	return le.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func journalWrite(epoch uint64, disk uint32, offset uint64, data string) []byte {
	return journalRecord(journalKindWrite, epoch, disk, offset, data)
}

func journalCommit(epoch uint64) []byte { return journalRecord(journalKindCommit, epoch, 0, 0, "") }

func TestJournalOpenRejects(t *testing.T) {
	tests := []struct {
		name    string
		records [][]byte
		want    error
	}{
		{"commit not after the last", [][]byte{journalCommit(2), journalCommit(2)}, ErrJournalCorrupt},
		{"commit going back", [][]byte{journalCommit(3), journalCommit(2)}, ErrJournalCorrupt},
		{"commit of epoch 0", [][]byte{journalCommit(0)}, ErrJournalCorrupt},
		{"write of a committed epoch after its commit", [][]byte{journalWrite(1, 0, 0, "a"), journalCommit(1), journalWrite(1, 0, 0, "b")}, ErrJournalCorrupt},
		{"write of epoch 0", [][]byte{journalWrite(0, 0, 0, "a")}, ErrJournalCorrupt},
		{"write epoch going back", [][]byte{journalWrite(3, 0, 0, "a"), journalWrite(2, 0, 0, "b")}, ErrJournalCorrupt},
		{"unknown disk", [][]byte{journalWrite(1, 7, 0, "a")}, ErrJournalUnknownDisk},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "journal")
			content := bytes.Join(tt.records, nil)
			if err := os.WriteFile(path, content, 0o600); err != nil {
				t.Fatal(err)
			}
			ds := newJournalTestDisks()
			j, err := OpenJournal(path, ds.m())
			if !errors.Is(err, tt.want) {
				t.Fatalf("OpenJournal = %v, want %v", err, tt.want)
			}
			if j != nil {
				t.Fatal("journal returned with an error")
			}
			if got, _ := os.ReadFile(path); !bytes.Equal(got, content) {
				t.Error("a journal that was refused was changed")
			}
			if !sameJournalImages(ds.images(), [2][]byte{}) {
				t.Error("a journal that was refused was applied")
			}
		})
	}
}

// TestJournalTornTail checks records that fail before their checksum does.
func TestJournalTornTail(t *testing.T) {
	good := journalWrite(1, 0, 0, "abc")
	huge := journalWrite(1, 0, 0, "x")
	le.PutUint32(huge[20:], JournalMaxWrite+1)
	zeroLen := journalWrite(1, 0, 0, "x")
	le.PutUint32(zeroLen[20:], 0)
	overflow := journalWrite(1, 0, math.MaxInt64, "x")
	kind := journalRecord(9, 1, 0, 0, "x")
	reserved := journalWrite(1, 0, 0, "x")
	reserved[6] = 1
	commitWithData := journalRecord(journalKindCommit, 2, 0, 0, "x")
	tests := []struct {
		name string
		tail []byte
	}{
		{"zeros", make([]byte, 100)},
		{"length beyond the bound", huge},
		{"write without data", zeroLen},
		{"offset overflow", overflow},
		{"unknown kind", kind},
		{"reserved bytes", reserved},
		{"commit with data", commitWithData},
		{"short header", good[:10]},
		{"runs past the end", good[:len(good)-1]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "journal")
			if err := os.WriteFile(path, append(bytes.Clone(good), tt.tail...), 0o600); err != nil {
				t.Fatal(err)
			}
			ds := newJournalTestDisks()
			j := openTestJournal(t, path, ds)
			if r := j.Recovered(); r.TruncatedAt != int64(len(good)) {
				t.Errorf("recovery %+v, want the tail cut at %d", r, len(good))
			}
			if d := j.Depth(); d.Records != 1 || d.FileBytes != int64(len(good)) {
				t.Errorf("depth %+v, want the one good record", d)
			}
		})
	}
}

func TestJournalRejects(t *testing.T) {
	tests := []struct {
		name  string
		setup []journalOp
		op    func(j *Journal) error
		want  error // nil: any error
	}{
		{"unknown disk", nil, func(j *Journal) error {
			return j.Append(1, DiskWrite{Disk: 2, Data: []byte("a")})
		}, ErrJournalUnknownDisk},
		{"write of the committed epoch", []journalOp{jc(3)}, func(j *Journal) error {
			return j.Append(3, DiskWrite{Data: []byte("a")})
		}, ErrJournalEpoch},
		{"write before the committed epoch", []journalOp{jc(3)}, func(j *Journal) error {
			return j.Append(1, DiskWrite{Data: []byte("a")})
		}, ErrJournalEpoch},
		{"write of epoch 0", nil, func(j *Journal) error {
			return j.Append(0, DiskWrite{Data: []byte("a")})
		}, ErrJournalEpoch},
		{"write epoch going back", []journalOp{jw(5, 0, 0, "a")}, func(j *Journal) error {
			return j.Append(4, DiskWrite{Data: []byte("a")})
		}, ErrJournalEpoch},
		{"commit going back", []journalOp{jc(3)}, func(j *Journal) error { return j.Commit(2) }, ErrJournalEpoch},
		{"commit again", []journalOp{jc(3)}, func(j *Journal) error { return j.Commit(3) }, ErrJournalEpoch},
		{"commit of epoch 0", nil, func(j *Journal) error { return j.Commit(0) }, ErrJournalEpoch},
		{"empty write", nil, func(j *Journal) error {
			return j.Append(1, DiskWrite{Data: nil})
		}, nil},
		{"write beyond the bound", nil, func(j *Journal) error {
			return j.Append(1, DiskWrite{Data: make([]byte, JournalMaxWrite+1)})
		}, nil},
		{"offset overflow", nil, func(j *Journal) error {
			return j.Append(1, DiskWrite{Offset: math.MaxInt64 - 1, Data: []byte("ab")})
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ds := newJournalTestDisks()
			j := openTestJournal(t, filepath.Join(t.TempDir(), "journal"), ds)
			runOps(t, j, tt.setup)
			before := j.Depth()
			err := tt.op(j)
			if err == nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if after := j.Depth(); after != before {
				t.Errorf("a refused call changed the journal from %+v to %+v", before, after)
			}
			// A refusal is no failure: the journal goes on.
			if err := j.Append(j.Committed()+10, DiskWrite{Data: []byte("ok")}); err != nil {
				t.Errorf("append after a refusal: %v", err)
			}
		})
	}
}

// TestJournalDiskFailure: a disk that fails during a commit leaves the
// journal unusable; reopening applies the committed writes again.
func TestJournalDiskFailure(t *testing.T) {
	ds := newJournalTestDisks()
	path := filepath.Join(t.TempDir(), "journal")
	j := openTestJournal(t, path, ds)
	if err := j.Append(1, DiskWrite{Disk: 1, Data: []byte("data")}); err != nil {
		t.Fatal(err)
	}
	ds[1].fail = errors.New("EIO")
	if err := j.Commit(1); err == nil {
		t.Fatal("commit to a failing disk succeeded")
	}
	if err := j.Append(2, DiskWrite{Disk: 0, Data: []byte("x")}); err == nil || !errors.Is(err, ds[1].fail) {
		t.Fatalf("append after a failed commit: %v, want the commit's error", err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	ds[1].fail = nil
	j = openTestJournal(t, path, ds)
	if got := string(ds[1].bytes()); got != "data" || j.Committed() != 1 || j.Recovered().Reapplied != 1 {
		t.Errorf("after reopen: disk %q, committed %d, recovery %+v", got, j.Committed(), j.Recovered())
	}
}

// TestJournalChangedOnDisk: a record that no longer matches its checksum
// when Commit reads it back never reaches the disk.
func TestJournalChangedOnDisk(t *testing.T) {
	ds := newJournalTestDisks()
	path := filepath.Join(t.TempDir(), "journal")
	j := openTestJournal(t, path, ds)
	if err := j.Append(1, DiskWrite{Data: []byte("data")}); err != nil {
		t.Fatal(err)
	}
	if err := j.Sync(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt([]byte("D"), journalHeaderSize)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Commit(1); !errors.Is(err, ErrJournalCorrupt) {
		t.Fatalf("commit of a changed record: %v, want ErrJournalCorrupt", err)
	}
	if got := ds[0].bytes(); len(got) != 0 {
		t.Errorf("disk holds %q", got)
	}
}

func TestJournalClosed(t *testing.T) {
	j := openTestJournal(t, filepath.Join(t.TempDir(), "journal"), newJournalTestDisks())
	for range 2 {
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Append(1, DiskWrite{Data: []byte("a")}); !errors.Is(err, os.ErrClosed) {
		t.Errorf("append after close: %v", err)
	}
	if err := j.Commit(1); !errors.Is(err, os.ErrClosed) {
		t.Errorf("commit after close: %v", err)
	}
	if err := j.Sync(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("sync after close: %v", err)
	}
}

// TestJournalCompaction compacts at every commit and checks the pending
// writes carried into the new file still apply where they belong.
func TestJournalCompaction(t *testing.T) {
	ds := newJournalTestDisks()
	path := filepath.Join(t.TempDir(), "journal")
	j := openTestJournal(t, path, ds)
	j.compactAt = 1
	for i, op := range journalScript {
		if err := op.run(j); err != nil {
			t.Fatal(err)
		}
		modelJournal(journalScript[:i+1], false).check(t, j, ds)
	}
	// Only the last commit and the pending writes remain.
	want := int64(journalCommitSize)
	for _, op := range modelJournal(journalScript, false).pending {
		want += journalHeaderSize + int64(len(op.data)) + journalTrailerSize
	}
	if d := j.Depth(); d.FileBytes != want {
		t.Errorf("file of %d bytes after compaction, want %d", d.FileBytes, want)
	}
	j.Close()
	if fi, err := os.Stat(path); err != nil || fi.Size() != want {
		t.Fatalf("journal file: %v, want %d bytes", err, want)
	}
	j = openTestJournal(t, path, ds)
	modelJournal(journalScript, false).check(t, j, ds)
	if err := j.ApplyAll(); err != nil {
		t.Fatal(err)
	}
	if got, all := ds.images(), modelJournal(journalScript, true).images; !sameJournalImages(got, all) {
		t.Errorf("after ApplyAll disks hold %q, want %q", got, all)
	}
}

// TestJournalInterruptedCompaction: a compaction that died before its rename
// leaves a temporary file that must not be mistaken for the journal.
func TestJournalInterruptedCompaction(t *testing.T) {
	path := filepath.Join(t.TempDir(), "journal")
	writeJournalScript(t, path, journalScript)
	if err := os.WriteFile(path+".tmp", journalCommit(99), 0o600); err != nil {
		t.Fatal(err)
	}
	ds := newJournalTestDisks()
	j := openTestJournal(t, path, ds)
	modelJournal(journalScript, false).check(t, j, ds)
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary file left: %v", err)
	}
}

func TestJournalConcurrent(t *testing.T) {
	ds := newJournalTestDisks()
	j := openTestJournal(t, filepath.Join(t.TempDir(), "journal"), ds)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				j.Depth()
				j.Committed()
			}
		}
	})
	for epoch := uint64(1); epoch <= 50; epoch++ {
		if err := j.Append(epoch, DiskWrite{Disk: uint32(epoch % 2), Offset: epoch, Data: []byte{byte(epoch)}}); err != nil {
			t.Fatal(err)
		}
		if err := j.Commit(epoch); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}

// journalFuzzSeeds are journals of every shape; testdata/fuzz/FuzzJournal
// holds the same as a committed corpus.
func journalFuzzSeeds(t testing.TB) map[string][]byte {
	path := filepath.Join(t.TempDir(), "journal")
	writeJournalScript(t, path, journalScript)
	script, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(script)
	flipped[len(flipped)/2] ^= 4
	huge := journalWrite(1, 0, 0, "x")
	le.PutUint32(huge[20:], 1<<31)
	return map[string][]byte{
		"empty":         {},
		"script":        script,
		"torn":          script[:len(script)-3],
		"flipped":       flipped,
		"commit-only":   journalCommit(7),
		"pending-only":  bytes.Join([][]byte{journalWrite(1, 0, 0, "abc"), journalWrite(2, 1, 512, "de")}, nil),
		"base-pending":  bytes.Join([][]byte{journalCommit(4), journalWrite(5, 1, 100, "x"), journalWrite(5, 0, 0, "yy")}, nil),
		"bad-order":     bytes.Join([][]byte{journalWrite(3, 0, 0, "a"), journalCommit(3), journalWrite(2, 0, 0, "b")}, nil),
		"unknown-disk":  journalWrite(1, 5, 0, "a"),
		"beyond-disk":   bytes.Join([][]byte{journalWrite(1, 0, 1<<30, "a"), journalCommit(1)}, nil),
		"zeros":         make([]byte, 64),
		"huge-length":   huge,
		"garbage-after": append(journalCommit(1), "GET / HTTP/1.1\r\n\r\n"...),
		"last-epoch":    bytes.Join([][]byte{journalWrite(1, 0, 0, "a"), journalWrite(math.MaxUint64, 1, 0, "b"), journalCommit(math.MaxUint64)}, nil),
	}
}

func FuzzJournal(f *testing.F) {
	seeds := journalFuzzSeeds(f)
	for _, name := range slices.Sorted(maps.Keys(seeds)) {
		f.Add(seeds[name])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "journal")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		ds := newJournalTestDisks()
		j, err := OpenJournal(path, ds.m())
		if err != nil {
			return
		}
		defer j.Close()
		d, committed := j.Depth(), j.Committed()
		if d.FileBytes > int64(len(data)) || d.Bytes > d.FileBytes || (d.Records == 0) != (d.Bytes == 0) || d.OldestEpoch > d.NewestEpoch {
			t.Fatalf("depth %+v of a %d-byte journal", d, len(data))
		}
		if d.Records > 0 && d.OldestEpoch <= committed {
			t.Fatalf("epoch %d pending, %d committed", d.OldestEpoch, committed)
		}
		images := ds.images()
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		// Recovery is idempotent: a second open finds a whole journal in
		// the same state and leaves the disks as they are.
		j, err = OpenJournal(path, ds.m())
		if err != nil {
			t.Fatalf("reopen after recovery: %v", err)
		}
		defer j.Close()
		if r := j.Recovered(); r.TruncatedAt != -1 {
			t.Fatalf("second open cut the journal again: %+v", r)
		}
		if d2 := j.Depth(); d2 != d || j.Committed() != committed || !sameJournalImages(ds.images(), images) {
			t.Fatalf("reopened as %+v committed %d, was %+v committed %d", d2, j.Committed(), d, committed)
		}
		n, err := j.Discard()
		if err != nil || n != d.Records {
			t.Fatalf("discard = %d, %v; want %d", n, err, d.Records)
		}
		if committed == math.MaxUint64 {
			return // no epoch can follow
		}
		if err := j.Append(committed+1, DiskWrite{Data: []byte("after")}); err != nil {
			t.Fatalf("append after discard: %v", err)
		}
		if err := j.Commit(committed + 1); err != nil {
			t.Fatalf("commit after discard: %v", err)
		}
	})
}

// BenchmarkJournalAppendCommit journals 64 KiB writes to real files and
// commits every 16, fsyncs included: the secondary's disk path per byte.
func BenchmarkJournalAppendCommit(b *testing.B) {
	dir := b.TempDir()
	disk, err := os.OpenFile(filepath.Join(dir, "disk"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer disk.Close()
	j, err := OpenJournal(filepath.Join(dir, "journal"), map[uint32]JournalDisk{0: disk})
	if err != nil {
		b.Fatal(err)
	}
	defer j.Close()
	const size = 64 << 10
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	b.SetBytes(size)
	b.ReportAllocs()
	epoch := uint64(1)
	i := 0
	for b.Loop() {
		// 64 MiB of disk, rewritten in a loop, like a guest's hot set.
		w := DiskWrite{Offset: uint64(i%1024) * size, Data: data}
		if err := j.Append(epoch, w); err != nil {
			b.Fatal(err)
		}
		if i++; i%16 == 0 {
			if err := j.Commit(epoch); err != nil {
				b.Fatal(err)
			}
			epoch++
		}
	}
}
