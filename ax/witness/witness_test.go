package witness

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

const testTTL = 10 * time.Second

var (
	testKey  = []byte("0123456789abcdef0123456789abcdef")
	otherKey = []byte("fedcba9876543210fedcba9876543210")
	// testLineKey is the line MAC key PSK mode derives from testKey.
	testLineKey = pskLineKey(testKey)
)

// fakeClock is the witness's and the clients' clock in these tests; the
// network deadlines still use real time.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.UnixMilli(1_700_000_000_000)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type testWitness struct {
	t        *testing.T
	srv      *Server
	clock    *fakeClock
	addr     string
	stop     func()
	observer *Client
}

// startWitness serves a new PSK-mode witness on loopback, keeping its
// leases in memory; it stops at the end of the test or when stop is called.
func startWitness(t *testing.T, clock *fakeClock) *testWitness {
	t.Helper()
	return startWitnessWith(t, clock, ServerConfig{PSK: testKey}, "127.0.0.1:0")
}

// startWitnessWith serves a witness configured by cfg (its TTL, clock and
// log filled in) on addr.
func startWitnessWith(t *testing.T, clock *fakeClock, cfg ServerConfig, addr string) *testWitness {
	t.Helper()
	cfg.LeaseTTL, cfg.Now = testTTL, clock.Now
	cfg.Log = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return serveWitness(t, srv, clock, ln)
}

// serveWitness serves srv on ln until the end of the test or stop.
func serveWitness(t *testing.T, srv *Server, clock *fakeClock, ln net.Listener) *testWitness {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return &testWitness{t: t, srv: srv, clock: clock, addr: ln.Addr().String(), stop: stop}
}

// startWitnessPastGrace starts a witness whose post-start grace is over.
func startWitnessPastGrace(t *testing.T) *testWitness {
	w := startWitness(t, newFakeClock())
	w.clock.Advance(testTTL)
	return w
}

func (w *testWitness) client(holder string) *Client {
	return w.clientWithKey(holder, testKey)
}

func (w *testWitness) clientWithKey(holder string, key []byte) *Client {
	w.t.Helper()
	return newTestClient(w.t, ClientConfig{Addr: w.addr, PSK: key, Holder: holder}, w.clock)
}

// newTestClient returns a client on clock, closed at the end of the test.
func newTestClient(t *testing.T, cfg ClientConfig, clock *fakeClock) *Client {
	t.Helper()
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.now = clock.Now
	t.Cleanup(func() { c.Close() })
	return c
}

func (w *testWitness) query(vm string) LeaseInfo {
	w.t.Helper()
	if w.observer == nil {
		w.observer = w.client("observer")
	}
	info, err := w.observer.Query(context.Background(), vm)
	if err != nil {
		w.t.Fatalf("query %s: %v", vm, err)
	}
	return info
}

func wantHeld(t *testing.T, err error, holder string) *LeaseHeldError {
	t.Helper()
	var held *LeaseHeldError
	if !errors.As(err, &held) || !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("err = %v, want a *LeaseHeldError", err)
	}
	if held.Holder != holder {
		t.Fatalf("held by %q, want %q (%v)", held.Holder, holder, err)
	}
	return held
}

