package heartbeat

import (
	"bytes"
	"context"
	"errors"
	"github.com/axproject/ax/ax/identity/identitytest"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/ax/identity"
)

// state is a copy of what d has heard of peer.
func state(d *Detector, peer string) peerHeard {
	d.mu.Lock()
	defer d.mu.Unlock()
	if ph := d.heard[peer]; ph != nil {
		return *ph
	}
	return peerHeard{}
}

func mustNew(t testing.TB, host string, sec Security, peers ...string) *Detector {
	t.Helper()
	d, err := New(host, sec, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if err := d.AddPeer(p, PeerAddrs{}); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func TestNew(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "w")
	for _, tc := range []struct {
		name string
		host string
		sec  Security
		ok   bool
	}{
		{"identity", "a", Security{Identity: ids["a"]}, true},
		{"psk", "a", Security{PSK: testPSK}, true},
		{"neither", "a", Security{}, false},
		{"both", "a", Security{Identity: ids["a"], PSK: testPSK}, false},
		{"someone else's certificate", "b", Security{Identity: ids["a"]}, false},
		{"witness certificate", "w", Security{Identity: ids["w"]}, false},
		{"short psk", "a", Security{PSK: testPSK[:identity.MinKeySize-1]}, false},
		{"unsafe host name", "../a", Security{PSK: testPSK}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := New(tc.host, tc.sec, time.Second, nil)
			if (err == nil) != tc.ok {
				t.Fatalf("New: %v, want ok=%v", err, tc.ok)
			}
			if err == nil && d.host != tc.host {
				t.Fatalf("host %q", d.host)
			}
		})
	}
	if err := mustNew(t, "a", Security{PSK: testPSK}).AddPeer("b/../c", PeerAddrs{}); err == nil {
		t.Fatal("AddPeer took an unsafe name")
	}
}

