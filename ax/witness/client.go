package witness

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// DefaultTimeout bounds one call, dial included, when NewClient gets none.
const DefaultTimeout = 2 * time.Second

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

// Client talks to a witness on behalf of one host. It is safe for concurrent
// use; each call is one short TCP connection.
type Client struct {
	addr    string
	psk     []byte
	holder  string
	timeout time.Duration
	now     func() time.Time // time.Now; tests replace it
	dialer  net.Dialer
}

// NewClient returns a client of the witness at addr (host:port) for the host
// named holder. Timeout bounds each call, dial included (DefaultTimeout when
// <= 0).
func NewClient(addr string, psk []byte, holder string, timeout time.Duration) (*Client, error) {
	if err := checkKey(psk); err != nil {
		return nil, err
	}
	if err := checkName("holder", holder); err != nil {
		return nil, fmt.Errorf("witness: new client: %w", err)
	}
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{addr: addr, psk: append([]byte(nil), psk...), holder: holder, timeout: timeout, now: time.Now}, nil
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
	resp, err := c.call(ctx, opRenew, vm, start)
	if err != nil {
		return time.Time{}, err
	}
	return start.Add(time.Duration(resp.RemainingMS) * time.Millisecond), nil
}

// Query returns the witness's view of vm's lease.
func (c *Client) Query(ctx context.Context, vm string) (LeaseInfo, error) {
	resp, err := c.call(ctx, opQuery, vm, c.now())
	if err != nil {
		return LeaseInfo{}, err
	}
	info := LeaseInfo{Holder: resp.Holder, Remaining: time.Duration(resp.RemainingMS) * time.Millisecond, Expired: resp.Expired}
	if resp.ExpiresAt != 0 {
		info.ExpiresAt = time.UnixMilli(resp.ExpiresAt)
	}
	return info, nil
}

// Takeover makes this host the holder of vm's lease if it has expired or
// there is none; the witness decides atomically, so of several hosts asking
// at most one wins. A secondary calls it after DecideSecondary said Promote
// and starts the VM only if it returns nil, then renews as the primary.
// The error is a *LeaseHeldError when the lease is not free.
func (c *Client) Takeover(ctx context.Context, vm string) error {
	_, err := c.call(ctx, opTakeover, vm, c.now())
	return err
}

// call sends one request and returns the witness's authenticated, positive
// answer to it.
func (c *Client) call(ctx context.Context, op, vm string, now time.Time) (*response, error) {
	if err := checkName("vm", vm); err != nil {
		return nil, fmt.Errorf("witness: %s: %w", op, err)
	}
	req := request{op: op, holder: c.holder, vm: vm, ts: now.UnixMilli()}
	if _, err := rand.Read(req.nonce[:]); err != nil {
		return nil, fmt.Errorf("witness: %s vm %q: nonce: %w", op, vm, err)
	}
	req.sign(c.psk)
	line, err := req.encode()
	if err != nil {
		return nil, fmt.Errorf("witness: %s vm %q: encode: %w", op, vm, err)
	}
	if len(line) > MaxLineSize {
		return nil, fmt.Errorf("witness: %s vm %q: request of %d bytes, more than %d", op, vm, len(line), MaxLineSize)
	}

	resp, err := c.exchange(ctx, line)
	if err != nil {
		return nil, fmt.Errorf("witness %s: %s vm %q: %w", c.addr, op, vm, err)
	}
	if resp.MAC == "" {
		if resp.Code == codeAuth {
			return nil, fmt.Errorf("witness %s: %s vm %q: %w: the witness rejected our request: check that this host and the witness use the same pre-shared key", c.addr, op, vm, ErrAuth)
		}
		return nil, fmt.Errorf("witness %s: %s vm %q: %w: unsigned response", c.addr, op, vm, ErrAuth)
	}
	if !resp.verify(c.psk) {
		return nil, fmt.Errorf("witness %s: %s vm %q: %w: response MAC is wrong (different pre-shared key, or not the witness)", c.addr, op, vm, ErrAuth)
	}
	if resp.Nonce != hex.EncodeToString(req.nonce[:]) {
		return nil, fmt.Errorf("witness %s: %s vm %q: %w: response answers another request", c.addr, op, vm, ErrAuth)
	}

	if !resp.OK {
		switch resp.Code {
		case codeHeld, codeRestarted:
			e := &LeaseHeldError{
				VM:        vm,
				Holder:    resp.Holder,
				Remaining: time.Duration(resp.RemainingMS) * time.Millisecond,
				Restarted: resp.Code == codeRestarted,
			}
			if resp.ExpiresAt != 0 {
				e.ExpiresAt = time.UnixMilli(resp.ExpiresAt)
			}
			return nil, e
		}
		return nil, fmt.Errorf("witness %s: %s vm %q: refused (%s): %s", c.addr, op, vm, resp.Code, resp.Error)
	}
	if op != opQuery && resp.Holder != c.holder {
		return nil, fmt.Errorf("witness %s: %s vm %q: granted to %q, not to us (%q)", c.addr, op, vm, resp.Holder, c.holder)
	}
	return resp, nil
}

// exchange dials, writes line and reads one response line.
func (c *Client) exchange(ctx context.Context, line []byte) (_ *response, err error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	defer func() {
		// An I/O error caused by the context says so.
		if err != nil && ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", context.Cause(ctx), err)
		}
	}()

	conn, err := c.dialer.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// The context alone ends the exchange, so that an I/O error it causes
	// always finds ctx.Err set.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := conn.Write(line); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	out, err := bufio.NewReaderSize(conn, MaxLineSize).ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("response longer than %d bytes", MaxLineSize)
		}
		if errors.Is(err, io.EOF) {
			return nil, errors.New("witness closed the connection without an answer (it does so on a request it cannot parse)")
		}
		return nil, fmt.Errorf("read response: %w", err)
	}
	var resp response
	if err := decodeStrict(out[:len(out)-1], &resp); err != nil {
		return nil, fmt.Errorf("malformed response: %w", err)
	}
	return &resp, nil
}