func TestRenewAndQuery(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()
	a := w.client("a")

	if info := w.query("web"); info.Holder != "" || !info.Expired || !info.ExpiresAt.IsZero() {
		t.Fatalf("before any lease: %+v, want none, expired", info)
	}
	start := w.clock.Now()
	exp, err := a.Renew(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if want := start.Add(testTTL); !exp.Equal(want) {
		t.Fatalf("Renew expires %v, want %v", exp, want)
	}
	info := w.query("web")
	if info.Holder != "a" || info.Expired || info.Remaining != testTTL || !info.ExpiresAt.Equal(start.Add(testTTL)) {
		t.Fatalf("after renew: %+v", info)
	}

	w.clock.Advance(4 * time.Second)
	exp, err = a.Renew(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if want := start.Add(4*time.Second + testTTL); !exp.Equal(want) {
		t.Fatalf("second Renew expires %v, want %v", exp, want)
	}

	w.clock.Advance(testTTL - time.Millisecond)
	if info := w.query("web"); info.Expired || info.Remaining != time.Millisecond {
		t.Fatalf("1ms before expiry: %+v", info)
	}
	w.clock.Advance(time.Millisecond)
	if info := w.query("web"); !info.Expired || info.Holder != "a" || info.Remaining != 0 {
		t.Fatalf("at expiry: %+v, want expired, holder a", info)
	}
}

func TestRenewRefusedWhileAnotherHolds(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()
	if _, err := w.client("a").Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(3 * time.Second)
	_, err := w.client("b").Renew(ctx, "web")
	held := wantHeld(t, err, "a")
	if held.Remaining != 7*time.Second || held.Restarted || held.VM != "web" {
		t.Fatalf("refusal %+v", held)
	}
	if info := w.query("web"); info.Holder != "a" {
		t.Fatalf("after refused renew: %+v", info)
	}
	// Another VM is independent.
	if _, err := w.client("b").Renew(ctx, "db"); err != nil {
		t.Fatal(err)
	}
}

func TestTakeover(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()
	a, b := w.client("a"), w.client("b")

	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	wantHeld(t, b.Takeover(ctx, "web"), "a")
	w.clock.Advance(testTTL - time.Millisecond)
	wantHeld(t, b.Takeover(ctx, "web"), "a")

	w.clock.Advance(time.Millisecond)
	if err := b.Takeover(ctx, "web"); err != nil {
		t.Fatalf("takeover of an expired lease: %v", err)
	}
	if info := w.query("web"); info.Holder != "b" || info.Expired || info.Remaining != testTTL {
		t.Fatalf("after takeover: %+v", info)
	}
	// The old primary, back from a partition, cannot renew: it must stay fenced.
	_, err := a.Renew(ctx, "web")
	wantHeld(t, err, "b")
	// Asking again after a lost answer is harmless.
	if err := b.Takeover(ctx, "web"); err != nil {
		t.Fatalf("repeated takeover by the holder: %v", err)
	}
	// A VM nobody holds can be taken at once.
	if err := b.Takeover(ctx, "db"); err != nil {
		t.Fatalf("takeover of a free lease: %v", err)
	}
}

func TestRelease(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()
	a, b := w.client("a"), w.client("b")
	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	// Only the holder can give a lease up.
	wantHeld(t, b.Release(ctx, "web"), "a")
	wantHeld(t, b.Takeover(ctx, "web"), "a")
	// Released: the partner takes over at once, well within the TTL.
	w.clock.Advance(time.Second)
	if err := a.Release(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if info := w.query("web"); info.Holder != "a" || !info.Expired {
		t.Fatalf("after release: %+v, want a named as the last holder, expired", info)
	}
	if err := b.Takeover(ctx, "web"); err != nil {
		t.Fatalf("takeover right after the holder released: %v", err)
	}
	// The old holder can neither renew nor release the partner's lease.
	_, err := a.Renew(ctx, "web")
	wantHeld(t, err, "b")
	wantHeld(t, a.Release(ctx, "web"), "b")
	if info := w.query("web"); info.Holder != "b" || info.Expired {
		t.Fatalf("after the old holder's refused release: %+v", info)
	}
	// A lease no one holds, or one that lapsed, releases as a no-op.
	if err := a.Release(ctx, "db"); err != nil {
		t.Fatalf("release of a free lease: %v", err)
	}
	w.clock.Advance(testTTL)
	if err := a.Release(ctx, "web"); err != nil {
		t.Fatalf("release of another's lapsed lease: %v", err)
	}
	if info := w.query("web"); info.Holder != "b" {
		t.Fatalf("a no-op release changed the holder: %+v", info)
	}
}

func TestConcurrentTakeoversOneWins(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()
	holders := []string{"b", "c", "d"}
	for _, vm := range []string{"vm0", "vm1", "vm2", "vm3", "vm4", "vm5", "vm6", "vm7"} {
		if _, err := w.client("a").Renew(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	w.clock.Advance(testTTL)

	for _, vm := range []string{"vm0", "vm1", "vm2", "vm3", "vm4", "vm5", "vm6", "vm7"} {
		errs := make([]error, len(holders))
		var wg sync.WaitGroup
		go1 := make(chan struct{})
		for i, h := range holders {
			c := w.client(h)
			wg.Go(func() {
				<-go1
				errs[i] = c.Takeover(ctx, vm)
			})
		}
		close(go1)
		wg.Wait()

		winner := w.query(vm).Holder
		wins := 0
		for i, err := range errs {
			if err == nil {
				wins++
				if holders[i] != winner {
					t.Errorf("%s: %s won, but the witness names %s", vm, holders[i], winner)
				}
				continue
			}
			wantHeld(t, err, winner)
		}
		if wins != 1 {
			t.Fatalf("%s: %d takeovers won, want exactly 1 (%v)", vm, wins, errs)
		}
	}
}

func TestWrongKey(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()

	_, err := w.clientWithKey("mallory", otherKey).Renew(ctx, "web")
	if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "pre-shared key") {
		t.Fatalf("renew with the wrong key: %v, want ErrAuth naming the key", err)
	}
	if err := w.clientWithKey("mallory", otherKey).Takeover(ctx, "web"); !errors.Is(err, ErrAuth) {
		t.Fatalf("takeover with the wrong key: %v, want ErrAuth", err)
	}
	if info := w.query("web"); info.Holder != "" {
		t.Fatalf("unauthenticated requests changed the lease: %+v", info)
	}
}

// fakeWitness answers every request line with reply(request).
func fakeWitness(t *testing.T, reply func(req request) response) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			line, err := bufio.NewReader(conn).ReadBytes('\n')
			if err == nil {
				req, err := decodeRequest(line[:len(line)-1])
				if err != nil {
					t.Errorf("fake witness: %v", err)
				}
				out, _ := encodeLine(reply(req))
				conn.Write(out)
			}
			conn.Close()
		}
	})
	return ln.Addr().String()
}

