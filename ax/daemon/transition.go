package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/guard"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/netbuffer"
)

// eventKinds names each transition in the event log (axctl events).
var eventKinds = map[vm.Event]string{
	vm.Protect: "protect", vm.Covered: "protected", vm.Lost: "alarm", vm.LeftFT: "level",
	vm.Degraded: "alarm", vm.Unprotect: "unprotect", vm.FenceFailed: "alarm", vm.Paused: "fenced",
	vm.HandOver: "handover", vm.HandOverFailed: "handover", vm.Moved: "moved",
	vm.ReplicaOpened: "replica", vm.ReplicaReady: "ready", vm.ReplicaLevelFT: "level",
	vm.HandedOver: "handover", vm.RanOn: "stale", vm.Promote: "promote", vm.PromoteFailed: "alarm",
	vm.Promoted: "promoted", vm.Released: "released", vm.Stopped: "stopped",
}

// fire moves v's protection state on event e, if e applies in its state
// (vm.Next decides), and carries out what the transition requires. also, if
// not nil, runs under v's lock with the transition taken, to change other
// fields of v in the same step. detail says why, for the alarm and the
// event log. fire returns the transition, and whether it was taken.
func (d *Daemon) fire(v *vmState, e vm.Event, detail string, also func(v *vmState)) (vm.Transition, bool) {
	v.mu.Lock()
	to, act, ok := vm.Next(v.st, e)
	if !ok {
		from := v.st
		v.mu.Unlock()
		d.log.Debug("event does not apply", "vm", v.name, "state", from.String(), "event", e.String())
		return vm.Transition{VM: v.name, From: from, To: from, Event: e}, false
	}
	tr := vm.Transition{VM: v.name, From: v.st, To: to, Event: e, Actions: act, Detail: detail}
	v.st = to
	alarmChanged := false
	switch {
	case act.Has(vm.SetAlarm):
		alarmChanged, v.alarm = v.alarm != detail, detail
	case act.Has(vm.ClearAlarm):
		v.alarm = ""
	}
	if also != nil {
		also(v)
	}
	gap := v.trackIntent(tr)
	// The gate changes in the same step as the state: nothing can see the
	// new state with the old gate.
	gate := v.gate
	if act.Has(vm.DetachOutput) {
		v.gate = nil
	}
	level := v.level
	rec := v.record()
	v.mu.Unlock()

	d.applyOutput(v.name, gate, act)
	d.observe(tr, level, alarmChanged, rec)
	if gap > 0 {
		d.metrics.UnprotectedS.WithLabelValues(v.name).Add(gap.Seconds())
		d.event(v.name, "reprotected", fmt.Sprintf("%s is protected at its declared level %s again, after %.1f s unprotected", v.name, level, gap.Seconds()))
	}
	return tr, true
}

// trackIntent keeps the time a VM with a declared level spends below it
// (v.mu held): the gap opens when protection is lost (the stream, a fence;
// a failover and an axd restart open it where they happen) and closes,
// reported, when the VM is protected again. A first sync, or a level
// change's, opens none: the VM was not protected before, or still is at
// its disks' level.
func (v *vmState) trackIntent(tr vm.Transition) (closed time.Duration) {
	switch {
	case tr.To.Role() == api.RoleSecondary || tr.To == vm.Gone || !v.declaresLevel():
		v.unprotectedSince = time.Time{}
	case tr.To == vm.Protected:
		if !v.unprotectedSince.IsZero() {
			closed = max(time.Since(v.unprotectedSince), time.Nanosecond)
		}
		v.unprotectedSince = time.Time{}
	case tr.To == vm.Syncing:
	case v.unprotectedSince.IsZero():
		v.unprotectedSince = time.Now()
	}
	return closed
}

