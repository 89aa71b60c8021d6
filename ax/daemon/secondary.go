package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/replication"
)

// definedChecker is a hypervisor driver that resumes a replica only as a
// domain defined on this host (libvirt).
type definedChecker interface {
	Defined(ctx context.Context, name string) error
}

// bridgeReadier says why a replica's tap could not join a bridge here at
// a failover.
type bridgeReadier interface {
	BridgeReady(bridge string) error
}

// definitionReader gives a VM's definition on this host, for its partner
// (libvirt's inactive XML).
type definitionReader interface {
	Definition(ctx context.Context, name string) ([]byte, error)
}

// peerDefiner defines a VM on this host from its primary's definition,
// checked as hostile (libvirt.CheckPeerDefinition); false: it was defined
// here already.
type peerDefiner interface {
	DefineFromPeer(ctx context.Context, name string, def []byte, bridges []string) (bool, error)
}

// definition is VM name's definition here for its partner ("" when the
// hypervisor has none to give, or it is too big to send).
func (d *Daemon) definition(ctx context.Context, name string) string {
	dr, ok := d.cfg.Hypervisor.(definitionReader)
	if !ok {
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	def, err := dr.Definition(ctx, name)
	switch {
	case err != nil:
		d.log.Warn("the definition of "+name+" for its partner", "err", err)
		return ""
	case len(def) > libvirt.MaxPeerDefinition:
		d.log.Warn(fmt.Sprintf("the definition of %s is %d bytes, more than a partner takes (%d): not sent", name, len(def), libvirt.MaxPeerDefinition))
		return ""
	}
	return string(def)
}

// definedTapper names the tap this host's definition of a VM gives it
// (libvirt's <target dev=…/>; "" for none).
type definedTapper interface {
	DefinedTap(ctx context.Context, name string) (string, error)
}

// openReplica is called when a primary's stream is authenticated: it checks
// the VM's spec against this host's policy, promises the capacity, then
// registers the VM as a secondary here and opens its replica. peer is the
// primary's name from its certificate ("" in PSK mode). Nothing is
// registered before every check passed.
func (d *Daemon) openReplica(name, peer string, payload []byte, remote net.Addr) (_ *replication.Replica, err error) {
	var ss streamSpec
	if err := json.Unmarshal(payload, &ss); err != nil {
		return nil, fmt.Errorf("replica %s: bad spec: %w", name, err)
	}
	spec, err := d.adoptSpec(name, peer, ss)
	if err != nil {
		return nil, err
	}
	ss.Spec = spec
	if hv, ok := d.cfg.Hypervisor.(definedChecker); ok {
		// Refused now, while the primary runs and says it is not
		// protected, rather than at the failover this host could not do.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := hv.Defined(ctx, name)
		if pd, ok := hv.(peerDefiner); ok && err != nil && d.cfg.DefineReplicas && ss.Definition != "" {
			// No definition here: made from the primary's, checked.
			if defined, derr := pd.DefineFromPeer(ctx, name, []byte(ss.Definition), d.cfg.Bridges); derr != nil {
				err = fmt.Errorf("%w; %w", err, derr)
			} else {
				err = nil
				if defined {
					d.event(name, "define", fmt.Sprintf("domain %s defined here from %s's definition (checked: its files within this host's directories, its bridges among --bridge, nothing that reaches the host's devices or runs a program): a failover can resume it here", name, ss.Primary))
				}
			}
		}
		if br, ok := hv.(bridgeReadier); ok && err == nil && ss.Spec.Bridge != "" {
			err = br.BridgeReady(ss.Spec.Bridge)
		}
		if tapper, ok := hv.(definedTapper); ok && err == nil && ss.Spec.Guest.Tap != "" {
			// This host's definition names the replica's tap (the
			// primary's names mean nothing here).
			var tap string
			if tap, err = tapper.DefinedTap(ctx, name); err == nil && tap != "" {
				ss.Spec.Guest.Tap = tap
			}
		}
		cancel()
		if err != nil {
			return nil, fmt.Errorf("replica %s: %w", name, err)
		}
	}
	dir, err := names.Join(filepath.Join(d.cfg.StateDir, "replicas"), "vm", name)
	if err != nil {
		return nil, err
	}
	ramSize := int64(ss.Spec.Guest.RAMMiB) << 20
	d.awaitSeed(name)
	if len(ss.DiskSizes) != len(ss.Spec.Guest.Disks) {
		return nil, fmt.Errorf("replica %s: %d disks but %d sizes", name, len(ss.Spec.Guest.Disks), len(ss.DiskSizes))
	}
	need := api.Capacity{VCPUs: max(ss.Spec.Guest.VCPUs, 1), MemoryBytes: ramSize}
	for _, n := range ss.DiskSizes {
		if n <= 0 {
			return nil, fmt.Errorf("replica %s: disk size %d", name, n)
		}
		need.DiskBytes += n
	}
	d.mu.Lock()
	v, ok := d.vms[name]
	restoring := d.restoring[name]
	d.mu.Unlock()
	if restoring {
		// Its copy here (if any) is being decided about: resumed, or killed
		// because the partner took it over. The partner asks again.
		return nil, fmt.Errorf("replica %s: axd on %s just started and is still restoring what it ran of it; try again", name, d.cfg.Host)
	}
	if ok && runsHere(v) {
		return nil, fmt.Errorf("replica %s: the VM runs here (%s); refusing to overwrite it", name, v.role())
	}
	if ok && v.state() == vm.Promoting {
		return nil, fmt.Errorf("replica %s: being promoted here; refusing a new stream", name)
	}
	// A soft reservation: this host promises to be able to run the VM.
	if err := d.book.Promise(name, reserve.Capacity{VCPUs: need.VCPUs, MemoryBytes: need.MemoryBytes, DiskBytes: need.DiskBytes}, ss.Force); err != nil {
		return nil, fmt.Errorf("%s cannot promise to run %s: %w", d.cfg.Host, name, err)
	}
	d.mu.Lock()
	if v, ok = d.vms[name]; ok && runsHere(v) {
		d.mu.Unlock()
		d.book.Release(name)
		return nil, fmt.Errorf("replica %s: the VM runs here (%s); refusing to overwrite it", name, v.role())
	}
	if !ok {
		v = newVM(name, vm.Gone) // until its replica is open
		d.vms[name] = v
	}
	d.mu.Unlock()
	d.reservationChanged()
	defer func() {
		if err == nil || ok {
			return
		}
		// A VM first seen by this stream leaves no trace of a failed open:
		// a retry (say with --force) starts from nothing.
		d.mu.Lock()
		if d.vms[name] == v {
			delete(d.vms, name)
		}
		d.mu.Unlock()
		d.book.Release(name)
		d.reservationChanged()
	}()
	var rep *replication.Replica
	var oldDisks *replicaDisks
	v.set(func(v *vmState) { rep, oldDisks = v.replica, v.replicaDisks })
	if oldDisks != nil {
		oldDisks.Close()
	}
	if rep == nil || rep.RAMSize() != ramSize {
		if rep != nil {
			rep.Close()
		}
		rep, err = replication.OpenReplica(dir, ramSize)
		if errors.Is(err, replication.ErrReplicaTorn) || errors.Is(err, replication.ErrRAMSizeMismatch) {
			rep, err = replication.ResetReplica(dir, ramSize)
		}
		if err != nil {
			return nil, err
		}
	}
	var disks *replicaDisks
	if len(ss.DiskSizes) > 0 {
		if disks, err = openReplicaDisks(filepath.Join(dir, "disks"), ss.DiskSizes); err != nil {
			return nil, err
		}
	}
	detail := fmt.Sprintf("receiving %s from %s (%s), %d disks", name, ss.Primary, remote, len(ss.DiskSizes))
	if _, ok := d.fire(v, vm.ReplicaOpened, detail, func(v *vmState) {
		v.spec, v.replica, v.peer, v.replicaDisks = ss.Spec, rep, ss.Primary, disks
		v.level, v.epochs, v.streamEndedAt, v.haReady = api.LevelNone, &vm.Epochs{}, time.Time{}, false
		v.restartUntil = time.Time{}
		if !v.watched {
			v.watched = true
			d.wg.Go(func() { d.watchReplica(v) })
		}
	}); !ok {
		if disks != nil {
			disks.Close()
		}
		return nil, fmt.Errorf("replica %s: it is %s here; refusing a new stream", name, v.state())
	}
	d.metrics.SetLevel(name, api.RoleSecondary, api.LevelNone)
	return rep, nil
}

// replicaDiskSink is where the stream puts a replica's disk writes.
func (d *Daemon) replicaDiskSink(name string) replication.DiskSink {
	v, err := d.vm(name)
	if err != nil {
		return nil
	}
	var disks *replicaDisks
	v.set(func(v *vmState) { disks = v.replicaDisks })
	if disks == nil {
		return nil // no typed nil: a disk write must find no sink
	}
	return disks
}

// replicaLevel: the primary changed the level on the stream. The first
// level frame comes once the disks are in sync: from then on the VM can be
// restarted here from them.
func (d *Daemon) replicaLevel(name, level string) {
	v, err := d.vm(name)
	if err != nil {
		return
	}
	// Level ft counts once a checkpoint of this stream commits
	// (replicaCommitted): until then the replica may hold an older one —
	// from before a link cut, or left by a copy of the VM that ran here —
	// that must never be resumed.
	v.set(func(v *vmState) {
		v.haReady = true
		if level != api.LevelFT {
			v.level = level
		}
	})
	d.metrics.SetLevel(name, api.RoleSecondary, level)
	if level != api.LevelHA {
		d.fire(v, vm.ReplicaLevelFT, "level ft: disk writes journaled until their checkpoint commits", nil)
		return
	}
	tr, _ := d.fire(v, vm.ReplicaReady, "disks in sync: ready to restart the VM here (HA)", func(v *vmState) { v.epochs.Reset() })
	if !tr.Changed() {
		d.event(name, "level", "level ha: memory replica dropped, disk writes applied as they come")
	}
}

func (d *Daemon) replicaSynced(name string) {
	if v, err := d.vm(name); err == nil {
		d.fire(v, vm.MemorySynced, "", nil)
	}
}

func (d *Daemon) replicaCommitted(name string, epoch uint64, m replication.Marker) {
	v, err := d.vm(name)
	if err != nil {
		return
	}
	v.epochs.Took(epoch)
	v.epochs.Committed(epoch)
	d.fire(v, vm.ReplicaReady, fmt.Sprintf("replica committed epoch %d: ready to take over", epoch), func(v *vmState) {
		v.lastCommit, v.consoleOffset, v.level = time.Now(), m.ConsoleOffset, api.LevelFT
	})
}

// streamEnded: bye drops the replica; handover promotes at once; a lost
// connection leaves the replica for the failure detector to judge.
func (d *Daemon) streamEnded(name string, bye, handover bool, err error) {
	v, verr := d.vm(name)
	if verr != nil {
		return
	}
	switch {
	case bye:
		var rep *replication.Replica
		var disks *replicaDisks
		if _, ok := d.fire(v, vm.Released, "primary ended protection; replica dropped", func(v *vmState) {
			rep, disks = v.replica, v.replicaDisks
			v.replica, v.replicaDisks = nil, nil
		}); !ok {
			return // being promoted: the replica is the VM's now
		}
		if rep != nil {
			rep.Close()
		}
		if disks != nil {
			disks.Close()
		}
		d.book.Release(name)
		d.reservationChanged()
		if dir, err := names.Join(filepath.Join(d.cfg.StateDir, "replicas"), "vm", name); err == nil {
			os.RemoveAll(dir)
		}
		d.mu.Lock()
		if d.vms[name] == v {
			delete(d.vms, name)
		}
		d.mu.Unlock()
	case handover:
		d.fire(v, vm.HandedOver, "primary handed the VM over; taking over", nil)
	default:
		promoting := false
		var restart *replication.RestartingError
		restarts := errors.As(err, &restart)
		v.set(func(v *vmState) {
			promoting = v.st == vm.Promoting
			if !promoting {
				v.streamEndedAt = time.Now()
				if restarts {
					v.restartUntil = v.streamEndedAt.Add(restart.For)
				}
			}
		})
		switch {
		case v.role() != api.RoleSecondary || promoting:
		case restarts:
			d.event(name, "stream", fmt.Sprintf("the primary's axd restarts: replica kept, no takeover for %s", restart.For))
		default:
			d.event(name, "stream", fmt.Sprintf("replication stream ended: %v", err))
		}
	}
}

// runsHere reports whether v is a VM running on this host (not a replica).
func runsHere(v *vmState) bool {
	r := v.role()
	return r == api.RoleLocal || r == api.RolePrimary
}

// watchReplica lets a replica decide every 50 ms whether to promote, until
// the VM is no longer a secondary here (promoted, or dropped) or axd stops.
// Each replica has its own: a slow witness call for one holds up no other.
func (d *Daemon) watchReplica(v *vmState) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		v.mu.Lock()
		if v.st.Role() != api.RoleSecondary {
			// Under the lock that ReplicaOpened starts watchers under: a
			// new stream either sees this one ending or keeps it.
			v.watched = false
			v.mu.Unlock()
			return
		}
		v.mu.Unlock()
		d.checkSecondary(d.ctx, v)
	}
}

