package replication

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
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

func startStreamServer(t *testing.T, mode securityMode, ramSize int64) (string, *Replica, chan Marker, chan streamEnd) {
	t.Helper()
	rep := testReplica(t, ramSize)
	commits := make(chan Marker, 16)
	ends := make(chan streamEnd, 4)
	h := Handler{
		Open: func(vm, peer string, spec []byte, _ net.Addr) (*Replica, error) {
			if vm != "vm1" || peer != mode.authPeer || string(spec) != `{"name":"vm1"}` {
				t.Errorf("open %q by %q: %q", vm, peer, spec)
			}
			return rep, nil
		},
		Committed: func(vm string, epoch uint64, m Marker) { commits <- m },
		Ended:     func(vm string, bye, handover bool, err error) { ends <- streamEnd{bye, handover, err} },
	}
	return serveHandler(t, mode.server, mode.allow, h), rep, commits, ends
}

// testReplica opens an empty replica of vm1, closed when the test ends.
func testReplica(t *testing.T, ramSize int64) *Replica {
	t.Helper()
	rep, err := OpenReplica(filepath.Join(t.TempDir(), "vm1"), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	return rep
}

// serveHandler serves h on a loopback port until the test ends and returns
// the address.
func serveHandler(t *testing.T, sec Security, allow []string, h Handler) string {
	t.Helper()
	return serve(t, NewServer(sec, allow, h, nil))
}

// serve runs srv on a loopback port until the test ends and returns the
// address.
func serve(t *testing.T, srv *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(ctx, ln); err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return ln.Addr().String()
}

// pskMode is PSK mode on both ends, what most tests need.
var pskMode = securityMode{name: "psk", client: Security{PSK: testKey}, server: Security{PSK: testKey}}

func TestStreamSyncCheckpointAck(t *testing.T) {
	for _, mode := range securityModes(t) {
		t.Run(mode.name, func(t *testing.T) { testStreamSyncCheckpointAck(t, mode) })
	}
}

func testStreamSyncCheckpointAck(t *testing.T, mode securityMode) {
	const ramSize = 16 * PageSize
	addr, rep, commits, ends := startStreamServer(t, mode, ramSize)
	s, err := Dial(context.Background(), addr, mode.client, mode.peer, "vm1", []byte(`{"name":"vm1"}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Conn().(*net.TCPConn); !ok {
		t.Errorf("Conn() is a %T, want the TCP connection for socket options", s.Conn())
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
	addr, _, _, _ := startStreamServer(t, pskMode, PageSize)
	_, err := Dial(context.Background(), addr, Security{PSK: otherKey}, "", "vm1", []byte(`{}`), PageSize)
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("dial with a wrong key: %v, want ErrAuth", err)
	}
}

func TestStreamDropsCheckpointBeforeSync(t *testing.T) {
	addr, rep, _, ends := startStreamServer(t, pskMode, 4*PageSize)
	s, err := Dial(context.Background(), addr, pskMode.client, "", "vm1", []byte(`{"name":"vm1"}`), 4*PageSize)
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

// An authenticated primary that never sends its spec is dropped.
func TestServerSpecDeadline(t *testing.T) {
	ends := make(chan streamEnd, 1)
	srv := NewServer(pskMode.server, nil, Handler{
		Open: func(string, string, []byte, net.Addr) (*Replica, error) {
			t.Error("opened without a spec")
			return nil, errors.New("no")
		},
		Ended: func(vm string, bye, handover bool, err error) { ends <- streamEnd{bye, handover, err} },
	}, nil)
	srv.specTimeout = 50 * time.Millisecond
	addr := serve(t, srv)
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	conn, err := ClientHandshake(raw, pskMode.client, "", "vm1", 0)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-ends:
		if !errors.Is(e.err, os.ErrDeadlineExceeded) {
			t.Fatalf("end %+v, want a deadline", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a silent primary is still held")
	}
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open")
	}
}

// logRecorder keeps the messages and attributes a logger was handed.
type logRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.records = append(l.records, r.Clone())
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

// lines returns the messages logged with msg, each with its "suppressed"
// count.
func (l *logRecorder) lines(msg string) []int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []int64
	for _, r := range l.records {
		if r.Message != msg {
			continue
		}
		n := int64(-1)
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "suppressed" {
				n = a.Value.Int64()
			}
			return true
		})
		out = append(out, n)
	}
	return out
}

// fakeClock is a time that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// refusedConn connects, sends what no AX host sends, and returns once the
// server has hung up.
func refusedConn(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	// EOF, or a reset for the bytes it did not read.
	if _, err := io.Copy(io.Discard, c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("server did not hang up: %v", err)
	}
}

// A peer that connects over and over gets one warning per interval, which
// then says how many were left out.
func TestServerRefusedLogRateLimited(t *testing.T) {
	logs := &logRecorder{}
	srv := NewServer(pskMode.server, nil, Handler{}, slog.New(logs))
	clock := &fakeClock{now: time.Unix(1000, 0)}
	srv.refusedLog.Now = clock.Now
	addr := serve(t, srv)
	for range 50 {
		refusedConn(t, addr)
	}
	if got := logs.lines("replication peer refused"); len(got) != 1 || got[0] != 0 {
		t.Fatalf("50 refusals logged %v lines (suppressed counts), want one", got)
	}
	clock.advance(refusedLogEvery)
	refusedConn(t, addr)
	if got := logs.lines("replication peer refused"); len(got) != 2 || got[1] != 49 {
		t.Fatalf("after the interval: %v, want a second line counting 49 suppressed", got)
	}
}

// Beyond a few connections that have not authenticated, new ones are
// closed at once; the slots come back when those handshakes end.
func TestServerBoundsUnauthenticated(t *testing.T) {
	logs := &logRecorder{}
	rep, err := OpenReplica(t.TempDir(), PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	srv := NewServer(pskMode.server, nil, Handler{
		Open: func(string, string, []byte, net.Addr) (*Replica, error) { return rep, nil },
	}, slog.New(logs))
	srv.preAuth = make(chan struct{}, 2)
	srv.handshakeTimeout = time.Hour // the idle ones hold their slots
	addr := serve(t, srv)

	var idle []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	// The server accepts in order: by the time it takes the next ones,
	// both slots are held.
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("a connection beyond the limit was held")
		}
	}
	if got := logs.lines("replication: too many unauthenticated connections, closing new ones at once"); len(got) != 1 {
		t.Errorf("flood warnings: %v, want one", got)
	}
	if _, err := Dial(context.Background(), addr, pskMode.client, "", "vm1", []byte(`{}`), PageSize); err == nil {
		t.Fatal("dial succeeded while the slots were held")
	}
	for _, c := range idle {
		c.Close()
	}
	// Their handshakes end with the connections; then a primary gets in.
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := Dial(context.Background(), addr, pskMode.client, "", "vm1", []byte(`{}`), PageSize)
		if err == nil {
			s.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slots not released: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Heard follows the frames of a VM's current stream, idle heartbeats
// included, on both ends, and is zero on the secondary's once the stream
// ended.
func TestServerHeard(t *testing.T) {
	const ramSize = 4 * PageSize
	rep := testReplica(t, ramSize)
	ends := make(chan streamEnd, 1)
	srv := NewServer(pskMode.server, nil, Handler{
		Open:  func(string, string, []byte, net.Addr) (*Replica, error) { return rep, nil },
		Ended: func(vm string, bye, handover bool, err error) { ends <- streamEnd{bye, handover, err} },
	}, nil)
	addr := serve(t, srv)
	if h := srv.Heard("vm1"); !h.IsZero() {
		t.Fatalf("Heard before any stream: %v", h)
	}
	s, err := Dial(context.Background(), addr, pskMode.client, "", "vm1", []byte(`{"name":"vm1"}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Nothing sent but the Sender's own heartbeats (one after 200 ms idle,
	// looked for every 100 ms) and the answers: Heard keeps up, with room
	// for a loaded machine.
	const within = 3 * HeartbeatInterval
	for range 3 {
		time.Sleep(2 * HeartbeatInterval)
		if age := time.Since(srv.Heard("vm1")); age > within {
			t.Fatalf("the idle stream's last frame is %v old on the secondary, want within %v", age, within)
		}
		if age := time.Since(s.Heard()); age > within {
			t.Fatalf("the secondary's last answer is %v old on the primary, want within %v", age, within)
		}
	}
	if h := srv.Heard("vm2"); !h.IsZero() {
		t.Fatalf("Heard of a VM with no stream: %v", h)
	}
	if err := s.Bye(); err != nil {
		t.Fatal(err)
	}
	<-ends
	if h := srv.Heard("vm1"); !h.IsZero() {
		t.Fatalf("Heard after the stream ended: %v", h)
	}
}
