package workload

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var discard = slog.New(slog.DiscardHandler)

// tempDisk makes a zeroed disk file of blocks blocks (header included).
func tempDisk(t *testing.T, blocks int) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, int64(blocks)*BlockSize); err != nil {
		t.Fatal(err)
	}
	return p
}

func openLedger(t *testing.T, path string) *Ledger {
	t.Helper()
	l, err := OpenLedger(path, discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func mustAppend(t *testing.T, l *Ledger, texts ...string) {
	t.Helper()
	for _, text := range texts {
		want := uint64(len(l.Snapshot())) + 1
		seq, err := l.Append(text)
		if err != nil || seq != want {
			t.Fatalf("Append(%q) = %d, %v; want %d", text, seq, err, want)
		}
	}
}

// writeBlock overwrites block seq of the disk file, under the ledger's feet.
func writeBlock(t *testing.T, path string, seq uint64, block []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(block, int64(seq)*BlockSize); err != nil {
		t.Fatal(err)
	}
}

func readBlock(t *testing.T, path string, seq uint64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, BlockSize)
	if _, err := f.ReadAt(b, int64(seq)*BlockSize); err != nil {
		t.Fatal(err)
	}
	return b
}

// converse sends each request and compares the answer lines.
func converse(t *testing.T, addr string, steps []struct{ send, want string }) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	for _, s := range steps {
		if s.send != "" {
			if _, err := conn.Write([]byte(s.send + "\n")); err != nil {
				t.Fatal(err)
			}
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", s.send, err)
		}
		if got = strings.TrimSpace(got); !strings.HasPrefix(got, s.want) {
			t.Errorf("%.60q: got %.80q, want %q…", s.send, got, s.want)
		}
	}
}

func TestDiskLedgerAcksAreOnDisk(t *testing.T) {
	path := tempDisk(t, 64)
	l := openLedger(t, path)
	mustAppend(t, l, "one", "two words", strings.Repeat("x", MaxDiskText))
	l.Close()
	l.Close() // twice is fine

	l = openLedger(t, path)
	if got, want := l.Snapshot(), []string{"one", "two words", strings.Repeat("x", MaxDiskText)}; !slices.Equal(got, want) {
		t.Fatalf("reloaded %d records %.60q, want %.60q", len(got), got, want)
	}
	mustAppend(t, l, "four")
	if n, err := l.CheckDisk(); n != 4 || err != nil {
		t.Fatalf("CheckDisk = %d, %v; want 4 records", n, err)
	}
	l.Close()
	if _, err := l.Append("five"); err == nil {
		t.Fatal("Append after Close succeeded")
	}
}

func TestDiskLedgerLoadStopsAtFirstBadBlock(t *testing.T) {
	other := make([]byte, BlockSize)
	encodeRecord(other, 0xdead, 4, "of another ledger")
	for _, tc := range []struct {
		name  string
		spoil func(b []byte, path string) []byte
	}{
		{"zeroed", func(b []byte, _ string) []byte { return make([]byte, BlockSize) }},
		{"torn text", func(b []byte, _ string) []byte { b[recordHeaderLen+1] ^= 0xff; return b }},
		{"torn tail", func(b []byte, _ string) []byte {
			// A new long record whose first sector only reached the disk.
			encodeRecord(b, binary.LittleEndian.Uint64(b[8:]), 4, strings.Repeat("t", 1000))
			clear(b[512:])
			return b
		}},
		{"half written", func(b []byte, _ string) []byte { clear(b[16:]); return b }},
		{"stale seq", func(_ []byte, path string) []byte { return readBlock(t, path, 2) }},
		{"other ledger", func([]byte, string) []byte { return other }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := tempDisk(t, 16)
			l := openLedger(t, path)
			mustAppend(t, l, "rec-1", "rec-2", "rec-3", "rec-4", "rec-5", "rec-6")
			l.Close()
			writeBlock(t, path, 4, tc.spoil(readBlock(t, path, 4), path))

			// Blocks 5 and 6 still hold records, which a real disk never
			// does after a bad block 4: the load must stop at 4 all the same.
			l = openLedger(t, path)
			if got := l.Snapshot(); !slices.Equal(got, []string{"rec-1", "rec-2", "rec-3"}) {
				t.Fatalf("loaded %q, want the 3 records before the spoilt block", got)
			}
			if n, err := l.CheckDisk(); n != 3 || err != nil {
				t.Fatalf("CheckDisk = %d, %v; want 3 records", n, err)
			}
			// The next append takes seq 4 and overwrites the spoilt block;
			// then CHECK sees the leftover record 5.
			mustAppend(t, l, "new-4")
			if b := readBlock(t, path, 4); !strings.Contains(string(b), "new-4") {
				t.Fatal("block 4 was not rewritten")
			}
			if _, err := l.CheckDisk(); err == nil || !strings.Contains(err.Error(), "block 5 holds a record") {
				t.Fatalf("CheckDisk = %v, want it to report block 5", err)
			}
		})
	}
}