// checkSecondary decides whether to promote a replica: only when the
// primary is silent on both paths for PromoteAfter (or handed over) and the
// witness lets this host take its lease.
func (d *Daemon) checkSecondary(ctx context.Context, v *vmState) {
	var peer string
	var rep *replication.Replica
	var haReady bool
	var st vm.State
	var restartUntil time.Time
	v.set(func(v *vmState) {
		peer, rep, st, haReady, restartUntil = v.peer, v.replica, v.st, v.haReady, v.restartUntil
	})
	// Promotable: a committed checkpoint (FT), or disks in sync (HA).
	if st == vm.Promoting || st == vm.Stale || rep == nil || !(rep.Usable() || haReady) {
		return
	}
	// The primary's axd restarts: its guard holds the guest and stops it
	// before this ends; its silence until then means nothing.
	if time.Now().Before(restartUntil) {
		return
	}
	handover := st == vm.TakingOver
	pv := d.hb.View(peer)
	// A stream that delivers frames (checkpoints, disk writes, or its own
	// heartbeats when idle) shows the primary alive and the replication
	// path working: heartbeat datagrams lost or late on a loaded host must
	// not make the replica stale, nor count as the primary's silence.
	if !handover && time.Since(d.repl.Heard(v.name)) < d.cfg.SilenceTimeout {
		v.set(func(v *vmState) { v.silentSince, v.waitNoted = time.Time{}, false })
		return
	}
	if !handover {
		// The replication link is down but the primary is alive: it runs
		// on unprotected and lets its guest's output out, so this replica
		// falls behind what clients saw and must never be resumed. The
		// condition must last, so that a host dying (both paths going
		// silent within a heartbeat of each other) is not mistaken for it.
		// Likewise when the stream ended but the primary still sends
		// heartbeats well after that: it lives, and runs on unprotected.
		var ended time.Time
		v.set(func(v *vmState) { ended = v.streamEndedAt })
		runsOn := !ended.IsZero() && pv.LastHeard.After(ended.Add(d.cfg.StaleAfter))
		if runsOn || (!pv.ReplHeard && pv.MgmtHeard && pv.ReplAge > d.cfg.SilenceTimeout+d.cfg.StaleAfter) {
			d.fire(v, vm.RanOn, "the primary runs on without this replica (link down or stream lost): it will not be resumed until resynchronised", nil)
			return
		}
		if pv.ReplHeard || pv.MgmtHeard {
			v.set(func(v *vmState) { v.silentSince, v.waitNoted = time.Time{}, false })
			return
		}
		var since time.Time
		v.set(func(v *vmState) {
			if v.silentSince.IsZero() {
				v.silentSince = time.Now()
			}
			since = v.silentSince
		})
		if time.Since(since) < d.cfg.PromoteAfter {
			return
		}
	}
	var last time.Time
	v.set(func(v *vmState) { last = v.lastTakeover })
	if time.Since(last) < 100*time.Millisecond {
		return
	}
	v.set(func(v *vmState) { v.lastTakeover = time.Now() })
	obs := witness.Observation{ReplHeard: pv.ReplHeard && !handover, MgmtHeard: pv.MgmtHeard && !handover}
	var takeErr error
	if d.wit == nil {
		takeErr = errors.New("no witness configured")
	} else {
		tctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		takeErr = d.takeover(tctx, v.name)
		cancel()
		obs.WitnessReachable = takeErr == nil || errors.Is(takeErr, witness.ErrLeaseHeld)
		obs.PartnerLeaseExpired = takeErr == nil
		d.setWitness(obs.WitnessReachable)
	}
	if witness.DecideSecondary(obs) != witness.Promote {
		noted := false
		v.set(func(v *vmState) { noted, v.waitNoted = v.waitNoted, true })
		if !noted {
			d.event(v.name, "wait", fmt.Sprintf("primary %s silent on both paths; not promoting yet: %v", peer, takeErr))
		}
		return
	}
	if _, ok := d.fire(v, vm.Promote, fmt.Sprintf("this host holds the lease of %s now: starting it from the replica", v.name), nil); !ok {
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := d.promote(ctx, v); err != nil {
			d.fire(v, vm.PromoteFailed, "promotion failed: "+err.Error(), nil)
		}
	}()
}

