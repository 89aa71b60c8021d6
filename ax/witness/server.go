package witness

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/ratelog"
)

const (
	// maxNonces bounds the replay cache. Honest hosts use a few nonces a
	// second; a full cache refuses requests rather than forget a nonce early.
	maxNonces = 1 << 16
	// pruneEvery is how many remembered nonces pass between sweeps.
	pruneEvery = 1024
	// maxLeases bounds the VMs the witness knows; a new one past it is
	// refused. Only authenticated hosts add VMs.
	maxLeases = 1 << 16
	// floorLead is how far ahead of the requests it accepts the witness
	// persists its bound on their timestamps: one state write per floorLead
	// at most, for the bound alone.
	floorLead = 2 * time.Second
	// warnEvery rate-limits warnings about rejected requests.
	warnEvery = 10 * time.Second
)

// ServerConfig configures a witness. Exactly one of Identity and PSK is set.
type ServerConfig struct {
	// Identity selects TLS mode: the witness serves TLS 1.3 with this
	// identity (role witness) and serves hosts with certificates from the
	// same CA; a request's holder is its host's certificate name.
	Identity *identity.Identity
	// PSK selects PSK mode: the pre-shared master key (at least MinKeySize
	// bytes); the line key is derived from it for the witness alone.
	PSK []byte
	// LeaseTTL is the length of a lease.
	LeaseTTL time.Duration
	// StateFile keeps leases and the replay floor across restarts; "" keeps
	// them in memory only (tests). Its directory must exist; NewServer
	// creates the file if it is absent.
	StateFile string
	// Now is the clock (time.Now when nil); Log the logger (discard when nil).
	Now func() time.Time
	Log *slog.Logger
}

// Server is the witness: it grants each VM's lease to one holder at a time.
//
// Leases survive a restart in the state file: the holder of each is written
// before the witness grants a lease to a new holder, and expiries ride along
// with the writes of the replay floor (below), so a saved expiry can lag the
// real one by about floorLead. For one lease TTL after NewServer the witness
// refuses takeovers (except by a holder whose lease is valid) and Query
// reports no VM as expired: every lease granted before the restart has run
// out by then, whatever the saved expiry or a step of the wall clock across
// the restart. Renewals are served throughout, but only by a lease's saved
// holder while it is valid, which is why only a host that runs the VM, or has
// just won a takeover, may renew its lease.
//
// Replays across a restart: the witness never accepts a request whose
// timestamp exceeds the bound last saved ("accepted up to"); before it would,
// it saves a new bound floorLead ahead. After a restart the saved bound (or
// the start time, if later) is the floor: requests at or below it are refused
// with a signed answer that names it, and clients retry at once above it.
type Server struct {
	lineKey []byte      // PSK mode: the line MAC key; TLS mode: nil
	tlsConf *tls.Config // TLS mode
	ttl     time.Duration
	path    string // state file, "" for memory only
	now     func() time.Time
	log     *slog.Logger
	started time.Time
	budget  *budget

	mu       sync.Mutex
	graceEnd time.Time
	floor    int64            // Unix ms: requests at or below it are refused
	ceiling  int64            // Unix ms: saved bound on accepted requests' timestamps
	leases   map[string]lease // by VM name
	nonces   map[[nonceSize]byte]time.Time
	inserted int // nonces remembered since the last sweep
	saves    int // state writes, for tests

	warnings *ratelog.Limiter
}

type lease struct {
	holder  string
	expires time.Time
}

