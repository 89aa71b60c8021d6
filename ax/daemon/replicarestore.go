package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/replication"
)

// restoreReplica brings back a replica this host held before axd started
// (a restart, a crash of axd on the secondary): its files are reopened and
// its watcher runs again, so that should the primary die before its stream
// reconnects, the VM is still taken over here — and when it reconnects, the
// sync starts on the replica. It may be promoted only as it was when the
// record was written: ready, at FT with a committed checkpoint whose epoch
// the disks are at too, at HA with disks in sync. Otherwise it is kept as a
// base only. Its stream ended at the latest now: should the primary be
// heard running on without it, it is marked stale as after any stream end.
func (d *Daemon) restoreReplica(r vm.Record) {
	dir, err := names.Join(filepath.Join(d.cfg.StateDir, "replicas"), "vm", r.VM)
	if err != nil {
		return
	}
	ramSize := int64(r.Spec.Guest.RAMMiB) << 20
	rep, err := replication.OpenReplica(dir, ramSize)
	if err != nil {
		d.event(r.VM, "forget", fmt.Sprintf("the replica of %s kept before axd started cannot be reopened (%v): it waits for its primary's stream", r.VM, err))
		d.store.Delete(r.VM)
		return
	}
	var disks *replicaDisks
	var disksAt uint64
	if len(r.Spec.Guest.Disks) > 0 {
		ddir := filepath.Join(dir, "disks")
		disksAt = disksCommittedEpoch(ddir)
		sizes := make([]int64, len(r.Spec.Guest.Disks))
		for i := range sizes {
			fi, err := os.Stat(replicaDiskPath(ddir, i))
			if err != nil {
				rep.Close()
				d.event(r.VM, "forget", fmt.Sprintf("the replica of %s kept before axd started lacks disk %d (%v): it waits for its primary's stream", r.VM, i, err))
				d.store.Delete(r.VM)
				return
			}
			sizes[i] = fi.Size()
		}
		if disks, err = openReplicaDisks(ddir, sizes); err != nil {
			rep.Close()
			d.event(r.VM, "forget", fmt.Sprintf("the replica disks of %s cannot be reopened (%v)", r.VM, err))
			d.store.Delete(r.VM)
			return
		}
	}
	epoch, _ := rep.Committed()
	ready := r.State == vm.Ready.String()
	ft := ready && r.Level == api.LevelFT && rep.Usable() && (disks == nil || disksAt == epoch)
	ha := ready && r.Level == api.LevelHA && disks != nil
	if ft && disks != nil {
		disks.level = replication.StreamLevelFT
		disks.committed = epoch
		disks.markCommitted(epoch)
	}
	st, level, why := vm.ReplicaSyncing, api.LevelNone, "kept as the base of the next sync only"
	switch {
	case ft:
		st, level, why = vm.Ready, api.LevelFT, fmt.Sprintf("ready to take over from checkpoint %d", epoch)
	case ha:
		st, level, why = vm.Ready, api.LevelHA, "ready to restart the VM here from its disks (HA)"
	}
	v := newVM(r.VM, st) // not a transition: what the record says it was
	v.spec, v.peer, v.replica, v.replicaDisks, v.level, v.haReady = *r.Spec, r.Peer, rep, disks, level, ha
	v.streamEndedAt = time.Now()
	if ft {
		v.epochs.Took(epoch)
		v.epochs.Committed(epoch)
	}
	d.mu.Lock()
	if _, taken := d.vms[r.VM]; taken {
		d.mu.Unlock() // a stream came first: it has the replica now
		rep.Close()
		if disks != nil {
			disks.Close()
		}
		return
	}
	v.watched = true
	d.vms[r.VM] = v
	d.mu.Unlock()
	d.metrics.SetLevel(r.VM, api.RoleSecondary, level)
	d.event(r.VM, "restore", fmt.Sprintf("the replica of %s from %s reopened after axd started: %s", r.VM, r.Peer, why))
	d.wg.Go(func() { d.watchReplica(v) })
}
