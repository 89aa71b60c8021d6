package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/nova-hook/spool"
)

// libvirt's qemu hook (ax-nova-hook) hands axd each domain event with the
// domain's XML. axd checks and records it, answers, and only then acts:
// the hook must return at once, and what axd does next may ask libvirtd
// about the domain, which waits for the hook.

// LevelSource says at which level, towards which partner, a domain Nova
// started is to be protected. Config.Levels nil is MetadataLevels;
// with --nova-cloud it is Nova's API (novalevels.go).
type LevelSource interface {
	// Level returns the level asked for dom; a zero Choice means none is.
	Level(ctx context.Context, dom *libvirt.Identity) (Choice, error)
}

// Choice is a level asked for a domain, where it was found, and the
// partner named with it ("" : the host's only one). With no level, From
// may say where none was found.
type Choice struct {
	Level, Peer string
	From        string
}

// MetadataLevels is the level in the domain's own metadata:
// <ax:level peer='HOST'>ft</ax:level>, as Nova keeps it in the domain.
type MetadataLevels struct{}

var _ LevelSource = MetadataLevels{}

func (MetadataLevels) Level(_ context.Context, dom *libvirt.Identity) (Choice, error) {
	if dom.Level == "" {
		return Choice{}, nil
	}
	return Choice{Level: dom.Level, Peer: dom.Peer, From: "<ax:level> in the domain's metadata"}, nil
}

// hookAction is what axd does about a hook event.
type hookAction int

const (
	hookRecord hookAction = iota // record it, nothing else
	hookApply                    // protect the domain at the level asked
	hookEnd                      // end the domain's protection
)

// hookApplyTimeout bounds discovering and protecting one started domain.
const hookApplyTimeout = 30 * time.Second

// decideHook is what to do about operation op of domain dom, which axd
// holds in state st (known false: not at all), declaring a level or not,
// and why.
func decideHook(op string, dom *libvirt.Identity, known bool, st vm.State, declared bool) (hookAction, string) {
	switch op {
	case "started":
		switch {
		case dom.Nova == nil:
			return hookRecord, "not a Nova instance: left alone"
		case known && st.Role() != api.RoleLocal:
			return hookRecord, fmt.Sprintf("already %s here (%s): left as it is", st.Role(), st)
		case known && declared:
			return hookRecord, "axd protects it again at its declared level by itself"
		}
		return hookApply, "its level is applied"
	case "stopped", "release":
		switch {
		case !known || st.Role() != api.RolePrimary:
			return hookRecord, "not protected here"
		case st != vm.Syncing && st != vm.Protected && st != vm.Unprotected:
			// Fencing, fenced, handing over: the stop is part of what
			// axd and the partner do; the partner decides.
			return hookRecord, fmt.Sprintf("%s: left to the failover", st)
		}
		return hookEnd, "its protection ends (no failover)"
	}
	return hookRecord, "nothing to do"
}

// serveLibvirtHook is POST /v1/hooks/libvirt.
func (d *Daemon) serveLibvirtHook(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(io.LimitReader(r.Body, api.MaxHookEvent+1))
	if err != nil {
		reply(w, nil, fmt.Errorf("libvirt hook: %w", err))
		return
	}
	if len(data) > api.MaxHookEvent {
		reply(w, nil, fmt.Errorf("libvirt hook: event over %d bytes: refused", api.MaxHookEvent))
		return
	}
	var ev api.HookEvent
	if err := json.Unmarshal(data, &ev); err != nil {
		reply(w, nil, fmt.Errorf("libvirt hook: bad request: %w", err))
		return
	}
	reply(w, nil, d.libvirtHook(ev, false))
}

// libvirtHook checks and records one hook event (replayed: from the
// spool) and starts what it asks for; an error says why it was refused.
func (d *Daemon) libvirtHook(ev api.HookEvent, replayed bool) error {
	if err := names.Check("vm", ev.Domain); err != nil {
		return fmt.Errorf("libvirt hook: %w", err)
	}
	if !api.KnownHookOperation(ev.Operation) {
		return fmt.Errorf("libvirt hook: domain %s: unknown operation %.32q (AX takes %s)", ev.Domain, ev.Operation, strings.Join(api.HookOperations, ", "))
	}
	if len(ev.XML) > api.MaxHookXML {
		return fmt.Errorf("libvirt hook: domain %s %s: XML over %d bytes: refused", ev.Domain, ev.Operation, api.MaxHookXML)
	}
	dom, err := libvirt.Identify([]byte(ev.XML))
	if err != nil {
		return fmt.Errorf("libvirt hook: domain %s %s: %w", ev.Domain, ev.Operation, err)
	}
	if dom.Name != ev.Domain {
		return fmt.Errorf("libvirt hook: domain %s %s: its XML is domain %s's", ev.Domain, ev.Operation, dom.Name)
	}
	known, st, declared := false, vm.Gone, false
	if v, err := d.vm(dom.Name); err == nil {
		known = true
		v.set(func(v *vmState) { st, declared = v.st, v.declaresLevel() })
	}
	action, why := decideHook(ev.Operation, dom, known, st, declared)
	what := "libvirt hook: domain " + dom.Name + " " + ev.Operation
	if replayed {
		what = fmt.Sprintf("libvirt hook (replayed, of %s): domain %s %s", ev.Time.UTC().Format(time.RFC3339), dom.Name, ev.Operation)
	}
	if dom.Nova != nil && dom.Nova.Name != "" {
		what += fmt.Sprintf(" (Nova instance %s, project %s)", dom.Nova.Name, dom.Nova.Project.Name)
	}
	d.event(dom.Name, "hook", what+": "+why)
	switch action {
	case hookApply:
		d.wg.Go(func() { d.applyHookLevel(dom) })
	case hookEnd:
		d.wg.Go(func() {
			if err := d.unprotect(dom.Name); err != nil {
				d.event(dom.Name, "hook", fmt.Sprintf("libvirt hook: domain %s %s: ending its protection failed: %v", dom.Name, ev.Operation, err))
				return
			}
			d.event(dom.Name, "hook", fmt.Sprintf("libvirt hook: domain %s %s: protection ended, the domain stopped (no failover)", dom.Name, ev.Operation))
		})
	}
	return nil
}

