package witness

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"
)

const (
	// maxConns bounds the connections served at once; more are closed on
	// accept. Two hosts per protected pair need a handful.
	maxConns = 64
	// connIdleTimeout closes a connection that sends no complete line.
	connIdleTimeout = 10 * time.Second
	// maxNonces bounds the replay cache. Honest hosts use a few nonces a
	// second; a full cache refuses requests rather than forget a nonce early.
	maxNonces = 1 << 16
	// pruneEvery is how many remembered nonces pass between sweeps.
	pruneEvery = 1024
	// warnEvery rate-limits warnings about rejected requests.
	warnEvery = 10 * time.Second
)

// Server is the witness: it grants each VM's lease to one holder at a time.
//
// Leases live in memory only. A restarted witness has forgotten them, so for
// one lease TTL after NewServer it refuses takeovers (except by a holder that
// renewed since) and Query reports no lease as expired. A lease granted
// before the restart runs out within that time — its holder fences unless it
// renews, and a renewal re-creates the lease here — so it cannot be stolen.
// Renewals are served throughout, which is why only a host that runs the VM,
// or has just won a takeover, may renew its lease.
type Server struct {
	psk      []byte
	ttl      time.Duration
	now      func() time.Time
	log      *slog.Logger
	started  time.Time
	graceEnd time.Time

	mu       sync.Mutex
	leases   map[string]lease // by VM name
	nonces   map[[nonceSize]byte]time.Time
	inserted int // nonces remembered since the last sweep

	warnMu     sync.Mutex
	warnNext   time.Time
	suppressed int
}

type lease struct {
	holder  string
	expires time.Time
}

// NewServer returns a witness granting leases of leaseTTL, authenticated with
// psk. The grace period of a restarted witness starts now. A nil now means
// time.Now, a nil log discards.
func NewServer(psk []byte, leaseTTL time.Duration, now func() time.Time, log *slog.Logger) (*Server, error) {
	if err := checkKey(psk); err != nil {
		return nil, err
	}
	if leaseTTL <= 0 {
		return nil, fmt.Errorf("witness: lease TTL %s, want > 0", leaseTTL)
	}
	if now == nil {
		now = time.Now
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	started := now()
	return &Server{
		psk:      append([]byte(nil), psk...),
		ttl:      leaseTTL,
		now:      now,
		log:      log,
		started:  started,
		graceEnd: started.Add(leaseTTL),
		leases:   make(map[string]lease),
		nonces:   make(map[[nonceSize]byte]time.Time),
	}, nil
}

// Serve accepts connections on ln until ctx is done, then closes ln and every
// connection, waits for their handlers and returns nil. It returns an error
// only if ln fails for another reason.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	s.log.Info("witness serving", "addr", ln.Addr().String(), "lease_ttl", s.ttl, "takeovers_refused_until", s.graceEnd)
	slots := make(chan struct{}, maxConns)
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
		select {
		case slots <- struct{}{}:
		default:
			s.warn("witness: too many connections, closing a new one", "remote", conn.RemoteAddr().String(), "max", maxConns)
			conn.Close()
			continue
		}
		wg.Go(func() {
			defer func() { <-slots }()
			s.serveConn(ctx, conn)
		})
	}
}

// serveConn answers request lines until the peer closes, goes idle, or sends
// a line that is too long, malformed or unauthenticated.
func (s *Server) serveConn(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	r := bufio.NewReaderSize(conn, MaxLineSize)
	for {
		if err := conn.SetDeadline(time.Now().Add(connIdleTimeout)); err != nil {
			return
		}
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			s.warn("witness: request line too long, dropping connection", "remote", conn.RemoteAddr().String(), "max_bytes", MaxLineSize)
			return
		}
		if err != nil {
			return // closed, idle or a partial line at EOF
		}
		resp, keep := s.handleLine(line[:len(line)-1], conn.RemoteAddr())
		if resp != nil {
			out, err := encodeLine(resp)
			if err != nil {
				return
			}
			if _, err := conn.Write(out); err != nil {
				return
			}
		}
		if !keep {
			return
		}
	}
}

// handleLine answers one request line. A nil response drops the connection
// without a word; keep false closes it after the response.
func (s *Server) handleLine(line []byte, from net.Addr) (resp *response, keep bool) {
	req, err := decodeRequest(line)
	if err != nil {
		s.warn("witness: malformed request, dropping connection", "remote", from.String(), "err", err)
		return nil, false
	}
	nonce := hex.EncodeToString(req.nonce[:])
	if !req.verify(s.psk) {
		s.warn("witness: request failed authentication (wrong pre-shared key?)", "remote", from.String(), "op", req.op, "vm", req.vm, "holder", req.holder)
		// Not signed: the request proved nothing, so neither does the answer;
		// it only tells an honest but misconfigured client why.
		return &response{Nonce: nonce, Code: codeAuth, Error: "request failed authentication: check that this host and the witness use the same pre-shared key"}, false
	}
	resp = s.handle(&req, from)
	resp.Nonce = nonce
	resp.sign(s.psk)
	return resp, true
}

