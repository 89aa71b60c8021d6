package heartbeat

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/ratelog"
)

// Every is how often a heartbeat is sent to each partner on each path.
const Every = 100 * time.Millisecond

// maxClockSkew bounds how far a heartbeat's send time may be from the
// receiver's clock. Sequence numbers stop replays inside it.
const maxClockSkew = 30 * time.Second

// rejectLogEvery rate-limits the warning about refused datagrams, which
// anyone who can reach the sockets can trigger.
const rejectLogEvery = time.Minute

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

// Security is how heartbeats are authenticated: set exactly one field.
//
// With an Identity (production) every datagram carries the sender's
// certificate and signature; a partner is known by its certificate's name
// and must hold the host role. With a PSK (the lab) datagrams carry an
// HMAC under a key derived for heartbeats only; the sender's name is then
// self-declared, so any holder of the PSK, the witness included, can
// speak for any host.
type Security struct {
	Identity *identity.Identity
	PSK      []byte
}

// Detector sends heartbeats to partners on both paths and tracks what it
// hears of them.
type Detector struct {
	host     string
	mode     mode
	key      []byte // PSK mode: the derived heartbeat key
	id       *identity.Identity
	verifier *identity.Verifier
	timeout  time.Duration
	log      *slog.Logger

	signFailed bool // logged once; only Run's goroutine sends

	mu    sync.Mutex
	peers map[string][3]*net.UDPAddr // by Path; resolved once, in AddPeer
	heard map[string]*peerHeard
	seq   uint64
	// rejected counts refused datagrams; rejectLog spaces out the warning.
	rejected  uint64
	rejectLog *ratelog.Limiter
}

type peerHeard struct {
	last    [3]time.Time // by Path
	lastSeq [3]uint64    // by Path
	hearsMe time.Time    // last datagram saying the peer hears us
}

// New prepares heartbeats for host; timeout is how long silence on a path
// means the path (or the partner) is down. In identity mode host must be
// the identity's name.
func New(host string, sec Security, timeout time.Duration, log *slog.Logger) (*Detector, error) {
	if err := names.Check("host", host); err != nil {
		return nil, fmt.Errorf("heartbeat: %w", err)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("heartbeat: silence timeout %v must be positive", timeout)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Sequence numbers start from the clock so a restarted sender is not
	// taken for a replay of its earlier self.
	d := &Detector{host: host, timeout: timeout, log: log, peers: map[string][3]*net.UDPAddr{}, rejectLog: ratelog.New(rejectLogEvery),
		heard: map[string]*peerHeard{}, seq: uint64(time.Now().UnixNano())}
	switch {
	case sec.Identity != nil && sec.PSK != nil:
		return nil, errors.New("heartbeat: both an identity and a pre-shared key given; configure one")
	case sec.Identity != nil:
		id := sec.Identity
		if id.Name() != host {
			return nil, fmt.Errorf("heartbeat: host %q holds the certificate of %q; use a certificate issued to %q", host, id.Name(), host)
		}
		if id.Role() != identity.RoleHost {
			return nil, fmt.Errorf("heartbeat: the certificate of %q has role %s; heartbeats need a %s certificate", host, id.Role(), identity.RoleHost)
		}
		worst := headerSize + len(host) + names.MaxLen + trailSize + 2 + len(id.CertDER()) + maxSig
		if worst > maxDatagram {
			return nil, fmt.Errorf("heartbeat: the certificate of %q is %d bytes, too big for a %d-byte datagram; issue a smaller one", host, len(id.CertDER()), maxDatagram)
		}
		// Partners verify ECDSA signatures only: find out now, not by
		// being taken for silent.
		probe := []byte("ax heartbeat signing probe")
		sig, err := id.Sign(probe)
		if err == nil {
			_, err = id.Verifier().Verify(id.CertDER(), probe, sig)
		}
		if err != nil {
			return nil, fmt.Errorf("heartbeat: the key of %q cannot sign heartbeats its partners accept (issue an ECDSA certificate with: axctl pki issue): %w", host, err)
		}
		d.mode, d.id, d.verifier = modeIdentity, id, id.Verifier()
	case sec.PSK != nil:
		if len(sec.PSK) < identity.MinKeySize {
			return nil, fmt.Errorf("heartbeat: pre-shared key of %d bytes, need at least %d", len(sec.PSK), identity.MinKeySize)
		}
		d.mode, d.key = modePSK, identity.DeriveKey(sec.PSK, identity.PurposeHeartbeat)
	default:
		return nil, errors.New("heartbeat: no identity and no pre-shared key; configure one")
	}
	return d, nil
}

// AddPeer starts heartbeats to a partner. An address that does not
// resolve is left out (and logged): that path then counts as silent.
func (d *Detector) AddPeer(name string, addrs PeerAddrs) error {
	if err := names.Check("host", name); err != nil {
		return fmt.Errorf("heartbeat: partner: %w", err)
	}
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
			d.log.Warn("heartbeat address does not resolve", "peer", name, "path", pa.path, "err", err)
			continue
		}
		resolved[pa.path] = ua
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.peers[name] = resolved
	if d.heard[name] == nil {
		d.heard[name] = &peerHeard{}
	}
	return nil
}

// PeerView is what this host hears of a partner now.
type PeerView struct {
	ReplHeard, MgmtHeard bool
	ReplAge, MgmtAge     time.Duration // since the last heartbeat (large if never)
	HearsMe              bool          // the partner said recently that it hears us
	LastHeard            time.Time     // the latest heartbeat on either path (zero if never)
}

