package daemon

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/replication"
)

// heldSink is a secondary's disk sink whose writes can be held: a held
// write is received but not done, so the partner does not acknowledge it.
type heldSink struct {
	mu     sync.Mutex
	hold   chan struct{} // writes wait until it is closed
	writes []string
}

func (s *heldSink) holdWrites() { s.mu.Lock(); s.hold = make(chan struct{}); s.mu.Unlock() }
func (s *heldSink) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.hold:
	default:
		close(s.hold)
	}
}

func (s *heldSink) Write(epoch uint64, w replication.DiskWrite) error {
	s.mu.Lock()
	hold := s.hold
	s.mu.Unlock()
	<-hold
	s.mu.Lock()
	s.writes = append(s.writes, fmt.Sprintf("%d@%d:%c", epoch, w.Offset, w.Data[0]))
	s.mu.Unlock()
	return nil
}
func (s *heldSink) Zero(epoch uint64, z replication.DiskZero) error {
	s.mu.Lock()
	hold := s.hold
	s.mu.Unlock()
	<-hold
	s.mu.Lock()
	s.writes = append(s.writes, fmt.Sprintf("%d@zero %d+%d", epoch, z.Offset, z.Length))
	s.mu.Unlock()
	return nil
}
func (s *heldSink) Commit(uint64) error   { return nil }
func (s *heldSink) SetLevel(string) error { return nil }
func (s *heldSink) seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.writes...)
}
func (s *heldSink) last() (w string, n int) { w2 := s.seen(); return fmt.Sprint(w2), len(w2) }

// newTestDiskRepl connects a diskRepl to a real replication server whose
// disk sink is sink.
func newTestDiskRepl(t testing.TB, sink replication.DiskSink) (*diskRepl, *replication.Sender) {
	r, s := newTestDiskReplNoPump(t, sink)
	go r.pump()
	return r, s
}

// newTestDiskReplNoPump is newTestDiskRepl without its pump: writes stay
// queued until the test starts it.
func newTestDiskReplNoPump(t testing.TB, sink replication.DiskSink) (*diskRepl, *replication.Sender) {
	t.Helper()
	sizes := []int64{1 << 20}
	s := serveDisks(t, sink)(sizes...)
	return makeDiskRepl(t.Context(), nil, "vm1", s, nil, nil, sizes), s
}

