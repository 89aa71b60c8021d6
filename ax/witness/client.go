package witness

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/names"
)

// DefaultTimeout bounds one call, waiting for a free connection and dialling
// included, when NewClient gets none.
const DefaultTimeout = 2 * time.Second

// DefaultMaxConns is how many connections a client keeps open at most when
// NewClient gets no number: one each for as many calls at once.
const DefaultMaxConns = 4

// maxClientConns caps ClientConfig.MaxConns below the witness's limit per
// holder (maxConnsPerHolder), where a holder's new connection closes its
// oldest: the spare lets a client open a replacement before the witness has
// seen the connection it replaces close, without losing one in use.
const maxClientConns = maxConnsPerHolder - 1

var (
	// ErrLeaseHeld is matched (errors.Is) by every *LeaseHeldError.
	ErrLeaseHeld = errors.New("witness: lease held")
	// ErrAuth reports a request the witness could not authenticate, or a
	// response this client could not: different keys, or not the witness.
	ErrAuth = errors.New("witness: authentication failed")
)

// LeaseHeldError is a renewal or takeover the witness refused because the
// lease is not free: another holder's lease is valid, or the witness started
// less than one lease TTL ago and cannot yet tell (Restarted).
type LeaseHeldError struct {
	VM        string
	Holder    string    // empty when Restarted
	ExpiresAt time.Time // on the witness's clock: the lease's end, or the grace's
	Remaining time.Duration
	Restarted bool
}

func (e *LeaseHeldError) Error() string {
	if e.Restarted {
		return fmt.Sprintf("witness: lease on vm %q unknown: witness restarted recently and refuses takeovers for another %s", e.VM, e.Remaining)
	}
	return fmt.Sprintf("witness: lease on vm %q held by %q for another %s", e.VM, e.Holder, e.Remaining)
}

// Is makes errors.Is(err, ErrLeaseHeld) true.
func (e *LeaseHeldError) Is(target error) bool { return target == ErrLeaseHeld }

// LeaseInfo is the witness's view of a VM's lease.
type LeaseInfo struct {
	Holder    string    // empty when no host holds a lease
	ExpiresAt time.Time // on the witness's clock; zero when there is no lease
	Remaining time.Duration
	// Expired is the witness's own judgement, the one a secondary may act on
	// (Observation.PartnerLeaseExpired): no other clock is compared.
	Expired bool
}

// ClientConfig configures a client. Exactly one of Identity and PSK is set.
type ClientConfig struct {
	// Addr is the witness's host:port.
	Addr string
	// Identity selects TLS mode: this host's identity (role host); the
	// holder is its certificate's name. Witness is the name the witness's
	// certificate must carry (role witness).
	Identity *identity.Identity
	Witness  string
	// PSK selects PSK mode: the pre-shared master key. Holder is this host's
	// name, self-declared: any holder of the key can claim any name.
	PSK    []byte
	Holder string
	// Timeout bounds each call, waiting for a free connection included
	// (DefaultTimeout when <= 0).
	Timeout time.Duration
	// MaxConns bounds the connections open at once, and so the calls in
	// progress at once: each call has a connection to itself, so that a
	// slow answer about one VM holds up no call about another
	// (DefaultMaxConns when <= 0; more than 7 count as 7, below the
	// witness's limit of 8 per holder).
	MaxConns int
	// LeaseTTL is the lease length the witness is run with (its
	// --lease-ttl), for Health to report: the protocol does not carry it.
	LeaseTTL time.Duration
}

// Client talks to a witness on behalf of one host. It is safe for concurrent
// use: calls run concurrently, each on a connection of its own, on up to
// MaxConns connections kept open between calls; a call that finds them all
// in use waits for one. A connection whose exchange failed is closed, and a
// later call opens another. Close the client when done.
type Client struct {
	addr     string
	holder   string
	pskKey   []byte      // PSK mode
	tlsConf  *tls.Config // TLS mode
	timeout  time.Duration
	maxConns int
	ttl      time.Duration    // reported by Health
	now      func() time.Time // time.Now; tests replace it
	dialer   net.Dialer

	mu     sync.Mutex // guards the fields below; never held during I/O
	closed bool
	idle   []*clientConn            // open and free, the most recently used last
	conns  map[*clientConn]struct{} // open, idle or in use: Close closes them
	open   int                      // conns and those being dialled, at most maxConns
	freed  chan struct{}            // closed, and replaced, when a connection may be free
	floor  int64                    // the witness's restart floor: timestamps go above it
	dials  int                      // connections opened, for tests
}