// TestHandle feeds single datagrams to a detector for host b whose
// partners are a and w: each refused one must change nothing.
func TestHandle(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "b", "c", "w")
	_, other := identitytest.PKI(t, "a")
	now := time.Now()
	seq := uint64(1000)
	pkt := func(path Path, from string) packet {
		seq++
		return packet{path: path, from: from, to: "b", seq: seq, sent: now.UnixNano()}
	}
	sign := func(id *identity.Identity, p packet) []byte { return mustSign(t, id, p) }
	psk := func(p packet) []byte { return sealPSK(pskKey(), p) }
	flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 1; return b }
	withSent := func(p packet, d time.Duration) packet { p.sent = now.Add(d).UnixNano(); return p }
	withTo := func(p packet, to string) packet { p.to = to; return p }
	withSeq := func(p packet, s uint64) packet { p.seq = s; return p }

	goodSigned := sign(ids["a"], pkt(PathRepl, "a"))
	goodPSK := psk(pkt(PathRepl, "a"))
	mgmtSigned := sign(ids["a"], pkt(PathMgmt, "a"))
	rawKey := func(p packet) []byte { return sealPSK(testPSK, p) } // the PSK itself, not the derived key

	type delivery struct {
		path Path
		b    []byte
	}
	for _, tc := range []struct {
		name  string
		mode  mode
		prime []delivery // accepted first
		got   delivery
		want  error // nil: accepted
	}{
		{"identity accepted", modeIdentity, nil, delivery{PathRepl, goodSigned}, nil},
		{"psk accepted", modePSK, nil, delivery{PathRepl, goodPSK}, nil},
		{"forged name: c's certificate claiming a", modeIdentity, nil, delivery{PathRepl, sign(ids["c"], pkt(PathRepl, "a"))}, errName},
		{"certificate of another CA", modeIdentity, nil, delivery{PathRepl, sign(other["a"], pkt(PathRepl, "a"))}, errAuth},
		{"witness certificate", modeIdentity, nil, delivery{PathRepl, sign(ids["w"], pkt(PathRepl, "w"))}, errRole},
		{"witness certificate claiming a", modeIdentity, nil, delivery{PathRepl, sign(ids["w"], pkt(PathRepl, "a"))}, errRole},
		{"identity flipped bit in the signature", modeIdentity, nil, delivery{PathRepl, flip(goodSigned, len(goodSigned)-5)}, errAuth},
		{"identity flipped bit in the sequence", modeIdentity, nil, delivery{PathRepl, flip(goodSigned, headerSize+2+3)}, errAuth},
		{"psk flipped bit in the MAC", modePSK, nil, delivery{PathRepl, flip(goodPSK, len(goodPSK)-1)}, errAuth},
		{"psk flipped bit in the send time", modePSK, nil, delivery{PathRepl, flip(goodPSK, headerSize+2+12)}, errAuth},
		{"psk keyed with the raw PSK", modePSK, nil, delivery{PathRepl, rawKey(pkt(PathRepl, "a"))}, errAuth},
		{"identity truncated", modeIdentity, nil, delivery{PathRepl, goodSigned[:len(goodSigned)-30]}, errAuth},
		{"identity truncated to the header", modeIdentity, nil, delivery{PathRepl, goodSigned[:headerSize+2]}, errMalformed},
		{"psk truncated", modePSK, nil, delivery{PathRepl, goodPSK[:len(goodPSK)-1]}, errMalformed},
		{"identity replayed", modeIdentity, []delivery{{PathRepl, goodSigned}}, delivery{PathRepl, goodSigned}, errReplay},
		{"psk replayed", modePSK, []delivery{{PathRepl, goodPSK}}, delivery{PathRepl, goodPSK}, errReplay},
		// The cheap checks come first: these never reach the signature.
		{"replay with a broken signature", modeIdentity, []delivery{{PathRepl, goodSigned}}, delivery{PathRepl, flip(goodSigned, len(goodSigned)-5)}, errReplay},
		{"stale with a broken signature", modeIdentity, nil, delivery{PathRepl, flip(sign(ids["a"], withSent(pkt(PathRepl, "a"), time.Hour)), len(goodSigned)-5)}, errStale},
		{"older sequence", modeIdentity, []delivery{{PathRepl, goodSigned}}, delivery{PathRepl, sign(ids["a"], withSeq(pkt(PathRepl, "a"), 1))}, errReplay},
		{"replayed onto the management socket", modeIdentity, []delivery{{PathRepl, goodSigned}}, delivery{PathMgmt, goodSigned}, errPath},
		{"psk replayed onto the management socket", modePSK, []delivery{{PathRepl, goodPSK}}, delivery{PathMgmt, goodPSK}, errPath},
		{"management datagram on the replication socket", modeIdentity, nil, delivery{PathRepl, mgmtSigned}, errPath},
		{"addressed to c", modeIdentity, nil, delivery{PathRepl, sign(ids["a"], withTo(pkt(PathRepl, "a"), "c"))}, errRecipient},
		{"from a host that is no partner", modeIdentity, nil, delivery{PathRepl, sign(ids["c"], pkt(PathRepl, "c"))}, errUnknownPeer},
		{"sent a minute ago", modeIdentity, nil, delivery{PathRepl, sign(ids["a"], withSent(pkt(PathRepl, "a"), -time.Minute))}, errStale},
		{"sent a minute ahead", modePSK, nil, delivery{PathRepl, psk(withSent(pkt(PathRepl, "a"), time.Minute))}, errStale},
		{"psk datagram to an identity host", modeIdentity, nil, delivery{PathRepl, goodPSK}, errMode},
		{"signed datagram to a psk host", modePSK, nil, delivery{PathRepl, goodSigned}, errMode},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sec := Security{PSK: testPSK}
			if tc.mode == modeIdentity {
				sec = Security{Identity: ids["b"]}
			}
			d := mustNew(t, "b", sec, "a", "w")
			for _, p := range tc.prime {
				if err := d.handle(p.path, p.b, now); err != nil {
					t.Fatalf("priming: %v", err)
				}
			}
			before := map[string]peerHeard{"a": state(d, "a"), "w": state(d, "w"), "c": state(d, "c")}
			err := d.handle(tc.got.path, tc.got.b, now)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if st := state(d, "a"); !st.last[tc.got.path].Equal(now) || st.lastSeq[tc.got.path] == 0 {
					t.Fatalf("accepted but not recorded: %+v", st)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			for peer, st := range before {
				if state(d, peer) != st {
					t.Fatalf("refused datagram changed what is heard of %s", peer)
				}
			}
		})
	}
}