// applyOutput does to the VM's output gate what a transition requires.
func (d *Daemon) applyOutput(name string, g *netbuffer.Gate, act vm.Actions) {
	if g == nil {
		return
	}
	var err error
	switch {
	case act.Has(vm.HoldOutput):
		err = g.Hold()
	case act.Has(vm.ReleaseOutput):
		err = g.Open()
	case act.Has(vm.DiscardOutput):
		err = g.Discard()
	}
	if err != nil {
		d.log.Warn("output gate", "vm", name, "err", err)
	}
	if act.Has(vm.DetachOutput) {
		g.Detach()
	}
}

// observe is where a transition reaches the event log, the metrics and the
// state store.
func (d *Daemon) observe(tr vm.Transition, level string, alarmChanged bool, rec vm.Record) {
	// A repeated alarm (a retry failing the same way) is logged once.
	repeated := !tr.Changed() && tr.Actions.Has(vm.SetAlarm) && !alarmChanged
	if tr.Actions.Has(vm.Log) && !repeated {
		d.event(tr.VM, eventKinds[tr.Event], tr.Detail)
	}
	switch {
	case tr.To == vm.Gone:
		d.metrics.Forget(tr.VM)
	case tr.From.Role() != tr.To.Role():
		if tr.From.Role() == api.RolePrimary {
			d.metrics.Forget(tr.VM) // its stream's series end with it
		}
		d.metrics.SetLevel(tr.VM, tr.To.Role(), level)
	}
	if tr.To.Role() == api.RolePrimary {
		d.metrics.Protected.WithLabelValues(tr.VM).Set(b2f(tr.To == vm.Protected))
	}
	if !tr.Changed() {
		return
	}
	var err error
	if tr.To == vm.Gone {
		err = d.store.Delete(tr.VM)
	} else {
		err = d.store.Save(rec)
	}
	if err != nil {
		d.log.Warn("state store", "vm", tr.VM, "err", err)
	}
}

// record is what the state store keeps of v (v.mu held).
func (v *vmState) record() vm.Record {
	spec := v.spec
	return vm.Record{Version: vm.RecordVersion, VM: v.name, State: v.st.String(), Role: v.st.Role(), Level: v.level,
		Peer: v.peer, NextEpoch: v.epochs.Floor(), Alarm: v.alarm, Declared: v.declared, DeclaredPeer: v.declaredPeer,
		UnprotectedSince: v.unprotectedSince, LeftGuard: v.leftGuard, Updated: time.Now(), Spec: &spec}
}

// saveRecord writes v's record to the state store.
func (d *Daemon) saveRecord(v *vmState) {
	v.mu.Lock()
	rec := v.record()
	v.mu.Unlock()
	if err := d.store.Save(rec); err != nil {
		d.log.Warn("state store", "vm", v.name, "err", err)
	}
}

// restore re-registers the VMs the state store kept from before axd
// started, each whose hypervisor still runs it (the others are gone: the
// host restarted, or it failed over and its copy here was killed):
// a local VM as it was defined; a primary defined and protected again at
// its level towards its partner (a new stream: memory and disks are
// synchronised again), its epochs above those it used — should the partner
// have taken it over meanwhile, the witness refuses this host the lease and
// the guard fences this copy; a VM whose fence was under way or done stays
// fenced and unprotected, the fence retried until its guest is verified
// paused. A replica is reopened (restoreReplica); a stream of its VM waits
// until it is.
func (d *Daemon) restore(recs []vm.Record) {
	d.unpinStale(recs)
	for _, r := range recs {
		if r.Spec == nil || r.Spec.Name != r.VM || (r.Role != api.RoleLocal && r.Role != api.RolePrimary && r.Role != api.RoleSecondary) {
			continue
		}
		d.mu.Lock()
		if d.restoring == nil {
			d.restoring = map[string]bool{}
		}
		d.restoring[r.VM] = true
		d.mu.Unlock()
		d.wg.Go(func() {
			defer func() {
				d.mu.Lock()
				delete(d.restoring, r.VM)
				d.mu.Unlock()
			}()
			if r.Role == api.RoleSecondary {
				d.restoreReplica(r)
				return
			}
			// A stream of the VM waits while a seed may be made of it
			// (its copy here found gone or taken over).
			defer d.seeding(r.VM)()
			d.restoreVM(r)
		})
	}
}