// NewServer returns a witness, with the leases and floor of cfg.StateFile if
// it exists. A state file from a newer version (ErrStateVersion) or one
// damaged (ErrStateCorrupt) is an error, never an empty state. The grace
// period of a restarted witness starts now.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.LeaseTTL <= 0 {
		return nil, fmt.Errorf("witness: lease TTL %s, want > 0", cfg.LeaseTTL)
	}
	s := &Server{
		warnings: ratelog.New(warnEvery),
		ttl:      cfg.LeaseTTL,
		path:     cfg.StateFile,
		now:      cfg.Now,
		log:      cfg.Log,
		budget:   newBudget(),
		leases:   make(map[string]lease),
		nonces:   make(map[[nonceSize]byte]time.Time),
	}
	switch {
	case cfg.Identity != nil && cfg.PSK != nil:
		return nil, errors.New("witness: both an identity and a pre-shared key given: configure one security mode")
	case cfg.Identity != nil:
		if cfg.Identity.Role() != identity.RoleWitness {
			return nil, fmt.Errorf("witness: certificate %q has role %s: the witness needs a %s certificate (axctl pki issue --role %s)", cfg.Identity.Name(), cfg.Identity.Role(), identity.RoleWitness, identity.RoleWitness)
		}
		s.tlsConf = cfg.Identity.ServerConfig(acceptHost)
	case cfg.PSK != nil:
		if err := checkKey(cfg.PSK); err != nil {
			return nil, err
		}
		s.lineKey = pskLineKey(cfg.PSK)
	default:
		return nil, errors.New("witness: no identity and no pre-shared key: configure one security mode")
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.started = s.now()
	s.graceEnd = s.started.Add(s.ttl)
	s.floor = s.started.UnixMilli()
	if s.path != "" {
		removeTemps(s.path)
		st, found, err := loadState(s.path)
		if err != nil {
			return nil, err
		}
		if found {
			for _, l := range st.Leases {
				s.leases[l.VM] = lease{holder: l.Holder, expires: time.UnixMilli(l.ExpiresAt)}
			}
			s.floor = max(s.floor, st.AcceptedUpTo)
			s.log.Info("witness state loaded", "file", s.path, "leases", len(st.Leases), "floor", time.UnixMilli(s.floor))
		} else {
			s.log.Info("witness state file absent, starting without leases", "file", s.path)
		}
	}
	s.ceiling = s.floor
	if s.path != "" {
		// Written now, so that an unwritable place fails the start rather
		// than every request, and the start time is the floor next time.
		st := savedState{AcceptedUpTo: s.ceiling}
		for vm, l := range s.leases {
			st.Leases = append(st.Leases, savedLease{VM: vm, Holder: l.holder, ExpiresAt: l.expires.UnixMilli()})
		}
		if err := saveState(s.path, st); err != nil {
			return nil, fmt.Errorf("witness: state file %s: %w (its directory must exist and be writable)", s.path, err)
		}
	}
	return s, nil
}

// acceptHost admits any host of the witness's CA; which leases it may hold
// is the witness's business.
func acceptHost(p identity.Peer) error {
	if p.Role != identity.RoleHost {
		return fmt.Errorf("%w: %q is a %s; only hosts hold leases", identity.ErrPeer, p.Name, p.Role)
	}
	return nil
}

// Serve accepts connections on ln until ctx is done, then closes ln and every
// connection, waits for their handlers and returns nil. It returns an error
// only if ln fails for another reason. ln is a plain TCP listener in both
// modes: the witness runs TLS itself, under its connection budget.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	mode := "psk"
	if s.tlsConf != nil {
		mode = "tls"
	}
	s.log.Info("witness serving", "addr", ln.Addr().String(), "mode", mode, "lease_ttl", s.ttl, "state_file", s.path, "takeovers_refused_until", s.graceEnd)
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("witness: accept on %s: %w", ln.Addr(), err)
			}
			// Out of file descriptors and the like: pass, do not spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.warn("witness: accept failed, retrying", "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		t, evict := s.budget.admit(conn)
		for _, c := range evict {
			c.Close()
		}
		if len(evict) > 0 {
			s.warn("witness: too many unauthenticated connections, closed the oldest", "remote", conn.RemoteAddr().String(), "max", maxPreAuth, "max_per_source", maxPreAuthPerSource)
		}
		wg.Go(func() {
			defer s.budget.release(t)
			s.serveConn(ctx, t)
		})
	}
}

// session is what a connection has established about its peer.
type session struct {
	from string
	key  []byte // line MAC key
	// holder is the one holder the connection's requests may name, once
	// bound: the certificate's name, or in PSK mode the first authenticated
	// request's holder.
	holder string
	bound  bool
	// admit is called with the holder when a PSK connection authenticates;
	// false closes it.
	admit func(holder string) bool
}

