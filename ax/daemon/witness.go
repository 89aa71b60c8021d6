package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/monitor"
)

const (
	// witnessProbeEvery is how often axd probes the witness's health:
	// etcd's member list and every member's status, for the operator.
	witnessProbeEvery = 2 * time.Second
	// witnessProbeTimeout bounds one probe: the member list, then every
	// member at once (each within the witness's call timeout).
	witnessProbeTimeout = 1500 * time.Millisecond
)

// renew renews this host's lease of vm, counting the result.
func (d *Daemon) renew(ctx context.Context, vm string) (time.Time, error) {
	until, err := d.wit.Renew(ctx, vm)
	d.metrics.WitnessRenewals.WithLabelValues(leaseResult(err, monitor.RenewOK)).Inc()
	return until, err
}

// takeover asks the witness for vm's lease, counting the result.
func (d *Daemon) takeover(ctx context.Context, vm string) error {
	err := d.wit.Takeover(ctx, vm)
	d.metrics.WitnessTakeovers.WithLabelValues(leaseResult(err, monitor.TakeoverWon)).Inc()
	return err
}

// leaseResult is a lease call's result label: ok (granted), refused (held by
// another host), or failed (no answer).
func leaseResult(err error, ok string) string {
	switch {
	case err == nil:
		return ok
	case errors.Is(err, witness.ErrLeaseHeld):
		return monitor.Refused
	}
	return monitor.Failed
}

func (d *Daemon) witnessState() string {
	if d.wit == nil {
		return "none"
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.witOK {
		return "reachable"
	}
	return "unreachable"
}

func (d *Daemon) setWitness(ok bool) {
	d.mu.Lock()
	d.witOK = ok
	if ok {
		d.witSeen = time.Now()
	}
	d.mu.Unlock()
	d.metrics.Witness.Set(b2f(ok))
}

// watchWitness probes the witness's health every witnessProbeEvery, in a
// goroutine of its own so that a slow witness holds up nothing else, until
// ctx ends.
func (d *Daemon) watchWitness(ctx context.Context) {
	t := time.NewTicker(witnessProbeEvery)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, witnessProbeTimeout)
		h, err := d.wit.Health(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			d.log.Warn("witness: health probe", "err", err)
		} else {
			d.noteWitnessHealth(h)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// noteWitnessHealth keeps a probe's result for status and metrics, and
// raises the host's alarm when the witness lost its quorum (an event
// again when it is back). Without lease traffic lately (no primary here)
// the probe also says whether the witness is reachable.
func (d *Daemon) noteWitnessHealth(h witness.Health) {
	st := &api.WitnessHealth{Kind: h.Kind, Reachable: h.Reachable(), Quorum: h.Quorum, LeaseTTLMS: ms(h.TTL), ProbedAt: time.Now()}
	for _, m := range h.Members {
		wm := api.WitnessMember{Name: m.Name, Endpoint: m.Endpoint, Reachable: m.Reachable}
		if m.Err != nil {
			wm.Error = m.Err.Error()
		}
		st.Members = append(st.Members, wm)
	}
	if !h.Quorum {
		st.Alarm = fmt.Sprintf("witness %s has no quorum (%d of %d members reachable): %v; a primary here that also loses its partner fences its VMs, and no replica here can take over",
			h.Kind, st.Reachable, len(st.Members), h.QuorumErr)
	}
	d.mu.Lock()
	prev := d.witHealth
	d.witHealth = st
	idle := time.Since(d.witSeen) > time.Second
	d.mu.Unlock()
	d.metrics.SetWitnessHealth(len(st.Members), st.Reachable, st.Quorum)
	if idle {
		d.setWitness(h.Quorum)
	}
	switch {
	case !h.Quorum && (prev == nil || prev.Quorum):
		d.event("", "alarm", st.Alarm)
	case h.Quorum && prev != nil && !prev.Quorum:
		d.event("", "witness", fmt.Sprintf("witness %s has a quorum again (%d of %d members reachable)", h.Kind, st.Reachable, len(st.Members)))
	}
}

// witnessHealth returns the last probe's result (nil before the first),
// which is never changed once kept.
func (d *Daemon) witnessHealth() *api.WitnessHealth {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.witHealth
}