func (d *Daemon) restoreVM(r vm.Record) {
	if r.Role == api.RolePrimary && r.Spec.PID > 0 {
		if stopped, _ := guard.Stopped(r.Spec.PID); stopped && !d.resumeGuarded(r) {
			return
		}
	}
	ctx, cancel := context.WithTimeout(d.ctx, 2*time.Second)
	mon, err := d.cfg.Hypervisor.Domain(r.Spec.Guest).Control(ctx)
	cancel()
	if err != nil {
		d.unpinGate(r.VM)
		d.event(r.VM, "forget", fmt.Sprintf("%s was %s here before axd started, but its hypervisor does not answer (%v): forgotten", r.VM, r.State, err))
		if err := d.store.Delete(r.VM); err != nil {
			d.log.Warn("state store", "vm", r.VM, "err", err)
		}
		if r.Role == api.RolePrimary {
			d.seedReplica(*r.Spec) // its QEMU is gone: what it left is a base
		}
		return
	}
	mon.Close()
	if err := d.define(*r.Spec); err != nil {
		d.event(r.VM, "alarm", fmt.Sprintf("not restored after axd started: %v", err))
		return
	}
	v, err := d.vm(r.VM)
	if err != nil {
		return
	}
	fenced := r.State == vm.Fencing.String() || r.State == vm.Fenced.String()
	v.set(func(v *vmState) {
		v.epochs = vm.RestoreEpochs(r.NextEpoch)
		v.declared, v.declaredPeer, v.unprotectedSince = r.Declared, r.DeclaredPeer, r.UnprotectedSince
		v.leftGuard = r.LeftGuard
		if r.Role == api.RolePrimary && !fenced {
			// Its protection lapsed while axd was away: the gap runs from
			// now (or from when it was lost before) until the new stream
			// covers it. Protect declares its level again.
			v.declared = r.Level
			if v.unprotectedSince.IsZero() {
				v.unprotectedSince = time.Now()
			}
		}
		if !v.declaresLevel() {
			v.declared, v.declaredPeer, v.unprotectedSince = api.LevelNone, "", time.Time{}
		}
		if fenced {
			// Not a transition: the VM was fencing before axd started.
			v.st, v.level, v.peer, v.alarm = vm.Fencing, r.Level, r.Peer, "fencing (from before axd restarted): "+r.Alarm
		}
	})
	switch {
	case fenced:
		d.fenceUntilPaused(v, "it was fencing or fenced before axd restarted", nil)
		d.unpinGate(r.VM) // what it held is discarded, as a fence does
	case r.Role == api.RolePrimary:
		d.event(r.VM, "restore", fmt.Sprintf("restoring protection of %s at level %s towards %s", r.VM, r.Level, r.Peer))
		if err := d.protect(r.VM, api.ProtectRequest{Level: r.Level, Peer: r.Peer}); err != nil {
			d.fire(v, vm.Degraded, "protection not resumed after axd restarted: "+err.Error(), nil)
		}
	}
}

// unpinStale removes the pinned output gates of VMs that no record names
// as a primary here: nothing will adopt them.
func (d *Daemon) unpinStale(recs []vm.Record) {
	if !d.pinGates {
		return
	}
	ents, err := os.ReadDir(d.cfg.BPFDir)
	if err != nil {
		return
	}
	keep := map[string]bool{}
	for _, r := range recs {
		if r.Role == api.RolePrimary {
			keep[r.VM] = true
		}
	}
	for _, e := range ents {
		if !keep[e.Name()] {
			d.unpinGate(e.Name())
		}
	}
}