// promote starts the VM here from the replica. With a committed checkpoint
// (FT): QEMU with the same machine over the replica's RAM file, the
// committed device state loaded, resumed, its MAC announced on the network —
// and its disks as of that checkpoint. Otherwise, with disks in sync (HA):
// the guest boots afresh from its replicated disks.
func (d *Daemon) promote(ctx context.Context, v *vmState) (err error) {
	t0 := time.Now()
	d.repl.Drop(v.name) // nothing more is applied once promotion starts
	var spec api.VMSpec
	var rep *replication.Replica
	var disks *replicaDisks
	var peer, level string
	var haReady bool
	v.set(func(v *vmState) {
		spec, rep, peer, disks, level, haReady = v.spec, v.replica, v.peer, v.replicaDisks, v.level, v.haReady
	})
	epoch, devState := rep.Committed()
	resume := rep.Usable() && level == api.LevelFT
	if !resume && !haReady {
		return errors.New("the replica is not usable (no committed checkpoint, disks not in sync)")
	}
	dir, err := names.Join(filepath.Join(d.cfg.StateDir, "vms"), "vm", v.name)
	if err != nil {
		return err
	}
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			d.keepFailedAttempt(v.name, dir)
		}
	}()
	g := spec.Guest
	g.QMP = filepath.Join(dir, "qmp.sock")
	g.Console = filepath.Join(dir, "console.log")
	g.Agent = filepath.Join(dir, "agent.sock")
	g.PIDFile = filepath.Join(dir, "qemu.pid")
	if disks != nil {
		// FT resumes with the disks as of the committed checkpoint; HA
		// boots from every write received, in order.
		if err := disks.prepare(resume); err != nil {
			return fmt.Errorf("replica disks: %w", err)
		}
		disks.Close()
		g.Disks = append([]api.Disk(nil), g.Disks...)
		moved := 0
		defer func() {
			// A failed attempt gives the disks back to the replica
			// directory (before its own is kept aside), so that the next
			// attempt starts from them again.
			if err != nil {
				for i := range moved {
					if rerr := os.Rename(g.Disks[i].Path, replicaDiskPath(disks.dir, i)); rerr != nil {
						err = fmt.Errorf("%w; and replica disk %d could not be put back for the next attempt: %v", err, i, rerr)
					}
				}
			}
		}()
		for i := range g.Disks {
			// The disks move out of the replica directory: they are the
			// running VM's now.
			to := filepath.Join(dir, fmt.Sprintf("disk%d.raw", i))
			if err := os.Rename(replicaDiskPath(disks.dir, i), to); err != nil {
				return fmt.Errorf("replica disk %d: %w", i, err)
			}
			g.Disks[i].Path, g.Disks[i].Format = to, "raw"
			moved++
		}
	}
	var dev string
	if resume {
		// The device state file is replaced by later commits; take a copy.
		dev = filepath.Join(dir, "devstate")
		data, err := os.ReadFile(devState)
		if err != nil {
			return fmt.Errorf("committed device state: %w", err)
		}
		if err := os.WriteFile(dev, data, 0o600); err != nil {
			return err
		}
		g.RAMFile = rep.RAMPath()
	} else {
		// A fresh boot gets fresh memory beside the replica's.
		g.RAMFile = filepath.Join(filepath.Dir(rep.RAMPath()), "boot-ram")
		f, err := os.Create(g.RAMFile)
		if err == nil {
			err = f.Truncate(int64(g.RAMMiB) << 20)
			f.Close()
		}
		if err != nil {
			return fmt.Errorf("memory for the restarted VM: %w", err)
		}
	}
	// A QEMU of another user than axd (libvirt's) opens the disks moved
	// into dir (libvirt gives it the files, not the way to them).
	if err := reachable(d.cfg.StateDir, dir); err != nil {
		return err
	}
	dom := d.cfg.Hypervisor.Domain(g)
	if err := dom.PlugTap(ctx, spec.Bridge); err != nil {
		return err
	}
	logPath := filepath.Join(dir, "qemu.log")
	start := dom.Start
	if resume {
		start = dom.StartIncoming
	}
	proc, err := start(ctx, logPath)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			// A promotion that failed leaves no QEMU behind: it would hold
			// the tap and the RAM file of the next attempt.
			if kerr := proc.Kill(); kerr != nil {
				err = fmt.Errorf("%w; and the failed attempt's QEMU (pid %d) could not be stopped: %v", err, proc.PID(), kerr)
			}
		}
	}()
	mon, err := controlStarted(ctx, dom, proc, logPath)
	if err != nil {
		return err
	}
	defer mon.Close()
	qctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	how := "restarted " + v.name + " from its replicated disks (HA)"
	if resume {
		// QEMU listens for the device state on a socket it makes in dir.
		if err := giveToQEMU(d.cfg.StateDir, dir, proc.PID()); err != nil {
			return err
		}
		if err := qemu.LoadDeviceStateFile(qctx, mon, dev, filepath.Join(dir, "incoming.sock")); err != nil {
			return fmt.Errorf("load device state of epoch %d: %w", epoch, err)
		}
		if err := mon.Cont(qctx); err != nil {
			return err
		}
		if err := mon.Announce(qctx); err != nil {
			d.log.Warn("announce failed", "vm", v.name, "err", err)
		}
		how = fmt.Sprintf("resumed %s from epoch %d", v.name, epoch)
	}
	spec.Guest, spec.PID = g, proc.PID()
	if disc, ok := d.cfg.Hypervisor.(hv.Discoverer); ok {
		// The hypervisor named the running VM's RAM file itself (libvirt:
		// after the domain's new ID; the replica was copied into it), and
		// that file is what protecting it again reads.
		if found, err := disc.DiscoverSpec(qctx, v.name); err != nil {
			d.log.Warn("the promoted VM as its hypervisor describes it", "vm", v.name, "err", err)
		} else {
			spec.Guest.RAMFile = found.Guest.RAMFile
			if found.PID > 0 {
				spec.PID = found.PID
			}
		}
	}
	d.metrics.Failovers.WithLabelValues(v.name).Inc()
	var evac *evacuation
	if d.nova != nil {
		// Recorded before the VM runs here unprotected: re-protection,
		// which may start at once, waits for Nova from the first moment.
		evac = d.nova.expect(v.name, peer)
	}
	// The level the primary protected the VM at stays declared: axd
	// protects it again by itself, towards the old primary once it is back
	// (intent.go). The gap began when the primary was lost.
	_, promoted := d.fire(v, vm.Promoted, fmt.Sprintf("%s of %s in %.0f ms; it runs here unprotected until it is protected again at its declared level %s (axd does it as soon as %s or another partner can take the replica; axctl level %s none ends that)",
		how, peer, float64(time.Since(t0).Microseconds())/1000, level, peer, v.name), func(v *vmState) {
		v.spec, v.level, v.peer = spec, api.LevelNone, ""
		v.replica, v.replicaDisks = nil, nil
		v.declared, v.declaredPeer = level, peer
		v.reprotectAt, v.reprotectWait, v.reprotectErr = time.Time{}, 0, ""
		v.unprotectedSince = t0
		if !v.streamEndedAt.IsZero() && v.streamEndedAt.Before(t0) {
			v.unprotectedSince = v.streamEndedAt
		}
	})
	rep.Close()
	// The promise is kept: the VM runs here now.
	d.book.Release(v.name)
	d.reservationChanged()
	d.startAgent(v)
	if d.nova != nil {
		if !promoted {
			d.nova.forget(evac)
		} else {
			d.nova.start(evac) // Nova's record follows, after the guest runs
		}
	}
	return nil
}

