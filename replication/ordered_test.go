package replication

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// recordingSink records what a secondary's disk sink was asked, in order.
type recordingSink struct {
	mu    sync.Mutex
	calls []string
	fail  error
}

func (r *recordingSink) add(s string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, s)
	return r.fail
}

func (r *recordingSink) Write(epoch uint64, w DiskWrite) error {
	return r.add("write " + itoa(epoch) + " " + itoa(uint64(w.Disk)) + " " + itoa(w.Offset) + " " + string(w.Data))
}
func (r *recordingSink) Zero(epoch uint64, z DiskZero) error {
	return r.add("zero " + itoa(epoch) + " " + itoa(uint64(z.Disk)) + " " + itoa(z.Offset) + " " + itoa(z.Length))
}
func (r *recordingSink) Commit(epoch uint64) error { return r.add("commit " + itoa(epoch)) }
func (r *recordingSink) SetLevel(l string) error   { return r.add("level " + l) }

func (r *recordingSink) snapshot() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.calls...)
}

func itoa(v uint64) string {
	var b []byte
	for {
		b = append([]byte{byte('0' + v%10)}, b...)
		if v /= 10; v == 0 {
			return string(b)
		}
	}
}

func startDiskServer(t *testing.T, sec Security, open func() (*Replica, error), sink DiskSink) string {
	t.Helper()
	h := Handler{
		Open:  func(string, string, []byte, net.Addr) (*Replica, error) { return open() },
		Disks: func(string) DiskSink { return sink },
	}
	return serveHandler(t, sec, nil, h)
}

// Disk writes and level changes reach the sink in stream order, interleaved
// correctly with checkpoint commits, and WaitOrdered returns only once the
// secondary has done them.
func TestStreamDiskWritesOrdered(t *testing.T) {
	psk := Security{PSK: testKey}
	const ramSize = 4 * PageSize
	rep, err := OpenReplica(t.TempDir(), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	sink := &recordingSink{}
	addr := startDiskServer(t, psk, func() (*Replica, error) { return rep, nil }, sink)
	s, err := Dial(context.Background(), addr, psk, "", "vm1", []byte(`{}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := s.SendDiskWrite(0, DiskWrite{Disk: 0, Offset: 4096, Data: []byte("ha")})
	if err != nil || n != 1 {
		t.Fatalf("first write: n=%d err=%v", n, err)
	}
	if n, err = s.SendDiskZero(0, DiskZero{Disk: 0, Offset: 8192, Length: 1 << 20}); err != nil || n != 2 {
		t.Fatalf("zero range: n=%d err=%v", n, err)
	}
	if err := s.WaitOrdered(ctx, n); err != nil {
		t.Fatal(err)
	}
	if n, err = s.SetLevel(StreamLevelFT); err != nil || n != 3 {
		t.Fatalf("level: n=%d err=%v", n, err)
	}
	if err := s.SyncDone(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SendDiskWrite(1, DiskWrite{Disk: 1, Offset: 0, Data: []byte("e1")}); err != nil {
		t.Fatal(err)
	}
	if err := s.SendCheckpoint(1, nil, nil, []byte("dev"), -1); err != nil {
		t.Fatal(err)
	}
	n, err = s.SendDiskWrite(2, DiskWrite{Disk: 1, Offset: 8, Data: []byte("e2")})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.WaitOrdered(ctx, n); err != nil {
		t.Fatal(err)
	}
	if got := <-s.Acks(); got != 1 {
		t.Fatalf("ack %d", got)
	}
	if s.OrderedPending() != 0 || s.DiskBytesSent() != 6 {
		t.Fatalf("pending %d, disk bytes %d", s.OrderedPending(), s.DiskBytesSent())
	}
	want := []string{"write 0 0 4096 ha", "zero 0 0 8192 1048576", "level ft", "write 1 1 0 e1", "commit 1", "write 2 1 8 e2"}
	if got := sink.snapshot(); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("sink saw %q, want %q", got, want)
	}
	// Waiting for more than was sent is bounded by ctx, never a false yes.
	short, c := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer c()
	if err := s.WaitOrdered(short, 10); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait for unsent frames: %v", err)
	}
}

// A secondary that cannot take the VM says why, and Dial returns it.
func TestStreamRefusal(t *testing.T) {
	psk := Security{PSK: testKey}
	addr := startDiskServer(t, psk, func() (*Replica, error) {
		return nil, errors.New("memory: 8 GiB asked, 2 GiB free (use --force)")
	}, nil)
	_, err := Dial(context.Background(), addr, psk, "", "vm1", []byte(`{}`), PageSize)
	var refused *RefusedError
	if !errors.As(err, &refused) || !errors.Is(err, ErrRefused) || !strings.Contains(refused.Reason, "8 GiB asked") {
		t.Fatalf("refusal: %v", err)
	}
}

// A disk write for a VM without disks, or one the sink rejects, ends the
// stream; WaitOrdered then fails instead of hanging.
func TestStreamDiskWriteRejected(t *testing.T) {
	psk := Security{PSK: testKey}
	for _, tc := range []struct {
		name string
		sink DiskSink
	}{
		{"no disks", nil},
		{"sink error", &recordingSink{fail: errors.New("disk 9 unknown")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := OpenReplica(t.TempDir(), PageSize)
			if err != nil {
				t.Fatal(err)
			}
			defer rep.Close()
			addr := startDiskServer(t, psk, func() (*Replica, error) { return rep, nil }, tc.sink)
			s, err := Dial(context.Background(), addr, psk, "", "vm1", []byte(`{}`), PageSize)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			n, err := s.SendDiskWrite(0, DiskWrite{Disk: 9, Data: bytes.Repeat([]byte{1}, 512)})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := s.WaitOrdered(ctx, n); err == nil || errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("rejected write acknowledged or hung: %v", err)
			}
		})
	}
}