// serveConn authenticates a connection, then answers request lines until
// the peer closes, goes idle, or sends a line that is too long, malformed
// or unauthenticated.
func (s *Server) serveConn(ctx context.Context, t *tracked) {
	raw := t.conn
	defer raw.Close()
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	if err := raw.SetDeadline(time.Now().Add(preAuthTimeout)); err != nil {
		return
	}
	sess := &session{from: raw.RemoteAddr().String()}
	var rw io.ReadWriter = raw
	if s.tlsConf != nil {
		tc := tls.Server(raw, s.tlsConf)
		if err := tc.HandshakeContext(ctx); err != nil {
			s.warn("witness: TLS handshake failed", "remote", sess.from, "err", err)
			return
		}
		cs := tc.ConnectionState()
		peer, err := identity.PeerOf(cs)
		if err != nil {
			s.warn("witness: TLS peer", "remote", sess.from, "err", err)
			return
		}
		if sess.key, err = tlsLineKey(cs); err != nil {
			s.warn("witness: TLS session", "remote", sess.from, "err", err)
			return
		}
		if !s.promote(t, peer.Name) {
			return
		}
		sess.holder, sess.bound = peer.Name, true
		rw = tc
	} else {
		sess.key = s.lineKey
		sess.admit = func(holder string) bool { return s.promote(t, holder) }
	}

	r := bufio.NewReaderSize(rw, MaxLineSize)
	for {
		if sess.bound {
			if err := raw.SetDeadline(time.Now().Add(authIdleTimeout)); err != nil {
				return
			}
		} // else the pre-authentication deadline stands
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			s.warn("witness: request line too long, dropping connection", "remote", sess.from, "max_bytes", MaxLineSize)
			return
		}
		if err != nil {
			return // closed, idle, evicted or a partial line at EOF
		}
		resp, keep := s.handleLine(sess, line[:len(line)-1])
		if resp != nil {
			out, err := encodeLine(resp)
			if err != nil {
				return
			}
			if _, err := rw.Write(out); err != nil {
				return
			}
		}
		if !keep {
			return
		}
	}
}

// promote moves t to the authenticated connections of holder, closing the
// holder's oldest connection if it has too many. False: t must close.
func (s *Server) promote(t *tracked, holder string) bool {
	evict, err := s.budget.promote(t, holder)
	if evict != nil {
		evict.Close()
		s.log.Debug("witness: closed a holder's oldest connection", "holder", holder, "max", maxConnsPerHolder)
	}
	if err != nil {
		s.warn("witness: closing an authenticated connection", "holder", holder, "remote", t.conn.RemoteAddr().String(), "err", err)
		return false
	}
	return true
}

// handleLine answers one request line. A nil response drops the connection
// without a word; keep false closes it after the response.
func (s *Server) handleLine(sess *session, line []byte) (resp *response, keep bool) {
	req, err := decodeRequest(line)
	if err != nil {
		s.warn("witness: malformed request, dropping connection", "remote", sess.from, "err", err)
		return nil, false
	}
	nonce := hex.EncodeToString(req.nonce[:])
	if !req.verify(sess.key) {
		s.warn("witness: request failed authentication (wrong pre-shared key?)", "remote", sess.from, "op", req.op, "vm", req.vm, "holder", req.holder)
		// Not signed: the request proved nothing, so neither does the answer;
		// it only tells an honest but misconfigured client why.
		return &response{Nonce: nonce, Code: codeAuth, Error: "request failed authentication: check that this host and the witness use the same pre-shared key"}, false
	}
	keep = true
	if !sess.bound {
		if sess.admit != nil && !sess.admit(req.holder) {
			return nil, false
		}
		sess.holder, sess.bound = req.holder, true
	}
	if req.holder != sess.holder && (req.op != opQuery || req.holder != "") {
		s.warn("witness: request names another holder than its connection, dropping connection", "remote", sess.from, "op", req.op, "vm", req.vm, "holder", req.holder, "connection_holder", sess.holder)
		resp, keep = refusal(codeHolder, fmt.Sprintf("this connection speaks for holder %q, the request names %q: a host may hold leases only under its own name", sess.holder, req.holder)), false
	} else {
		resp = s.handle(&req, sess.from)
	}
	resp.Nonce = nonce
	resp.sign(sess.key)
	return resp, keep
}

