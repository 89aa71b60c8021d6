package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/replication"
)

// openReplica is called when a primary's stream is authenticated: it
// registers the VM as a secondary here and opens its replica.
func (d *Daemon) openReplica(name string, payload []byte, remote net.Addr) (*replication.Replica, error) {
	var ss streamSpec
	if err := json.Unmarshal(payload, &ss); err != nil {
		return nil, fmt.Errorf("replica %s: bad spec: %w", name, err)
	}
	if ss.Spec.Name != name || ss.Primary == "" || ss.Spec.Guest.RAMMiB <= 0 {
		return nil, fmt.Errorf("replica %s: spec names VM %q from host %q with %d MiB", name, ss.Spec.Name, ss.Primary, ss.Spec.Guest.RAMMiB)
	}
	if _, ok := d.cfg.Peers[ss.Primary]; !ok {
		return nil, fmt.Errorf("replica %s: primary %q is not one of this host's peers", name, ss.Primary)
	}
	d.mu.Lock()
	v, ok := d.vms[name]
	if ok && v.role() != api.RoleSecondary {
		d.mu.Unlock()
		return nil, fmt.Errorf("replica %s: the VM runs here (%s); refusing to overwrite it", name, v.role())
	}
	if !ok {
		v = &vmState{name: name, consoleOffset: -1}
		d.vms[name] = v
	}
	d.mu.Unlock()
	dir := filepath.Join(d.cfg.StateDir, "replicas", name)
	ramSize := int64(ss.Spec.Guest.RAMMiB) << 20
	var rep *replication.Replica
	var err error
	v.set(func(v *vmState) { rep = v.replica })
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
	v.set(func(v *vmState) {
		v.spec, v.replica, v.peer = ss.Spec, rep, ss.Primary
		v.roleV, v.level, v.state, v.alarm = api.RoleSecondary, api.LevelFT, "syncing", ""
		v.committed, v.epoch, v.handover, v.promoting, v.stale, v.streamEndedAt = 0, 0, false, false, false, time.Time{}
	})
	d.metrics.SetLevel(name, api.RoleSecondary, api.LevelFT)
	d.event(name, "replica", fmt.Sprintf("receiving %s from %s (%s)", name, ss.Primary, remote))
	return rep, nil
}

func (d *Daemon) replicaSynced(name string) {
	if v, err := d.vm(name); err == nil {
		v.set(func(v *vmState) { v.state = "synced" })
	}
}

func (d *Daemon) replicaCommitted(name string, epoch uint64, m replication.Marker) {
	v, err := d.vm(name)
	if err != nil {
		return
	}
	first := false
	v.set(func(v *vmState) {
		first = v.state != "ready"
		v.epoch, v.committed, v.lastCommit, v.state, v.consoleOffset = epoch, epoch, time.Now(), "ready", m.ConsoleOffset
	})
	if first {
		d.event(name, "ready", fmt.Sprintf("replica committed epoch %d: ready to take over", epoch))
	}
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
		v.set(func(v *vmState) { rep = v.replica; v.replica = nil })
		if rep != nil {
			rep.Close()
		}
		os.RemoveAll(filepath.Join(d.cfg.StateDir, "replicas", name))
		d.mu.Lock()
		if d.vms[name] == v {
			delete(d.vms, name)
		}
		d.mu.Unlock()
		d.metrics.Forget(name)
		d.event(name, "released", "primary ended protection; replica dropped")
	case handover:
		v.set(func(v *vmState) { v.handover = true })
		d.event(name, "handover", "primary handed the VM over; taking over")
	default:
		promoting := false
		v.set(func(v *vmState) {
			promoting = v.promoting
			if !promoting {
				v.streamEndedAt = time.Now()
			}
		})
		if v.role() == api.RoleSecondary && !promoting {
			d.event(name, "stream", fmt.Sprintf("replication stream ended: %v", err))
		}
	}
}