// journalMetrics exports what a secondary's disk journal holds.
func (d *Daemon) journalMetrics(v *vmState) {
	var disks *replicaDisks
	v.set(func(v *vmState) { disks = v.replicaDisks })
	if disks == nil {
		return
	}
	dp := disks.depth()
	d.metrics.JournalWrites.WithLabelValues(v.name).Set(float64(dp.Records))
	d.metrics.JournalBytes.WithLabelValues(v.name).Set(float64(dp.Bytes))
}

// reservation is the capacity promised to partners' VMs, for status.
func (d *Daemon) reservation() *api.Reservation {
	if d.book == nil {
		return nil
	}
	c := func(x reserve.Capacity) api.Capacity {
		return api.Capacity{VCPUs: x.VCPUs, MemoryBytes: x.MemoryBytes, DiskBytes: x.DiskBytes}
	}
	r := &api.Reservation{Host: c(d.book.Host()), Reserved: c(d.book.Reserved()), Free: c(d.book.Free()), Promises: map[string]api.Capacity{}}
	for vm, p := range d.book.Promises() {
		r.Promises[vm] = c(p.Need)
		if p.Forced {
			r.Forced = append(r.Forced, vm)
		}
	}
	sort.Strings(r.Forced)
	if d.place != nil {
		r.Placement = d.place.status()
	}
	return r
}