func TestDiskLedgerCheck(t *testing.T) {
	path := tempDisk(t, 16)
	l := openLedger(t, path)
	addr := serveLedger(t, l)
	converse(t, addr, []struct{ send, want string }{
		{"CHECK", "CHECK ok 0"},
		{"APPEND a", "ACK 1"},
		{"APPEND b", "ACK 2"},
		{"APPEND c", "ACK 3"},
		{"CHECK", "CHECK ok 3"},
		{"LIST", "REC 1 a"}, {"", "REC 2 b"}, {"", "REC 3 c"}, {"", "END 3"},
	})
	if n, err := Check(context.Background(), addr, 5*time.Second); n != 3 || err != nil {
		t.Fatalf("Check = %d, %v; want 3", n, err)
	}

	good := readBlock(t, path, 2)
	corrupt := slices.Clone(good)
	corrupt[recordHeaderLen] = 'B'
	beyond := make([]byte, BlockSize)
	encodeRecord(beyond, l.disk.id, 4, "d")
	for _, tc := range []struct {
		name  string
		seq   uint64
		block []byte
		want  string
	}{
		{"corrupted", 2, corrupt, "ERR check: block 2: bad CRC"},
		{"missing", 2, make([]byte, BlockSize), "ERR check: block 2: no record"},
		{"misplaced", 2, readBlock(t, path, 3), "ERR check: block 2: record 3, want 2"},
		{"record beyond memory", 4, beyond, "ERR check: block 4 holds a record; memory has 3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old := readBlock(t, path, tc.seq)
			writeBlock(t, path, tc.seq, tc.block)
			defer writeBlock(t, path, tc.seq, old)
			converse(t, addr, []struct{ send, want string }{{"CHECK", tc.want}})
			if _, err := Check(context.Background(), addr, 5*time.Second); err == nil {
				t.Fatal("Check succeeded")
			}
		})
	}

	// Memory that lost a record, or holds other text, differs from the disk too.
	l.mu.Lock()
	l.records[1] = "forged"
	l.mu.Unlock()
	converse(t, addr, []struct{ send, want string }{{"CHECK", `ERR check: block 2: text "b", memory has "forged"`}})
	l.mu.Lock()
	l.records = []string{"a", "b"}
	l.mu.Unlock()
	converse(t, addr, []struct{ send, want string }{{"CHECK", "ERR check: block 3 holds a record; memory has 2"}})
}

func TestDiskLedgerFull(t *testing.T) {
	l := openLedger(t, tempDisk(t, 3)) // header and two records
	addr := serveLedger(t, l)
	converse(t, addr, []struct{ send, want string }{
		{"APPEND a", "ACK 1"},
		{"APPEND b", "ACK 2"},
		{"APPEND c", "ERR disk full"},
		{"COUNT", "COUNT 2"},
		{"CHECK", "CHECK ok 2"},
		{"APPEND " + strings.Repeat("x", MaxDiskText+1), "ERR disk: record of"},
	})
	if _, err := l.Append("d"); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("Append on a full disk: %v, want ErrDiskFull", err)
	}
}

func TestDiskLedgerRefusesBadDisk(t *testing.T) {
	bad := func(mutate func(b []byte)) string {
		path := tempDisk(t, 4)
		openLedger(t, path).Close()
		b := readBlock(t, path, 0)
		mutate(b)
		writeBlock(t, path, 0, b)
		return path
	}
	for _, tc := range []struct {
		name, path, want string
	}{
		{"missing", "/nonexistent/vdz", "no such file"},
		{"too small", tempDisk(t, 1), "at least 8192"},
		{"header CRC", bad(func(b []byte) { b[20] ^= 1 }), "bad CRC"},
		{"version", bad(func(b []byte) {
			binary.LittleEndian.PutUint32(b[8:], 9)
			binary.LittleEndian.PutUint32(b[24:], crc32.Checksum(b[:24], castagnoli))
		}), "version 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := OpenLedger(tc.path, discard)
			if err == nil {
				l.Close()
				t.Fatal("OpenLedger succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to say %q", err, tc.want)
			}
		})
	}
}

