package witness

import (
	"context"
	"fmt"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"
)

type fakeConn struct {
	net.Conn
	id     int
	remote net.Addr
}

func (c *fakeConn) RemoteAddr() net.Addr { return c.remote }

func tcpAddr(ip string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000} }

func ids(conns []net.Conn) []int {
	var out []int
	for _, c := range conns {
		out = append(out, c.(*fakeConn).id)
	}
	return out
}

// evens returns 0, 2, … : the first n even numbers.
func evens(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = 2 * i
	}
	return out
}

func TestBudgetAdmit(t *testing.T) {
	distinct := func(i int) string { return fmt.Sprintf("10.%d.%d.1", i/256, i%256) }
	for _, c := range []struct {
		name   string
		n      int
		source func(i int) string
		want   []int // connections evicted, in order
	}{
		{"within caps", maxPreAuthPerSource, func(int) string { return "10.0.0.1" }, nil},
		{"one source over its cap loses its oldest", maxPreAuthPerSource + 2, func(int) string { return "10.0.0.1" }, []int{0, 1}},
		{"an IPv6 /64 is one source", maxPreAuthPerSource + 1, func(i int) string { return fmt.Sprintf("2001:db8::%x", i+1) }, []int{0}},
		{"IPv6 /64s apart are two", 2 * maxPreAuthPerSource, func(i int) string { return fmt.Sprintf("2001:db8:0:%x::1", i%2) }, nil},
		{"all over the global cap lose the oldest", maxPreAuth + 3, distinct, []int{0, 1, 2}},
		{"a source over its cap among many", maxPreAuth, func(i int) string {
			if i%2 == 0 {
				return "10.0.0.1"
			}
			return distinct(i)
		}, evens(maxPreAuth/2 - maxPreAuthPerSource)},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := newBudget()
			var evicted []int
			for i := range c.n {
				_, ev := b.admit(&fakeConn{id: i, remote: tcpAddr(c.source(i))})
				evicted = append(evicted, ids(ev)...)
			}
			if !slices.Equal(evicted, c.want) {
				t.Fatalf("evicted %v, want %v", evicted, c.want)
			}
			st := b.stats()
			if st.preAuth > maxPreAuth || st.maxPerSource > maxPreAuthPerSource || st.preAuth+st.evicted != c.n {
				t.Fatalf("stats %+v after %d connections", st, c.n)
			}
		})
	}
}

func TestBudgetPromote(t *testing.T) {
	b := newBudget()
	admit := func(i int, ip string) *tracked {
		tr, ev := b.admit(&fakeConn{id: i, remote: tcpAddr(ip)})
		if len(ev) != 0 {
			t.Fatalf("admitting %d evicted %v", i, ids(ev))
		}
		return tr
	}
	// A holder's connections: the newest past the cap evicts its oldest.
	var first *tracked
	for i := range maxConnsPerHolder + 1 {
		tr := admit(i, "10.0.0.1")
		ev, err := b.promote(tr, "a")
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case i == 0:
			first = tr
		case i < maxConnsPerHolder && ev != nil:
			t.Fatalf("promotion %d evicted %d", i, ev.(*fakeConn).id)
		case i == maxConnsPerHolder && (ev == nil || ev.(*fakeConn).id != 0):
			t.Fatalf("promotion past the holder's cap evicted %v, want its oldest (0)", ev)
		}
	}
	if st := b.stats(); st.preAuth != 0 || st.auth != maxConnsPerHolder {
		t.Fatalf("after promotions: %+v", st)
	}
	b.release(first) // its handler ends: it must not count twice
	if st := b.stats(); st.auth != maxConnsPerHolder {
		t.Fatalf("releasing an evicted connection: %+v", st)
	}

	// Authenticated connections do not count against the pre-auth budget:
	// a flood of new ones evicts none of them.
	var flood []int
	for i := range 2 * maxPreAuth {
		_, ev := b.admit(&fakeConn{id: 1000 + i, remote: tcpAddr(fmt.Sprintf("10.1.%d.%d", i/256, i%256))})
		flood = append(flood, ids(ev)...)
	}
	for _, id := range flood {
		if id < 1000 {
			t.Fatalf("the flood evicted authenticated connection %d", id)
		}
	}

	// A connection evicted before its handshake ends cannot be promoted.
	b2 := newBudget()
	old, _ := b2.admit(&fakeConn{id: 0, remote: tcpAddr("10.0.0.9")})
	for i := range maxPreAuthPerSource {
		b2.admit(&fakeConn{id: i + 1, remote: tcpAddr("10.0.0.9")})
	}
	if _, err := b2.promote(old, "a"); err != errEvicted {
		t.Fatalf("promoting an evicted connection: %v, want errEvicted", err)
	}
	b2.release(old)
	if st := b2.stats(); st.preAuth != maxPreAuthPerSource || st.auth != 0 {
		t.Fatalf("after the eviction: %+v", st)
	}
}