// reservationChanged exports the host's capacity and what is promised,
// and has Placement hold the promises.
func (d *Daemon) reservationChanged() {
	r := d.reservation()
	if r == nil {
		return
	}
	if d.place != nil {
		d.place.kick()
	}
	for _, x := range []struct {
		name          string
		host, promise float64
	}{
		{"vcpus", float64(r.Host.VCPUs), float64(r.Reserved.VCPUs)},
		{"memory_bytes", float64(r.Host.MemoryBytes), float64(r.Reserved.MemoryBytes)},
		{"disk_bytes", float64(r.Host.DiskBytes), float64(r.Reserved.DiskBytes)},
	} {
		d.metrics.Capacity.WithLabelValues(x.name).Set(x.host)
		d.metrics.Reserved.WithLabelValues(x.name).Set(x.promise)
	}
}

// startedQMPWait is how long a QEMU just started has to open its QMP socket.
var startedQMPWait = 5 * time.Second

// controlStarted connects to the monitor of a QEMU just started, which
// opens its QMP socket a moment after it runs.
func controlStarted(ctx context.Context, dom hv.Domain, proc hv.Process, logPath string) (hv.Control, error) {
	deadline := time.Now().Add(startedQMPWait)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		mon, err := dom.Control(cctx)
		cancel()
		if err == nil {
			return mon, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("QEMU for the replica did not open its QMP socket: %w (see %s)", err, logPath)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for QEMU's QMP socket: %w", ctx.Err())
		case <-proc.Done():
			return nil, fmt.Errorf("QEMU for the replica exited at start (see %s)", logPath)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// keepFailedAttempt moves a failed promotion's directory aside, to
// <dir>.failed, for diagnosis: the next attempt starts afresh in dir, and
// only the last failed attempt is kept.
func (d *Daemon) keepFailedAttempt(vm, dir string) {
	failed := dir + ".failed"
	if err := os.RemoveAll(failed); err != nil {
		d.log.Warn("removing an older failed promotion", "vm", vm, "dir", failed, "err", err)
	}
	if err := os.Rename(dir, failed); err != nil {
		d.log.Warn("keeping the failed promotion's files", "vm", vm, "dir", dir, "err", err)
		return
	}
	d.log.Info("the failed promotion's files are kept", "vm", vm, "dir", failed)
}