// handle serves one authenticated request.
func (s *Server) handle(req *request, from string) *response {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()

	sent := req.time()
	if d := now.Sub(sent); d > MaxRequestAge || d < -MaxRequestAge {
		s.warn("witness: stale request rejected", "remote", from, "op", req.op, "vm", req.vm, "holder", req.holder, "skew", d)
		return refusal(codeReplay, fmt.Sprintf("request time %s is %s from the witness's clock, more than %s: a replay, or check NTP on both hosts", sent.UTC().Format(time.RFC3339Nano), d.Round(time.Millisecond), MaxRequestAge))
	}
	if req.ts <= s.floor {
		s.log.Debug("witness: request below the restart floor refused", "remote", from, "op", req.op, "vm", req.vm, "holder", req.holder, "ts", req.ts, "floor", s.floor)
		r := refusal(codeFloor, fmt.Sprintf("request time %d is not after %d, the last time the witness may have accepted before it restarted: send again with a later timestamp", req.ts, s.floor))
		r.Floor = s.floor
		return r
	}
	if _, seen := s.nonces[req.nonce]; seen {
		s.warn("witness: replayed request rejected", "remote", from, "op", req.op, "vm", req.vm, "holder", req.holder)
		return refusal(codeReplay, "nonce already used: replayed request")
	}
	if !s.remember(req.nonce, sent.Add(MaxRequestAge), now) {
		s.warn("witness: replay cache full, refusing requests", "max", maxNonces)
		return refusal(codeBusy, "witness replay cache full, retry later")
	}

	var resp *response
	var grant *lease
	switch req.op {
	case opRenew:
		resp, grant = s.renew(req, now)
	case opTakeover:
		resp, grant = s.takeover(req, now)
	case opRelease:
		resp, grant = s.release(req, now)
	default:
		resp = s.query(req, now)
	}
	old, had := s.leases[req.vm]
	if grant != nil && !had && len(s.leases) >= maxLeases {
		s.warn("witness: lease table full, refusing a new VM", "vm", req.vm, "holder", req.holder, "max", maxLeases)
		return refusal(codeBusy, fmt.Sprintf("the witness knows %d VMs, its limit: refusing a new one", maxLeases))
	}

	// Persist before answering whatever a restarted witness must know:
	// a new holder, or a timestamp beyond the saved bound.
	ceiling := s.ceiling
	if req.ts > ceiling {
		ceiling = max(req.ts, now.UnixMilli()) + floorLead.Milliseconds()
	}
	newHolder := grant != nil && (!had || old.holder != grant.holder)
	if ceiling != s.ceiling || newHolder {
		if err := s.save(ceiling, req.vm, grant); err != nil {
			s.warn("witness: cannot save state, refusing requests", "file", s.path, "err", err)
			return refusal(codeStore, "the witness cannot save its state: "+err.Error())
		}
		s.ceiling = ceiling
	}
	if grant != nil {
		s.leases[req.vm] = *grant
		if newHolder {
			s.log.Info("witness: lease granted", "op", req.op, "vm", req.vm, "holder", grant.holder, "until", grant.expires, "previous_holder", old.holder)
		} else {
			s.log.Debug("witness: lease renewed", "vm", req.vm, "holder", grant.holder, "until", grant.expires)
		}
	}
	return resp
}

// save writes the state as it will be once vm's lease is grant (nil: as
// is) and the bound is ceiling. s.mu is held: requests wait for the write,
// which happens about once per floorLead and when a lease changes holder.
func (s *Server) save(ceiling int64, vm string, grant *lease) error {
	if s.path == "" {
		return nil
	}
	st := savedState{AcceptedUpTo: ceiling, Leases: make([]savedLease, 0, len(s.leases)+1)}
	for name, l := range s.leases {
		if name == vm && grant != nil {
			continue
		}
		st.Leases = append(st.Leases, savedLease{VM: name, Holder: l.holder, ExpiresAt: l.expires.UnixMilli()})
	}
	if grant != nil {
		st.Leases = append(st.Leases, savedLease{VM: vm, Holder: grant.holder, ExpiresAt: grant.expires.UnixMilli()})
	}
	if err := saveState(s.path, st); err != nil {
		return err
	}
	s.saves++
	return nil
}

// remember records nonce until expires, when its request's timestamp is too
// old to pass anyway. It reports false when the cache is full.
func (s *Server) remember(nonce [nonceSize]byte, expires, now time.Time) bool {
	if s.inserted >= pruneEvery || len(s.nonces) >= maxNonces {
		for n, until := range s.nonces {
			if now.After(until) {
				delete(s.nonces, n)
			}
		}
		s.inserted = 0
	}
	if len(s.nonces) >= maxNonces {
		return false
	}
	s.nonces[nonce] = expires
	s.inserted++
	return true
}

// renew decides a renewal; grant is the lease to record if it succeeds.
func (s *Server) renew(req *request, now time.Time) (resp *response, grant *lease) {
	l, ok := s.leases[req.vm]
	if ok && l.holder != req.holder && now.Before(l.expires) {
		s.log.Info("witness: renewal refused, lease held by another host", "vm", req.vm, "holder", req.holder, "held_by", l.holder, "until", l.expires)
		return heldBy(l, now), nil
	}
	expires := now.Add(s.ttl)
	if ok && l.holder == req.holder && l.expires.After(expires) {
		expires = l.expires // never shorten a lease
	}
	return granted(req.holder, expires, now), &lease{holder: req.holder, expires: expires}
}

