package daemon

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/replication/bufpool"
)

const r64 = replication.DiskBaseRange

// rangeBase hashes content as a replica's disk base.
func rangeBase(content []byte) []uint64 {
	var hs []uint64
	for off := 0; off < len(content); off += r64 {
		hs = append(hs, dirty.PageHash(content[off:min(off+r64, len(content))]))
	}
	return hs
}

// patterned returns n bytes that differ from range to range.
func patterned(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i/r64)*7 + byte(i%251)
	}
	return b
}

// What a write sends during a sync on a base, step after step on one
// comparison: only the ranges it covers wholly with the base's content are
// skipped, and a range anything was sent for is never skipped again.
func TestDiskResyncFilter(t *testing.T) {
	size := int64(4*r64 + 100) // a short last range
	old := patterned(int(size), 1)
	c := newDiskResync([][]uint64{rangeBase(old)}, []int64{size})
	changed := bytes.Clone(old)
	copy(changed[r64:], bytes.Repeat([]byte{0xee}, r64)) // range 1 differs
	for _, tc := range []struct {
		name string
		off  int64
		p    []byte
		zero int64 // a zero range of this length instead of p
		want string
		disk uint32
	}{
		{name: "the base's content, whole ranges", off: 0, p: old[:2*r64], want: "[]"},
		{name: "one range of two differs", off: 0, p: changed[:2*r64], want: fmt.Sprintf("[{%d %d}]", r64, r64)},
		{name: "the old content where it was sent", off: r64, p: old[r64 : 2*r64], want: fmt.Sprintf("[{%d %d}]", r64, r64)},
		{name: "a range covered partly is sent", off: 2*r64 + 10, p: old[2*r64+10 : 3*r64], want: fmt.Sprintf("[{%d %d}]", 2*r64+10, r64-10)},
		{name: "and then never skipped", off: 2 * r64, p: old[2*r64 : 3*r64], want: fmt.Sprintf("[{%d %d}]", 2*r64, r64)},
		{name: "the short last range", off: 4 * r64, p: old[4*r64:], want: "[]"},
		{name: "split around a range skipped", off: r64 / 2, p: old[r64/2 : 4*r64], want: fmt.Sprintf("[{%d %d}]", r64/2, 3*r64-r64/2)},
		{name: "zeroes where the base has data", off: 3 * r64, zero: r64, want: fmt.Sprintf("[{%d %d}]", 3*r64, r64)},
		{name: "a disk without a base", off: 0, p: old[:r64], disk: 1, want: fmt.Sprintf("[{0 %d}]", r64)},
	} {
		var got []span
		if tc.zero > 0 {
			got = c.zero(tc.disk, tc.off, tc.zero)
		} else {
			got = c.write(tc.disk, tc.off, tc.p)
		}
		if fmt.Sprint(got) != tc.want {
			t.Errorf("%s: sent %v, want %s", tc.name, got, tc.want)
		}
	}

	zeros := newDiskResync([][]uint64{rangeBase(make([]byte, size))}, []int64{size})
	if got := zeros.zero(0, 0, size); len(got) != 0 {
		t.Errorf("zeroes over a base of zeroes, short last range included: sent %v", got)
	}
	if got := zeros.zero(0, 0, r64+1); fmt.Sprint(got) != fmt.Sprintf("[{%d 1}]", r64) {
		t.Errorf("zeroes over one range and a byte: sent %v", got)
	}
	if newDiskResync([][]uint64{rangeBase(old)[:3]}, []int64{size}) != nil {
		t.Error("a base that does not fit the disk was taken")
	}
}

// recordingDisks are a replica's disks that record what reached them.
type recordingDisks struct {
	*replicaDisks
	mu  sync.Mutex
	got []string
}

func (d *recordingDisks) Write(epoch uint64, w replication.DiskWrite) error {
	d.mu.Lock()
	d.got = append(d.got, fmt.Sprintf("w %d+%d", w.Offset, len(w.Data)))
	d.mu.Unlock()
	return d.replicaDisks.Write(epoch, w)
}

func (d *recordingDisks) Zero(epoch uint64, z replication.DiskZero) error {
	d.mu.Lock()
	d.got = append(d.got, fmt.Sprintf("z %d+%d", z.Offset, z.Length))
	d.mu.Unlock()
	return d.replicaDisks.Zero(epoch, z)
}

// take returns what reached the disks since the last call.
func (d *recordingDisks) take() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := fmt.Sprint(d.got)
	d.got = nil
	return s
}

