package replication

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Heartbeats travel as UDP datagrams on both paths between partners — the
// replication link and the management network — so a failed path is told
// apart from a failed host. Each datagram is authenticated with the
// pre-shared key and carries whether the sender hears the receiver, so a
// host learns that its partner hears it (one-way loss is visible).
//
// Datagram: "AXHB" | version u8 | path u8 | heardYou u8 | nameLen u8 | name |
// seq u64 | unixNano i64 | mac[16] (HMAC-SHA256 of everything before it).
const (
	hbMagic   = "AXHB"
	hbVersion = 1
	hbMACSize = 16
	hbMaxName = 64
	// HeartbeatEvery is how often heartbeats are sent on each path.
	HeartbeatEvery = 100 * time.Millisecond
)

// Path names one of the two heartbeat paths.
type Path uint8

// The paths.
const (
	PathRepl Path = 1
	PathMgmt Path = 2
)

func (p Path) String() string {
	switch p {
	case PathRepl:
		return "replication"
	case PathMgmt:
		return "management"
	}
	return fmt.Sprintf("Path(%d)", uint8(p))
}

// PeerAddrs are a partner's heartbeat addresses (host:port, UDP).
type PeerAddrs struct {
	Repl string
	Mgmt string
}

type hbPacket struct {
	path     Path
	heardYou bool
	name     string
	seq      uint64
	sent     int64
}

var errBadHeartbeat = errors.New("bad heartbeat")

func (p hbPacket) encode(psk []byte) []byte {
	b := make([]byte, 0, 8+len(p.name)+16+hbMACSize)
	b = append(b, hbMagic...)
	heard := byte(0)
	if p.heardYou {
		heard = 1
	}
	b = append(b, hbVersion, byte(p.path), heard, byte(len(p.name)))
	b = append(b, p.name...)
	b = binary.LittleEndian.AppendUint64(b, p.seq)
	b = binary.LittleEndian.AppendUint64(b, uint64(p.sent))
	m := hmac.New(sha256.New, psk)
	m.Write(b)
	return append(b, m.Sum(nil)[:hbMACSize]...)
}

func decodeHeartbeat(b, psk []byte) (hbPacket, error) {
	if len(b) < 8+16+hbMACSize || string(b[:4]) != hbMagic || b[4] != hbVersion {
		return hbPacket{}, errBadHeartbeat
	}
	n := int(b[7])
	if n == 0 || n > hbMaxName || len(b) != 8+n+16+hbMACSize {
		return hbPacket{}, errBadHeartbeat
	}
	body := b[:len(b)-hbMACSize]
	m := hmac.New(sha256.New, psk)
	m.Write(body)
	if !hmac.Equal(m.Sum(nil)[:hbMACSize], b[len(body):]) {
		return hbPacket{}, errBadHeartbeat
	}
	p := hbPacket{path: Path(b[5]), heardYou: b[6] == 1, name: string(b[8 : 8+n])}
	if p.path != PathRepl && p.path != PathMgmt {
		return hbPacket{}, errBadHeartbeat
	}
	p.seq = binary.LittleEndian.Uint64(b[8+n:])
	p.sent = int64(binary.LittleEndian.Uint64(b[16+n:]))
	return p, nil
}

// Heartbeats sends and receives partner heartbeats on both paths.
type Heartbeats struct {
	host    string
	psk     []byte
	timeout time.Duration
	log     *slog.Logger

	mu    sync.Mutex
	peers map[string][3]*net.UDPAddr // by Path; resolved once, in AddPeer
	heard map[string]*peerHeard
	seq   uint64
}

type peerHeard struct {
	last     [3]time.Time // by Path
	lastSeq  [3]uint64
	hearsMe  time.Time // last datagram saying the peer hears us
	rejected uint64
}