// clientConn is one connection to the witness. Only the call that took it
// from the pool uses it, until it puts it back.
type clientConn struct {
	conn net.Conn
	r    *bufio.Reader
	key  []byte // line MAC key: in TLS mode, this connection's own
	// broken marks a connection whose state is unknown (an exchange failed,
	// or its context fired: an answer may still be on its way). It goes
	// back to no pool: the call closes it.
	broken bool
}

// NewClient returns a client of the witness at cfg.Addr that runs calls
// concurrently on up to cfg.MaxConns connections. It does not dial: the
// first call does, and each call that finds no idle connection while fewer
// than MaxConns are open.
func NewClient(cfg ClientConfig) (*Client, error) {
	c := &Client{
		addr:     cfg.Addr,
		timeout:  cfg.Timeout,
		maxConns: cfg.MaxConns,
		ttl:      cfg.LeaseTTL,
		now:      time.Now,
		conns:    make(map[*clientConn]struct{}),
		freed:    make(chan struct{}),
	}
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	if c.maxConns <= 0 {
		c.maxConns = DefaultMaxConns
	}
	c.maxConns = min(c.maxConns, maxClientConns)
	switch {
	case cfg.Identity != nil && cfg.PSK != nil:
		return nil, errors.New("witness: new client: both an identity and a pre-shared key given: configure one security mode")
	case cfg.Identity != nil:
		id := cfg.Identity
		if id.Role() != identity.RoleHost {
			return nil, fmt.Errorf("witness: new client: certificate %q has role %s: leases are held with a %s certificate", id.Name(), id.Role(), identity.RoleHost)
		}
		if cfg.Holder != "" && cfg.Holder != id.Name() {
			return nil, fmt.Errorf("witness: new client: holder %q given, but in TLS mode the holder is the certificate's name %q: leave Holder empty", cfg.Holder, id.Name())
		}
		if err := names.Check("witness", cfg.Witness); err != nil {
			return nil, fmt.Errorf("witness: new client: the witness's certificate name: %w", err)
		}
		c.holder = id.Name()
		c.tlsConf = id.ClientConfig(identity.Want(cfg.Witness, identity.RoleWitness))
	case cfg.PSK != nil:
		if err := checkKey(cfg.PSK); err != nil {
			return nil, err
		}
		if err := checkName("holder", cfg.Holder); err != nil {
			return nil, fmt.Errorf("witness: new client: %w", err)
		}
		c.holder = cfg.Holder
		c.pskKey = pskLineKey(cfg.PSK)
	default:
		return nil, errors.New("witness: new client: no identity and no pre-shared key: configure one security mode")
	}
	return c, nil
}

// Close closes every connection, interrupting the calls in progress and
// those waiting for a connection; later calls fail. It is safe to call twice.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	conns := c.conns
	c.conns = make(map[*clientConn]struct{})
	c.idle = nil
	c.wake()
	c.mu.Unlock()
	for cc := range conns {
		cc.conn.Close()
	}
	return nil
}

// Renew asks for this host's lease on vm to be granted or extended.
//
// The returned expiry is on this host's clock, counted from before the
// request was sent, so it never ends after the witness's: the witness starts
// the TTL later. Compare it only with time.Now of this process (it carries
// the monotonic reading) and fence a margin before it, for clock rate drift
// and for the pause to take effect. Renew is for the host that runs vm, or
// is about to start protecting it, or has just won Takeover; the error is a
// *LeaseHeldError when another host holds the lease.
func (c *Client) Renew(ctx context.Context, vm string) (expires time.Time, err error) {
	start := c.now()
	resp, err := c.call(ctx, opRenew, vm)
	if err != nil {
		return time.Time{}, err
	}
	return start.Add(time.Duration(resp.RemainingMS) * time.Millisecond), nil
}

