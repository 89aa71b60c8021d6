package daemon

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// replPath stands between a host and its partner's replication address: it
// passes the stream (TCP) through, and the heartbeat datagrams (UDP) only
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
		// Datagrams from the host go on to the partner from this socket;
		// the partner's own heartbeats take their own way back.
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

// Heartbeat datagrams lost on the replication path, both ways, while the
// stream goes on delivering checkpoints and acks (a loaded host, a
// congested link that drops UDP): the replica stays ready to take over,
// and the primary keeps its stream and stays protected. Marking the
// replica stale would leave the VM unprotected for good while the primary
// says protected; closing the stream would leave it unprotected for
// nothing.
func TestReplicaLiveStreamNotStale(t *testing.T) {
	paths := map[string]*replPath{}
	p := runPair(t, func(h string, c *Config) {
		for peer, addrs := range c.Peers {
			paths[h] = newReplPath(t, addrs.Repl)
			addrs.Repl = paths[h].addr
			c.Peers = map[string]Peer{peer: addrs}
		}
	})
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)

	for _, path := range paths {
		path.pass.Store(false)
	}
	quiet := 3 * (p.b.cfg.SilenceTimeout + p.b.cfg.StaleAfter + p.b.cfg.PromoteAfter)
	for end := time.Now().Add(quiet); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if a, b := vm1(p.a), vm1(p.b); a.State != "protected" || b.State != "ready" {
			t.Fatalf("a's VM is %s and b's replica %s while the stream delivers checkpoints and acks (heartbeats lost both ways): %s", a.State, b.State, both(p)())
		}
	}
	for h, d := range map[string]*Daemon{"a": p.b, "b": p.a} {
		if v := d.hb.View(h); v.ReplHeard {
			t.Fatalf("%s's heartbeats on the replication path crossed the cut: %+v", h, v)
		}
	}
	before := vm1(p.a).Committed
	time.Sleep(200 * time.Millisecond)
	if a := vm1(p.a); a.Committed <= before {
		t.Fatalf("a stopped committing: %s", both(p)())
	}
	for _, path := range paths {
		path.pass.Store(true)
	}
	p.waitFT(t)
}
