package witness

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/test/etcdtest"
)

// leaseTTL is the lease TTL of the tests that run against every backend, on
// the real clock: a whole second for etcd, and long enough that a busy
// machine does not lose a lease a test keeps renewing.
const leaseTTL = 2 * time.Second

// lapseWithin bounds the wait for a lease to lapse once its renewals stop:
// etcd's leader looks for expired leases every 500 ms, then deletes their
// keys through raft.
const lapseWithin = leaseTTL + 3*time.Second

// openLeases returns a host's view of one witness, closed at the end of the
// test; every call of one openLeases reaches the same witness.
type openLeases func(host string) Leases

// leaseCases hold for every backend: the semantics of Leases, as the
// tests of Server and Client check them on a fake clock (TestRenewAndQuery,
// TestTakeover, TestRelease, ...), here with real time.
var leaseCases = []struct {
	name string
	run  func(t *testing.T, open openLeases)
}{
	{"renew and query", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, obs := open("a"), open("observer")
		if info := query(t, obs, "web"); info.Holder != "" || !info.Expired || !info.ExpiresAt.IsZero() {
			t.Fatalf("before any lease: %+v, want none, expired", info)
		}
		before := time.Now()
		exp, err := a.Renew(ctx, "web")
		after := time.Now()
		if err != nil {
			t.Fatal(err)
		}
		// Counted from before the request: never after the witness's end.
		if exp.Before(before.Add(leaseTTL)) || exp.After(after.Add(leaseTTL)) {
			t.Fatalf("Renew expires %v after the call began, want %v counted from within the call (which took %v)", exp.Sub(before), leaseTTL, after.Sub(before))
		}
		if info := query(t, obs, "web"); info.Holder != "a" || info.Expired || info.Remaining < 0 || info.Remaining > leaseTTL {
			t.Fatalf("after renew: %+v", info)
		}
		exp2, err := a.Renew(ctx, "web")
		if err != nil {
			t.Fatal(err)
		}
		if exp2.Before(exp) {
			t.Fatalf("second Renew expires %v, before the first's %v: a lease is never shortened", exp2, exp)
		}
		if info := waitLapsed(t, obs, "web"); info.Holder != "a" || info.Remaining != 0 {
			t.Fatalf("after expiry: %+v, want a named, nothing left", info)
		}
	}},
	{"renew refused while another holds", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, b := open("a"), open("b")
		if _, err := a.Renew(ctx, "web"); err != nil {
			t.Fatal(err)
		}
		_, err := b.Renew(ctx, "web")
		held := wantHeld(t, err, "a")
		if held.Remaining < 0 || held.Remaining > leaseTTL || held.Restarted || held.VM != "web" {
			t.Fatalf("refusal %+v", held)
		}
		if info := query(t, b, "web"); info.Holder != "a" || info.Expired {
			t.Fatalf("after refused renew: %+v", info)
		}
		// Another VM is independent.
		if _, err := b.Renew(ctx, "db"); err != nil {
			t.Fatal(err)
		}
	}},
	{"takeover", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, b := open("a"), open("b")
		if _, err := a.Renew(ctx, "web"); err != nil {
			t.Fatal(err)
		}
		wantHeld(t, b.Takeover(ctx, "web"), "a")
		waitLapsed(t, b, "web")
		if err := b.Takeover(ctx, "web"); err != nil {
			t.Fatalf("takeover of an expired lease: %v", err)
		}
		if info := query(t, a, "web"); info.Holder != "b" || info.Expired {
			t.Fatalf("after takeover: %+v", info)
		}
		// The old primary, back from a partition, cannot renew: it must stay fenced.
		_, err := a.Renew(ctx, "web")
		wantHeld(t, err, "b")
		// Asking again after a lost answer is harmless.
		if err := b.Takeover(ctx, "web"); err != nil {
			t.Fatalf("repeated takeover by the holder: %v", err)
		}
		if _, err := b.Renew(ctx, "web"); err != nil {
			t.Fatalf("renewal after the takeover: %v", err)
		}
		// A VM nobody holds can be taken at once.
		if err := b.Takeover(ctx, "db"); err != nil {
			t.Fatalf("takeover of a free lease: %v", err)
		}
	}},
	{"release", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, b := open("a"), open("b")
		if _, err := a.Renew(ctx, "web"); err != nil {
			t.Fatal(err)
		}
		// Only the holder can give a lease up.
		wantHeld(t, b.Release(ctx, "web"), "a")
		wantHeld(t, b.Takeover(ctx, "web"), "a")
		if err := a.Release(ctx, "web"); err != nil {
			t.Fatal(err)
		}
		if info := query(t, b, "web"); info.Holder != "a" || !info.Expired {
			t.Fatalf("after release: %+v, want a named as the last holder, expired", info)
		}
		// Released: the partner takes over at once, well within the TTL.
		if err := b.Takeover(ctx, "web"); err != nil {
			t.Fatalf("takeover right after the holder released: %v", err)
		}
		// The old holder can neither renew nor release the partner's lease.
		_, err := a.Renew(ctx, "web")
		wantHeld(t, err, "b")
		wantHeld(t, a.Release(ctx, "web"), "b")
		if info := query(t, a, "web"); info.Holder != "b" || info.Expired {
			t.Fatalf("after the old holder's refused release: %+v", info)
		}
		// A lease no one holds, or one that lapsed, releases as a no-op.
		if err := a.Release(ctx, "db"); err != nil {
			t.Fatalf("release of a free lease: %v", err)
		}
		waitLapsed(t, a, "web")
		if err := a.Release(ctx, "web"); err != nil {
			t.Fatalf("release of another's lapsed lease: %v", err)
		}
		if info := query(t, a, "web"); info.Holder != "b" || !info.Expired {
			t.Fatalf("a no-op release changed the lease: %+v", info)
		}
	}},
	{"expired lease renewed by anyone", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, b := open("a"), open("b")
		for _, vm := range []string{"web", "db"} {
			if _, err := a.Renew(ctx, vm); err != nil {
				t.Fatal(err)
			}
		}
		waitLapsed(t, a, "web")
		waitLapsed(t, a, "db")
		// Another host may renew a lapsed lease, and so may its holder.
		if _, err := b.Renew(ctx, "web"); err != nil {
			t.Fatalf("renewal of another's lapsed lease: %v", err)
		}
		if _, err := a.Renew(ctx, "db"); err != nil {
			t.Fatalf("renewal of the own lapsed lease: %v", err)
		}
		for vm, want := range map[string]string{"web": "b", "db": "a"} {
			if info := query(t, a, vm); info.Holder != want || info.Expired {
				t.Fatalf("%s after renewing a lapsed lease: %+v, want held by %s", vm, info, want)
			}
		}
	}},
	{"lease lapses while the host renews another", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, obs := open("a"), open("observer")
		for _, vm := range []string{"web", "db"} {
			if _, err := a.Renew(ctx, vm); err != nil {
				t.Fatal(err)
			}
		}
		// Renew db alone: web must lapse all the same.
		deadline := time.Now().Add(lapseWithin)
		for !query(t, obs, "web").Expired {
			if time.Now().After(deadline) {
				t.Fatalf("web still held %v after its last renewal, while db was renewed", lapseWithin)
			}
			if _, err := a.Renew(ctx, "db"); err != nil {
				t.Fatal(err)
			}
			time.Sleep(leaseTTL / 10)
		}
		if info := query(t, obs, "db"); info.Holder != "a" || info.Expired {
			t.Fatalf("db, renewed throughout: %+v", info)
		}
		if info := query(t, obs, "web"); info.Holder != "a" || !info.Expired {
			t.Fatalf("web, not renewed: %+v", info)
		}
	}},
	{"two hosts race takeover", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a, obs := open("a"), open("observer")
		racers := map[string]Leases{"b": open("b"), "c": open("c")}
		var free, lapsed []string
		for i := range 8 {
			free = append(free, fmt.Sprintf("free%d", i))
			lapsed = append(lapsed, fmt.Sprintf("lapsed%d", i))
			if _, err := a.Renew(ctx, lapsed[i]); err != nil {
				t.Fatal(err)
			}
		}
		for _, vm := range lapsed {
			waitLapsed(t, obs, vm)
		}
		for _, vm := range append(free, lapsed...) {
			errs := make(map[string]error)
			var mu sync.Mutex
			var wg sync.WaitGroup
			start := make(chan struct{})
			for h, l := range racers {
				wg.Go(func() {
					<-start
					err := l.Takeover(ctx, vm)
					mu.Lock()
					errs[h] = err
					mu.Unlock()
				})
			}
			close(start)
			wg.Wait()
			winner := query(t, obs, vm).Holder
			wins := 0
			for h, err := range errs {
				if err == nil {
					wins++
					if h != winner {
						t.Errorf("%s: %s won, but the witness names %s", vm, h, winner)
					}
					continue
				}
				wantHeld(t, err, winner)
			}
			if wins != 1 {
				t.Fatalf("%s: %d takeovers won, want exactly 1 (%v)", vm, wins, errs)
			}
		}
	}},
	{"bad names refused", func(t *testing.T, open openLeases) {
		ctx := context.Background()
		a := open("a")
		for _, vm := range []string{"", `"`, "../vm", "a/b", "v;id", "web\n", strings.Repeat("v", MaxNameLen+1)} {
			errs := []error{a.Takeover(ctx, vm), a.Release(ctx, vm)}
			_, err := a.Renew(ctx, vm)
			errs = append(errs, err)
			_, err = a.Query(ctx, vm)
			errs = append(errs, err)
			for i, err := range errs {
				if err == nil || errors.Is(err, ErrLeaseHeld) {
					t.Errorf("call %d with vm %q: %v, want a refusal of the name", i, vm, err)
				}
			}
		}
	}},
}

