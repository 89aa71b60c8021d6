package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/ratelog"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/nova-hook/nova"
)

// On a Nova compute host the capacity this host promised its partners'
// VMs (the book, package reserve) is held in Placement too: an allocation
// per promise against this host's compute node resource provider, by a
// consumer of AX's own (nova-hook/nova/placement.go). Nova's scheduler
// then counts it, and does not fill the host with servers that would
// leave no room for a failover. axd makes Placement's reservations match
// the book at each change of the book and every resync, so a reservation
// left by a crash, or removed by an operator, is mended; before Nova is
// asked to evacuate a server promoted here its reservation is removed, so
// the scheduler finds its room.

// PlacementCloud is what axd asks of Placement: *nova.Client.
type PlacementCloud interface {
	ComputeNode(ctx context.Context, host string) (string, error)
	Inventory(ctx context.Context, rp string) (nova.Resources, error)
	Allocations(ctx context.Context, rp string) (map[string]nova.Resources, error)
	ConsumerType(ctx context.Context, consumer string) (string, error)
	Reserve(ctx context.Context, consumer, rp string, r nova.Resources) error
	Unreserve(ctx context.Context, consumer string) error
}

var _ PlacementCloud = (*nova.Client)(nil)

// placementRetryMax is the longest wait before a failed round is tried
// again (the first is 5 s, doubled at each failure).
const placementRetryMax = time.Minute

// placementMirror holds the book's promises in Placement.
type placementMirror struct {
	d     *Daemon
	cloud PlacementCloud
	host  string
	every time.Duration
	kickc chan struct{}
	warn  *ratelog.Limiter

	round sync.Mutex // one round, or one drop, at a time

	mu      sync.Mutex
	rp      string            // this host's resource provider ("" : not found yet)
	err     string            // why the last round did not complete
	alarmed bool              // an alarm said so, and no round completed since
	vms     map[string]string // promised VMs: "" held, or why not
	foreign map[string]bool   // consumers on rp that are not AX's
}

func newPlacementMirror(d *Daemon, cloud PlacementCloud, host string, every time.Duration) *placementMirror {
	p := &placementMirror{d: d, cloud: cloud, host: host, every: every, kickc: make(chan struct{}, 1), warn: ratelog.New(time.Minute),
		vms: map[string]string{}, foreign: map[string]bool{}}
	return p
}

// kick asks for a round soon: the book changed.
func (p *placementMirror) kick() {
	select {
	case p.kickc <- struct{}{}:
	default:
	}
}

// run makes rounds until ctx ends: at start, at each kick, every p.every,
// and sooner after a failure.
func (p *placementMirror) run(ctx context.Context) {
	retry := 5 * time.Second
	for {
		wait := p.every
		if err := p.sync(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			wait = min(retry, p.every)
			retry = min(2*retry, placementRetryMax)
		} else {
			retry = 5 * time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-p.kickc:
		case <-t.C:
		}
		t.Stop()
	}
}

// resourcesOf is what Placement counts of need, in the classes provider
// inventory has; amounts are rounded up to Placement's units.
func resourcesOf(need reserve.Capacity, inventory nova.Resources) nova.Resources {
	const mib, gib = 1 << 20, 1 << 30
	r := nova.Resources{}
	for class, n := range map[string]int64{
		"VCPU":      int64(need.VCPUs),
		"MEMORY_MB": (need.MemoryBytes + mib - 1) / mib,
		"DISK_GB":   (need.DiskBytes + gib - 1) / gib,
	} {
		if _, ok := inventory[class]; ok && n > 0 {
			r[class] = int(n)
		}
	}
	return r
}

// sync is one round: Placement's reservations on this host's provider
// made to match the book.
func (p *placementMirror) sync(ctx context.Context) error {
	p.round.Lock()
	defer p.round.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 3*novaRequestTimeout)
	defer cancel()
	err := p.syncLocked(ctx)
	p.ended(err, len(p.d.book.Promises()) > 0)
	return err
}

func (p *placementMirror) syncLocked(ctx context.Context) error {
	rp, err := p.provider(ctx)
	if err != nil {
		return err
	}
	inv, err := p.cloud.Inventory(ctx, rp)
	if err != nil {
		return err
	}
	have, err := p.cloud.Allocations(ctx, rp)
	if err != nil {
		return err
	}
	type want struct {
		vm  string
		res nova.Resources
	}
	wants := map[string]want{}
	for vm, pr := range p.d.book.Promises() {
		wants[nova.ReservationConsumer(rp, vm)] = want{vm, resourcesOf(pr.Need, inv)}
	}
	results := map[string]string{}
	var errs []error
	for c, w := range wants {
		switch {
		case len(w.res) == 0:
			results[w.vm] = "its promise has nothing Placement counts (no VCPU, MEMORY_MB or DISK_GB in the provider's inventory)"
		case have[c].Equal(w.res):
			results[w.vm] = ""
		default:
			results[w.vm] = ""
			if err := p.cloud.Reserve(ctx, c, rp, w.res); err != nil {
				if ctx.Err() != nil {
					return err
				}
				results[w.vm] = nova.Truncate(err.Error(), 400)
				if !errors.Is(err, nova.ErrNoCapacity) {
					errs = append(errs, err)
				}
			}
		}
	}
	// Reservations the book no longer has: removed. A consumer is asked
	// its type once; an instance or a migration is left alone.
	for c := range have {
		if _, ok := wants[c]; ok || p.isForeign(c) {
			continue
		}
		t, err := p.cloud.ConsumerType(ctx, c)
		switch {
		case err != nil:
			errs = append(errs, err)
		case t == nova.ReservationType:
			if err := p.cloud.Unreserve(ctx, c); err != nil {
				errs = append(errs, err)
			}
		default:
			p.mu.Lock()
			p.foreign[c] = true
			p.mu.Unlock()
		}
	}
	p.mu.Lock()
	for c := range p.foreign {
		if _, ok := have[c]; !ok {
			delete(p.foreign, c) // gone: the cache holds what is there
		}
	}
	p.mu.Unlock()
	p.settle(rp, results)
	return errors.Join(errs...)
}