func TestBudgetAuthCap(t *testing.T) {
	b := newBudget()
	for i := range maxAuthConns {
		tr, _ := b.admit(&fakeConn{id: i, remote: tcpAddr("10.0.0.1")})
		if _, err := b.promote(tr, fmt.Sprintf("h%d", i)); err != nil {
			t.Fatalf("promotion %d: %v", i, err)
		}
	}
	tr, _ := b.admit(&fakeConn{id: -1, remote: tcpAddr("10.0.0.1")})
	if _, err := b.promote(tr, "late"); err != errAuthFull {
		t.Fatalf("promotion past the cap: %v, want errAuthFull", err)
	}
	b.release(tr)
	if st := b.stats(); st.auth != maxAuthConns || st.preAuth != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSourceOf(t *testing.T) {
	for _, c := range []struct {
		addr net.Addr
		want string
	}{
		{tcpAddr("192.0.2.7"), "192.0.2.7"},
		{tcpAddr("::ffff:192.0.2.7"), "192.0.2.7"},
		{tcpAddr("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64"},
		{&net.UnixAddr{Name: "@x", Net: "unix"}, "@x"},
	} {
		if got := sourceOf(c.addr); got != c.want {
			t.Errorf("sourceOf(%v) = %q, want %q", c.addr, got, c.want)
		}
	}
}

// floodFDs makes sure the process may open n more files, or skips.
func floodFDs(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("cannot read the open files limit: %v", err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		t.Skipf("the test opens %d files and the hard limit is %d: raise it (ulimit -Hn %d, or LimitNOFILE= in the unit) to run it", n, lim.Max, n)
	}
	old := lim
	lim.Cur = n
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("raise the open files limit to %d: %v (run ulimit -n %d first)", n, err, n)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// idleFlood opens n connections that never authenticate: from one source
// for half, from fifty others for the rest; every tenth sends a fragment
// and stalls. They stay open (unless the witness closes them) until the end
// of the test. It returns when the witness has accepted them all.
func idleFlood(t *testing.T, w *testWitness, n int) {
	t.Helper()
	before := w.srv.budget.stats().accepted
	for i := range n {
		src := net.IPv4(127, 0, 0, 2)
		if i%2 == 1 {
			src = net.IPv4(127, 0, 0, byte(3+i%50))
		}
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src}}
		c, err := d.Dial("tcp", w.addr)
		if err != nil {
			t.Fatalf("flood connection %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		if i%10 == 0 {
			c.Write([]byte("\x16\x03\x01{\"op\":\"renew\""))
		}
	}
	// Wait for the accept loop to take them all: the legitimate client must
	// come after the flood, not race it. Bounded only so a bug cannot hang.
	for deadline := time.Now().Add(time.Minute); w.srv.budget.stats().accepted < before+n; {
		if time.Now().After(deadline) {
			t.Fatalf("the witness accepted %d of %d flood connections in a minute", w.srv.budget.stats().accepted-before, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestIdleFlood holds 1,000 unauthenticated connections open against the
// witness, then 1,000 more, and checks a legitimate host is served
// throughout on one connection.
func TestIdleFlood(t *testing.T) {
	const n = 1000
	for _, mode := range []string{"psk", "tls"} {
		t.Run(mode, func(t *testing.T) {
			floodFDs(t, 2*n+maxPreAuth+256)
			var w *testWitness
			var a *Client
			if mode == "tls" {
				ids := tlsPKI(t)
				w = startTLSWitness(t, ids)
				a = w.tlsClient(ids["a"], "w")
			} else {
				w = startWitnessPastGrace(t)
				a = w.client("a")
			}
			ctx := context.Background()

			idleFlood(t, w, n)
			if info, err := a.Query(ctx, "web"); err != nil || info.Holder != "" {
				t.Fatalf("query under the flood: %+v, %v", info, err)
			}
			if _, err := a.Renew(ctx, "web"); err != nil {
				t.Fatalf("renewal under the flood: %v", err)
			}
			// Evicted: all but maxPreAuth, less the tenth whose fragment a
			// TLS witness refuses at once.
			st := w.srv.budget.stats()
			if st.preAuth > maxPreAuth || st.maxPerSource > maxPreAuthPerSource || st.evicted < n-maxPreAuth-n/10 || st.auth != 1 {
				t.Fatalf("budget after %d idle connections: %+v", n, st)
			}

			// Authenticated, the host's connection is out of the flood's reach.
			idleFlood(t, w, n)
			for range 3 {
				w.clock.Advance(testTTL / 4)
				if _, err := a.Renew(ctx, "web"); err != nil {
					t.Fatalf("renewal under the second flood: %v", err)
				}
			}
			if a.dials != 1 {
				t.Fatalf("the host dialled %d times: the flood closed its authenticated connection", a.dials)
			}
			if info, err := a.Query(ctx, "web"); err != nil || info.Holder != "a" || info.Expired {
				t.Fatalf("query after the floods: %+v, %v", info, err)
			}
		})
	}
}
