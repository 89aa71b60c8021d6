package vm

import (
	"testing"

	"github.com/axproject/ax/ax/api"
)

// allowed is the whole transition table written out by hand: every pair
// not in it must leave the state as it is and do nothing.
var allowed = map[State]map[Event]State{
	Running: {Protect: Syncing, Degraded: Running, Stopped: Gone},
	Syncing: {StreamStarted: Syncing, Covered: Protected, Lost: Unprotected, LeftFT: Syncing, Degraded: Syncing,
		Unprotect: Running, Fence: Fencing, Stopped: Gone},
	Protected: {StreamStarted: Syncing, Covered: Protected, Lost: Unprotected, LeftFT: Protected, Degraded: Protected,
		Unprotect: Running, Fence: Fencing, HandOver: HandingOver, Stopped: Gone},
	Unprotected: {StreamStarted: Syncing, Lost: Unprotected, LossSettled: Unprotected, Degraded: Unprotected,
		Unprotect: Running, Fence: Fencing, Stopped: Gone},
	Fencing:     {Degraded: Fencing, Unprotect: Running, Fence: Fencing, FenceFailed: Fencing, Paused: Fenced},
	Fenced:      {Degraded: Fenced, Unprotect: Running},
	HandingOver: {Degraded: HandingOver, HandOverFailed: Protected, Moved: Gone, Fence: Fencing},
	Gone:        {ReplicaOpened: ReplicaSyncing},
	ReplicaSyncing: {ReplicaOpened: ReplicaSyncing, MemorySynced: ReplicaSynced, ReplicaReady: Ready, ReplicaLevelFT: ReplicaSyncing,
		HandedOver: TakingOver, RanOn: Stale, Promote: Promoting, Released: Gone, Degraded: ReplicaSyncing},
	ReplicaSynced: {ReplicaOpened: ReplicaSyncing, ReplicaReady: Ready, ReplicaLevelFT: ReplicaSyncing,
		HandedOver: TakingOver, RanOn: Stale, Promote: Promoting, Released: Gone, Degraded: ReplicaSynced},
	Ready: {ReplicaOpened: ReplicaSyncing, ReplicaReady: Ready, ReplicaLevelFT: ReplicaSyncing,
		HandedOver: TakingOver, RanOn: Stale, Promote: Promoting, Released: Gone, Degraded: Ready},
	TakingOver:      {ReplicaOpened: ReplicaSyncing, Promote: Promoting, Released: Gone, Degraded: TakingOver},
	Stale:           {ReplicaOpened: ReplicaSyncing, RanOn: Stale, Released: Gone, Degraded: Stale},
	Promoting:       {PromoteFailed: PromotionFailed, Promoted: Running, Degraded: Promoting},
	PromotionFailed: {ReplicaOpened: ReplicaSyncing, Promote: Promoting, Released: Gone, Degraded: PromotionFailed},
}

func TestTransitionTable(t *testing.T) {
	for s := State(0); s < numStates; s++ {
		for e := Event(1); e < numEvents; e++ {
			to, act, ok := Next(s, e)
			want, allow := allowed[s][e]
			switch {
			case allow && (!ok || to != want):
				t.Errorf("%v on %v: got %v ok=%v, want %v", s, e, to, ok, want)
			case !allow && (ok || to != s || act != 0):
				t.Errorf("%v on %v: got %v ok=%v actions %b, want refused with the state unchanged and no actions", s, e, to, ok, act)
			}
		}
	}
}