func (p *placementMirror) isForeign(c string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.foreign[c]
}

// provider is this host's resource provider, found once.
func (p *placementMirror) provider(ctx context.Context) (string, error) {
	p.mu.Lock()
	rp := p.rp
	p.mu.Unlock()
	if rp != "" {
		return rp, nil
	}
	rp, err := p.cloud.ComputeNode(ctx, p.host)
	if err != nil {
		return "", fmt.Errorf("this host's resource provider: %w", err)
	}
	p.mu.Lock()
	p.rp = rp
	p.mu.Unlock()
	return rp, nil
}

// settle records each promised VM's result, with an event when it changed.
func (p *placementMirror) settle(rp string, results map[string]string) {
	p.mu.Lock()
	old := p.vms
	p.vms = results
	p.mu.Unlock()
	for _, vm := range slices.Sorted(maps.Keys(results)) {
		why := results[vm]
		prev, seen := old[vm]
		if seen && prev == why {
			continue
		}
		if why == "" {
			p.d.event(vm, "placement", fmt.Sprintf("Placement holds this host's promise to %s (resource provider %s, consumer %s): Nova's scheduler counts it", vm, rp, nova.ReservationConsumer(rp, vm)))
			continue
		}
		p.d.event(vm, "placement", fmt.Sprintf("Placement does not hold this host's promise to %s: %s; Nova's scheduler may fill this host past what a failover of %s needs", vm, why, vm))
	}
	p.metrics()
}

// ended notes how a round ended: the first failure while this host has
// promises to hold is an alarm, the next ones (and those with nothing to
// hold) a rate-limited log; the first success after an alarm, an event.
func (p *placementMirror) ended(err error, promised bool) {
	p.mu.Lock()
	p.err = ""
	if err != nil {
		p.err = nova.Truncate(err.Error(), 400)
	}
	now, alarmed := p.err, p.alarmed
	p.alarmed = err != nil && (alarmed || promised)
	p.mu.Unlock()
	if err == nil {
		p.d.metrics.PlacementRounds.WithLabelValues("ok").Inc()
		if alarmed {
			p.d.event("", "placement", "Placement's reservations match this host's promises again")
		}
		return
	}
	p.d.metrics.PlacementRounds.WithLabelValues("error").Inc()
	if promised && !alarmed {
		p.d.event("", "alarm", fmt.Sprintf("Placement's reservations cannot be made to match this host's promises (%s): Nova's scheduler may fill this host past what its partners' failovers need; axd tries again", now))
		return
	}
	if ok, held := p.warn.Allow(); ok {
		p.d.log.Warn("Placement: "+now, "held_back", held)
	}
}

// drop removes vm's reservation now: vm was promoted here, and Nova's
// scheduler is about to look for its room on this host.
func (p *placementMirror) drop(ctx context.Context, vm string) {
	p.round.Lock()
	defer p.round.Unlock()
	ctx, cancel := context.WithTimeout(ctx, novaRequestTimeout)
	defer cancel()
	rp, err := p.provider(ctx)
	if err == nil {
		err = p.cloud.Unreserve(ctx, nova.ReservationConsumer(rp, vm))
	}
	p.mu.Lock()
	delete(p.vms, vm)
	p.mu.Unlock()
	p.metrics()
	if err != nil {
		p.d.event(vm, "placement", fmt.Sprintf("removing the reservation of %s from Placement before its evacuation: %s; the scheduler may find no room for it here (axd removes it at its next round)",
			vm, nova.Truncate(err.Error(), 400)))
		p.kick()
		return
	}
	p.d.event(vm, "placement", fmt.Sprintf("removed the reservation of %s from Placement: it runs here now", vm))
}

func (p *placementMirror) metrics() {
	p.mu.Lock()
	held, failed := 0, 0
	for _, why := range p.vms {
		if why == "" {
			held++
		} else {
			failed++
		}
	}
	p.mu.Unlock()
	p.d.metrics.PlacementReservations.WithLabelValues("held").Set(float64(held))
	p.d.metrics.PlacementReservations.WithLabelValues("failed").Set(float64(failed))
}

// status is the mirror as axctl status shows it.
func (p *placementMirror) status() *api.PlacementHold {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := &api.PlacementHold{Provider: p.rp, Error: p.err}
	for _, vm := range slices.Sorted(maps.Keys(p.vms)) {
		if why := p.vms[vm]; why != "" {
			if s.Failed == nil {
				s.Failed = map[string]string{}
			}
			s.Failed[vm] = why
		} else {
			s.Held = append(s.Held, vm)
		}
	}
	return s
}
