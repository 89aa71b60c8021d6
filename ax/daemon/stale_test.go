package daemon

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// replPath stands between a primary and its partner's replication address:
// it passes the stream (TCP) through, and the heartbeat datagrams (UDP) only
// while pass is set.
type replPath struct {
	addr string
	pass atomic.Bool
}

func newReplPath(t *testing.T, to string) *replPath {
	t.Helper()
	addr := freePort(t)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := net.ResolveUDPAddr("udp", to)
	if err != nil {
		t.Fatal(err)
	}
	p := &replPath{addr: addr}
	p.pass.Store(true)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); uc.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				s, err := net.Dial("tcp", to)
				if err != nil {
					return
				}
				defer s.Close()
				go func() { io.Copy(s, c); s.Close() }()
				io.Copy(c, s)
			})
		}
	})
	wg.Go(func() {
		// Datagrams from the primary go on to the partner from this
		// socket; the partner's own heartbeats take their own way back.
		buf := make([]byte, 64<<10)
		for {
			n, _, err := uc.ReadFrom(buf)
			if err != nil {
				return
			}
			if p.pass.Load() {
				uc.WriteTo(buf[:n], dst)
			}
		}
	})
	return p
}

// Heartbeat datagrams lost on the replication path while the stream goes on
// delivering checkpoints (a loaded host, a congested link that drops UDP):
// the replica stays ready to take over, and the primary protected. Marking
// it stale would leave the VM unprotected for good while the primary says
// protected.
func TestReplicaLiveStreamNotStale(t *testing.T) {
	var path *replPath
	p := runPair(t, func(h string, c *Config) {
		if h == "a" {
			path = newReplPath(t, c.Peers["b"].Repl)
			peer := c.Peers["b"]
			peer.Repl = path.addr
			c.Peers = map[string]Peer{"b": peer}
		}
	})
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)

	path.pass.Store(false)
	quiet := 3 * (p.b.cfg.SilenceTimeout + p.b.cfg.StaleAfter + p.b.cfg.PromoteAfter)
	for end := time.Now().Add(quiet); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if b := vm1(p.b); b.State != "ready" {
			t.Fatalf("b's replica is %s while the stream delivers checkpoints (a's heartbeats to b lost): %s", b.State, both(p)())
		}
	}
	if v := p.b.hb.View("a"); v.ReplHeard {
		t.Fatalf("b heard a's heartbeats on the replication path through the cut: %+v", v)
	}
	before := vm1(p.a).Committed
	time.Sleep(200 * time.Millisecond)
	if a := vm1(p.a); a.State != "protected" || a.Committed <= before {
		t.Fatalf("a stopped committing: %s", both(p)())
	}
	path.pass.Store(true)
	p.waitFT(t)
}
