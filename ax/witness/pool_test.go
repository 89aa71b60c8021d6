package witness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"
)

// gate makes the real witness slow to answer about some VMs, with no hook
// in the server: its listener's connections hold back the request lines for
// the VMs holds names until the gate opens, and report each one they hold.
// It also counts the connections the witness has open.
type gate struct {
	holds   func(vm string) bool
	arrived chan string   // the VM of each request line held back
	release chan struct{} // closed by Release: held lines go through
	once    sync.Once

	mu            sync.Mutex
	open, maxOpen int // connections the witness has open, now and at most
}

func newGate(holds func(vm string) bool) *gate {
	return &gate{holds: holds, arrived: make(chan string, 64), release: make(chan struct{})}
}

// Release lets the held lines through, and all lines after them.
func (g *gate) Release() { g.once.Do(func() { close(g.release) }) }

func (g *gate) maxOpenConns() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.maxOpen
}

type gatedListener struct {
	net.Listener
	g *gate
}

func (l gatedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.g.mu.Lock()
	l.g.open++
	l.g.maxOpen = max(l.g.maxOpen, l.g.open)
	l.g.mu.Unlock()
	return &gatedConn{Conn: c, g: l.g, r: bufio.NewReaderSize(c, MaxLineSize), closed: make(chan struct{})}, nil
}

// gatedConn reads whole lines from its connection and hands them on to the
// witness, a held one once the gate opens (or the witness closes it).
type gatedConn struct {
	net.Conn
	g       *gate
	r       *bufio.Reader
	pending []byte // of the last line read, not yet handed on
	once    sync.Once
	closed  chan struct{}
}