// Query returns the witness's view of vm's lease.
func (c *Client) Query(ctx context.Context, vm string) (LeaseInfo, error) {
	resp, err := c.call(ctx, opQuery, vm)
	if err != nil {
		return LeaseInfo{}, err
	}
	info := LeaseInfo{Holder: resp.Holder, Remaining: time.Duration(resp.RemainingMS) * time.Millisecond, Expired: resp.Expired}
	if resp.ExpiresAt != 0 {
		info.ExpiresAt = time.UnixMilli(resp.ExpiresAt)
	}
	return info, nil
}

// Health probes the witness with a query (about no VM of this host's):
// one member, reachable and with quorum if it answered. See Leases.Health.
func (c *Client) Health(ctx context.Context) (Health, error) {
	_, err := c.Query(ctx, probeVM)
	if errors.Is(err, errClientClosed) {
		return Health{}, err
	}
	return Health{
		Kind:    KindAxd,
		Members: []Member{{Endpoint: c.addr, Reachable: err == nil, Err: err}},
		Quorum:  err == nil, QuorumErr: err,
		TTL: c.ttl,
	}, nil
}

// Takeover makes this host the holder of vm's lease if it has expired or
// there is none; the witness decides atomically, so of several hosts asking
// at most one wins. A secondary calls it after DecideSecondary said Promote
// and starts the VM only if it returns nil, then renews as the primary.
// The error is a *LeaseHeldError when the lease is not free.
func (c *Client) Takeover(ctx context.Context, vm string) error {
	_, err := c.call(ctx, opTakeover, vm)
	return err
}

// Release gives up this host's lease of vm now, so that the partner's next
// Takeover succeeds without waiting for it to expire: a planned handover
// calls it once the guest here is verified paused and stops renewing. It
// is refused (a *LeaseHeldError) when another host holds the lease.
func (c *Client) Release(ctx context.Context, vm string) error {
	_, err := c.call(ctx, opRelease, vm)
	return err
}

// errFloor is a signed refusal of a timestamp at or below the witness's
// restart floor; the request may be sent again above it.
type errFloor struct{ floor int64 }

func (e errFloor) Error() string {
	return fmt.Sprintf("request timestamp not after the witness's restart floor %d", e.floor)
}

