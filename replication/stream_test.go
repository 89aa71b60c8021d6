package replication

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

type streamEnd struct {
	bye, handover bool
	err           error
}

func startStreamServer(t *testing.T, psk []byte, ramSize int64) (string, *Replica, chan Marker, chan streamEnd) {
	t.Helper()
	dir := t.TempDir()
	rep, err := OpenReplica(filepath.Join(dir, "vm1"), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	commits := make(chan Marker, 16)
	ends := make(chan streamEnd, 4)
	h := Handler{
		Open: func(vm string, spec []byte, _ net.Addr) (*Replica, error) {
			if vm != "vm1" || string(spec) != `{"name":"vm1"}` {
				t.Errorf("open %q %q", vm, spec)
			}
			return rep, nil
		},
		Committed: func(vm string, epoch uint64, m Marker) { commits <- m },
		Ended:     func(vm string, bye, handover bool, err error) { ends <- streamEnd{bye, handover, err} },
	}
	return serveHandler(t, psk, h), rep, commits, ends
}

// serveHandler serves h on a loopback port until the test ends and returns
// the address.
func serveHandler(t *testing.T, psk []byte, h Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); NewServer(psk, h, nil).Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return ln.Addr().String()
}

func TestStreamSyncCheckpointAck(t *testing.T) {
	psk := []byte("0123456789abcdef0123")
	const ramSize = 16 * PageSize
	addr, rep, commits, ends := startStreamServer(t, psk, ramSize)
	s, err := Dial(context.Background(), addr, psk, "vm1", []byte(`{"name":"vm1"}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	page := func(b byte) []byte { return bytes.Repeat([]byte{b}, PageSize) }
	if err := s.SendSync([]uint64{0, 5}, append(page(1), page(2)...)); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncDone(); err != nil {
		t.Fatal(err)
	}
	if err := s.SendCheckpoint(1, []uint64{5, 7}, append(page(3), page(4)...), []byte("dev1"), 1234); err != nil {
		t.Fatal(err)
	}
	select {
	case n := <-s.Acks():
		if n != 1 {
			t.Fatalf("ack %d", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no ack")
	}
	if m := <-commits; m.Epoch != 1 || m.ConsoleOffset != 1234 {
		t.Fatalf("marker %+v", m)
	}
	ram, _ := os.ReadFile(rep.RAMPath())
	for pfn, want := range map[int]byte{0: 1, 5: 3, 7: 4, 1: 0} {
		if ram[pfn*PageSize] != want {
			t.Errorf("replica page %d holds %d, want %d", pfn, ram[pfn*PageSize], want)
		}
	}
	epoch, dev := rep.Committed()
	if data, _ := os.ReadFile(dev); epoch != 1 || string(data) != "dev1" {
		t.Fatalf("committed %d %q", epoch, data)
	}
	if err := s.Bye(); err != nil {
		t.Fatal(err)
	}
	if e := <-ends; !e.bye {
		t.Fatalf("end %+v, want bye", e)
	}
}

func TestStreamRefusesWrongKey(t *testing.T) {
	addr, _, _, _ := startStreamServer(t, []byte("0123456789abcdef0123"), PageSize)
	_, err := Dial(context.Background(), addr, []byte("another-key-entirely"), "vm1", []byte(`{}`), PageSize)
	if err == nil {
		t.Fatal("dial with a wrong key succeeded")
	}
}

func TestStreamDropsCheckpointBeforeSync(t *testing.T) {
	psk := []byte("0123456789abcdef0123")
	addr, rep, _, ends := startStreamServer(t, psk, 4*PageSize)
	s, err := Dial(context.Background(), addr, psk, "vm1", []byte(`{"name":"vm1"}`), 4*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SendCheckpoint(1, nil, nil, []byte("dev"), -1)
	select {
	case e := <-ends:
		if e.err == nil || e.bye {
			t.Fatalf("end %+v, want an error", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stream not dropped")
	}
	if rep.Usable() {
		t.Fatal("replica usable after a refused stream")
	}
}
