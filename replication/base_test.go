package replication

import (
	"bytes"
	"context"
	"errors"
	"math"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/axproject/ax/ax/dirty"
)

// A replica's content is the base of the next stream's initial sync: the
// primary is given the hash of every page it holds, and a sync on that base
// writes only what it sends, keeping the rest — a page the replica held that
// the guest no longer has (zeros now) must be sent like any other.
func TestStreamSyncOnBase(t *testing.T) {
	const ramSize = 8 * PageSize
	addr, rep, commits, ends := startStreamServer(t, pskMode, ramSize)
	page := func(b byte) []byte { return bytes.Repeat([]byte{b}, PageSize) }
	dial := func() *Sender {
		t.Helper()
		s, err := Dial(context.Background(), addr, pskMode.client, pskMode.peer, "vm1", []byte(`{"name":"vm1"}`), ramSize)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	commit := func(s *Sender, epoch uint64) {
		t.Helper()
		if err := s.SendCheckpoint(epoch, nil, nil, []byte("dev"), 0); err != nil {
			t.Fatal(err)
		}
		select {
		case <-commits:
		case <-time.After(5 * time.Second):
			t.Fatalf("epoch %d not committed", epoch)
		}
	}

	// First stream: the replica is empty, every base hash is of zeros.
	s := dial()
	base := s.TakeBase()
	zero := dirty.PageHash(make([]byte, PageSize))
	if len(base) != 8 || base[3] != zero {
		t.Fatalf("base of an empty replica: %d hashes, page 3 %x", len(base), base[3])
	}
	if s.TakeBase() != nil {
		t.Error("TakeBase gave the base twice")
	}
	if err := s.BeginSync(true); err != nil {
		t.Fatal(err)
	}
	if err := s.SendSync([]uint64{1, 2, 3}, append(append(page(1), page(2)...), page(3)...)); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncDone(); err != nil {
		t.Fatal(err)
	}
	commit(s, 1)
	s.Close()
	<-ends

	// The link is cut; a second stream finds pages 1-3 in the replica.
	s = dial()
	defer s.Close()
	base = s.TakeBase()
	if base[1] != dirty.PageHash(page(1)) || base[3] != dirty.PageHash(page(3)) || base[4] != zero {
		t.Fatalf("base after the first stream: %x", base[:5])
	}
	// The guest changed page 2 and zeroed page 3: only those travel.
	if err := s.BeginSync(true); err != nil {
		t.Fatal(err)
	}
	if err := s.SendSync([]uint64{2, 3}, append(page(9), page(0)...)); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncDone(); err != nil {
		t.Fatal(err)
	}
	commit(s, 2)
	ram, _ := os.ReadFile(rep.RAMPath())
	for pfn, want := range map[int]byte{1: 1, 2: 9, 3: 0, 4: 0} {
		if ram[pfn*PageSize] != want {
			t.Errorf("replica page %d holds %d, want %d", pfn, ram[pfn*PageSize], want)
		}
	}
	// The replica changed since this stream opened: a second sync on its
	// base is refused (the stream ends), never applied over other content.
	if err := s.BeginSync(true); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-ends:
		if e.err == nil {
			t.Fatal("a second sync on a stale base ended the stream without an error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a second sync on a stale base was taken")
	}
}

func TestDecodeBaseRefusesBadFrames(t *testing.T) {
	good := baseFrames([]uint64{1, 2, 3}, nil)
	if len(good) != 1 {
		t.Fatalf("%d frames", len(good))
	}
	if base, err := decodeBase(good[0], nil, 3); err != nil || len(base) != 3 || base[2] != 3 {
		t.Fatalf("good frame: %v %v", base, err)
	}
	skip := baseFrames([]uint64{1, 2, 3, 4}, nil)[0]
	le.PutUint64(skip.Payload, 1) // claims to start at page 1
	disk := baseFrames(nil, [][]uint64{{5, 6}, {7}})[0]
	for name, c := range map[string]struct {
		f     Frame
		total uint64
	}{
		"too many":           {good[0], 2},
		"out of order":       {skip, 5},
		"short":              {Frame{Type: TypeBase, Payload: make([]byte, 8)}, 3},
		"ragged":             {Frame{Type: TypeBase, Payload: make([]byte, 21)}, 3},
		"wrong type":         {Frame{Type: TypeAck, Payload: good[0].Payload}, 3},
		"more disk hashes":   {disk, 2},
		"disk hashes beyond": {disk, 1},
	} {
		if _, err := decodeBase(c.f, nil, c.total); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnexpectedType) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// The Accept frame's counts are checked against what the primary knows
// (its RAM and disk sizes) before anything is allocated for the hashes.
func TestDecodeAccept(t *testing.T) {
	const ram = 8 * PageSize
	sizes := []int64{4 * DiskBaseRange, 2*DiskBaseRange + 1}
	pages, ranges, err := decodeAccept(acceptFrame(8, [][]uint64{make([]uint64, 4), make([]uint64, 3)}), ram, sizes)
	if err != nil || pages != 8 || len(ranges) != 2 || ranges[0] != 4 || ranges[1] != 3 {
		t.Fatalf("good Accept: %d pages, ranges %v, %v", pages, ranges, err)
	}
	if pages, ranges, err := decodeAccept(acceptFrame(0, nil), ram, sizes); err != nil || pages != 0 || ranges != nil {
		t.Fatalf("Accept without a base: %d pages, ranges %v, %v", pages, ranges, err)
	}
	if _, ranges, err := decodeAccept(acceptFrame(8, nil), ram, sizes); err != nil || ranges != nil {
		t.Fatalf("Accept without a disk base: ranges %v, %v", ranges, err)
	}
	hugeDisks := acceptFrame(8, nil)
	le.PutUint32(hugeDisks.Payload[8:], math.MaxUint32)
	hugeRanges := acceptFrame(8, [][]uint64{make([]uint64, 4), make([]uint64, 3)})
	le.PutUint64(hugeRanges.Payload[20:], math.MaxUint64)
	for name, f := range map[string]Frame{
		"wrong type":         {Type: TypeBase, Payload: acceptFrame(8, nil).Payload},
		"v3 Accept":          {Type: TypeAccept, Payload: le.AppendUint64(nil, 8)},
		"empty":              {Type: TypeAccept},
		"5 pages of 8":       acceptFrame(5, nil),
		"one disk of two":    acceptFrame(8, [][]uint64{make([]uint64, 4)}),
		"three disks of two": acceptFrame(8, [][]uint64{make([]uint64, 4), make([]uint64, 3), nil}),
		"short last range":   acceptFrame(8, [][]uint64{make([]uint64, 4), make([]uint64, 2)}),
		"a range too many":   acceptFrame(8, [][]uint64{make([]uint64, 5), make([]uint64, 3)}),
		"no ranges":          acceptFrame(8, [][]uint64{nil, nil}),
		"huge disk count":    hugeDisks,
		"huge range count":   hugeRanges,
		"trailing bytes":     {Type: TypeAccept, Payload: append(acceptFrame(8, nil).Payload, 0)},
	} {
		if _, _, err := decodeAccept(f, ram, sizes); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnexpectedType) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestDiskRanges(t *testing.T) {
	for size, want := range map[int64]uint64{0: 0, 1: 1, DiskBaseRange: 1, DiskBaseRange + 1: 2, 1 << 30: 1 << 14, math.MaxInt64: 1 << 47} {
		if got := DiskRanges(size); got != want {
			t.Errorf("DiskRanges(%d) = %d, want %d", size, got, want)
		}
	}
}

// hashingSink is a disk sink that says its disks hold hashes.
type hashingSink struct {
	recordingSink
	hashes [][]uint64
	err    error
	slow   bool // hashing lasts until its context ends
}

func (h *hashingSink) RangeHashes(ctx context.Context) ([][]uint64, error) {
	if h.slow {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return h.hashes, h.err
}

// The replica's disk hashes reach the primary after the page hashes, in
// Base frames that may cross from pages to disks and hold more than one
// frame's worth; counts that do not fit the primary's disks end the dial.
func TestStreamDiskBase(t *testing.T) {
	const ramSize = 8 * PageSize
	rep, err := OpenReplica(t.TempDir(), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	big := make([]uint64, maxBaseHashes+5) // two Base frames of disk hashes
	for i := range big {
		big[i] = uint64(i) * 0x9e3779b97f4a7c15
	}
	sizes := []int64{3*DiskBaseRange + 512, int64(len(big)) * DiskBaseRange}
	// start serves a replica whose disks hash as sink says, hashing for at
	// most timeout, and returns how to dial it.
	start := func(sink *hashingSink, timeout time.Duration) func(sizes ...int64) (*Sender, error) {
		srv := NewServer(pskMode.server, nil, Handler{
			Open:  func(string, string, []byte, net.Addr) (*Replica, error) { return rep, nil },
			Disks: func(string) DiskSink { return sink },
		}, nil)
		srv.diskBaseTimeout = timeout
		addr := serve(t, srv)
		return func(sizes ...int64) (*Sender, error) {
			return Dial(context.Background(), addr, pskMode.client, "", "vm1", []byte(`{}`), ramSize, sizes...)
		}
	}
	sink := &hashingSink{hashes: [][]uint64{{11, 12, 13, 14}, big}}
	dial := start(sink, diskBaseTimeout)

	s, err := dial(sizes...)
	if err != nil {
		t.Fatal(err)
	}
	if base := s.TakeBase(); len(base) != 8 || base[0] != dirty.PageHash(make([]byte, PageSize)) {
		t.Fatalf("page base: %d hashes", len(base))
	}
	db := s.TakeDiskBase()
	if len(db) != 2 || !slices.Equal(db[0], sink.hashes[0]) || !slices.Equal(db[1], big) {
		t.Fatalf("disk base: %d disks", len(db))
	}
	if s.TakeDiskBase() != nil {
		t.Error("TakeDiskBase gave the base twice")
	}
	s.Close()

	// A primary whose disks differ from the replica's hashes refuses them.
	for name, sz := range map[string][]int64{
		"a shorter disk":    {2 * DiskBaseRange, sizes[1]},
		"a longer disk":     {4*DiskBaseRange + 1, sizes[1]},
		"one disk fewer":    {sizes[0]},
		"no disks at all":   nil,
		"one disk more":     {sizes[0], sizes[1], DiskBaseRange},
		"the disks swapped": {sizes[1], sizes[0]},
	} {
		if s, err := dial(sz...); err == nil {
			s.Close()
			t.Errorf("%s: dialled", name)
		} else if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}

	// A replica whose disks take too long to hash sends no disk base:
	// they are copied in full.
	dial = start(&hashingSink{hashes: sink.hashes, slow: true}, 50*time.Millisecond)
	if s, err = dial(sizes...); err != nil {
		t.Fatal(err)
	}
	if db := s.TakeDiskBase(); db != nil || s.TakeBase() == nil {
		t.Fatalf("disk base of a slow replica: %d disks", len(db))
	}
	s.Close()

	// One that cannot read its disks refuses the stream.
	dial = start(&hashingSink{err: errors.New("disk0.raw: input/output error")}, diskBaseTimeout)
	if _, err := dial(sizes...); !errors.Is(err, ErrRefused) {
		t.Fatalf("a replica that cannot hash its disks: %v", err)
	}
}