// call sends one request and returns the witness's authenticated, positive
// answer to it. It takes a connection of its own for the call (waiting for
// one if all MaxConns are in use), and sends again once, at once, if the
// witness restarted and names a floor above the request's timestamp, or if a
// reused connection turns out to be dead.
func (c *Client) call(ctx context.Context, op, vm string) (*response, error) {
	if err := checkName("vm", vm); err != nil {
		return nil, fmt.Errorf("witness: %s: %w", op, err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	var cc *clientConn
	defer func() {
		if cc != nil {
			c.put(cc)
		}
	}()
	floorRetried, connRetried := false, false
	for {
		reused := cc != nil // kept after a floor refusal
		if cc == nil {
			var err error
			// After a dead reused connection, a new one: the idle
			// ones are likely dead too.
			if cc, reused, err = c.get(ctx, connRetried); err != nil {
				return nil, fmt.Errorf("witness %s: %s vm %q: %w", c.addr, op, vm, err)
			}
		}
		resp, err := c.attempt(ctx, cc, op, vm)
		if cc.broken {
			c.put(cc)
			cc = nil
		}
		var fl errFloor
		switch {
		case errors.As(err, &fl) && !floorRetried:
			c.raiseFloor(fl.floor)
			floorRetried = true
			continue
		case err != nil && reused && !connRetried && ctx.Err() == nil && isConnErr(err):
			// The witness closed an idle connection, or restarted: a
			// request it never read is safe to send on a new one.
			connRetried = true
			continue
		case errors.Is(err, ErrLeaseHeld):
			return nil, err // says all, and callers match it
		case err != nil:
			return nil, fmt.Errorf("witness %s: %s vm %q: %w", c.addr, op, vm, err)
		}
		return resp, nil
	}
}

// connErr marks an error of the connection itself (not of an answer).
type connErr struct{ err error }

func (e connErr) Error() string { return e.err.Error() }
func (e connErr) Unwrap() error { return e.err }

func isConnErr(err error) bool {
	var ce connErr
	return errors.As(err, &ce)
}

// attempt sends the request once on cc and reads the answer. It marks cc
// broken when the connection's state is no longer known.
func (c *Client) attempt(ctx context.Context, cc *clientConn, op, vm string) (*response, error) {
	c.mu.Lock()
	floor := c.floor
	c.mu.Unlock()
	req := request{op: op, holder: c.holder, vm: vm, ts: max(c.now().UnixMilli(), floor+1)}
	if _, err := rand.Read(req.nonce[:]); err != nil {
		return nil, fmt.Errorf("nonce: %w", err)
	}
	req.sign(cc.key)
	line, err := req.encode()
	if err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	if len(line) > MaxLineSize {
		return nil, fmt.Errorf("request of %d bytes, more than %d", len(line), MaxLineSize)
	}
	out, err := cc.exchange(ctx, line)
	if err != nil {
		cc.broken = true // an answer may still be on its way
		return nil, err
	}
	resp, err := c.checkResponse(&req, cc.key, out)
	if err != nil {
		var fl errFloor
		if !errors.As(err, &fl) && !errors.Is(err, ErrLeaseHeld) {
			cc.broken = true
		}
		return nil, err
	}
	return resp, nil
}

// raiseFloor records the witness's restart floor, shared by all connections:
// the witness has one.
func (c *Client) raiseFloor(floor int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.floor = max(c.floor, floor)
}

var errClientClosed = fmt.Errorf("client closed: %w", net.ErrClosed)

// get returns a connection for one call: the idle one used last, or a new
// one while fewer than maxConns are open, or the first to come back. fresh
// skips the idle ones, and closes the one idle longest if they fill the
// pool: the caller found a reused connection dead, and the witness has
// likely closed the others too (it restarted, or they idled past its
// timeout). reused reports a connection opened by an earlier call.
func (c *Client) get(ctx context.Context, fresh bool) (cc *clientConn, reused bool, err error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, false, errClientClosed
		}
		if n := len(c.idle); n > 0 && !fresh {
			cc = c.idle[n-1]
			c.idle = c.idle[:n-1]
			c.mu.Unlock()
			return cc, true, nil
		}
		var stale *clientConn
		if c.open >= c.maxConns && len(c.idle) > 0 {
			stale = c.idle[0]
			c.idle = c.idle[1:]
			delete(c.conns, stale)
			c.open--
		}
		if c.open < c.maxConns {
			c.open++ // the slot is this call's while it dials
			c.mu.Unlock()
			if stale != nil {
				stale.conn.Close()
			}
			cc, err := c.dial(ctx)
			if err != nil {
				c.mu.Lock()
				c.open--
				c.wake()
				c.mu.Unlock()
				return nil, false, err
			}
			return cc, false, nil
		}
		freed := c.freed
		c.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return nil, false, fmt.Errorf("waited for a connection, all %d in use by other calls (ClientConfig.MaxConns): %w", c.maxConns, context.Cause(ctx))
		}
	}
}

// put ends a call's use of cc: back to the pool, or closed if it is broken
// or the client is. Either way a waiting call may go on.
func (c *Client) put(cc *clientConn) {
	c.mu.Lock()
	keep := !cc.broken && !c.closed
	if keep {
		c.idle = append(c.idle, cc)
	} else {
		delete(c.conns, cc)
		c.open--
	}
	c.wake()
	c.mu.Unlock()
	if !keep {
		cc.conn.Close()
	}
}

// wake tells the calls waiting for a connection to look again; c.mu is held.
func (c *Client) wake() {
	close(c.freed)
	c.freed = make(chan struct{})
}

