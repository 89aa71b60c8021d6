package replication

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

func freeUDP(t *testing.T) string {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

func TestHeartbeatsBothPaths(t *testing.T) {
	psk := []byte("0123456789abcdef0123")
	aRepl, aMgmt, bRepl, bMgmt := freeUDP(t), freeUDP(t), freeUDP(t), freeUDP(t)
	a, _ := NewHeartbeats("a", psk, 400*time.Millisecond, nil)
	b, _ := NewHeartbeats("b", psk, 400*time.Millisecond, nil)
	a.AddPeer("b", PeerAddrs{Repl: bRepl, Mgmt: bMgmt})
	b.AddPeer("a", PeerAddrs{Repl: aRepl, Mgmt: aMgmt})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	run := func(h *Heartbeats, repl, mgmt string, ctx context.Context) {
		wg.Add(1)
		go func() { defer wg.Done(); h.Run(ctx, repl, mgmt) }()
	}
	run(a, aRepl, aMgmt, ctx)
	bctx, bcancel := context.WithCancel(ctx)
	run(b, bRepl, bMgmt, bctx)
	waitFor(t, func() bool { v := a.View("b"); return v.ReplHeard && v.MgmtHeard && v.HearsMe }, "a hears b on both paths and b hears a")

	// A forged heartbeat (wrong key) for an unheard peer changes nothing.
	a.AddPeer("c", PeerAddrs{})
	forged := hbPacket{path: PathMgmt, name: "c", seq: 1 << 62, sent: time.Now().UnixNano()}.encode([]byte("not-the-key-at-all!!"))
	conn, _ := net.Dial("udp", aMgmt)
	conn.Write(forged)
	conn.Write([]byte("garbage"))
	conn.Close()
	time.Sleep(150 * time.Millisecond)
	if v := a.View("c"); v.MgmtHeard {
		t.Fatal("forged heartbeat accepted")
	}

	// b dies: a hears nothing on either path after the timeout.
	bcancel()
	waitFor(t, func() bool { v := a.View("b"); return !v.ReplHeard && !v.MgmtHeard && !v.HearsMe }, "a notices b's silence")
}

func TestHeartbeatDecodeRejects(t *testing.T) {
	psk := []byte("0123456789abcdef0123")
	good := hbPacket{path: PathRepl, name: "a", seq: 7, sent: 1}.encode(psk)
	if p, err := decodeHeartbeat(good, psk); err != nil || p.name != "a" || p.seq != 7 {
		t.Fatalf("decode good: %+v %v", p, err)
	}
	for i := range good {
		bad := append([]byte(nil), good...)
		bad[i] ^= 0x40
		if _, err := decodeHeartbeat(bad, psk); err == nil {
			t.Errorf("flipped byte %d accepted", i)
		}
	}
	for _, n := range []int{0, 1, len(good) - 1} {
		if _, err := decodeHeartbeat(good[:n], psk); err == nil {
			t.Errorf("truncated to %d accepted", n)
		}
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(fmt.Sprintf("timed out waiting until %s", what))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