// fakeDisk is a disk in memory whose writes and syncs fail on demand.
type fakeDisk struct {
	mu        sync.Mutex
	data      []byte
	failWrite error
	failSync  error
	syncs     int
}

func (d *fakeDisk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return copy(p, d.data[off:]), nil
}

func (d *fakeDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failWrite != nil {
		// A failed write may still have reached part of the block.
		copy(d.data[off:], p[:len(p)/2])
		return len(p) / 2, d.failWrite
	}
	return copy(d.data[off:], p), nil
}

// fail makes later writes and syncs fail with the errors given (nil: succeed).
func (d *fakeDisk) fail(write, sync error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.failWrite, d.failSync = write, sync
}

func (d *fakeDisk) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.syncs++
	return d.failSync
}

func (d *fakeDisk) Size() (int64, error) { return int64(len(d.data)), nil }
func (d *fakeDisk) Close() error         { return nil }

func TestDiskLedgerWriteErrorIsNotAcked(t *testing.T) {
	dev := &fakeDisk{data: make([]byte, 8*BlockSize)}
	l, err := openDiskLedger(dev, "fake", discard)
	if err != nil {
		t.Fatal(err)
	}
	addr := serveLedger(t, l)
	converse(t, addr, []struct{ send, want string }{{"APPEND a", "ACK 1"}})

	eio := errors.New("input/output error")
	dev.fail(eio, nil)
	converse(t, addr, []struct{ send, want string }{
		{"APPEND b", "ERR disk: write block 2: input/output error"},
		{"COUNT", "COUNT 1"},
	})
	dev.fail(nil, eio)
	converse(t, addr, []struct{ send, want string }{
		{"APPEND b", "ERR disk: sync block 2: input/output error"},
		{"GET 2", "ERR no such record"},
	})
	dev.fail(nil, nil)
	// No gap: the failed appends did not use up sequence numbers.
	converse(t, addr, []struct{ send, want string }{
		{"APPEND c", "ACK 2"},
		{"CHECK", "CHECK ok 2"},
	})
	dev.mu.Lock()
	defer dev.mu.Unlock()
	if dev.syncs != 4 { // header, a, failed b, c
		t.Errorf("%d syncs, want one per durable write (4)", dev.syncs)
	}
}

func TestDiskLedgerConcurrentAppendsStayGapFree(t *testing.T) {
	path := tempDisk(t, 512)
	l := openLedger(t, path)
	const writers, each = 8, 40
	seqs := make([][]uint64, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				seq, err := l.Append(fmt.Sprintf("w%d-%d", w, i))
				if err != nil {
					t.Error(err)
					return
				}
				seqs[w] = append(seqs[w], seq)
			}
		})
	}
	wg.Wait()
	all := slices.Sorted(slices.Values(slices.Concat(seqs...)))
	for i, s := range all {
		if s != uint64(i+1) {
			t.Fatalf("sequence numbers %v… have a gap or duplicate at %d", all[:i+1], i)
		}
	}
	mem := l.Snapshot()
	l.Close()
	l = openLedger(t, path)
	if got := l.Snapshot(); !slices.Equal(got, mem) || len(got) != writers*each {
		t.Fatalf("reloaded %d records, memory had %d", len(got), len(mem))
	}
	if n, err := l.CheckDisk(); n != writers*each || err != nil {
		t.Fatalf("CheckDisk = %d, %v", n, err)
	}
}

func TestAppendLatency(t *testing.T) {
	l := openLedger(t, tempDisk(t, 12)) // room for 11 records
	addr := serveLedger(t, l)
	rtts, err := AppendLatency(context.Background(), addr, 10)
	if err != nil || len(rtts) != 10 {
		t.Fatalf("AppendLatency = %d round trips, %v; want 10", len(rtts), err)
	}
	for i, d := range rtts {
		if d <= 0 {
			t.Errorf("round trip %d is %v", i, d)
		}
	}
	rtts, err = AppendLatency(context.Background(), addr, 5)
	if err == nil || !strings.Contains(err.Error(), "disk full") || len(rtts) != 1 {
		t.Fatalf("AppendLatency on a nearly full disk = %d round trips, %v; want 1 and disk full", len(rtts), err)
	}
}