// View returns what this host hears of peer.
func (d *Detector) View(peer string) PeerView {
	d.mu.Lock()
	defer d.mu.Unlock()
	ph := d.heard[peer]
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
	v.ReplHeard = v.ReplAge < d.timeout
	v.MgmtHeard = v.MgmtAge < d.timeout
	v.HearsMe = age(ph.hearsMe) < d.timeout
	return v
}

// Run listens on the given UDP addresses (either may be empty) and sends
// heartbeats until ctx ends. A datagram counts for the path of the socket
// it arrived on.
func (d *Detector) Run(ctx context.Context, replListen, mgmtListen string) error {
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
			return fmt.Errorf("heartbeat: %s address: %w", l.path, err)
		}
		c, err := net.ListenUDP("udp", ua)
		if err != nil {
			return fmt.Errorf("heartbeat: listen on %s: %w", l.addr, err)
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
				d.receive(ctx, c, p)
			}()
		}
	}
	t := time.NewTicker(Every)
	defer t.Stop()
	for {
		d.send(conns)
		select {
		case <-ctx.Done():
			for _, c := range conns {
				if c != nil {
					c.Close() // ends the receivers' reads
				}
			}
			return nil
		case <-t.C:
		}
	}
}

func (d *Detector) send(conns [3]*net.UDPConn) {
	type target struct {
		addr *net.UDPAddr
		pkt  packet
	}
	var targets []target
	d.mu.Lock()
	now := time.Now()
	for name, addrs := range d.peers {
		ph := d.heard[name]
		hears := now.Sub(ph.last[PathRepl]) < d.timeout || now.Sub(ph.last[PathMgmt]) < d.timeout
		for _, p := range []Path{PathRepl, PathMgmt} {
			if addrs[p] == nil || conns[p] == nil {
				continue
			}
			d.seq++
			targets = append(targets, target{addrs[p], packet{path: p, heardYou: hears, from: d.host, to: name,
				seq: d.seq, sent: now.UnixNano()}})
		}
	}
	d.mu.Unlock()
	for _, t := range targets {
		b, err := d.seal(t.pkt)
		if err != nil {
			if !d.signFailed {
				d.log.Error("cannot sign heartbeats; partners will take this host for silent", "err", err)
			}
			d.signFailed = true
			return
		}
		// Errors (no route while a link is down) are what heartbeats detect.
		conns[t.pkt.path].WriteToUDP(b, t.addr)
	}
}

func (d *Detector) seal(p packet) ([]byte, error) {
	if d.mode == modeIdentity {
		return sealSigned(d.id, p)
	}
	return sealPSK(d.key, p), nil
}

func (d *Detector) receive(ctx context.Context, c *net.UDPConn, path Path) {
	// One byte more than a heartbeat may have, so an oversized datagram
	// is seen as such rather than silently truncated.
	buf := make([]byte, maxDatagram+1)
	for ctx.Err() == nil {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		now := time.Now()
		if err := d.handle(path, buf[:n], now); err != nil {
			d.noteReject(path, from, err)
		}
	}
}

// handle takes a datagram that arrived on path's socket. It runs the cheap
// checks before the MAC or signature, and changes nothing unless it
// accepts the datagram.
func (d *Detector) handle(path Path, b []byte, now time.Time) error {
	p, signed, err := decode(b)
	switch {
	case err != nil:
		return err
	case p.mode != d.mode:
		return errMode
	case p.path != path:
		return fmt.Errorf("%w: says %s, arrived on %s", errPath, p.path, path)
	case p.to != d.host:
		return fmt.Errorf("%w: %q", errRecipient, p.to)
	}
	if err := d.expects(p.from, path, p.seq); err != nil {
		return err
	}
	if skew := now.Sub(time.Unix(0, p.sent)); skew > maxClockSkew || skew < -maxClockSkew {
		return fmt.Errorf("%w: %v off this host's clock", errStale, skew.Round(time.Millisecond))
	}
	if err := d.authenticate(p, signed); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ph := d.heard[p.from]
	// Checked again: another datagram may have been accepted meanwhile.
	if ph == nil || p.seq <= ph.lastSeq[path] {
		return errReplay
	}
	ph.lastSeq[path] = p.seq
	ph.last[path] = now
	if p.heardYou {
		ph.hearsMe = now
	}
	return nil
}

// expects says why a datagram from a partner cannot be accepted on path
// (the sender is no partner, or its sequence number is not newer), or nil.
func (d *Detector) expects(from string, path Path, seq uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ph := d.heard[from]
	if ph == nil {
		return fmt.Errorf("%w: %q", errUnknownPeer, from)
	}
	if seq <= ph.lastSeq[path] {
		return errReplay
	}
	return nil
}

func (d *Detector) authenticate(p packet, signed []byte) error {
	if d.mode == modePSK {
		m := hmac.New(sha256.New, d.key)
		m.Write(signed)
		if !hmac.Equal(m.Sum(nil), p.auth) {
			return errAuth
		}
		return nil
	}
	peer, err := d.verifier.Verify(p.cert, signed, p.auth)
	if err != nil {
		return fmt.Errorf("%w: %w", errAuth, err)
	}
	if peer.Role != identity.RoleHost {
		return fmt.Errorf("%w: %q is a %s", errRole, peer.Name, peer.Role)
	}
	if peer.Name != p.from {
		return fmt.Errorf("%w: says %q, certificate of %q", errName, p.from, peer.Name)
	}
	return nil
}

// noteReject counts a refused datagram and logs at most once per
// rejectLogEvery how many were refused.
func (d *Detector) noteReject(path Path, from netip.AddrPort, err error) {
	d.mu.Lock()
	d.rejected++
	d.mu.Unlock()
	if ok, held := d.rejectLog.Allow(); ok {
		d.log.Warn("heartbeat datagrams refused", "count", held+1, "path", path, "last_source", from.String(), "last_reason", err)
	}
}