// NewHeartbeats prepares heartbeats for host; timeout is how long silence
// on a path means the path (or the partner) is down.
func NewHeartbeats(host string, psk []byte, timeout time.Duration, log *slog.Logger) (*Heartbeats, error) {
	if len(host) == 0 || len(host) > hbMaxName {
		return nil, fmt.Errorf("heartbeats: host name must be 1-%d bytes", hbMaxName)
	}
	if len(psk) < MinKeySize {
		return nil, ErrWeakKey
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Sequence numbers start from the clock so a restarted sender is not
	// taken for a replay of its earlier self.
	return &Heartbeats{host: host, psk: psk, timeout: timeout, log: log, peers: map[string][3]*net.UDPAddr{}, heard: map[string]*peerHeard{},
		seq: uint64(time.Now().UnixNano())}, nil
}

// AddPeer starts heartbeats to a partner. An address that does not
// resolve is left out (and logged): that path then counts as silent.
func (h *Heartbeats) AddPeer(name string, addrs PeerAddrs) {
	var resolved [3]*net.UDPAddr
	for _, pa := range []struct {
		path Path
		addr string
	}{{PathRepl, addrs.Repl}, {PathMgmt, addrs.Mgmt}} {
		if pa.addr == "" {
			continue
		}
		ua, err := net.ResolveUDPAddr("udp", pa.addr)
		if err != nil {
			h.log.Warn("heartbeat address does not resolve", "peer", name, "path", pa.path, "err", err)
			continue
		}
		resolved[pa.path] = ua
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.peers[name] = resolved
	if h.heard[name] == nil {
		h.heard[name] = &peerHeard{}
	}
}

// PeerView is what this host hears of a partner now.
type PeerView struct {
	ReplHeard, MgmtHeard bool
	ReplAge, MgmtAge     time.Duration // since the last heartbeat (large if never)
	HearsMe              bool          // the partner said recently that it hears us
	LastHeard            time.Time     // the latest heartbeat on either path (zero if never)
}

// View returns what this host hears of peer.
func (h *Heartbeats) View(peer string) PeerView {
	h.mu.Lock()
	defer h.mu.Unlock()
	ph := h.heard[peer]
	if ph == nil {
		return PeerView{ReplAge: time.Hour, MgmtAge: time.Hour}
	}
	age := func(t time.Time) time.Duration {
		if t.IsZero() {
			return time.Hour
		}
		return time.Since(t)
	}
	v := PeerView{ReplAge: age(ph.last[PathRepl]), MgmtAge: age(ph.last[PathMgmt]), LastHeard: ph.last[PathRepl]}
	if ph.last[PathMgmt].After(v.LastHeard) {
		v.LastHeard = ph.last[PathMgmt]
	}
	v.ReplHeard = v.ReplAge < h.timeout
	v.MgmtHeard = v.MgmtAge < h.timeout
	v.HearsMe = age(ph.hearsMe) < h.timeout
	return v
}

// Run listens on the given UDP addresses (either may be empty) and sends
// heartbeats until ctx ends.
func (h *Heartbeats) Run(ctx context.Context, replListen, mgmtListen string) error {
	var conns [3]*net.UDPConn
	for _, l := range []struct {
		path Path
		addr string
	}{{PathRepl, replListen}, {PathMgmt, mgmtListen}} {
		if l.addr == "" {
			continue
		}
		ua, err := net.ResolveUDPAddr("udp", l.addr)
		if err != nil {
			return fmt.Errorf("heartbeats: %s address: %w", l.path, err)
		}
		c, err := net.ListenUDP("udp", ua)
		if err != nil {
			return fmt.Errorf("heartbeats: listen on %s: %w", l.addr, err)
		}
		conns[l.path] = c
		defer c.Close()
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for p := PathRepl; p <= PathMgmt; p++ {
		if c := conns[p]; c != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				h.receive(ctx, c)
			}()
		}
	}
	t := time.NewTicker(HeartbeatEvery)
	defer t.Stop()
	for {
		h.send(conns)
		select {
		case <-ctx.Done():
			for _, c := range conns {
				if c != nil {
					c.Close()
				}
			}
			return nil
		case <-t.C:
		}
	}
}

func (h *Heartbeats) send(conns [3]*net.UDPConn) {
	h.mu.Lock()
	type target struct {
		path Path
		addr *net.UDPAddr
		pkt  []byte
	}
	var targets []target
	for name, addrs := range h.peers {
		ph := h.heard[name]
		hears := time.Since(ph.last[PathRepl]) < h.timeout || time.Since(ph.last[PathMgmt]) < h.timeout
		for _, p := range []Path{PathRepl, PathMgmt} {
			if addrs[p] == nil || conns[p] == nil {
				continue
			}
			h.seq++
			pkt := hbPacket{path: p, heardYou: hears, name: h.host, seq: h.seq, sent: time.Now().UnixNano()}
			targets = append(targets, target{p, addrs[p], pkt.encode(h.psk)})
		}
	}
	h.mu.Unlock()
	for _, t := range targets {
		// Errors (no route while a link is down) are what heartbeats detect.
		conns[t.path].WriteToUDP(t.pkt, t.addr)
	}
}

func (h *Heartbeats) receive(ctx context.Context, c *net.UDPConn) {
	buf := make([]byte, 512)
	for ctx.Err() == nil {
		n, _, err := c.ReadFromUDP(buf)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			continue
		}
		p, err := decodeHeartbeat(buf[:n], h.psk)
		if err != nil {
			continue // unauthenticated or malformed: ignored, changes nothing
		}
		if d := time.Since(time.Unix(0, p.sent)); d > 30*time.Second || d < -30*time.Second {
			continue
		}
		h.mu.Lock()
		ph := h.heard[p.name]
		if ph != nil && p.seq > ph.lastSeq[p.path] {
			ph.lastSeq[p.path] = p.seq
			ph.last[p.path] = time.Now()
			if p.heardYou {
				ph.hearsMe = time.Now()
			}
		}
		h.mu.Unlock()
	}
}