// The output rules, over every pair: these are what keep a client from
// seeing output the partner's copy never produced.
func TestTransitionOutputRules(t *testing.T) {
	for s := State(0); s < numStates; s++ {
		for e := Event(1); e < numEvents; e++ {
			to, act, ok := Next(s, e)
			if !ok {
				continue
			}
			if act.Has(ReleaseOutput) && act.Has(DiscardOutput) {
				t.Errorf("%v on %v both releases and discards", s, e)
			}
			// Once a fence started, the partner may run the guest: nothing
			// held may ever be let out.
			if (s == Fencing || s == Fenced || s == HandingOver) && act.Has(ReleaseOutput) {
				t.Errorf("%v on %v releases output", s, e)
			}
			if to == Fencing && s != Fencing && !act.Has(HoldOutput) {
				t.Errorf("%v on %v enters fencing without holding output", s, e)
			}
			if to == Fenced && s != Fenced && !act.Has(DiscardOutput|DetachOutput) {
				t.Errorf("%v on %v: a fenced VM must drop and detach its gate", s, e)
			}
			// Leaving the primary role leaves no gate behind.
			if s.Role() == api.RolePrimary && to.Role() != api.RolePrimary && !act.Has(DetachOutput) {
				t.Errorf("%v on %v leaves the primary role with its gate attached", s, e)
			}
			// Roles change only through the operator, a promotion, a
			// handover, or a dropped replica.
			if s.Role() != to.Role() {
				switch e {
				case Protect, Unprotect, Promoted, Moved, Released, ReplicaOpened, Stopped:
				default:
					t.Errorf("%v on %v changes role %s → %s", s, e, s.Role(), to.Role())
				}
			}
			if act.Has(SetAlarm) && act.Has(ClearAlarm) {
				t.Errorf("%v on %v sets and clears the alarm", s, e)
			}
		}
	}
}

func TestStateNames(t *testing.T) {
	seen := map[string][]State{}
	for s := State(0); s < numStates; s++ {
		if s.String() == "" {
			t.Errorf("state %d has no name", s)
		}
		seen[s.String()] = append(seen[s.String()], s)
	}
	// Only "syncing" names two states, one per role.
	for n, ss := range seen {
		if len(ss) > 1 && (n != "syncing" || len(ss) != 2 || ss[0].Role() == ss[1].Role()) {
			t.Errorf("name %q shared by %v", n, ss)
		}
	}
	for e := Event(1); e < numEvents; e++ {
		if eventNames[e] == "" {
			t.Errorf("event %d has no name", e)
		}
	}
	if State(200).String() != "State(200)" || Event(200).String() != "Event(200)" {
		t.Error("out-of-range names")
	}
}

func TestEpochsOnlyGrow(t *testing.T) {
	e := &Epochs{}
	if got := e.Start(); got != 1 {
		t.Fatalf("first stream starts at %d, want 1", got)
	}
	e.Took(5)
	e.Committed(4)
	e.Ended(5)
	if got := e.Start(); got != 7 {
		t.Fatalf("after taking 5 the next stream starts at %d, want 7", got)
	}
	e.Ended(2) // a stream that ended early cannot lower it
	if got := e.Next(); got != 7 {
		t.Fatalf("next %d after an earlier end, want 7", got)
	}
	if tk, c := e.Status(); tk != 5 || c != 4 {
		t.Fatalf("status %d/%d", tk, c)
	}
	e.Reset()
	if tk, c := e.Status(); tk != 0 || c != 0 {
		t.Fatalf("status after reset %d/%d", tk, c)
	}
	if got := RestoreEpochs(42).Start(); got != 42 {
		t.Fatalf("restored counter starts at %d", got)
	}
	// The stored floor stays above every epoch taken, rising a block at a
	// time: after a crash a stream starts above all of them.
	f := RestoreEpochs(10)
	if !f.Took(10) || f.Floor() != 12+epochBlock {
		t.Fatalf("floor %d after taking 10", f.Floor())
	}
	for n := uint64(11); n < 10+epochBlock; n++ {
		if f.Took(n) {
			t.Fatalf("floor written again at %d, within the block", n)
		}
	}
	if !f.Took(11+epochBlock) || f.Floor() <= 11+epochBlock+1 {
		t.Fatalf("floor %d did not rise past epoch %d", f.Floor(), 11+epochBlock)
	}
	if RestoreEpochs(f.Floor()).Start() <= 11+epochBlock+1 {
		t.Fatal("a restored counter starts at or below an epoch taken")
	}
}