func TestDiskLedgerMain(t *testing.T) {
	path := tempDisk(t, 8)
	l := openLedger(t, path)
	mustAppend(t, l, "kept")
	l.Close()

	ctx, cancel := context.WithCancel(context.Background())
	pr, pw, _ := os.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- Main(ctx, []string{"ledger", "--listen", "127.0.0.1:0", "--disk", path}, pw)
		pw.Close()
	}()
	r := bufio.NewReader(pr)
	line, _ := r.ReadString('\n')
	if want := "ledger: loaded 1 records from " + path + "\n"; line != want {
		t.Errorf("first line %q, want %q", line, want)
	}
	line, _ = r.ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "AXLEDGER listening ")
	if !ok {
		t.Fatalf("second line %q", line)
	}
	var out strings.Builder
	if err := Main(context.Background(), []string{"check", "--addr", addr}, &out); err != nil || out.String() != "records=1\n" {
		t.Errorf("check: %q, %v", out.String(), err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func FuzzLedgerBlock(f *testing.F) {
	// The seeds in testdata/fuzz/FuzzLedgerBlock are blocks of this ledger
	// id, trailing zeroes cut: the target pads its input to a block.
	const id = 0x1122334455667788
	f.Fuzz(func(t *testing.T, data []byte) {
		decodeHeader(data)
		decodeRecord(data, id, 1) // any length: an error, never a panic
		block := make([]byte, BlockSize)
		copy(block, data)
		seq := binary.LittleEndian.Uint64(block[16:])
		text, err := decodeRecord(block, id, seq)
		if err != nil {
			return
		}
		if _, err := decodeRecord(block, id, seq+1); err == nil {
			t.Fatal("block decodes as two sequence numbers")
		}
		again := make([]byte, BlockSize)
		encodeRecord(again, id, seq, text)
		if n := recordHeaderLen + len(text); string(again[:n]) != string(block[:n]) {
			t.Fatalf("record %d %q re-encodes differently", seq, text)
		}
	})
}

func TestDiskBypassesPageCache(t *testing.T) {
	path := tempDisk(t, 4)
	dev, err := openFileDevice(path)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	flags, err := unix.FcntlInt(uintptr(dev.fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_DIRECT == 0 {
		t.Skipf("the file system of %s has no O_DIRECT (tmpfs?); set TMPDIR to a directory on ext4 or xfs", path)
	}
	// With O_DIRECT a misaligned buffer fails with EINVAL: the ledger's
	// writes passing shows its buffers are aligned.
	b := alignedBlocks(2)
	if _, err := dev.WriteAt(b[1:BlockSize+1], BlockSize); !errors.Is(err, unix.EINVAL) {
		t.Logf("misaligned O_DIRECT write: %v (this file system tolerates it)", err)
	}
	encodeRecord(b, 1, 1, "direct")
	if _, err := dev.WriteAt(b[:BlockSize], BlockSize); err != nil {
		t.Fatalf("aligned O_DIRECT write: %v", err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
}

// FILL writes scratch data at the end of the disk only, never over records,
// and the records load unchanged afterwards.
func TestDiskLedgerFill(t *testing.T) {
	path := tempDisk(t, 2<<20/BlockSize)
	l := openLedger(t, path)
	mustAppend(t, l, "kept")
	for _, writers := range []int{1, 4} {
		if _, err := l.Fill(1, writers); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Fill(2, 1); err == nil {
		t.Fatal("a fill over the records was accepted")
	}
	if _, err := l.Fill(1, 0); err == nil {
		t.Fatal("a fill with no writer was accepted")
	}
	if _, err := (&Ledger{}).Fill(1, 1); !errors.Is(err, ErrNoDisk) {
		t.Fatalf("fill without a disk: %v", err)
	}
	if n, err := l.CheckDisk(); n != 1 || err != nil {
		t.Fatalf("after fill: CheckDisk = %d, %v", n, err)
	}
	l.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if end := data[len(data)-fillChunk:]; end[1] != 7 {
		t.Fatalf("fill data missing at the end of the disk")
	}
	l = openLedger(t, path)
	if got := l.Snapshot(); !slices.Equal(got, []string{"kept"}) {
		t.Fatalf("records after fill: %q", got)
	}
}
