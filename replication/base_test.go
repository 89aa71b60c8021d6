package replication

import (
	"bytes"
	"context"
	"errors"
	"os"
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
	good := baseFrames([]uint64{1, 2, 3})
	if len(good) != 1 {
		t.Fatalf("%d frames", len(good))
	}
	if base, err := decodeBase(good[0], nil, 3); err != nil || len(base) != 3 || base[2] != 3 {
		t.Fatalf("good frame: %v %v", base, err)
	}
	skip := baseFrames([]uint64{1, 2, 3, 4})[0]
	le.PutUint64(skip.Payload, 1) // claims to start at page 1
	for name, c := range map[string]struct {
		f     Frame
		total uint64
	}{
		"too many":     {good[0], 2},
		"out of order": {skip, 5},
		"short":        {Frame{Type: TypeBase, Payload: make([]byte, 8)}, 3},
		"ragged":       {Frame{Type: TypeBase, Payload: make([]byte, 21)}, 3},
		"wrong type":   {Frame{Type: TypeAck, Payload: good[0].Payload}, 3},
	} {
		if _, err := decodeBase(c.f, nil, c.total); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnexpectedType) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := decodeAccept(acceptFrame(5), 8*PageSize); err == nil {
		t.Error("a base of 5 pages for 8 accepted")
	}
}
