package witness

import (
	"time"
)

// Kinds of witness, as Health reports them.
const (
	KindAxd  = "axd"  // an axd --witness (*Client)
	KindEtcd = "etcd" // an etcd cluster (*Etcd)
)

// probeVM is the VM name a probe asks about: any name does, no lease is
// held or changed.
const probeVM = "ax-probe"

// Health is the witness as an operator sees it: what it is, its members,
// which of them answer, and whether it can grant and judge leases now.
type Health struct {
	Kind string // KindAxd or KindEtcd
	// Members are the axd --witness, or the etcd cluster's members as the
	// cluster lists them (its configured endpoints when no member answers).
	Members []Member
	// Quorum: the witness can decide about leases now. An axd --witness
	// answered; etcd answered a linearizable read, which needs a leader
	// that a majority of the members follows. QuorumErr says why not.
	Quorum    bool
	QuorumErr error
	// TTL is a lease's length: etcd's (whole seconds), or for an axd
	// --witness the length this host is configured with (ClientConfig.LeaseTTL;
	// its protocol does not carry it).
	TTL time.Duration
}

// Member is one member of the witness, as a probe found it.
type Member struct {
	Name      string // etcd's member name; "" for an axd --witness or an endpoint no member list named
	Endpoint  string // host:port it was probed at; "" for an etcd member not started yet
	Reachable bool   // it answered the probe
	Err       error  // why not
}

// Reachable counts the members that answered.
func (h Health) Reachable() int {
	n := 0
	for _, m := range h.Members {
		if m.Reachable {
			n++
		}
	}
	return n
}
