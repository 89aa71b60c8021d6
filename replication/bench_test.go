package replication

import (
	"bytes"
	"context"
	"github.com/axproject/ax/ax/identity/identitytest"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BenchmarkWritePages measures framing full pages frames (CRC32C included)
// into a buffered stream.
func BenchmarkWritePages(b *testing.B) {
	pages := testPages(PagesPerFrame(0), 0)
	w := NewWriter(io.Discard, 0)
	b.SetBytes(int64(len(pages) * PageSize))
	b.ReportAllocs()
	for b.Loop() {
		if err := w.WritePages(TypeCheckpointPages, 1, pages); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkReadPages measures reading, checking and decoding full pages frames.
func BenchmarkReadPages(b *testing.B) {
	pages := testPages(PagesPerFrame(0), 0)
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	if err := w.WritePages(TypeCheckpointPages, 1, pages); err != nil {
		b.Fatal(err)
	}
	w.Flush()
	r := NewReader(&loop{data: buf.Bytes()}, 0)
	b.SetBytes(int64(len(pages) * PageSize))
	b.ReportAllocs()
	for b.Loop() {
		f, err := r.ReadFrame()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := DecodePages(f); err != nil {
			b.Fatal(err)
		}
	}
}

// loop replays data forever, like a peer that keeps sending.
type loop struct {
	data []byte
	off  int
}

func (l *loop) Read(p []byte) (int, error) {
	n := copy(p, l.data[l.off:])
	l.off = (l.off + n) % len(l.data)
	return n, nil
}

// BenchmarkAssembleCheckpoint measures receiving a checkpoint of 8 MiB of
// pages: framing checks, copying and the SHA-256 digest.
func BenchmarkAssembleCheckpoint(b *testing.B) {
	pages := testPages(2048, 0)
	frames := checkpointFrames(b, 1, pages, devState(1, 13000), 0)
	b.SetBytes(int64(len(pages) * PageSize))
	b.ReportAllocs()
	epoch := uint64(0)
	a := NewCheckpointAssembler(int64(len(pages))*PageSize, 0, 0)
	for b.Loop() {
		epoch++
		for _, f := range frames {
			f.Epoch = epoch
			switch f.Type {
			case TypeCheckpointBegin:
				bg, _ := DecodeCheckpointBegin(Frame{Type: f.Type, Epoch: 1, Payload: f.Payload})
				bg.Epoch = epoch
				f = bg.Frame()
			case TypeCheckpointEnd:
				e, _ := DecodeCheckpointEnd(Frame{Type: f.Type, Epoch: 1, Payload: f.Payload})
				e.Epoch = epoch
				f = e.Frame()
			}
			if _, err := a.Add(f); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// discardSink takes disk writes and keeps nothing.
type discardSink struct{}

func (discardSink) Write(uint64, DiskWrite) error { return nil }
func (discardSink) Zero(uint64, DiskZero) error   { return nil }
func (discardSink) Commit(uint64) error           { return nil }
func (discardSink) SetLevel(string) error         { return nil }

// cpuTime is the process's user and system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkStreamSecurity measures what protecting the stream costs: 64 MiB
// per iteration, as 256 KiB disk writes or as 16 MiB checkpoints, from a
// Sender to a real Server over loopback TCP, on the unprotected wire (the
// control), in PSK mode (sealed records) and in TLS mode. Both ends run in
// this process, so cpu-s/GB is the two hosts' CPU together.
func BenchmarkStreamSecurity(b *testing.B) {
	const (
		total      = 64 << 20
		writeSize  = 256 << 10
		checkpoint = 16 << 20
		ramSize    = checkpoint
	)
	_, ids := identitytest.PKI(b, "pa", "sb")
	modes := []securityMode{
		{name: "plain", client: Security{PSK: testKey, plain: true}, server: Security{PSK: testKey, plain: true}},
		{name: "psk", client: Security{PSK: testKey}, server: Security{PSK: testKey}},
		{name: "tls", client: Security{Identity: ids["pa"]}, server: Security{Identity: ids["sb"]}, peer: "sb", allow: []string{"pa"}},
	}
	data := make([]byte, checkpoint)
	for i := range data {
		data[i] = byte(i * 31)
	}
	pfns := make([]uint64, checkpoint/PageSize)
	for i := range pfns {
		pfns[i] = uint64(i)
	}
	for _, kind := range []string{"diskwrite", "checkpoint"} {
		for _, mode := range modes {
			b.Run(kind+"/"+mode.name, func(b *testing.B) {
				rep, err := OpenReplica(b.TempDir(), ramSize)
				if err != nil {
					b.Fatal(err)
				}
				defer rep.Close()
				srv := NewServer(mode.server, mode.allow, Handler{
					Open:  func(string, string, []byte, net.Addr) (*Replica, error) { return rep, nil },
					Disks: func(string) DiskSink { return discardSink{} },
				}, nil)
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				var wg sync.WaitGroup
				wg.Add(1)
				go func() { defer wg.Done(); srv.Serve(ctx, ln) }()
				defer func() { cancel(); wg.Wait() }()

				s, err := Dial(ctx, ln.Addr().String(), mode.client, mode.peer, "vm1", []byte(`{}`), ramSize)
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				if kind == "checkpoint" {
					if err := s.SyncDone(); err != nil {
						b.Fatal(err)
					}
				}
				epoch := uint64(0)
				b.SetBytes(total)
				b.ResetTimer()
				cpu0 := cpuTime(b)
				for range b.N {
					switch kind {
					case "diskwrite":
						var n uint64
						for off := 0; off < total; off += writeSize {
							if n, err = s.SendDiskWrite(0, DiskWrite{Offset: uint64(off), Data: data[:writeSize]}); err != nil {
								b.Fatal(err)
							}
						}
						if err := s.WaitOrdered(ctx, n); err != nil {
							b.Fatal(err)
						}
					case "checkpoint":
						for range total / checkpoint {
							epoch++
							if err := s.SendCheckpoint(epoch, pfns, data, []byte("device state"), -1); err != nil {
								b.Fatal(err)
							}
						}
						for {
							if a, ok := <-s.Acks(); !ok {
								b.Fatalf("stream ended: %v", s.Err())
							} else if a == epoch {
								break
							}
						}
					}
				}
				cpu := cpuTime(b) - cpu0
				b.StopTimer()
				b.ReportMetric(cpu.Seconds()/(float64(b.N)*total/1e9), "cpu-s/GB")
			})
		}
	}
}