// serveDisks runs a real replication server whose disk sink is sink until
// the test ends, and returns how to open a stream to it for disks of sizes
// (each stream replaces the one before, as a primary's reconnection does).
func serveDisks(t testing.TB, sink replication.DiskSink) func(sizes ...int64) *replication.Sender {
	t.Helper()
	sec := replication.Security{PSK: []byte("0123456789abcdef0123456789abcdef")}
	const ramSize = 4 * replication.PageSize
	rep, err := replication.OpenReplica(t.TempDir(), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	h := replication.Handler{
		Open:  func(string, string, []byte, net.Addr) (*replication.Replica, error) { return rep, nil },
		Disks: func(string) replication.DiskSink { return sink },
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); replication.NewServer(sec, nil, h, nil).Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return func(sizes ...int64) *replication.Sender {
		t.Helper()
		s, err := replication.Dial(ctx, ln.Addr().String(), sec, "b", "vm1", []byte(`{}`), ramSize, sizes...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
}

// returns reports whether f returns within d, and f's error.
func returns(d time.Duration, f func() error) (bool, error, <-chan error) {
	c := make(chan error, 1)
	go func() { c <- f() }()
	select {
	case err := <-c:
		return true, err, c
	case <-time.After(d):
		return false, nil, c
	}
}

func block(c byte) []byte { return bytes.Repeat([]byte{c}, 4096) }

// Below FT a write through a quorum child completes once it is queued for
// the stream, and the guest's flush (or a FUA write) waits until the
// partner has every write before it; a write through the mirror, which
// never flushes, waits for the partner itself. The queue keeps its own copy
// of each write.
func TestDiskExportDurabilityBelowFT(t *testing.T) {
	sink := &heldSink{}
	sink.holdWrites()
	defer sink.release()
	r, _ := newTestDiskRepl(t, sink)
	child := &diskExport{r: r, idx: 0, size: 1 << 20, child: true}
	mirror := &diskExport{r: r, idx: 0, size: 1 << 20}

	p := block('a')
	if done, err, _ := returns(2*time.Second, func() error { return child.WriteAt(p, 0, false) }); !done || err != nil {
		t.Fatalf("a write through the quorum child waited for the partner (returned %v, %v)", done, err)
	}
	copy(p, block('x')) // the NBD server reuses its buffer
	done, _, flushed := returns(300*time.Millisecond, child.Flush)
	if done {
		t.Fatal("a flush returned while the partner had not acknowledged the write before it")
	}
	done, _, fua := returns(100*time.Millisecond, func() error { return child.WriteAt(block('b'), 4096, true) })
	if done {
		t.Fatal("a FUA write returned while the partner held it")
	}
	done, _, mirrored := returns(100*time.Millisecond, func() error { return mirror.WriteAt(block('c'), 8192, false) })
	if done {
		t.Fatal("a mirror write returned while the partner held it")
	}
	sink.release()
	for name, c := range map[string]<-chan error{"flush": flushed, "FUA write": fua, "mirror write": mirrored} {
		select {
		case err := <-c:
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s still waits after the partner acknowledged", name)
		}
	}
	if got, want := fmt.Sprint(sink.seen()), "[0@0:a 0@4096:b 0@8192:c]"; got != want {
		t.Fatalf("the partner received %s, want %s", got, want)
	}
}

// At FT nothing waits for the partner — the checkpoint covers the writes —
// but every write queued before a checkpoint's pause is on the stream before
// the checkpoint may follow, tagged with the epoch it was made in.
func TestDiskExportCheckpointFollowsItsWrites(t *testing.T) {
	sink := &heldSink{}
	sink.holdWrites()
	defer sink.release()
	r, s := newTestDiskReplNoPump(t, sink)
	r.wait, r.epoch = false, 1 // FT, as setLevel leaves it
	child := &diskExport{r: r, idx: 0, size: 1 << 20, child: true}
	mirror := &diskExport{r: r, idx: 0, size: 1 << 20}
	before := s.Ordered()
	for i, e := range []*diskExport{child, mirror, child} {
		if done, err, _ := returns(2*time.Second, func() error { return e.WriteAt(block(byte('a'+i)), int64(i)*4096, true) }); !done || err != nil {
			t.Fatalf("write %d at FT waited for the partner (returned %v, %v)", i, done, err)
		}
	}
	if done, err, _ := returns(2*time.Second, child.Flush); !done || err != nil {
		t.Fatalf("a flush at FT waited for the partner (returned %v, %v)", done, err)
	}
	r.nextEpoch(2) // the pause of checkpoint 1
	done, _, boundary := returns(200*time.Millisecond, func() error { return r.awaitBoundary(1) })
	if done {
		t.Fatal("checkpoint 1 may go on the stream while its writes are still queued")
	}
	go r.pump()
	select {
	case err := <-boundary:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the writes of checkpoint 1 never reached the stream")
	}
	if got := s.Ordered() - before; got != 3 {
		t.Fatalf("%d of 3 writes on the stream when checkpoint 1 may follow them", got)
	}
	if err := r.awaitBoundary(7); err != nil { // no such pause: nothing to wait for
		t.Fatal(err)
	}
	if err := child.WriteAt(block('z'), 0, false); err != nil {
		t.Fatal(err)
	}
	sink.release()
	deadline := time.Now().Add(5 * time.Second)
	for _, n := sink.last(); n < 4 && time.Now().Before(deadline); _, n = sink.last() {
		time.Sleep(10 * time.Millisecond)
	}
	if got, want := fmt.Sprint(sink.seen()), "[1@0:a 1@4096:b 1@8192:c 2@0:z]"; got != want {
		t.Fatalf("the partner received %s, want %s", got, want)
	}
}

// BenchmarkDiskPipeline measures, side by side, 256 KiB writes to a file on
// tmpfs (what an unprotected guest's QEMU does) and the same writes through
// the primary's replication at HA: queued by the quorum child's export, put
// on a TCP stream, written by the partner to its replica on tmpfs, and a
// flush every 64 MiB waiting for the partner. Both hosts share this
// machine's cores, as in the lab.
func BenchmarkDiskPipeline(b *testing.B) {
	const size, chunk, flushEvery = 256 << 20, 256 << 10, 64 << 20
	dir, err := os.MkdirTemp("/dev/shm", "ax-bench-")
	if err != nil {
		b.Skip("no /dev/shm")
	}
	defer os.RemoveAll(dir)
	local, err := os.Create(filepath.Join(dir, "local.raw"))
	if err != nil {
		b.Fatal(err)
	}
	defer local.Close()
	replica, err := openReplicaDisks(filepath.Join(dir, "replica"), []int64{size})
	if err != nil {
		b.Fatal(err)
	}
	defer replica.Close()
	if err := replica.SetLevel(replication.StreamLevelHA); err != nil {
		b.Fatal(err)
	}
	r, _ := newTestDiskRepl(b, replica)
	if _, err := r.setLevel(replication.StreamLevelHA, 0); err != nil {
		b.Fatal(err)
	}
	child := &diskExport{r: r, idx: 0, size: size, child: true}
	p := bytes.Repeat([]byte{0xa5}, chunk)
	var tLocal, tRepl time.Duration
	var written int64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := (int64(i) * chunk) % size
		t0 := time.Now()
		if _, err := local.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := child.WriteAt(p, off, false); err != nil {
			b.Fatal(err)
		}
		if (int64(i)+1)*chunk%flushEvery == 0 || i == b.N-1 {
			if err := child.Flush(); err != nil {
				b.Fatal(err)
			}
		}
		tLocal, tRepl = tLocal+t1.Sub(t0), tRepl+time.Since(t1)
		written += chunk
	}
	b.StopTimer()
	mbs := func(d time.Duration) float64 { return float64(written) / d.Seconds() / 1e6 }
	b.ReportMetric(mbs(tLocal), "local-MB/s")
	b.ReportMetric(mbs(tRepl), "replicated-MB/s")
	b.ReportMetric(mbs(tRepl)/mbs(tLocal), "ratio")
}

// Ending replication releases a flush still waiting for a partner that will
// not answer: QEMU drains the replication child before it can be removed,
// so nothing may wait on the partner past stop.
func TestDiskReplStopReleasesWaiters(t *testing.T) {
	sink := &heldSink{}
	sink.holdWrites()
	defer sink.release()
	r, _ := newTestDiskRepl(t, sink)
	child := &diskExport{r: r, idx: 0, size: 1 << 20, child: true}
	if err := child.WriteAt(block('a'), 0, false); err != nil {
		t.Fatal(err)
	}
	done, _, flushed := returns(100*time.Millisecond, child.Flush)
	if done {
		t.Fatal("the flush returned while the partner held the write")
	}
	r.stop()
	select {
	case err := <-flushed:
		if err == nil {
			t.Fatal("a flush the partner never acknowledged succeeded")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the flush still waits after replication stopped")
	}
	if err := child.WriteAt(block('b'), 4096, false); err == nil {
		t.Fatal("a write after replication stopped was accepted")
	}
}

// A range of zeroes goes to the partner as one zero range, however long,
// tagged with its epoch at FT like any write.
func TestDiskExportZeroes(t *testing.T) {
	sink := &heldSink{}
	sink.holdWrites()
	sink.release()
	r, _ := newTestDiskRepl(t, sink)
	child := &diskExport{r: r, idx: 0, size: 1 << 24, child: true}
	if err := child.WriteZeroes(0, 3*diskChunk, true); err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(sink.seen()), fmt.Sprintf("[0@zero 0+%d]", 3*diskChunk); got != want {
		t.Fatalf("below FT the partner received %s, want %s", got, want)
	}
	if _, err := r.setLevel(replication.StreamLevelFT, 4); err != nil {
		t.Fatal(err)
	}
	if err := child.Trim(diskChunk, 2*diskChunk); err != nil {
		t.Fatal(err)
	}
	r.nextEpoch(5)
	if err := r.awaitBoundary(4); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, n := sink.last(); n < 2 && time.Now().Before(deadline); _, n = sink.last() {
		time.Sleep(10 * time.Millisecond)
	}
	want := fmt.Sprintf("[0@zero 0+%d 4@zero %d+%d]", 3*diskChunk, diskChunk, 2*diskChunk)
	if got := fmt.Sprint(sink.seen()); got != want {
		t.Fatalf("at FT the partner received %q, want %q", got, want)
	}
}

// A write whose buffer the export takes from the NBD server reaches the
// partner as written, like a copied one.
func TestDiskExportTakenWrite(t *testing.T) {
	sink := &heldSink{}
	sink.holdWrites()
	sink.release()
	r, _ := newTestDiskRepl(t, sink)
	child := &diskExport{r: r, idx: 0, size: 1 << 24, child: true}
	small, large := block('s'), bytes.Repeat([]byte{'l'}, diskChunk+4096)
	for _, p := range []*[]byte{&small, &large} {
		wait, err := child.TakeWrite(p, 8192, true)
		if err == nil && wait != nil {
			err = wait()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	want := fmt.Sprintf("[0@8192:s 0@8192:l 0@%d:l]", 8192+diskChunk)
	if got := fmt.Sprint(sink.seen()); got != want {
		t.Fatalf("the partner received %s, want %s", got, want)
	}
}
