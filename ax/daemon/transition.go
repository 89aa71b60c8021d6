package daemon

import (
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/netbuffer"
)

// eventKinds names each transition in the event log (axctl events).
var eventKinds = map[vm.Event]string{
	vm.Protect: "protect", vm.Covered: "protected", vm.Lost: "alarm", vm.LeftFT: "level",
	vm.Degraded: "alarm", vm.Unprotect: "unprotect", vm.FenceFailed: "alarm", vm.Paused: "fenced",
	vm.HandOver: "handover", vm.HandOverFailed: "handover", vm.Moved: "moved",
	vm.ReplicaOpened: "replica", vm.ReplicaReady: "ready", vm.ReplicaLevelFT: "level",
	vm.HandedOver: "handover", vm.RanOn: "stale", vm.Promote: "promote", vm.PromoteFailed: "alarm",
	vm.Promoted: "promoted", vm.Released: "released",
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
	// The gate changes in the same step as the state: nothing can see the
	// new state with the old gate.
	gate := v.gate
	if act.Has(vm.DetachOutput) {
		v.gate = nil
	}
	level := v.level
	rec := vm.Record{VM: v.name, State: to.String(), Role: to.Role(), Level: level, Peer: v.peer,
		NextEpoch: v.epochs.Next(), Alarm: v.alarm, Updated: time.Now()}
	v.mu.Unlock()

	d.applyOutput(v.name, gate, act)
	d.observe(tr, level, alarmChanged, rec)
	return tr, true
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