// How a restarted axd keeps asking a silent witness about a guest its guard
// stopped (resumeGuarded).
const (
	guardedAskEvery = time.Second
	guardedAskFor   = 2 * time.Minute
)

// guardedHolder asks the witness who last held vm's lease; when that is
// this host it holds the lease again before answering. A LeaseHeld refusal
// of that renewal is an answer (the holder it names), not an error.
func (d *Daemon) guardedHolder(name string) (string, error) {
	if d.wit == nil {
		return "", errors.New("no witness configured")
	}
	ctx, cancel := context.WithTimeout(d.ctx, 2*time.Second)
	defer cancel()
	li, err := d.wit.Query(ctx, name)
	if err != nil {
		return "", err
	}
	if li.Holder != d.cfg.Host {
		return li.Holder, nil
	}
	// Ours: hold it again before the guest runs.
	if _, err := d.renew(ctx, name); err != nil {
		var held *witness.LeaseHeldError
		if errors.As(err, &held) {
			return held.Holder, nil // taken meanwhile
		}
		if errors.Is(err, witness.ErrLeaseHeld) {
			return "", nil
		}
		return "", err
	}
	return d.cfg.Host, nil
}

// resumeGuarded decides about a primary whose guard stopped its QEMU while
// axd was away. The witness remembers who last held the VM's lease, even
// once it lapsed (a promoted VM runs on unprotected and renews nothing): if
// that is still this host, no one took the VM over and the guest continues
// (true); if it is the partner, the partner runs the VM and this copy is
// killed; if the witness cannot say, the guest stays stopped with an alarm.
// A witness that does not answer (down, unreachable, slow on a loaded host)
// is asked again every guardedAskEvery for guardedAskFor before that: an
// axd restarting in a partition, or beside a busy witness, should not leave
// the guest to the operator for want of one answer.
func (d *Daemon) resumeGuarded(r vm.Record) bool {
	pid := r.Spec.PID
	holder, err := d.guardedHolder(r.VM)
	if err != nil && d.wit != nil {
		d.event(r.VM, "alarm", fmt.Sprintf("its guard stopped %s while axd was away, and the witness does not answer (%v): the guest stays stopped; asking again every %s for %s",
			r.VM, err, guardedAskEvery, guardedAskFor))
		for deadline := time.Now().Add(guardedAskFor); err != nil && time.Now().Before(deadline); {
			select {
			case <-d.ctx.Done():
				return false
			case <-time.After(guardedAskEvery):
			}
			holder, err = d.guardedHolder(r.VM)
		}
	}
	switch {
	case holder == d.cfg.Host && err == nil:
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			d.event(r.VM, "alarm", fmt.Sprintf("its guard stopped %s while axd was away; resuming QEMU (pid %d) failed: %v", r.VM, pid, err))
			return false
		}
		d.event(r.VM, "restore", fmt.Sprintf("its guard stopped %s while axd was away; no one took it over (the lease is still this host's): resumed", r.VM))
		return true
	case holder != "" && holder != d.cfg.Host:
		syscall.Kill(pid, syscall.SIGKILL)
		d.unpinGate(r.VM) // what it held is never to be seen: the partner resumed from before it
		d.event(r.VM, "forget", fmt.Sprintf("%s was taken over by %s while axd was away (its guard had stopped it here): this copy (QEMU pid %d) is killed", r.VM, holder, pid))
		if err := d.store.Delete(r.VM); err != nil {
			d.log.Warn("state store", "vm", r.VM, "err", err)
		}
		d.seedReplica(*r.Spec)
		return false
	default:
		why := "it names no holder"
		if err != nil {
			why = err.Error()
		}
		d.event(r.VM, "alarm", fmt.Sprintf("its guard stopped %s while axd was away, and the witness cannot say who runs it now (%s): left stopped; resume it (kill -CONT %d) only once sure the partner does not run it", r.VM, why, pid))
		return false
	}
}