// replicaWith opens replica disks in a new directory holding content.
func replicaWith(t testing.TB, content []byte) *recordingDisks {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(replicaDiskPath(dir, 0), content, 0o600); err != nil {
		t.Fatal(err)
	}
	rd, err := openReplicaDisks(dir, []int64{int64(len(content))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	return &recordingDisks{replicaDisks: rd}
}

// A disk sync on the partner's replica, over a real stream: the replica's
// hashes come with the stream, a mirror-like copy of the whole disk sends
// only the ranges that differ, a range written partly is sent whole later
// even with the content the replica had, zeroes the replica holds are not
// sent, and once the disks are in sync nothing is compared. After each step
// the replica holds what the primary wrote.
func TestDiskReplResyncOnBase(t *testing.T) {
	size := int64(16*r64 + 1000) // 17 ranges, the last short
	old := patterned(int(size), 3)
	clear(old[5*r64 : 7*r64]) // ranges 5 and 6 hold zeroes
	want := bytes.Clone(old)
	copy(want[2*r64:4*r64], patterned(2*r64, 99)) // ranges 2 and 3 differ
	copy(want[9*r64:10*r64], patterned(r64, 42))  // and 9
	clear(want[12*r64 : 13*r64])                  // and 12, now zeroes

	disks := replicaWith(t, old)
	s := serveDisks(t, disks)(size)
	base := s.TakeDiskBase()
	if len(base) != 1 || !slices.Equal(base[0], rangeBase(old)) {
		t.Fatalf("the stream's disk base is not the replica's content")
	}
	r := newDiskRepl(t.Context(), nil, "vm1", s, nil, nil, []int64{size}, base)
	mirror := &diskExport{r: r, idx: 0, size: size}
	child := &diskExport{r: r, idx: 0, size: size, child: true}
	check := func(step, sent string) {
		t.Helper()
		if got := disks.take(); got != sent {
			t.Errorf("%s: the partner received %s, want %s", step, got, sent)
		}
		got, err := os.ReadFile(replicaDiskPath(disks.dir, 0))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			for i := 0; i < len(want); i += r64 {
				if !bytes.Equal(got[i:min(i+r64, len(got))], want[i:min(i+r64, len(want))]) {
					t.Errorf("%s: the replica's range %d differs from the primary's disk", step, i/r64)
				}
			}
		}
	}
	write := func(e *diskExport, off int64, p []byte) {
		t.Helper()
		if err := e.WriteAt(p, off, true); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	zero := func(off, n int64) {
		t.Helper()
		if err := mirror.WriteZeroes(off, n, false); err != nil {
			t.Fatal(err)
		}
		clear(want[off : off+n])
	}

	// The mirror copies the whole disk, four ranges a write.
	before := s.DiskBytesSent()
	for off := int64(0); off < size; off += 4 * r64 {
		write(mirror, off, bytes.Clone(want[off:min(off+4*r64, size)]))
	}
	check("the copy", fmt.Sprintf("[w %d+%d w %d+%d w %d+%d]", 2*r64, 2*r64, 9*r64, r64, 12*r64, r64))
	if got := s.DiskBytesSent() - before; got != 4*r64 {
		t.Errorf("the copy put %d bytes on the stream, want %d", got, 4*r64)
	}
	if c, n := r.resyncCompared.Load(), r.resyncSent.Load(); c != size || n != 4*r64 {
		t.Errorf("the copy compared %d bytes and sent %d, want %d and %d", c, n, size, 4*r64)
	}

	// A guest write to part of range 7 is sent, and the range is never
	// skipped again: the mirror copying its old content must send it.
	write(mirror, 7*r64+4096, patterned(4096, 200))
	write(mirror, 7*r64, bytes.Clone(old[7*r64:8*r64]))
	check("a partial write, then the old content", fmt.Sprintf("[w %d+4096 w %d+%d]", 7*r64+4096, 7*r64, r64))

	// Zeroes the replica holds are skipped; zeroes over its data, or over
	// part of a range, are sent.
	zero(5*r64, 2*r64)
	check("zeroes over zeroes", "[]")
	zero(10*r64, r64+r64/2)
	check("zeroes over data", fmt.Sprintf("[z %d+%d]", 10*r64, r64+r64/2))

	// A write the queue takes from the NBD server, half of it the
	// replica's content: only the other half goes, copied.
	p := bufpool.Get(2 * r64)
	copy(*p, old[13*r64:14*r64])
	copy((*p)[r64:], patterned(r64, 77))
	copy(want[13*r64:], *p)
	wait, err := child.TakeWrite(p, 13*r64, true)
	if err == nil && wait != nil {
		err = wait()
	}
	if err != nil {
		t.Fatal(err)
	}
	check("a taken write", fmt.Sprintf("[w %d+%d]", 14*r64, r64))

	// In sync: from now on every write is sent as it comes.
	r.endResync()
	compared, sent := r.resyncCompared.Load(), r.resyncSent.Load()
	write(mirror, 15*r64, bytes.Clone(old[15*r64:16*r64]))
	zero(6*r64, r64)
	check("after the sync", fmt.Sprintf("[w %d+%d z %d+%d]", 15*r64, r64, 6*r64, r64))
	if r.resyncCompared.Load() != compared || r.resyncSent.Load() != sent {
		t.Error("writes after the sync were compared")
	}
}

// Without a base (the replica's disks were not hashed) every write is sent.
func TestDiskReplWithoutBase(t *testing.T) {
	size := int64(4 * r64)
	old := patterned(int(size), 5)
	disks := replicaWith(t, old)
	s := serveDisks(t, disks)(size)
	r := newDiskRepl(t.Context(), nil, "vm1", s, nil, nil, []int64{size}, nil)
	mirror := &diskExport{r: r, idx: 0, size: size}
	if err := mirror.WriteAt(old, 0, false); err != nil {
		t.Fatal(err)
	}
	if got, want := disks.take(), fmt.Sprintf("[w 0+%d]", size); got != want {
		t.Fatalf("the partner received %s, want %s", got, want)
	}
}

// BenchmarkDiskResync measures, side by side on one replica, a disk sync
// on its base and a full copy: a 64 MiB disk of which 4 MiB (64 ranges
// spread over it) differ from what the partner's replica holds, copied by
// a mirror-like sequence of 1 MiB writes over a real stream, from dialling
// (the partner hashes its disk) to the partner having every write.
func BenchmarkDiskResync(b *testing.B) {
	const size, chunk = 64 << 20, 1 << 20
	old := patterned(size, 11)
	primary := bytes.Clone(old)
	for i := 0; i < 64; i++ {
		off := (i*16 + 3) * r64 // one range in every 16
		copy(primary[off:off+r64], patterned(r64, byte(i)))
	}
	disks := replicaWith(b, old)
	dial := serveDisks(b, disks)
	path := replicaDiskPath(disks.dir, 0)
	var baseBytes int
	copyDisk := func(onBase bool) (sent uint64, took time.Duration) {
		if err := os.WriteFile(path, old, 0o600); err != nil { // the replica as the last stream left it
			b.Fatal(err)
		}
		t0 := time.Now()
		s := dial(size)
		base := s.TakeDiskBase()
		baseBytes = 8 * len(base[0]) // the hashes that came the other way
		if !onBase {
			base = nil
		}
		r := newDiskRepl(b.Context(), nil, "vm1", s, nil, nil, []int64{size}, base)
		child := &diskExport{r: r, idx: 0, size: size, child: true}
		for off := 0; off < size; off += chunk {
			if err := child.WriteAt(primary[off:off+chunk], int64(off), false); err != nil {
				b.Fatal(err)
			}
		}
		if err := child.Flush(); err != nil {
			b.Fatal(err)
		}
		took = time.Since(t0)
		r.endResync()
		sent = s.DiskBytesSent()
		s.Close()
		disks.take()
		if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, primary) {
			b.Fatalf("the replica differs from the primary's disk after the sync (onBase %v): %v", onBase, err)
		}
		return sent, took
	}
	var resync, full uint64
	var tResync, tFull time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n, d := copyDisk(true)
		resync, tResync = resync+n, tResync+d
		n, d = copyDisk(false)
		full, tFull = full+n, tFull+d
	}
	b.StopTimer()
	b.ReportMetric(float64(resync)/float64(b.N)/(1<<20), "resync-MiB")
	b.ReportMetric(float64(full)/float64(b.N)/(1<<20), "full-MiB")
	b.ReportMetric(float64(baseBytes)/(1<<10), "base-KiB")
	b.ReportMetric(float64(resync)/float64(full), "sent-ratio")
	b.ReportMetric(tResync.Seconds()/tFull.Seconds(), "time-ratio")
}