func (c *gatedConn) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		line, err := c.r.ReadSlice('\n')
		if len(line) == 0 {
			return 0, err // the error comes again after a partial line
		}
		c.pending = append([]byte(nil), line...)
		if err == nil && c.held(line[:len(line)-1]) {
			c.g.arrived <- string(c.pending)
			select {
			case <-c.g.release:
			case <-c.closed:
				return 0, net.ErrClosed
			}
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// held reports whether line is a request the gate holds while it is shut.
func (c *gatedConn) held(line []byte) bool {
	select {
	case <-c.g.release:
		return false
	default:
	}
	req, err := decodeRequest(line)
	return err == nil && c.g.holds(req.vm)
}

func (c *gatedConn) Close() error {
	c.once.Do(func() {
		close(c.closed)
		c.g.mu.Lock()
		c.g.open--
		c.g.mu.Unlock()
	})
	return c.Conn.Close()
}

// startGatedWitness serves a PSK-mode witness past its grace on loopback
// behind a gate holding the requests for the VMs holds names; it stops at
// the end of the test or when stop is called.
func startGatedWitness(t *testing.T, holds func(vm string) bool) (*testWitness, *gate) {
	t.Helper()
	clock := newFakeClock()
	srv, err := NewServer(ServerConfig{
		PSK:      testKey,
		LeaseTTL: testTTL,
		Now:      clock.Now,
		Log:      slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(testTTL)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := newGate(holds)
	return serveWitness(t, srv, clock, gatedListener{ln, g}), g
}

// vmOf returns the VM a held request line names.
func vmOf(t *testing.T, line string) string {
	t.Helper()
	req, err := decodeRequest([]byte(line[:len(line)-1]))
	if err != nil {
		t.Fatalf("held line %q: %v", line, err)
	}
	return req.vm
}

// TestClientSlowCallHoldsUpNoOther stalls the witness's answer about VM
// "slow" and checks that a call about VM "fast" made meanwhile completes
// while the call about "slow" is still waiting.
func TestClientSlowCallHoldsUpNoOther(t *testing.T) {
	w, g := startGatedWitness(t, func(vm string) bool { return vm == "slow" })
	a := w.client("a")
	ctx := context.Background()

	// A first call leaves an idle connection, which the slow call takes:
	// the fast call must open one of its own.
	if _, err := a.Renew(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	slow := make(chan error, 1)
	go func() {
		_, err := a.Renew(ctx, "slow")
		slow <- err
	}()
	if vm := vmOf(t, <-g.arrived); vm != "slow" {
		t.Fatalf("the witness held a request about %q, want slow", vm)
	}

	if _, err := a.Renew(ctx, "fast"); err != nil {
		t.Fatalf("renewal of fast while the witness holds slow's: %v", err)
	}
	if _, err := a.Query(ctx, "fast"); err != nil {
		t.Fatalf("query of fast while the witness holds slow's renewal: %v", err)
	}
	select {
	case err := <-slow:
		t.Fatalf("slow's renewal returned (err %v) before the witness answered it", err)
	default:
	}

	g.Release()
	if err := <-slow; err != nil {
		t.Fatalf("slow's renewal once the witness answered: %v", err)
	}
	for _, vm := range []string{"slow", "fast"} {
		if info := w.query(vm); info.Holder != "a" || info.Expired {
			t.Fatalf("lease on %s: %+v, want held by a", vm, info)
		}
	}
	if a.dials != 2 {
		t.Fatalf("dials %d, want 2: the one the slow call took, and one for the fast calls", a.dials)
	}
}

// TestClientPoolBound runs more concurrent callers than MaxConns against a
// witness that answers nothing until MaxConns requests wait at once, and
// checks that the client opens MaxConns connections, no more, and every
// call succeeds.
func TestClientPoolBound(t *testing.T) {
	for _, maxConns := range []int{0, 1, 3, 20} {
		want := maxConns
		switch {
		case maxConns == 0:
			want = DefaultMaxConns
		case maxConns > maxClientConns:
			want = maxClientConns
		}
		t.Run(fmt.Sprintf("MaxConns=%d", maxConns), func(t *testing.T) {
			w, g := startGatedWitness(t, func(string) bool { return true })
			a := newTestClient(t, ClientConfig{Addr: w.addr, PSK: testKey, Holder: "a", MaxConns: maxConns}, w.clock)
			ctx := context.Background()
			callers, calls := 2*want+1, 5
			errs := make(chan error, callers*calls)
			var wg sync.WaitGroup
			for i := range callers {
				vm := fmt.Sprintf("vm%d", i)
				wg.Go(func() {
					for range calls {
						if _, err := a.Renew(ctx, vm); err != nil {
							errs <- err
						}
					}
				})
			}
			finished := make(chan struct{})
			go func() {
				wg.Wait()
				close(finished)
			}()

			for held := 0; held < want; held++ {
				select {
				case <-g.arrived:
				case <-finished:
					t.Fatalf("the calls ended with %d requests at the witness at once, want %d", held, want)
				}
			}
			g.Release()
			<-finished
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if n := g.maxOpenConns(); n != want || a.dials != want {
				t.Fatalf("%d callers: the witness had up to %d connections open, the client dialled %d times; want %d", callers, n, a.dials, want)
			}
		})
	}
}

// TestClientCloseDuringStalledCalls closes the client while the witness
// holds every request, with one more caller than connections, and checks
// that every call returns, as closed.
func TestClientCloseDuringStalledCalls(t *testing.T) {
	const maxConns = 2
	w, g := startGatedWitness(t, func(string) bool { return true })
	// Only Close can end these calls, or a timeout far beyond the test.
	a := newTestClient(t, ClientConfig{Addr: w.addr, PSK: testKey, Holder: "a", MaxConns: maxConns, Timeout: time.Minute}, w.clock)
	ctx := context.Background()
	const callers = maxConns + 1
	errs := make(chan error, callers)
	for i := range callers {
		go func() {
			_, err := a.Renew(ctx, fmt.Sprintf("vm%d", i))
			errs <- err
		}()
	}
	for range maxConns {
		<-g.arrived
	}

	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	for range callers {
		if err := <-errs; !errors.Is(err, net.ErrClosed) {
			t.Errorf("call interrupted by Close: %v, want net.ErrClosed", err)
		}
	}
	if _, err := a.Query(ctx, "vm0"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Query after Close: %v, want net.ErrClosed", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestClientPoolAfterRestart fills the pool with idle connections, restarts
// the witness under them, and checks that calls go on: each connection
// found dead is replaced, not tried after another dead one.
func TestClientPoolAfterRestart(t *testing.T) {
	w1, g := startGatedWitness(t, func(string) bool { return true })
	a := w1.client("a")
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := range DefaultMaxConns {
		wg.Go(func() {
			if _, err := a.Renew(ctx, fmt.Sprintf("vm%d", i)); err != nil {
				t.Error(err)
			}
		})
	}
	for range DefaultMaxConns {
		<-g.arrived
	}
	g.Release()
	wg.Wait()
	if a.dials != DefaultMaxConns {
		t.Fatalf("dials %d, want %d idle connections", a.dials, DefaultMaxConns)
	}

	w1.stop() // closes every connection under the client
	w2 := startWitnessWith(t, w1.clock, ServerConfig{PSK: testKey}, w1.addr)
	for i := range 2 * DefaultMaxConns {
		vm := fmt.Sprintf("vm%d", i%DefaultMaxConns)
		if _, err := a.Renew(ctx, vm); err != nil {
			t.Fatalf("renewal %d after the witness restarted: %v", i, err)
		}
	}
	if info := w2.query("vm0"); info.Holder != "a" {
		t.Fatalf("after the restart: %+v", info)
	}
	// Concurrent calls find the remaining dead connections too.
	for i := range DefaultMaxConns {
		wg.Go(func() {
			if _, err := a.Renew(ctx, fmt.Sprintf("vm%d", i)); err != nil {
				t.Errorf("concurrent renewal after the restart: %v", err)
			}
		})
	}
	wg.Wait()
}
