package nova

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/gophercloud/gophercloud/v2"
)

// The sequence that makes Nova's record of a server follow it to the host
// AX promoted it on (FAILOVER.md): the old host's nova-compute forced
// down, the server evacuated to the new host, Nova waited for until it
// says that host and ACTIVE, then until the old host's nova-compute has
// completed the evacuation (it destroyed what was left of the server
// there), and forced_down cleared. Every call is retried with back-off
// while Nova does not answer or refuses for now.

// Stage is how far a Follow is.
type Stage string

const (
	StageForcing    Stage = "forcing down the old host's nova-compute"
	StageEvacuating Stage = "evacuating"
	StageMoving     Stage = "waiting for Nova to say the new host, ACTIVE"
	// StageCompleting: Nova says the new host; a replica built on the
	// old host now would be destroyed by its nova-compute.
	StageCompleting Stage = "waiting for the old host's nova-compute to complete the evacuation"
	StageClearing   Stage = "clearing forced_down"
	StageDone       Stage = "done"
)

// Follower is what Follow asks of Nova: *Client.
type Follower interface {
	Server(ctx context.Context, id string) (Server, error)
	ComputeService(ctx context.Context, host string) (ComputeService, error)
	SetForcedDown(ctx context.Context, id string, down bool) error
	Evacuate(ctx context.Context, id, host string) error
	Evacuations(ctx context.Context, id string) ([]Migration, error)
}

var _ Follower = (*Client)(nil)

// Follow is one server's way through Nova to the host it runs on.
type Follow struct {
	Server string // its id
	To     string // the host it runs on now, as Nova names it
	// Poll is how often Nova is asked how far it is, and the first wait
	// after a failed call (0: 2 s); waits double up to MaxWait (0: 30 s).
	Poll, MaxWait time.Duration
	// Timeout bounds each call (0: 20 s).
	Timeout time.Duration
	// Stage is told each stage as it starts, with what was done so far
	// (the old host, whether Follow forced it down).
	Stage func(s Stage, res FollowResult)
	// Retry is told each failed call that is tried again.
	Retry func(s Stage, err error)
	// Forced says an earlier Follow of this server forced the old host
	// down: this one clears it at the end.
	Forced bool
}

// FollowResult is what a Follow did.
type FollowResult struct {
	From   string // the old host
	Forced bool   // Follow set forced_down (and cleared it)
	Moved  bool   // Nova said To, ACTIVE
}

// ErrNotFound: Nova has no such server.
var ErrNotFound = errors.New("no such server in Nova")

// ErrEvacuationFailed: Nova put the server in ERROR.
var ErrEvacuationFailed = errors.New("the evacuation failed")