// checkSecondary decides whether to promote a replica: only when the
// primary is silent on both paths for PromoteAfter (or handed over) and the
// witness lets this host take its lease.
func (d *Daemon) checkSecondary(ctx context.Context, v *vmState) {
	var peer string
	var rep *replication.Replica
	var promoting, handover bool
	stale := false
	v.set(func(v *vmState) {
		peer, rep, promoting, handover, stale = v.peer, v.replica, v.promoting, v.handover, v.stale
	})
	if promoting || stale || rep == nil || !rep.Usable() {
		return
	}
	pv := d.hb.View(peer)
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
			stale := false
			v.set(func(v *vmState) {
				stale = v.stale
				v.stale, v.state, v.alarm = true, "stale", "the primary runs on without this replica: unusable until resynchronised"
			})
			if !stale {
				d.event(v.name, "stale", "the primary runs on without this replica (link down or stream lost): it will not be resumed")
			}
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
		takeErr = d.wit.Takeover(tctx, v.name)
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
	v.set(func(v *vmState) { v.promoting, v.state = true, "promoting" })
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := d.promote(ctx, v); err != nil {
			v.set(func(v *vmState) { v.promoting, v.state, v.alarm = false, "failed", "promotion failed: "+err.Error() })
			d.event(v.name, "alarm", "promotion failed: "+err.Error())
		}
	}()
}

// promote starts the VM here from the replica: QEMU with the same machine
// over the replica's RAM file, the committed device state loaded, resumed,
// its MAC announced on the network.
func (d *Daemon) promote(ctx context.Context, v *vmState) error {
	t0 := time.Now()
	d.repl.Drop(v.name) // nothing more is applied once promotion starts
	var spec api.VMSpec
	var rep *replication.Replica
	var peer string
	v.set(func(v *vmState) { spec, rep, peer = v.spec, v.replica, v.peer })
	epoch, devState := rep.Committed()
	if !rep.Usable() {
		return errors.New("the replica is not usable (no committed checkpoint)")
	}
	dir := filepath.Join(d.cfg.StateDir, "vms", v.name)
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// The device state file is replaced by later commits; take a copy.
	dev := filepath.Join(dir, "devstate")
	data, err := os.ReadFile(devState)
	if err != nil {
		return fmt.Errorf("committed device state: %w", err)
	}
	if err := os.WriteFile(dev, data, 0o600); err != nil {
		return err
	}
	g := spec.Guest
	g.RAMFile = rep.RAMPath()
	g.QMP = filepath.Join(dir, "qmp.sock")
	g.Console = filepath.Join(dir, "console.log")
	g.Agent = filepath.Join(dir, "agent.sock")
	g.PIDFile = filepath.Join(dir, "qemu.pid")
	g.Incoming = true
	if err := plugTap(ctx, g.Tap, spec.Bridge); err != nil {
		return err
	}
	pid, err := qemu.Launch(g, filepath.Join(dir, "qemu.log"))
	if err != nil {
		return err
	}
	var mon *qemu.QMP
	for i := 0; ; i++ {
		if mon, err = qemu.Dial(g.QMP, time.Second); err == nil {
			break
		}
		if i > 200 {
			return fmt.Errorf("QEMU for the replica did not open its QMP socket: %w (see %s)", err, filepath.Join(dir, "qemu.log"))
		}
		time.Sleep(10 * time.Millisecond)
	}
	defer mon.Close()
	qctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := mon.LoadIncoming(qctx, "exec:cat "+dev); err != nil {
		return fmt.Errorf("load device state of epoch %d: %w", epoch, err)
	}
	if err := mon.Cont(qctx); err != nil {
		return err
	}
	if err := mon.Announce(qctx); err != nil {
		d.log.Warn("announce failed", "vm", v.name, "err", err)
	}
	g.Incoming = false
	spec.Guest, spec.PID = g, pid
	v.set(func(v *vmState) {
		v.spec, v.roleV, v.level, v.state, v.alarm, v.peer, v.promoting = spec, api.RoleLocal, api.LevelNone, "running", "", "", false
		v.replica = nil
	})
	rep.Close()
	d.startAgent(v)
	d.metrics.Failovers.WithLabelValues(v.name).Inc()
	d.metrics.SetLevel(v.name, api.RoleLocal, api.LevelNone)
	d.event(v.name, "promoted", fmt.Sprintf("resumed %s from epoch %d of %s in %.0f ms; it runs here unprotected (re-protect with: axctl protect %s --level ft --peer HOST)",
		v.name, epoch, peer, float64(time.Since(t0).Microseconds())/1000, v.name))
	return nil
}

// plugTap creates the replica's tap and joins it to the host bridge.
func plugTap(ctx context.Context, tap, bridge string) error {
	if tap == "" {
		return nil
	}
	run := func(args ...string) error {
		out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
		}
		return nil
	}
	if _, err := net.InterfaceByName(tap); err != nil {
		if err := run("tuntap", "add", "dev", tap, "mode", "tap"); err != nil {
			return err
		}
	}
	if bridge != "" {
		if err := run("link", "set", tap, "master", bridge); err != nil {
			return err
		}
	}
	return run("link", "set", tap, "up")
}
