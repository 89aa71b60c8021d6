package witness

import (
	"fmt"
	"testing"
)

const y, n = true, false

// decisions is the whole truth table: every combination of the five
// observations, with what each side must do. Unnamed rows are the ones that
// follow from a named rule above them.
var decisions = []struct {
	repl, mgmt, wit, exp, lease bool
	secondary                   SecondaryAction
	primary                     PrimaryAction
	name                        string
}{
	// repl mgmt witness partner-expired own-lease → secondary, primary
	{n, n, n, n, n, WaitWitness, Fence, "isolated, lease lapsed"},
	{n, n, n, n, y, WaitWitness, Fence, "isolated: fence before the lease runs out"},
	{n, n, n, y, n, WaitWitness, Fence, "stale 'expired' without the witness: never promote"},
	{n, n, n, y, y, WaitWitness, Fence, ""},
	{n, n, y, n, n, WaitWitness, Fence, "partner silent, own lease lapsed"},
	{n, n, y, n, y, WaitWitness, Unprotected, "partner silent, lease not yet expired: wait, run unprotected"},
	{n, n, y, y, n, Promote, Fence, "primary dead: witness confirms expiry, promote"},
	{n, n, y, y, y, Promote, Unprotected, ""},
	{n, y, n, n, n, Wait, Fence, ""},
	{n, y, n, n, y, Wait, Unprotected, "witness down, partner on mgmt only: unprotected"},
	{n, y, n, y, n, Wait, Fence, ""},
	{n, y, n, y, y, Wait, Unprotected, ""},
	{n, y, y, n, n, Wait, Fence, ""},
	{n, y, y, n, y, Wait, Unprotected, "replication link down: unprotected, alarm"},
	{n, y, y, y, n, Wait, Fence, ""},
	{n, y, y, y, y, Wait, Unprotected, "heard on mgmt vetoes promotion despite expiry"},
	{y, n, n, n, n, Wait, Fence, ""},
	{y, n, n, n, y, Wait, Protected, "witness down, replication fine: protected"},
	{y, n, n, y, n, Wait, Fence, ""},
	{y, n, n, y, y, Wait, Protected, ""},
	{y, n, y, n, n, Wait, Fence, ""},
	{y, n, y, n, y, Wait, Protected, "management network down: protected"},
	{y, n, y, y, n, Wait, Fence, ""},
	{y, n, y, y, y, Wait, Protected, "heard on replication vetoes promotion despite expiry"},
	{y, y, n, n, n, Wait, Fence, ""},
	{y, y, n, n, y, Wait, Protected, ""},
	{y, y, n, y, n, Wait, Fence, ""},
	{y, y, n, y, y, Wait, Protected, ""},
	{y, y, y, n, n, Wait, Fence, "own lease lapsed though partner heard: fence"},
	{y, y, y, n, y, Wait, Protected, "all healthy"},
	{y, y, y, y, n, Wait, Fence, ""},
	{y, y, y, y, y, Wait, Protected, ""},
}

func (o Observation) bits() int {
	b := 0
	for _, v := range []bool{o.ReplHeard, o.MgmtHeard, o.WitnessReachable, o.PartnerLeaseExpired, o.OwnLeaseValid} {
		b <<= 1
		if v {
			b |= 1
		}
	}
	return b
}

func TestDecide(t *testing.T) {
	seen := make(map[int]bool)
	for _, d := range decisions {
		o := Observation{ReplHeard: d.repl, MgmtHeard: d.mgmt, WitnessReachable: d.wit, PartnerLeaseExpired: d.exp, OwnLeaseValid: d.lease}
		name := d.name
		if name == "" {
			name = fmt.Sprintf("repl=%t,mgmt=%t,witness=%t,expired=%t,lease=%t", d.repl, d.mgmt, d.wit, d.exp, d.lease)
		}
		t.Run(name, func(t *testing.T) {
			if got := DecideSecondary(o); got != d.secondary {
				t.Errorf("DecideSecondary(%+v) = %s, want %s", o, got, d.secondary)
			}
			if got := DecidePrimary(o); got != d.primary {
				t.Errorf("DecidePrimary(%+v) = %s, want %s", o, got, d.primary)
			}
		})
		if seen[o.bits()] {
			t.Errorf("observation %+v is in the table twice", o)
		}
		seen[o.bits()] = true
	}
	if len(seen) != 32 {
		t.Errorf("table covers %d of the 32 observations", len(seen))
	}
}

// TestNeverBothRun checks the invariant the rules exist for, over every pair
// of observations the two hosts can hold at once. The witness says the
// primary's lease expired only after it did on the witness's clock, and the
// primary judges its own lease on a clock that runs out earlier (see
// Client.Renew); so when the secondary sees the witness confirm expiry, the
// primary's own lease is invalid.
func TestNeverBothRun(t *testing.T) {
	for p := range 32 {
		primary := observation(p)
		for s := range 32 {
			secondary := observation(s)
			if secondary.WitnessReachable && secondary.PartnerLeaseExpired && primary.OwnLeaseValid {
				continue // cannot happen at the same time
			}
			if DecideSecondary(secondary) == Promote && DecidePrimary(primary) != Fence {
				t.Errorf("secondary %+v promotes while primary %+v runs (%s)", secondary, primary, DecidePrimary(primary))
			}
		}
	}
}

func observation(bits int) Observation {
	return Observation{
		ReplHeard:           bits&16 != 0,
		MgmtHeard:           bits&8 != 0,
		WitnessReachable:    bits&4 != 0,
		PartnerLeaseExpired: bits&2 != 0,
		OwnLeaseValid:       bits&1 != 0,
	}
}

func TestActionStrings(t *testing.T) {
	for _, c := range []struct {
		got, want string
	}{
		{Wait.String(), "wait"},
		{Promote.String(), "promote"},
		{WaitWitness.String(), "wait-witness"},
		{SecondaryAction(0).String(), "SecondaryAction(0)"},
		{Protected.String(), "protected"},
		{Unprotected.String(), "unprotected"},
		{Fence.String(), "fence"},
		{PrimaryAction(9).String(), "PrimaryAction(9)"},
	} {
		if c.got != c.want {
			t.Errorf("String() = %q, want %q", c.got, c.want)
		}
	}
}