// handle serves one authenticated request.
func (s *Server) handle(req *request, from net.Addr) *response {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()

	sent := req.time()
	if d := now.Sub(sent); d > MaxRequestAge || d < -MaxRequestAge {
		s.warn("witness: stale request rejected", "remote", from.String(), "op", req.op, "vm", req.vm, "holder", req.holder, "skew", d)
		return refusal(codeReplay, fmt.Sprintf("request time %s is %s from the witness's clock, more than %s: a replay, or check NTP on both hosts", sent.UTC().Format(time.RFC3339Nano), d.Round(time.Millisecond), MaxRequestAge))
	}
	if _, seen := s.nonces[req.nonce]; seen {
		s.warn("witness: replayed request rejected", "remote", from.String(), "op", req.op, "vm", req.vm, "holder", req.holder)
		return refusal(codeReplay, "nonce already used: replayed request")
	}
	if !s.remember(req.nonce, sent.Add(MaxRequestAge), now) {
		s.warn("witness: replay cache full, refusing requests", "max", maxNonces)
		return refusal(codeBusy, "witness replay cache full, retry later")
	}

	switch req.op {
	case opRenew:
		return s.renew(req, now)
	case opTakeover:
		return s.takeover(req, now)
	default:
		return s.query(req, now)
	}
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

func (s *Server) renew(req *request, now time.Time) *response {
	l, ok := s.leases[req.vm]
	if ok && l.holder != req.holder && now.Before(l.expires) {
		s.log.Info("witness: renewal refused, lease held by another host", "vm", req.vm, "holder", req.holder, "held_by", l.holder, "until", l.expires)
		return heldBy(l, now)
	}
	expires := now.Add(s.ttl)
	if ok && l.holder == req.holder && l.expires.After(expires) {
		expires = l.expires // never shorten a lease
	}
	s.leases[req.vm] = lease{holder: req.holder, expires: expires}
	if ok && l.holder == req.holder {
		s.log.Debug("witness: lease renewed", "vm", req.vm, "holder", req.holder, "until", expires)
	} else {
		s.log.Info("witness: lease granted", "vm", req.vm, "holder", req.holder, "until", expires, "previous_holder", l.holder)
	}
	return granted(req.holder, expires, now)
}

// takeover hands the VM's lease to req.holder if nobody else holds it. Under
// s.mu it is atomic: of two secondaries racing, the second finds the first's
// fresh lease. It succeeds for the current holder too, so a caller whose
// answer was lost can ask again.
func (s *Server) takeover(req *request, now time.Time) *response {
	l, ok := s.leases[req.vm]
	mine := ok && l.holder == req.holder && now.Before(l.expires)
	if !mine && now.Before(s.graceEnd) {
		s.log.Info("witness: takeover refused, witness restarted recently", "vm", req.vm, "holder", req.holder, "until", s.graceEnd)
		return &response{
			Code:        codeRestarted,
			Error:       fmt.Sprintf("witness restarted at %s and has forgotten its leases: takeovers refused until %s", s.started.UTC().Format(time.RFC3339), s.graceEnd.UTC().Format(time.RFC3339)),
			ExpiresAt:   s.graceEnd.UnixMilli(),
			RemainingMS: s.graceEnd.Sub(now).Milliseconds(),
		}
	}
	if ok && !mine && now.Before(l.expires) {
		s.log.Info("witness: takeover refused, lease still valid", "vm", req.vm, "holder", req.holder, "held_by", l.holder, "until", l.expires)
		return heldBy(l, now)
	}
	expires := now.Add(s.ttl)
	s.leases[req.vm] = lease{holder: req.holder, expires: expires}
	s.log.Info("witness: lease taken over", "vm", req.vm, "holder", req.holder, "previous_holder", l.holder, "until", expires)
	return granted(req.holder, expires, now)
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
	s.warnMu.Lock()
	now := time.Now()
	if now.Before(s.warnNext) {
		s.suppressed++
		s.warnMu.Unlock()
		return
	}
	s.warnNext = now.Add(warnEvery)
	if s.suppressed > 0 {
		args = append(args, "suppressed_since_last", s.suppressed)
		s.suppressed = 0
	}
	s.warnMu.Unlock()
	s.log.Warn(msg, args...)
}