func TestClientRejectsForgedResponses(t *testing.T) {
	for _, c := range []struct {
		name  string
		reply func(req request) response
	}{
		{"signed with another key", func(req request) response {
			r := response{Nonce: hex.EncodeToString(req.nonce[:]), OK: true, Holder: req.holder, RemainingMS: 1e9}
			r.sign(otherKey)
			return r
		}},
		{"answer to another request", func(req request) response {
			r := response{Nonce: strings.Repeat("ab", nonceSize), OK: true, Holder: req.holder, RemainingMS: 1e9}
			r.sign(testLineKey)
			return r
		}},
		{"unsigned success", func(req request) response {
			return response{Nonce: hex.EncodeToString(req.nonce[:]), OK: true, Holder: req.holder, RemainingMS: 1e9}
		}},
		{"tampered after signing", func(req request) response {
			r := response{Nonce: hex.EncodeToString(req.nonce[:]), OK: true, Holder: req.holder, RemainingMS: 1000}
			r.sign(testLineKey)
			r.RemainingMS = 1e9
			return r
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cl := newTestClient(t, ClientConfig{Addr: fakeWitness(t, c.reply), PSK: testKey, Holder: "a"}, newFakeClock())
			if _, err := cl.Renew(context.Background(), "web"); !errors.Is(err, ErrAuth) {
				t.Fatalf("Renew = %v, want ErrAuth", err)
			}
		})
	}
}

// rawRequest builds a signed request line as a client would.
func rawRequest(t *testing.T, op, holder, vm string, ts time.Time, key []byte) []byte {
	t.Helper()
	req := request{op: op, holder: holder, vm: vm, ts: ts.UnixMilli()}
	rand.Read(req.nonce[:])
	req.sign(pskLineKey(key))
	line, err := req.encode()
	if err != nil {
		t.Fatal(err)
	}
	return line
}

// send writes line on a new connection and returns the response, or nil if
// the witness closed the connection without one.
func send(t *testing.T, addr string, line []byte) *response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(line); err != nil {
		t.Fatal(err)
	}
	out, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		if len(out) != 0 {
			t.Fatalf("partial response %q: %v", out, err)
		}
		return nil
	}
	var resp response
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("response %q: %v", out, err)
	}
	return &resp
}

func TestReplayRejected(t *testing.T) {
	w := startWitnessPastGrace(t)

	// b takes a free lease; the lease runs out; a recorded copy of the
	// request must not take it again.
	line := rawRequest(t, opTakeover, "b", "web", w.clock.Now(), testKey)
	if resp := send(t, w.addr, line); resp == nil || !resp.OK || !resp.verify(testLineKey) {
		t.Fatalf("first takeover: %+v", resp)
	}
	w.clock.Advance(testTTL + time.Second)
	if !w.query("web").Expired {
		t.Fatal("lease should have expired")
	}
	resp := send(t, w.addr, line)
	if resp == nil || resp.OK || resp.Code != codeReplay || !resp.verify(testLineKey) {
		t.Fatalf("replayed takeover: %+v, want a signed replay refusal", resp)
	}
	if info := w.query("web"); !info.Expired {
		t.Fatalf("replay renewed the lease: %+v", info)
	}

	// Once the nonce is forgotten, the timestamp is too old.
	w.clock.Advance(MaxRequestAge)
	for range pruneEvery + 1 {
		w.query("other") // pushes the old nonce out of the cache
	}
	if resp := send(t, w.addr, line); resp == nil || resp.Code != codeReplay {
		t.Fatalf("old request: %+v, want replay refusal", resp)
	}
	if info := w.query("web"); !info.Expired {
		t.Fatalf("old request renewed the lease: %+v", info)
	}

	// Nor may a request come from too far in the future.
	future := rawRequest(t, opRenew, "c", "web", w.clock.Now().Add(MaxRequestAge+time.Second), testKey)
	if resp := send(t, w.addr, future); resp == nil || resp.Code != codeReplay {
		t.Fatalf("future request: %+v, want replay refusal", resp)
	}
	if info := w.query("web"); info.Holder != "b" || !info.Expired {
		t.Fatalf("future request changed the lease: %+v", info)
	}
}

