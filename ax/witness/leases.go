package witness

import (
	"context"
	"time"
)

// Leases is the witness as a host sees it: one lease per VM, held by one
// host at a time, granted and judged by a third party that both partners
// reach. *Client (an axd --witness) and *Etcd (an etcd cluster) are the two.
//
// Every method is bounded by ctx, refuses a VM name that names.Check
// refuses, and is safe for concurrent use. A method that cannot get an
// answer returns an error that is not ErrLeaseHeld: the caller must then
// assume nothing about the lease.
type Leases interface {
	// Renew grants this host vm's lease, or extends it. It is refused with
	// a *LeaseHeldError only while another host's lease is valid: a lease
	// that expired may be renewed by anyone. A lease is never shortened.
	//
	// The returned expiry is on this host's clock, counted from before the
	// request was sent, so it never ends after the witness's. Compare it
	// only with time.Now of this process and fence a margin before it.
	Renew(ctx context.Context, vm string) (expires time.Time, err error)

	// Takeover makes this host vm's holder, atomically, if the lease is
	// free or expired: of several hosts asking at once at most one wins.
	// It succeeds for the current holder too, so an answer lost on the way
	// can be asked for again. Refused: a *LeaseHeldError. *Etcd keeps a
	// refusal while a watch sees the holder's key unchanged and answers a
	// takeover asked again from it: a release by the holder reaches it
	// within milliseconds (a Query sees it at once), so callers retry.
	Takeover(ctx context.Context, vm string) error

	// Release gives up this host's lease of vm now, for a planned
	// handover: the partner's next Takeover succeeds at once. The host is
	// kept as the last holder, for Query. Releasing another host's valid
	// lease is refused (a *LeaseHeldError); releasing one that lapsed, or
	// that no one holds, changes nothing.
	Release(ctx context.Context, vm string) error

	// Query returns the witness's view of vm's lease: its holder, also
	// after expiry or release (then the last holder, with Expired true).
	Query(ctx context.Context, vm string) (LeaseInfo, error)

	// Health probes the witness for its operator: its members, probed in
	// parallel, each within the call timeout, and whether it can decide
	// about leases now. A witness that does not answer is a Health
	// without quorum, not an error: the error is for a closed Leases.
	Health(ctx context.Context) (Health, error)

	// Close ends the connection to the witness; later calls fail. Leases
	// held stay until they expire. It is safe to call twice.
	Close() error
}

var _ Leases = (*Client)(nil)
