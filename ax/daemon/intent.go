package daemon

import (
	"fmt"
	"sort"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/vm"
)

// The declared level is the operator's intent for a VM: FT or HA towards a
// partner. A failover (planned, or after a host failure) leaves the VM
// running on the partner unprotected; it stays declared there, and axd
// protects it again by itself as soon as a partner can take the replica —
// the old primary once it is back, else another configured peer — and
// reports how long it ran unprotected (status, metric, event). `axctl
// level VM none` (or unprotect) ends the intent.

const (
	// reprotectFirst is the wait after a failed attempt, doubled up to
	// reprotectMax while the attempts keep failing.
	reprotectFirst = 2 * time.Second
	reprotectMax   = 30 * time.Second
)

// reprotect starts an attempt to protect v at its declared level, if it
// runs here below it, none is under way, the last failure's wait is over,
// and a partner is heard on the replication network. An attempt runs on
// its own (it waits for the partner's answer), owned by the daemon's wait
// group.
func (d *Daemon) reprotect(v *vmState) {
	var level, want string
	due := false
	v.set(func(v *vmState) {
		if v.st != vm.Running || !v.declaresLevel() || v.reprotecting || time.Now().Before(v.reprotectAt) {
			return
		}
		level, want, due = v.declared, v.declaredPeer, true
	})
	if !due {
		return
	}
	peer := d.reachablePeer(want)
	if peer == "" {
		return
	}
	if d.nova != nil && d.nova.holds(v.name, peer) != "" {
		return // until Nova completed the evacuation from peer (novaevacuate.go)
	}
	v.set(func(v *vmState) { v.reprotecting = true })
	d.wg.Go(func() {
		err := d.protectAs(v.name, api.ProtectRequest{Level: level, Peer: peer}, true)
		var note string
		v.set(func(v *vmState) {
			v.reprotecting = false
			if err == nil {
				v.reprotectWait, v.reprotectErr = 0, ""
				return
			}
			v.reprotectWait = min(max(2*v.reprotectWait, reprotectFirst), reprotectMax)
			v.reprotectAt = time.Now().Add(v.reprotectWait)
			if msg := err.Error(); msg != v.reprotectErr {
				v.reprotectErr, note = msg, msg
			}
		})
		if note != "" {
			d.event(v.name, "alarm", fmt.Sprintf("protecting %s again at its declared level %s towards %s failed: %s; retried", v.name, level, peer, note))
		}
	})
}

// reachablePeer is the partner to protect a VM towards: want (the declared
// partner) if it is heard on the replication network, else the first other
// configured peer that is; "" when none is.
func (d *Daemon) reachablePeer(want string) string {
	if _, ok := d.cfg.Peers[want]; ok && d.hb.View(want).ReplHeard {
		return want
	}
	others := peerNames(d.cfg.Peers)
	sort.Strings(others)
	for _, p := range others {
		if p != want && d.hb.View(p).ReplHeard {
			return p
		}
	}
	return ""
}

// intentMetrics exports how long v has run below its declared level.
func (d *Daemon) intentMetrics(v *vmState) {
	var since time.Time
	var counted bool
	v.set(func(v *vmState) {
		since, counted = v.unprotectedSince, v.declaresLevel() && v.st.Role() != api.RoleSecondary
	})
	if !counted {
		return
	}
	gap := 0.0
	if !since.IsZero() {
		gap = time.Since(since).Seconds()
	}
	d.metrics.Unprotected.WithLabelValues(v.name).Set(gap)
}