// dial opens a connection and adds it to the client's; the caller has
// counted it in c.open.
func (c *Client) dial(ctx context.Context) (*clientConn, error) {
	var conn net.Conn
	var key []byte
	if c.tlsConf != nil {
		d := tls.Dialer{NetDialer: &c.dialer, Config: c.tlsConf}
		nc, err := d.DialContext(ctx, "tcp", c.addr)
		if err != nil {
			return nil, fmt.Errorf("connect: %w", ctxErr(ctx, err))
		}
		tc := nc.(*tls.Conn)
		if key, err = tlsLineKey(tc.ConnectionState()); err != nil {
			nc.Close()
			return nil, err
		}
		conn = tc
	} else {
		nc, err := c.dialer.DialContext(ctx, "tcp", c.addr)
		if err != nil {
			return nil, fmt.Errorf("connect: %w", ctxErr(ctx, err))
		}
		conn, key = nc, c.pskKey
	}
	cc := &clientConn{conn: conn, r: bufio.NewReaderSize(conn, MaxLineSize), key: key}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		conn.Close()
		return nil, errClientClosed
	}
	c.conns[cc] = struct{}{}
	c.dials++
	c.mu.Unlock()
	return cc, nil
}

// exchange writes line and reads one response line, within ctx.
func (cc *clientConn) exchange(ctx context.Context, line []byte) (_ []byte, err error) {
	defer func() { err = ctxErr(ctx, err) }()
	// The context alone ends the exchange, so that an I/O error it causes
	// always finds ctx.Err set.
	if err := cc.conn.SetDeadline(time.Time{}); err != nil {
		return nil, connErr{err}
	}
	stop := context.AfterFunc(ctx, func() { cc.conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() {
			// The context fired, maybe after the answer: its deadline
			// could land on the next call, so the connection goes.
			cc.broken = true
		}
	}()

	if _, err := cc.conn.Write(line); err != nil {
		return nil, connErr{fmt.Errorf("send: %w", err)}
	}
	out, err := cc.r.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("response longer than %d bytes", MaxLineSize)
		}
		if errors.Is(err, io.EOF) {
			return nil, connErr{errors.New("witness closed the connection without an answer (it does so on a request it cannot parse, after an idle minute, and to a client without TLS when it serves TLS)")}
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "remote error" {
			return nil, fmt.Errorf("the witness refused this host's certificate (is it a host certificate from the witness's CA?): %w", err)
		}
		return nil, connErr{fmt.Errorf("read response: %w", err)}
	}
	return out[:len(out)-1], nil
}

// ctxErr says so when the context caused an I/O error.
func ctxErr(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", context.Cause(ctx), err)
	}
	return err
}

// checkResponse decodes and authenticates the answer to req and turns a
// refusal into an error: *LeaseHeldError, errFloor, or one that says why.
func (c *Client) checkResponse(req *request, key, line []byte) (*response, error) {
	var resp response
	if err := decodeStrict(line, &resp); err != nil {
		return nil, fmt.Errorf("malformed response: %w", err)
	}
	if resp.MAC == "" {
		if resp.Code == codeAuth {
			return nil, fmt.Errorf("%w: the witness rejected our request: check that this host and the witness use the same pre-shared key", ErrAuth)
		}
		return nil, fmt.Errorf("%w: unsigned response", ErrAuth)
	}
	if !resp.verify(key) {
		return nil, fmt.Errorf("%w: response MAC is wrong (different pre-shared key, or not the witness)", ErrAuth)
	}
	if resp.Nonce != hex.EncodeToString(req.nonce[:]) {
		return nil, fmt.Errorf("%w: response answers another request", ErrAuth)
	}

	if !resp.OK {
		switch resp.Code {
		case codeHeld, codeRestarted:
			e := &LeaseHeldError{
				VM:        req.vm,
				Holder:    resp.Holder,
				Remaining: time.Duration(resp.RemainingMS) * time.Millisecond,
				Restarted: resp.Code == codeRestarted,
			}
			if resp.ExpiresAt != 0 {
				e.ExpiresAt = time.UnixMilli(resp.ExpiresAt)
			}
			return nil, e
		case codeFloor:
			if resp.Floor >= req.ts {
				return nil, errFloor{resp.Floor}
			}
		}
		return nil, fmt.Errorf("refused (%s): %s", resp.Code, resp.Error)
	}
	if req.op != opQuery && resp.Holder != req.holder {
		return nil, fmt.Errorf("granted to %q, not to us (%q)", resp.Holder, req.holder)
	}
	return &resp, nil
}
