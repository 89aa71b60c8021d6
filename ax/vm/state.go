// Package vm is the protection state of one VM on this host: the states a
// primary, a secondary and an unprotected VM go through, the events that
// move it, and what each move requires of axd (its actions). Next is a pure
// function, so every (state, event) pair is decided in one table and tested;
// axd applies the result in one place, where the event log, the metrics and
// the state store observe it.
package vm

import (
	"fmt"

	"github.com/axproject/ax/ax/api"
)

// State is where a VM stands on this host.
type State uint8

const (
	// Gone: the VM is no longer known here (handed over, or its replica
	// dropped). The zero value, so that a VM never set up is not running.
	Gone State = iota
	// Running: the VM runs here, unprotected by choice (role local).
	Running
	// Syncing: a primary synchronising its disks or memory to the partner.
	Syncing
	// Protected: the partner can take the VM over (disks in sync at HA, a
	// committed checkpoint at FT).
	Protected
	// Unprotected: protection was lost; the primary retries, with an alarm.
	Unprotected
	// Fencing: the guest must be paused (the partner may take over) and is
	// not yet verified paused; its output is held, never released.
	Fencing
	// Fenced: the guest is verified paused; this copy must not run again.
	Fenced
	// HandingOver: a planned failover's final checkpoint committed; the
	// guest stays paused here until the partner holds the VM's lease.
	HandingOver
	// ReplicaSyncing: a secondary receiving the first sync of a stream.
	ReplicaSyncing
	// ReplicaSynced: the memory sync arrived; no checkpoint committed yet.
	ReplicaSynced
	// Ready: the secondary can take the VM over.
	Ready
	// TakingOver: the primary handed the VM over (planned failover).
	TakingOver
	// Stale: the primary ran on without this replica; it must never be
	// resumed, until a new stream resynchronises it.
	Stale
	// Promoting: the VM is being started here from the replica.
	Promoting
	// PromotionFailed: the last promotion failed; an alarm says why.
	PromotionFailed
	numStates
)

var stateNames = [numStates]string{
	Gone: "gone", Running: "running", Syncing: "syncing", Protected: "protected",
	Unprotected: "unprotected", Fencing: "fencing", Fenced: "fenced", HandingOver: "handing over",
	ReplicaSyncing: "syncing", ReplicaSynced: "synced", Ready: "ready", TakingOver: "taking over",
	Stale: "stale", Promoting: "promoting", PromotionFailed: "failed",
}