// TestLeases runs the cases against a witness Server through Clients and
// against etcd through Etcd.
func TestLeases(t *testing.T) {
	t.Run("server", func(t *testing.T) {
		runLeaseCases(t, serverLeases)
	})
	t.Run("etcd", func(t *testing.T) {
		c := etcdtest.Start(t, 1)
		runLeaseCases(t, func(t *testing.T) openLeases { return etcdLeases(t, c.Endpoints()) })
	})
}

func runLeaseCases(t *testing.T, witness func(t *testing.T) openLeases) {
	for _, c := range leaseCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel() // they mostly wait for leases to lapse
			c.run(t, witness(t))
		})
	}
}

// serverLeases serves a witness of its own on the real clock, past its
// restart grace, and opens PSK clients of it.
func serverLeases(t *testing.T) openLeases {
	t.Helper()
	srv, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: leaseTTL, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	srv.graceEnd = srv.started
	addr, _ := serve(t, srv)
	return func(host string) Leases {
		c, err := NewClient(ClientConfig{Addr: addr, PSK: testKey, Holder: host, Timeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
}

// serve serves srv on a loopback port until stop, or the test's end.
func serve(tb testing.TB, srv *Server) (addr string, stop func()) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				tb.Errorf("Serve: %v", err)
			}
		})
	}
	tb.Cleanup(stop)
	return ln.Addr().String(), stop
}