func TestBadLinesDropped(t *testing.T) {
	w := startWitnessPastGrace(t)
	if _, err := w.client("a").Renew(context.Background(), "web"); err != nil {
		t.Fatal(err)
	}
	before := w.query("web")
	w.clock.Advance(testTTL) // a's lease is free for the taking, if anything gets through

	valid := rawRequest(t, opTakeover, "m", "web", w.clock.Now(), testKey)
	oversize := append([]byte(`{"op":"takeover","holder":"m","vm":"`+strings.Repeat("x", MaxLineSize)+`"`), valid[1:]...)
	for _, c := range []struct {
		name string
		line []byte
	}{
		{"oversize", oversize},
		{"oversize without newline", []byte(strings.Repeat("x", 2*MaxLineSize))},
		{"garbage", []byte("GET / HTTP/1.1\r\n")},
		{"binary", []byte("\x00\xff\xfe\n")},
		{"empty line", []byte("\n")},
		{"trailing data", append(valid[:len(valid)-1:len(valid)-1], []byte(` {}`+"\n")...)},
		{"unknown field", []byte(strings.Replace(string(valid), `{`, `{"extra":1,`, 1))},
		{"unknown op", rawRequest(t, "steal", "m", "web", w.clock.Now(), testKey)},
		{"uppercase hex", upperMAC(valid)},
		{"control character in name", rawRequest(t, opTakeover, "m\n", "web", w.clock.Now(), testKey)},
	} {
		t.Run(c.name, func(t *testing.T) {
			if resp := send(t, w.addr, c.line); resp != nil {
				t.Fatalf("got response %+v, want the connection dropped", resp)
			}
		})
	}

	t.Run("wrong mac", func(t *testing.T) {
		forged := rawRequest(t, opTakeover, "m", "web", w.clock.Now(), otherKey)
		resp := send(t, w.addr, forged)
		if resp == nil || resp.OK || resp.Code != codeAuth || resp.MAC != "" {
			t.Fatalf("forged request: %+v, want an unsigned auth refusal", resp)
		}
	})

	after := w.query("web")
	if after.Holder != before.Holder || !after.ExpiresAt.Equal(before.ExpiresAt) {
		t.Fatalf("bad lines changed the lease: before %+v, after %+v", before, after)
	}
	// The witness still serves, and the valid line was never used.
	if resp := send(t, w.addr, valid); resp == nil || !resp.OK {
		t.Fatalf("valid takeover after the bad lines: %+v", resp)
	}
}

// upperMAC respells a request's MAC in uppercase hex: the same bytes, but
// not the one spelling the protocol allows.
func upperMAC(line []byte) []byte {
	var w wireRequest
	if err := json.Unmarshal(line, &w); err != nil {
		panic(err)
	}
	w.MAC = strings.ToUpper(w.MAC)
	out, _ := encodeLine(w)
	return out
}

func TestConnectionServesSeveralLines(t *testing.T) {
	w := startWitnessPastGrace(t)
	conn, err := net.Dial("tcp", w.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(conn)
	for i, op := range []string{opRenew, opQuery, opRenew} {
		w.clock.Advance(time.Second) // a fresh nonce each time
		if _, err := conn.Write(rawRequest(t, op, "a", "web", w.clock.Now(), testKey)); err != nil {
			t.Fatal(err)
		}
		out, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		var resp response
		if err := json.Unmarshal(out, &resp); err != nil || !resp.OK || !resp.verify(testLineKey) {
			t.Fatalf("request %d: %s (%v)", i, out, err)
		}
	}
}

func TestRestartGrace(t *testing.T) {
	clock := newFakeClock()
	w1 := startWitness(t, clock)
	clock.Advance(testTTL)
	ctx := context.Background()
	if _, err := w1.client("a").Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Second)
	w1.stop()

	// The witness comes back 1s into a's 10s lease, having forgotten it.
	w2 := startWitness(t, clock)
	b := w2.client("b")
	held := wantHeld(t, b.Takeover(ctx, "web"), "")
	if !held.Restarted || held.Remaining != testTTL {
		t.Fatalf("takeover during grace: %+v", held)
	}
	if info := w2.query("web"); info.Expired || info.Remaining != testTTL {
		t.Fatalf("query during grace: %+v, want not expired", info)
	}
	// a's lease has run out (it did not renew) but the grace has not.
	clock.Advance(testTTL - time.Millisecond)
	if held := wantHeld(t, b.Takeover(ctx, "web"), ""); held.Remaining != time.Millisecond {
		t.Fatalf("takeover at the end of the grace: %+v", held)
	}
	clock.Advance(time.Millisecond)
	if err := b.Takeover(ctx, "web"); err != nil {
		t.Fatalf("takeover after the grace: %v", err)
	}
}