// String is the state as axctl status shows it.
func (s State) String() string {
	if s < numStates {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Role is the VM's role on this host in s ("" once it is gone).
func (s State) Role() string {
	switch s {
	case Running:
		return api.RoleLocal
	case Syncing, Protected, Unprotected, Fencing, Fenced, HandingOver:
		return api.RolePrimary
	case ReplicaSyncing, ReplicaSynced, Ready, TakingOver, Stale, Promoting, PromotionFailed:
		return api.RoleSecondary
	}
	return ""
}

// Event is what happened to a VM.
type Event uint8

const (
	// Protect: the operator protects a running VM.
	Protect Event = iota + 1
	// StreamStarted: a primary's stream to the partner opened and synchronises.
	StreamStarted
	// Covered: the partner can take over (disks in sync, or a checkpoint
	// committed). Fired at every commit; only the first changes the state.
	Covered
	// Lost: the primary's stream failed; the detail says why.
	Lost
	// LossSettled: long enough after a loss that the partner must have
	// marked its replica stale: the guest's held output may go.
	LossSettled
	// LeftFT: the level went from FT to HA; the partner applied what it
	// journaled, so held output may go and the gate is no longer needed.
	LeftFT
	// Degraded: something is wrong but the state stands (an alarm).
	Degraded
	// Unprotect: the operator ends protection.
	Unprotect
	// Fence: the guest must be paused (detail: why).
	Fence
	// FenceFailed: pausing the guest did not happen (detail: why); retried.
	FenceFailed
	// Paused: the guest is verified paused.
	Paused
	// HandOver: a planned failover's final checkpoint committed.
	HandOver
	// HandOverFailed: the partner did not take over; the guest resumes here.
	HandOverFailed
	// Moved: the partner took the VM over after a planned failover.
	Moved
	// ReplicaOpened: a primary's stream for the VM was accepted here.
	ReplicaOpened
	// MemorySynced: the secondary received the memory sync.
	MemorySynced
	// ReplicaReady: the secondary can take over (disks in sync at HA, or a
	// committed checkpoint). Fired at every commit.
	ReplicaReady
	// ReplicaLevelFT: the primary switched the stream to FT; the replica
	// resynchronises memory (its disks stay usable for an HA restart).
	ReplicaLevelFT
	// HandedOver: the primary handed the VM over on the stream.
	HandedOver
	// RanOn: the primary runs on without this replica.
	RanOn
	// Promote: this host won the VM's lease and starts it from the replica.
	Promote
	// PromoteFailed: starting it failed (detail: why).
	PromoteFailed
	// Promoted: the VM runs here now, unprotected.
	Promoted
	// Released: the primary ended protection; the replica is dropped.
	Released
	// Stopped: the hypervisor stopped the VM here on someone's request
	// (libvirt: virsh destroy, a shutdown, a save): protection ends, no
	// failover, and axd forgets the VM.
	Stopped
	numEvents
)

var eventNames = [numEvents]string{
	Protect: "protect", StreamStarted: "stream-started", Covered: "covered", Lost: "lost",
	LossSettled: "loss-settled", LeftFT: "left-ft", Degraded: "degraded", Unprotect: "unprotect",
	Fence: "fence", FenceFailed: "fence-failed", Paused: "paused", HandOver: "handover",
	HandOverFailed: "handover-failed", Moved: "moved", ReplicaOpened: "replica-opened",
	MemorySynced: "memory-synced", ReplicaReady: "replica-ready", ReplicaLevelFT: "replica-level-ft",
	HandedOver: "handed-over", RanOn: "ran-on", Promote: "promote", PromoteFailed: "promote-failed",
	Promoted: "promoted", Released: "released", Stopped: "stopped",
}

func (e Event) String() string {
	if e > 0 && e < numEvents {
		return eventNames[e]
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// Actions are what axd must do when a transition is taken, besides
// recording it.
type Actions uint16

const (
	// SetAlarm: the VM's alarm becomes the event's detail.
	SetAlarm Actions = 1 << iota
	// ClearAlarm: the VM has no alarm any more.
	ClearAlarm
	// HoldOutput: from now on nothing of the guest's output goes out.
	HoldOutput
	// ReleaseOutput: what the gate holds goes out.
	ReleaseOutput
	// DiscardOutput: what the gate holds is dropped, never sent: the
	// partner may resume the guest from before it.
	DiscardOutput
	// DetachOutput: the gate is removed from the tap.
	DetachOutput
	// Log: the transition goes to the event log.
	Log
)

// Has reports whether every action of b is in a.
func (a Actions) Has(b Actions) bool { return a&b == b }

// Next decides the transition of a VM in state s on event e: the new state
// and the actions it requires. ok is false when e does not apply in s (the
// state stands and nothing is done): a late commit cannot undo a fence, a
// replica being promoted cannot be reopened.
func Next(s State, e Event) (to State, act Actions, ok bool) {
	primaryLive := s == Syncing || s == Protected || s == Unprotected
	replica := s == ReplicaSyncing || s == ReplicaSynced || s == Ready || s == Stale || s == PromotionFailed || s == TakingOver
	switch e {
	case Protect:
		if s == Running {
			return Syncing, ClearAlarm | Log, true
		}
	case StreamStarted:
		if primaryLive {
			return Syncing, ClearAlarm, true
		}
	case Covered:
		if s == Syncing {
			return Protected, ClearAlarm | Log, true
		}
		if s == Protected {
			return Protected, 0, true
		}
	case Lost:
		if primaryLive {
			return Unprotected, SetAlarm | Log, true
		}
	case LossSettled:
		// Only while unprotected: a fence in between means the partner may
		// have taken over, and what is held must never be seen.
		if s == Unprotected {
			return Unprotected, ReleaseOutput, true
		}
	case LeftFT:
		if s == Protected || s == Syncing {
			return s, ReleaseOutput | DetachOutput | Log, true
		}
	case Degraded:
		if s != Gone {
			return s, SetAlarm | Log, true
		}
	case Unprotect:
		switch s {
		case Syncing, Protected, Unprotected:
			return Running, ClearAlarm | ReleaseOutput | DetachOutput | Log, true
		case Fencing, Fenced:
			// The operator takes the VM back; the partner may have taken
			// over meanwhile, so what was held is never let out.
			return Running, ClearAlarm | DiscardOutput | DetachOutput | Log, true
		}
	case Fence:
		// Also while handing over: a handover whose lease was released and
		// cannot be taken back must not resume the guest here.
		if primaryLive || s == HandingOver {
			return Fencing, SetAlarm | HoldOutput, true
		}
		if s == Fencing {
			return Fencing, 0, true
		}
	case FenceFailed:
		if s == Fencing {
			return Fencing, SetAlarm | DiscardOutput | Log, true
		}
	case Paused:
		if s == Fencing {
			return Fenced, SetAlarm | DiscardOutput | DetachOutput | Log, true
		}
	case HandOver:
		if s == Protected {
			return HandingOver, Log, true
		}
	case HandOverFailed:
		if s == HandingOver {
			return Protected, Log, true
		}
	case Moved:
		if s == HandingOver {
			// Everything up to the final checkpoint was released on its
			// commit; anything after it belongs to the partner's copy.
			return Gone, DiscardOutput | DetachOutput | Log, true
		}
	case ReplicaOpened:
		if s == Gone || replica {
			return ReplicaSyncing, ClearAlarm | Log, true
		}
	case MemorySynced:
		if s == ReplicaSyncing {
			return ReplicaSynced, 0, true
		}
	case ReplicaReady:
		switch s {
		case ReplicaSyncing, ReplicaSynced:
			return Ready, ClearAlarm | Log, true
		case Ready:
			return Ready, 0, true
		}
	case ReplicaLevelFT:
		if s == Ready || s == ReplicaSyncing || s == ReplicaSynced {
			return ReplicaSyncing, Log, true
		}
	case HandedOver:
		if s == Ready || s == ReplicaSyncing || s == ReplicaSynced {
			return TakingOver, Log, true
		}
	case RanOn:
		switch s {
		case ReplicaSyncing, ReplicaSynced, Ready:
			return Stale, SetAlarm | Log, true
		case Stale:
			return Stale, 0, true
		}
	case Promote:
		switch s {
		case ReplicaSyncing, ReplicaSynced, Ready, TakingOver, PromotionFailed:
			return Promoting, ClearAlarm | Log, true
		}
	case PromoteFailed:
		if s == Promoting {
			return PromotionFailed, SetAlarm | Log, true
		}
	case Promoted:
		if s == Promoting {
			return Running, ClearAlarm | Log, true
		}
	case Released:
		if replica {
			return Gone, ClearAlarm | Log, true
		}
	case Stopped:
		// Not once fencing: the partner may be taking over, and the
		// guard's own stop is no operator's.
		switch {
		case s == Running:
			return Gone, ClearAlarm | Log, true
		case primaryLive:
			// The guest is gone and so is its replica: nobody resumes
			// from before what was held.
			return Gone, ClearAlarm | ReleaseOutput | DetachOutput | Log, true
		}
	}
	return s, 0, false
}

// Transition is one step a VM took, as observers see it.
type Transition struct {
	VM       string
	From, To State
	Event    Event
	Actions  Actions
	// Detail says why, in words for the operator (the alarm, the event log).
	Detail string
}

// Changed reports whether the transition changed the VM's state.
func (t Transition) Changed() bool { return t.From != t.To }