// etcdLeases opens Etcds of the cluster at endpoints, under a key prefix of
// the test's own.
func etcdLeases(t *testing.T, endpoints []string) openLeases {
	t.Helper()
	return func(host string) Leases { return newTestEtcd(t, endpoints, host, leaseTTL) }
}

func newTestEtcd(t testing.TB, endpoints []string, host string, ttl time.Duration) *Etcd {
	t.Helper()
	e, err := NewEtcd(EtcdConfig{
		Endpoints: endpoints,
		Host:      host,
		TTL:       ttl,
		Prefix:    "/test/" + t.Name(),
		Timeout:   5 * time.Second,
		Log:       testLog(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func query(t *testing.T, l Leases, vm string) LeaseInfo {
	t.Helper()
	info, err := l.Query(context.Background(), vm)
	if err != nil {
		t.Fatalf("query %s: %v", vm, err)
	}
	return info
}

// waitLapsed waits, without renewing, until the witness says vm's lease
// expired, and returns what it says then.
func waitLapsed(t *testing.T, l Leases, vm string) LeaseInfo {
	t.Helper()
	deadline := time.Now().Add(lapseWithin)
	for {
		info := query(t, l, vm)
		if info.Expired {
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: lease not expired %v after the wait began: %+v", vm, lapseWithin, info)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