// applyHookLevel protects the domain Nova started at the level its source
// asks, towards the partner it names or the host's only one; every outcome
// is an event.
func (d *Daemon) applyHookLevel(dom *libvirt.Identity) {
	ctx, cancel := context.WithTimeout(d.ctx, hookApplyTimeout)
	defer cancel()
	say := func(format string, a ...any) {
		d.event(dom.Name, "hook", fmt.Sprintf("libvirt hook: domain %s: ", dom.Name)+fmt.Sprintf(format, a...))
	}
	src := d.cfg.Levels
	if src == nil {
		src = MetadataLevels{}
	}
	c, err := src.Level(ctx, dom)
	switch {
	case err != nil:
		say("not protected: its level could not be read: %v", err)
		return
	case c.Level == "":
		if c.From == "" {
			c.From = "no <ax:level> in its metadata"
		}
		say("no level asked (%s): left alone", c.From)
		return
	case c.Level == api.LevelNone:
		say("level none asked (%s): left alone", c.From)
		return
	}
	peer, err := d.levelPartner(c.Peer, "<ax:level peer='HOST'>")
	if err != nil {
		say("not protected: %s asks %s but %v", c.From, c.Level, err)
		return
	}
	if err := d.protectDomain(ctx, dom.Name, c.Level, peer); err != nil {
		say("not protected at %s towards %s: %v", c.Level, peer, err)
		return
	}
	say("protected at %s towards %s, as %s asks", c.Level, peer, c.From)
}

// levelPartner is the partner a level asked by Nova or a domain's
// metadata goes towards: named, if it is one of this host's --peers, else
// the host's only one; the error says why there is none (nameIt: how the
// asker names one).
func (d *Daemon) levelPartner(named, nameIt string) (string, error) {
	peers := d.cfg.Peers
	if named != "" {
		if _, ok := peers[named]; !ok {
			known := peerNames(peers)
			sort.Strings(known)
			return "", fmt.Errorf("%s names %s, not a partner of %s (its partners: %s)", nameIt, named, d.cfg.Host, strings.Join(known, ", "))
		}
		return named, nil
	}
	if len(peers) != 1 {
		return "", fmt.Errorf("names no partner, and axd on %s has %d (its --peer flags): name one with %s", d.cfg.Host, len(peers), nameIt)
	}
	for p := range peers {
		return p, nil
	}
	return "", nil
}

// protectDomain protects the running hypervisor domain name at level
// towards peer, discovered afresh: a domain's RAM file is named after its
// id, new at each start.
func (d *Daemon) protectDomain(ctx context.Context, name, level, peer string) error {
	if err := d.waitRunning(ctx, name); err != nil {
		return err
	}
	if err := d.rediscover(ctx, name); err != nil {
		return err
	}
	return d.protect(name, api.ProtectRequest{Level: level, Peer: peer})
}

// pauseChecker says whether a hypervisor's domain is paused.
type pauseChecker interface {
	Paused(ctx context.Context, name string) (bool, error)
}

// pausedPoll is how often waitRunning asks whether a paused domain runs.
var pausedPoll = 250 * time.Millisecond

// waitRunning waits, within ctx, until domain name is not paused:
// protection's checkpoints stop and continue the guest, which would resume
// one its owner paused. Nova starts an instance paused until Neutron says
// its port is plugged, and resumes it then: resumed by AX first, Nova's
// resume fails and the instance with it.
func (d *Daemon) waitRunning(ctx context.Context, name string) error {
	pc, ok := d.cfg.Hypervisor.(pauseChecker)
	if !ok {
		return nil
	}
	t0 := time.Now()
	for said := false; ; said = true {
		// A domain whose state cannot be read is left to the discovery,
		// which says what is wrong with it (not defined here, …).
		if paused, err := pc.Paused(ctx, name); err != nil || !paused {
			if said && err == nil {
				d.event(name, "protect", fmt.Sprintf("VM %s runs (it was paused for %.1f s): protecting it", name, time.Since(t0).Seconds()))
			}
			return nil
		}
		if !said {
			d.event(name, "protect", fmt.Sprintf("VM %s is paused (Nova starts an instance paused until Neutron says its port is plugged): protected once it runs", name))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("VM %s stayed paused for %.0f s: protected once it runs (under Nova, once the server is ACTIVE)", name, time.Since(t0).Seconds())
		case <-time.After(pausedPoll):
		}
	}
}

// replayHooks takes the events the hook spooled while axd was down or
// slow, oldest first.
func (d *Daemon) replayHooks() {
	if d.cfg.HookSpool == "" {
		return
	}
	n, errs := spool.Replay(d.cfg.HookSpool, func(ev api.HookEvent) error { return d.libvirtHook(ev, true) })
	switch {
	case len(errs) > 0:
		d.event("", "hook", fmt.Sprintf("libvirt hook: %d spooled events replayed from %s; %d refused or unreadable: %v",
			n, d.cfg.HookSpool, len(errs), errors.Join(errs...)))
	case n > 0:
		d.event("", "hook", fmt.Sprintf("libvirt hook: %d spooled events replayed from %s", n, d.cfg.HookSpool))
	}
}

// hookSweep is how often axd looks for spooled events besides its start:
// a hook that timed out on a busy axd, or ran as axd was starting.
const hookSweep = 30 * time.Second