// Run takes f's server through the stages until done, ctx ends, Nova has
// no such server (ErrNotFound) or the evacuation fails
// (ErrEvacuationFailed). A server Nova has on To that no evacuation took
// there is done at once; one rebuilding or moved by an evacuation asked
// before is followed from there.
func (f *Follow) Run(ctx context.Context, nv Follower) (res FollowResult, err error) {
	if f.Poll <= 0 {
		f.Poll = 2 * time.Second
	}
	if f.MaxWait <= 0 {
		f.MaxWait = 30 * time.Second
	}
	if f.Timeout <= 0 {
		f.Timeout = 20 * time.Second
	}
	stage := Stage("")
	var wait time.Duration
	enter := func(s Stage) {
		stage, wait = s, 0
		if f.Stage != nil {
			f.Stage(s, res)
		}
	}
	// try runs call until it succeeds, finds no server, or ctx ends.
	try := func(call func(ctx context.Context) error) error {
		for {
			cctx, cancel := context.WithTimeout(ctx, f.Timeout)
			err := call(cctx)
			cancel()
			if err == nil || errors.Is(err, ErrNotFound) {
				return err
			}
			if f.Retry != nil {
				f.Retry(stage, err)
			}
			wait = min(max(2*wait, f.Poll), f.MaxWait)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(wait):
			}
		}
	}
	server := func(ctx context.Context) (Server, error) {
		s, err := nv.Server(ctx, f.Server)
		if gophercloud.ResponseCodeIs(err, http.StatusNotFound) {
			return s, fmt.Errorf("server %s: %w", f.Server, ErrNotFound)
		}
		return s, err
	}
	var s Server
	if err := try(func(ctx context.Context) (err error) { s, err = server(ctx); return err }); err != nil {
		return res, err
	}
	res.From, res.Forced = s.Host, f.Forced
	asked := s.Status == "REBUILD" || s.Host == f.To
	if asked {
		// Evacuated or being evacuated already (a Follow cut short by
		// axd's restart): the old host is the evacuation's source.
		var ms []Migration
		if err := try(func(ctx context.Context) (err error) { ms, err = nv.Evacuations(ctx, f.Server); return err }); err != nil {
			return res, err
		}
		from := ""
		for i := len(ms) - 1; i >= 0 && from == ""; i-- {
			if ms[i].Dest == f.To {
				from = ms[i].Source
			}
		}
		if from == "" && s.Host == f.To {
			res.Moved = s.Status == "ACTIVE"
			enter(StageDone) // never evacuated here: nothing to follow
			return res, nil
		}
		if from != "" {
			res.From = from
		}
	}
	if !asked {
		enter(StageForcing)
		err := try(func(ctx context.Context) error {
			svc, err := nv.ComputeService(ctx, res.From)
			if err != nil || svc.ForcedDown {
				return err // forced down already: by an operator, left to them
			}
			if err := nv.SetForcedDown(ctx, svc.ID, true); err != nil {
				return err
			}
			res.Forced = true
			return nil
		})
		if err != nil {
			return res, err
		}
		enter(StageEvacuating)
		err = try(func(ctx context.Context) error {
			err := nv.Evacuate(ctx, f.Server, f.To)
			if err == nil {
				return nil
			}
			// Nova may have taken a request whose answer was lost: then
			// the server is rebuilding, or on To already.
			if now, serr := server(ctx); serr == nil && (now.Status == "REBUILD" || now.Host == f.To) {
				return nil
			}
			return err
		})
		if err != nil {
			return res, err
		}
	}
	enter(StageMoving)
	for {
		var now Server
		if err := try(func(ctx context.Context) (err error) { now, err = server(ctx); return err }); err != nil {
			return res, err
		}
		if now.Status == "ERROR" {
			return res, fmt.Errorf("%w: Nova put server %s in ERROR on host %s (openstack server event list %s says why)", ErrEvacuationFailed, f.Server, Truncate(now.Host, 64), f.Server)
		}
		if now.Host == f.To && now.Status == "ACTIVE" {
			break
		}
		if err := sleep(ctx, f.Poll); err != nil {
			return res, err
		}
	}
	res.Moved = true
	enter(StageCompleting)
	for {
		var ms []Migration
		if err := try(func(ctx context.Context) (err error) { ms, err = nv.Evacuations(ctx, f.Server); return err }); err != nil {
			return res, err
		}
		if Completed(ms, res.From, f.To) {
			break
		}
		if err := sleep(ctx, f.Poll); err != nil {
			return res, err
		}
	}
	if res.Forced {
		enter(StageClearing)
		svc := ""
		err := try(func(ctx context.Context) error {
			if svc == "" {
				s, err := nv.ComputeService(ctx, res.From)
				if err != nil {
					return err
				}
				svc = s.ID
			}
			return nv.SetForcedDown(ctx, svc, false)
		})
		if err != nil {
			return res, err
		}
	}
	enter(StageDone)
	return res, nil
}

// Completed says whether the newest evacuation from → to is completed.
func Completed(ms []Migration, from, to string) bool {
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].Source == from && ms[i].Dest == to {
			return ms[i].Status == "completed"
		}
	}
	return false
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