func TestRestartGraceHolderRenews(t *testing.T) {
	clock := newFakeClock()
	w := startWitness(t, clock) // just restarted
	ctx := context.Background()
	clock.Advance(time.Second)
	if _, err := w.client("a").Renew(ctx, "web"); err != nil {
		t.Fatalf("renew during grace: %v", err)
	}
	clock.Advance(testTTL - time.Second/2) // past the grace, within a's lease
	wantHeld(t, w.client("b").Takeover(ctx, "web"), "a")
	if info := w.query("web"); info.Holder != "a" || info.Expired {
		t.Fatalf("after renewal during grace: %+v", info)
	}
}

// TestLongestNamesFit checks that the longest names keep requests and
// refusals within MaxLineSize, and that names outside the safe alphabet
// (which JSON would escape, or a path would misread) are refused.
func TestLongestNamesFit(t *testing.T) {
	w := startWitnessPastGrace(t)
	ctx := context.Background()
	vm := strings.Repeat("v", MaxNameLen)
	a := w.client(strings.Repeat("a", MaxNameLen))
	b := w.client(strings.Repeat("b", MaxNameLen))
	if _, err := a.Renew(ctx, vm); err != nil {
		t.Fatal(err)
	}
	wantHeld(t, b.Takeover(ctx, vm), a.holder)
	if info := w.query(vm); info.Holder != a.holder {
		t.Fatalf("holder %q", info.Holder)
	}
	for _, bad := range []string{`"`, `\`, "\u2028", "../vm", "v;id", strings.Repeat("v", MaxNameLen+1)} {
		if _, err := a.Renew(ctx, bad); err == nil {
			t.Errorf("renew of vm %q accepted", bad)
		}
	}
}

func TestTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // accepted by the kernel, never answered
	c := newTestClient(t, ClientConfig{Addr: ln.Addr().String(), PSK: testKey, Holder: "a", Timeout: 100 * time.Millisecond}, newFakeClock())
	if err := c.Takeover(context.Background(), "web"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Takeover against a silent witness: %v, want DeadlineExceeded", err)
	}
}

func TestConstructorsCheck(t *testing.T) {
	if _, err := NewServer(ServerConfig{PSK: []byte("short"), LeaseTTL: testTTL}); !errors.Is(err, ErrWeakKey) {
		t.Errorf("NewServer with a short key: %v", err)
	}
	if _, err := NewServer(ServerConfig{PSK: testKey}); err == nil {
		t.Error("NewServer with a zero TTL succeeded")
	}
	if _, err := NewServer(ServerConfig{LeaseTTL: testTTL}); err == nil {
		t.Error("NewServer without a key or identity succeeded")
	}
	if _, err := NewClient(ClientConfig{Addr: "x:1", PSK: []byte("short"), Holder: "a"}); !errors.Is(err, ErrWeakKey) {
		t.Errorf("NewClient with a short key: %v", err)
	}
	if _, err := NewClient(ClientConfig{Addr: "x:1", Holder: "a"}); err == nil {
		t.Error("NewClient without a key or identity succeeded")
	}
	for _, h := range []string{"", "a\x00", strings.Repeat("h", MaxNameLen+1), "\xff"} {
		if _, err := NewClient(ClientConfig{Addr: "x:1", PSK: testKey, Holder: h}); err == nil {
			t.Errorf("NewClient with holder %q succeeded", h)
		}
	}
	c := newTestClient(t, ClientConfig{Addr: "127.0.0.1:1", PSK: testKey, Holder: "a"}, newFakeClock())
	if _, err := c.Query(context.Background(), ""); err == nil {
		t.Error("Query of an empty vm name succeeded")
	}
}
