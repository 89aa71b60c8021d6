package witness

import "fmt"

// Observation is what one host knows when it decides, gathered by its caller:
// heartbeats on each path, the last exchange with the witness, and its own
// lease as measured on its own clock.
type Observation struct {
	// ReplHeard and MgmtHeard report whether the partner was heard within the
	// heartbeat timeout on the replication link and on the management network.
	ReplHeard, MgmtHeard bool
	// WitnessReachable reports whether the last call to the witness was
	// answered (and authenticated) within its timeout.
	WitnessReachable bool
	// PartnerLeaseExpired is the witness's answer (LeaseInfo.Expired) about
	// the partner's lease. It means nothing unless WitnessReachable.
	PartnerLeaseExpired bool
	// OwnLeaseValid reports whether this host's lease is still valid with a
	// safety margin: see Client.Renew for why it must be judged locally.
	OwnLeaseValid bool
}

// SecondaryAction is what the secondary does with its replica.
type SecondaryAction int

const (
	// Wait: the primary is alive on at least one path; keep receiving.
	Wait SecondaryAction = iota + 1
	// Promote: the primary is silent on both paths and the witness confirms
	// its lease has expired. The caller must still win Client.Takeover
	// before it starts the VM; Promote only says it may try.
	Promote
	// WaitWitness: the primary is silent on both paths but the witness
	// cannot confirm that its lease expired (unreachable, or not yet). The
	// primary may be running behind a partition, so never promote.
	WaitWitness
)

func (a SecondaryAction) String() string {
	switch a {
	case Wait:
		return "wait"
	case Promote:
		return "promote"
	case WaitWitness:
		return "wait-witness"
	}
	return fmt.Sprintf("SecondaryAction(%d)", int(a))
}

// DecideSecondary says whether the secondary may promote its replica.
// Hearing the primary on either path vetoes promotion whatever the witness
// says; silence alone never suffices, since the paths may be cut while the
// primary runs.
func DecideSecondary(o Observation) SecondaryAction {
	if o.ReplHeard || o.MgmtHeard {
		return Wait
	}
	if o.WitnessReachable && o.PartnerLeaseExpired {
		return Promote
	}
	return WaitWitness
}

// PrimaryAction is what the primary does with its running VM.
type PrimaryAction int

const (
	// Protected: the replication link is up; checkpoints flow.
	Protected PrimaryAction = iota + 1
	// Unprotected: the replication link is down but the partner is heard on
	// the management network, or the witness still answers. The VM runs on
	// without a replica; raise an alarm and resynchronise when the link
	// returns.
	Unprotected
	// Fence: pause the VM now. Either this host is isolated (no partner on
	// any path and no witness), or its lease is no longer valid, after which
	// the witness may hand the VM to the secondary.
	Fence
)

func (a PrimaryAction) String() string {
	switch a {
	case Protected:
		return "protected"
	case Unprotected:
		return "unprotected"
	case Fence:
		return "fence"
	}
	return fmt.Sprintf("PrimaryAction(%d)", int(a))
}

// DecidePrimary says whether the primary keeps its VM running.
//
// An invalid own lease fences even when the partner is heard: heartbeat loss
// can be one-way, so the secondary may hear nothing, see the lease expire at
// the witness and win a takeover while this host still hears it. Running on
// past the lease is the one way both sides could run the guest.
func DecidePrimary(o Observation) PrimaryAction {
	switch {
	case !o.OwnLeaseValid:
		return Fence
	case o.ReplHeard:
		return Protected
	case o.MgmtHeard || o.WitnessReachable:
		return Unprotected
	}
	return Fence
}