// takeover hands the VM's lease to req.holder if nobody else holds it. Under
// s.mu it is atomic: of two secondaries racing, the second finds the first's
// fresh lease. It succeeds for the current holder too, so a caller whose
// answer was lost can ask again.
func (s *Server) takeover(req *request, now time.Time) (resp *response, grant *lease) {
	l, ok := s.leases[req.vm]
	mine := ok && l.holder == req.holder && now.Before(l.expires)
	if !mine && now.Before(s.graceEnd) {
		s.log.Info("witness: takeover refused, witness restarted recently", "vm", req.vm, "holder", req.holder, "until", s.graceEnd)
		return &response{
			Code:        codeRestarted,
			Error:       fmt.Sprintf("witness restarted at %s and cannot vouch for the leases granted before: takeovers refused until %s", s.started.UTC().Format(time.RFC3339), s.graceEnd.UTC().Format(time.RFC3339)),
			ExpiresAt:   s.graceEnd.UnixMilli(),
			RemainingMS: s.graceEnd.Sub(now).Milliseconds(),
		}, nil
	}
	if ok && !mine && now.Before(l.expires) {
		s.log.Info("witness: takeover refused, lease still valid", "vm", req.vm, "holder", req.holder, "held_by", l.holder, "until", l.expires)
		return heldBy(l, now), nil
	}
	expires := now.Add(s.ttl)
	if mine && l.expires.After(expires) {
		expires = l.expires
	}
	return granted(req.holder, expires, now), &lease{holder: req.holder, expires: expires}
}

// release ends req.holder's lease of the VM now, for a planned handover:
// the partner's next takeover succeeds at once instead of after the TTL.
// The holder is kept, expired, so that Query still names who held it last.
// Releasing a lease that another host holds is refused; releasing one that
// lapsed, or that no one holds, changes nothing. A release lost with a
// witness restart only delays the partner: the saved expiry stands.
func (s *Server) release(req *request, now time.Time) (resp *response, grant *lease) {
	l, ok := s.leases[req.vm]
	switch {
	case ok && l.holder != req.holder && now.Before(l.expires):
		s.log.Info("witness: release refused, lease held by another host", "vm", req.vm, "holder", req.holder, "held_by", l.holder, "until", l.expires)
		return heldBy(l, now), nil
	case !ok || l.holder != req.holder || !now.Before(l.expires):
		return &response{OK: true, Holder: req.holder, Expired: true}, nil
	}
	s.log.Info("witness: lease released by its holder", "vm", req.vm, "holder", req.holder, "was_until", l.expires)
	return &response{OK: true, Holder: req.holder, Expired: true, ExpiresAt: now.UnixMilli()}, &lease{holder: req.holder, expires: now}
}

func (s *Server) query(req *request, now time.Time) *response {
	l, ok := s.leases[req.vm]
	// A VM without a lease is not expired while the grace lasts: the
	// witness cannot yet vouch that nobody holds it.
	until := s.graceEnd
	if ok && l.expires.After(until) {
		until = l.expires
	}
	resp := &response{OK: true, Holder: l.holder, Expired: !now.Before(until)}
	if ok || !resp.Expired {
		resp.ExpiresAt = until.UnixMilli()
		resp.RemainingMS = max(0, until.Sub(now).Milliseconds())
	}
	return resp
}

func heldBy(l lease, now time.Time) *response {
	left := l.expires.Sub(now)
	return &response{
		Code:        codeHeld,
		Error:       fmt.Sprintf("held by %q until %s (%s left)", l.holder, l.expires.UTC().Format(time.RFC3339Nano), left.Round(time.Millisecond)),
		Holder:      l.holder,
		ExpiresAt:   l.expires.UnixMilli(),
		RemainingMS: left.Milliseconds(),
	}
}

func granted(holder string, expires, now time.Time) *response {
	// Milliseconds truncates: the holder's idea of its lease never outlasts ours.
	return &response{OK: true, Holder: holder, ExpiresAt: expires.UnixMilli(), RemainingMS: expires.Sub(now).Milliseconds()}
}

func refusal(code, msg string) *response { return &response{Code: code, Error: msg} }

// warn logs at most one warning per warnEvery, counting the ones it drops:
// rejected requests come from the network, and a flood must not flood the log.
func (s *Server) warn(msg string, args ...any) {
	ok, suppressed := s.warnings.Allow()
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed_since_last", suppressed)
	}
	s.log.Warn(msg, args...)
}