// TestHandleEveryFlippedBit: no single-bit change of a datagram is accepted.
func TestHandleEveryFlippedBit(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "b")
	now := time.Now()
	p := packet{path: PathMgmt, heardYou: true, from: "a", to: "b", seq: 5, sent: now.UnixNano()}
	for _, tc := range []struct {
		name string
		sec  Security
		b    []byte
	}{
		{"psk", Security{PSK: testPSK}, sealPSK(pskKey(), p)},
		{"identity", Security{Identity: ids["b"]}, mustSign(t, ids["a"], p)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := mustNew(t, "b", tc.sec, "a")
			for i := range tc.b {
				for bit := range 8 {
					bad := bytes.Clone(tc.b)
					bad[i] ^= 1 << bit
					if err := d.handle(PathMgmt, bad, now); err == nil {
						t.Fatalf("byte %d bit %d flipped: accepted", i, bit)
					}
				}
			}
			if state(d, "a") != (peerHeard{}) {
				t.Fatal("a refused datagram changed state")
			}
			if err := d.handle(PathMgmt, tc.b, now); err != nil {
				t.Fatalf("the unflipped datagram: %v", err)
			}
			if st := state(d, "a"); !st.hearsMe.Equal(now) || !st.last[PathMgmt].Equal(now) || !st.last[PathRepl].IsZero() {
				t.Fatalf("after the good datagram: %+v", st)
			}
		})
	}
}

func freeUDP(t *testing.T) string {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// runDetector runs d until the test ends; stop ends it early.
func runDetector(t *testing.T, d *Detector, repl, mgmt string) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := d.Run(ctx, repl, mgmt); err != nil {
			t.Errorf("run %s: %v", d.host, err)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return stop
}

func TestLoopbackBothPaths(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "b")
	for _, tc := range []struct {
		name   string
		aS, bS Security
	}{
		{"identity", Security{Identity: ids["a"]}, Security{Identity: ids["b"]}},
		{"psk", Security{PSK: testPSK}, Security{PSK: testPSK}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			aRepl, aMgmt, bRepl, bMgmt := freeUDP(t), freeUDP(t), freeUDP(t), freeUDP(t)
			a, err := New("a", tc.aS, 400*time.Millisecond, nil)
			if err != nil {
				t.Fatal(err)
			}
			b, err := New("b", tc.bS, 400*time.Millisecond, nil)
			if err != nil {
				t.Fatal(err)
			}
			a.AddPeer("b", PeerAddrs{Repl: bRepl, Mgmt: bMgmt})
			b.AddPeer("a", PeerAddrs{Repl: aRepl, Mgmt: aMgmt})
			runDetector(t, a, aRepl, aMgmt)
			stopB := runDetector(t, b, bRepl, bMgmt)
			heard := func(d *Detector, peer string) func() bool {
				return func() bool { v := d.View(peer); return v.ReplHeard && v.MgmtHeard && v.HearsMe }
			}
			waitFor(t, heard(a, "b"), "a hears b on both paths and b hears a")
			waitFor(t, heard(b, "a"), "b hears a on both paths and a hears b")

			stopB()
			waitFor(t, func() bool { v := a.View("b"); return !v.ReplHeard && !v.MgmtHeard && !v.HearsMe }, "a notices b's silence")
		})
	}
}

// TestPathIsTheSocket: over real sockets, a datagram counts for the path of
// the socket it arrived on, and one that names the other path is refused.
func TestPathIsTheSocket(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "b")
	repl, mgmt := freeUDP(t), freeUDP(t)
	d := mustNew(t, "b", Security{Identity: ids["b"]}, "a")
	runDetector(t, d, repl, mgmt)
	rejected := func() uint64 { d.mu.Lock(); defer d.mu.Unlock(); return d.rejected }
	send := func(addr string, p packet) {
		t.Helper()
		p.from, p.to, p.sent = "a", "b", time.Now().UnixNano()
		c, err := net.Dial("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write(mustSign(t, ids["a"], p)); err != nil {
			t.Fatal(err)
		}
	}

	// Run binds its sockets in a goroutine: send until one is seen.
	waitFor(t, func() bool {
		if rejected() > 0 {
			return true
		}
		send(mgmt, packet{path: PathRepl, seq: 10})
		time.Sleep(20 * time.Millisecond)
		return false
	}, "the replication datagram on the management socket is refused")
	refused := rejected()
	if v := d.View("a"); v.ReplHeard || v.MgmtHeard {
		t.Fatalf("a replication datagram on the management socket counted: %+v", v)
	}

	send(mgmt, packet{path: PathMgmt, seq: 11})
	waitFor(t, func() bool { return d.View("a").MgmtHeard }, "the management datagram counts")
	if d.View("a").ReplHeard {
		t.Fatal("a management datagram counted for the replication path")
	}

	send(repl, packet{path: PathRepl, seq: 12})
	waitFor(t, func() bool { return d.View("a").ReplHeard }, "the replication datagram counts")
	if got := rejected(); got != refused {
		t.Fatalf("%d datagrams refused, want only the %d misrouted ones", got, refused)
	}
}
