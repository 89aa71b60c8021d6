package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/ax/ft"
	"github.com/axproject/ax/ax/guard"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/replication/heartbeat"
)

// streamSpec is what a primary tells its secondary about a VM.
type streamSpec struct {
	Primary string     `json:"primary"` // the primary host's name
	Spec    api.VMSpec `json:"spec"`
	// DiskSizes are the sizes the guest sees of Spec.Guest.Disks.
	DiskSizes []int64 `json:"disk_sizes,omitempty"`
	// Force: promise the capacity even beyond what the partner has free.
	Force bool `json:"force,omitempty"`
	// Definition is the domain's definition on the primary (libvirt's
	// inactive XML), which a partner without one may define from, checked
	// (axd --define-replicas).
	Definition string `json:"definition,omitempty"`
}

// sharedRAMHelp is how to give a VM the RAM AX needs.
const sharedRAMHelp = "start QEMU with -object memory-backend-file,id=mem0,size=SIZE,mem-path=FILE,share=on " +
	"-machine memory-backend=mem0 (libvirt: <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>; " +
	"Nova: [libvirt] file_backed_memory)"

// define registers or updates a local VM.
func (d *Daemon) define(spec api.VMSpec) error {
	level := api.LevelFT
	if len(spec.Guest.Disks) > 0 && spec.Guest.RAMFile == "" {
		level = api.LevelHA // disks only: HA; FT is refused until the RAM is shared
	}
	if err := checkSpec(spec, level, d.needsQMP()); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if v, ok := d.vms[spec.Name]; ok {
		if r := v.role(); r != api.RoleLocal {
			return fmt.Errorf("VM %s is %s here; unprotect it before redefining it", spec.Name, r)
		}
		var rec vm.Record
		v.set(func(v *vmState) { v.spec, rec = spec, v.record() })
		if err := d.store.Save(rec); err != nil {
			d.log.Warn("state store", "vm", spec.Name, "err", err)
		}
		d.wg.Go(func() { d.startAgent(v) })
		return nil
	}
	v := newVM(spec.Name, vm.Running)
	v.spec = spec
	d.vms[spec.Name] = v
	if err := d.store.Save(v.record()); err != nil {
		d.log.Warn("state store", "vm", spec.Name, "err", err)
	}
	d.metrics.SetLevel(spec.Name, api.RoleLocal, api.LevelNone)
	d.wg.Go(func() { d.startAgent(v) })
	return nil
}

func (d *Daemon) vm(name string) (*vmState, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[name]
	if !ok {
		return nil, fmt.Errorf("no VM %s on host %s (define it first: axctl define SPEC.json)", name, d.cfg.Host)
	}
	return v, nil
}

// protect starts protecting a local VM at level towards peer. It returns
// once the partner accepted the VM (or refused it: nothing changes then), or
// after a while if the partner cannot be reached (protection then starts
// when it can, with an alarm meanwhile).
func (d *Daemon) protect(name string, req api.ProtectRequest) error {
	return d.protectAs(name, req, false)
}

// protectAs protects a VM running here; auto says axd does it by itself
// (the declared level, intent.go), so a refusal keeps the declared level
// for the next attempt instead of ending it as the operator's would.
func (d *Daemon) protectAs(name string, req api.ProtectRequest, auto bool) error {
	v, err := d.vm(name)
	if err != nil {
		return err
	}
	switch req.Level {
	case api.LevelFT, api.LevelHA:
	case api.LevelNone:
		return d.unprotect(name)
	default:
		return fmt.Errorf("unknown level %q: use ft, ha or none", req.Level)
	}
	if _, ok := d.cfg.Peers[req.Peer]; !ok {
		return fmt.Errorf("unknown peer %q: axd on %s knows %v (its --peer flags)", req.Peer, d.cfg.Host, peerNames(d.cfg.Peers))
	}
	if d.nova != nil {
		if why := d.nova.holds(name, req.Peer); why != "" {
			return fmt.Errorf("not protecting %s towards %s yet: %s", name, req.Peer, why)
		}
	}
	var accepted chan error
	v.set(func(v *vmState) {
		if v.st != vm.Running {
			err = fmt.Errorf("VM %s is already %s (level %s); unprotect it first", name, v.st.Role(), v.level)
			return
		}
		if err = checkSpec(v.spec, req.Level, d.needsQMP()); err != nil {
			return
		}
		if req.Level == api.LevelFT {
			err = d.attachGate(v)
		}
	})
	if err != nil {
		return err
	}
	_, ok := d.fire(v, vm.Protect, fmt.Sprintf("protecting %s at level %s towards %s", name, req.Level, req.Peer), func(v *vmState) {
		v.level, v.peer, v.force = req.Level, req.Peer, req.Force
		v.declared, v.declaredPeer = req.Level, req.Peer
		v.finish = make(chan chan finishResult)
		v.levelCh, v.accepted, v.retry = make(chan levelReq), make(chan error, 1), make(chan struct{}, 1)
		v.epochs.Reset()
		v.lastCommit, v.pauses, v.syncSent, v.syncTotal = time.Time{}, nil, 0, 0
		v.scans, v.devSaves, v.dirtyTotal, v.sent = nil, nil, 0, 0
		v.diskSyncDone, v.diskSyncTotal = 0, 0
		accepted, v.partnerBackBy = v.accepted, time.Time{}
		v.prot = startProtection(d.ctx, &d.wg, func(ctx context.Context) { d.runPrimary(ctx, v) },
			func(ctx context.Context, closing, streamDone <-chan struct{}) {
				d.guardPrimary(ctx, v, closing, streamDone)
			})
	})
	if !ok {
		return fmt.Errorf("VM %s is already protected (a concurrent request); unprotect it first", name)
	}
	select {
	case err = <-accepted:
	case <-time.After(15 * time.Second):
	}
	if errors.Is(err, replication.ErrRefused) {
		d.endProtection(name, auto)
		return fmt.Errorf("VM %s stays unprotected: %w", name, err)
	}
	return nil
}

// attachGate attaches the output gate FT needs (v.mu held).
func (d *Daemon) attachGate(v *vmState) error {
	if !d.cfg.OutputCommit || v.gate != nil {
		return nil
	}
	// FT holds the guest's output until the checkpoint covering it
	// commits: no gate, no FT.
	if v.spec.Guest.Tap == "" {
		return fmt.Errorf("VM %s has no tap in its spec: FT must hold its network output there", v.name)
	}
	vm := v.name
	cfg := &netbuffer.Config{FirstEpoch: v.epochs.Next(), Log: d.log.With("vm", vm),
		Observer: func(delay time.Duration) { d.metrics.ReleaseDelay.WithLabelValues(vm).Observe(delay.Seconds()) }}
	cfg.PinDir = d.gatePins(vm)
	g, err := netbuffer.Attach(v.spec.Guest.Tap, cfg)
	if errors.Is(err, netbuffer.ErrPinNeedsTCX) {
		// A kernel without tcx (< 6.6) cannot pin a gate: hold the output
		// all the same, unpinned, and say what that costs.
		d.event(vm, "alarm", fmt.Sprintf("output gate not pinned (%v): should axd stop or crash, this VM's output passes unheld until it is back", err))
		cfg.PinDir = ""
		g, err = netbuffer.Attach(v.spec.Guest.Tap, cfg)
	}
	if errors.Is(err, netbuffer.ErrNotAdoptable) {
		// Pins that do not fit this tap (made for another one, or torn by
		// a crash): attach afresh.
		d.log.Warn("output gate: pins of an earlier gate not adopted; replacing them", "vm", vm, "err", err)
		if uerr := netbuffer.Unpin(cfg.PinDir); uerr == nil {
			g, err = netbuffer.Attach(v.spec.Guest.Tap, cfg)
		}
	}
	if err != nil {
		return fmt.Errorf("VM %s: cannot hold its output on tap %s: %w", vm, v.spec.Guest.Tap, err)
	}
	if g.Adopted() {
		st := g.Stats()
		d.event(vm, "gate", fmt.Sprintf("adopted the output gate an earlier axd left pinned: %d frames it held while no axd ran are held until the next checkpoint commits", st.HeldFrames))
	}
	v.gate = g
	return nil
}

// gatePins is where VM's output gate is pinned ("" when gates are not).
func (d *Daemon) gatePins(vm string) string {
	if !d.pinGates {
		return ""
	}
	dir, err := names.Join(d.cfg.BPFDir, "vm", vm)
	if err != nil {
		return ""
	}
	return dir
}

// unpinGate removes what an earlier axd left pinned of VM's gate, when the
// VM no longer runs here (its copy was killed, or is gone).
func (d *Daemon) unpinGate(vm string) {
	if dir := d.gatePins(vm); dir != "" {
		if err := netbuffer.Unpin(dir); err != nil {
			d.log.Warn("output gate: removing its pins", "vm", vm, "err", err)
		}
	}
}

// levelReq asks a primary's stream to change level; the answer comes when
// the VM is protected at the new level, or with why it stays at the old.
type levelReq struct {
	level string
	reply chan error
}

// setLevel changes a VM's level without restarting it: none → ha/ft starts
// protection, ha ↔ ft switches on the running stream, → none ends it.
func (d *Daemon) setLevel(ctx context.Context, name string, req api.ProtectRequest) error {
	v, err := d.vm(name)
	if err != nil {
		return err
	}
	var role, cur, peer string
	var ch chan levelReq
	v.set(func(v *vmState) { role, cur, peer, ch = v.st.Role(), v.level, v.peer, v.levelCh })
	switch {
	case role == api.RoleSecondary:
		return fmt.Errorf("VM %s is a replica here; change its level on its primary %s", name, peer)
	case req.Level != api.LevelNone && req.Level != api.LevelHA && req.Level != api.LevelFT:
		return fmt.Errorf("unknown level %q: use none, ha or ft", req.Level)
	case role == api.RoleLocal && req.Level == api.LevelNone:
		return d.unprotect(name) // ends a declared level it runs below
	case role == api.RoleLocal:
		if req.Peer == "" {
			return fmt.Errorf("VM %s is not protected: name the partner (--peer HOST)", name)
		}
		return d.protect(name, req)
	case req.Level == api.LevelNone:
		return d.unprotect(name)
	case req.Level == cur:
		return nil
	case req.Peer != "" && req.Peer != peer:
		return fmt.Errorf("VM %s is protected towards %s; to change partner: axctl level %s none, then protect towards %s", name, peer, name, req.Peer)
	}
	if req.Level == api.LevelFT {
		// Everything FT needs is checked before anything changes: a
		// refusal leaves the VM protected at its level.
		v.set(func(v *vmState) {
			if err = checkSpec(v.spec, api.LevelFT, d.needsQMP()); err == nil {
				err = d.attachGate(v)
			}
		})
		if err != nil {
			return fmt.Errorf("VM %s stays at level %s: %w", name, cur, err)
		}
	}
	r := levelReq{level: req.Level, reply: make(chan error, 1)}
	select {
	case ch <- r:
	case <-time.After(2 * time.Second):
		// No stream runs now (the partner is unreachable): the new level
		// is what the next one starts at.
		v.set(func(v *vmState) {
			v.level, v.declared = req.Level, req.Level
			select {
			case v.retry <- struct{}{}: // the next attempt, now
			default:
			}
		})
		d.saveRecord(v)
		d.metrics.SetLevel(name, api.RolePrimary, req.Level)
		d.event(name, "level", fmt.Sprintf("level of %s set to %s; it applies when %s is reachable again", name, req.Level, peer))
		return nil
	}
	select {
	case err = <-r.reply:
	case <-ctx.Done():
		// Still synchronising: the change goes on, status shows it.
		d.event(name, "level", fmt.Sprintf("change of %s to %s in progress", name, req.Level))
		return nil
	}
	if err != nil {
		return fmt.Errorf("VM %s: %w", name, err)
	}
	v.set(func(v *vmState) { v.declared = req.Level })
	d.saveRecord(v)
	d.metrics.SetLevel(name, api.RolePrimary, req.Level)
	return nil
}

func peerNames(p map[string]Peer) []string {
	var n []string
	for k := range p {
		n = append(n, k)
	}
	return n
}

// unprotect stops a primary's protection, and ends the level the operator
// declared for it; the secondary drops its replica.
func (d *Daemon) unprotect(name string) error { return d.endProtection(name, false) }

// endProtection stops a primary's protection; keepIntent keeps its declared
// level, for axd to protect it again by itself (a refused attempt of its
// own), where the operator's unprotect ends it.
func (d *Daemon) endProtection(name string, keepIntent bool) error {
	v, err := d.vm(name)
	if err != nil {
		return err
	}
	var prot *protection
	var dropped string
	var local bool
	v.set(func(v *vmState) {
		switch {
		case v.st == vm.Running:
			local = true
			// Not protected: what ends is the declared level axd would
			// protect it at again by itself.
			if v.declaresLevel() && !keepIntent {
				dropped = v.declared
				v.declared, v.declaredPeer, v.unprotectedSince = api.LevelNone, "", time.Time{}
			}
		case v.st.Role() == api.RoleSecondary:
			err = fmt.Errorf("VM %s is a replica here; unprotect it on its primary %s", name, v.peer)
		case v.st == vm.HandingOver:
			err = fmt.Errorf("VM %s is being handed over to %s; see axctl events", name, v.peer)
		}
		prot = v.prot
	})
	if err != nil {
		return err
	}
	if local {
		if dropped != "" {
			d.saveRecord(v)
			d.metrics.Unprotected.DeletePartialMatch(map[string]string{"vm": name})
			d.event(name, "unprotect", fmt.Sprintf("%s is no longer declared %s: axd will not protect it again by itself", name, dropped))
		}
		return nil
	}
	// The stream says bye (the secondary drops its replica); a fence the
	// guard was retrying stops: the operator takes the VM back.
	if prot != nil {
		prot.Close()
	}
	// What is held can go now — unless a fence was under way: the partner
	// may have taken over, so what is held must never be seen (the
	// transition decides).
	d.fire(v, vm.Unprotect, "protection ended; the partner drops its replica", func(v *vmState) {
		v.level, v.peer, v.prot = api.LevelNone, "", nil
		if !keepIntent {
			v.declared, v.declaredPeer = api.LevelNone, ""
		}
	})
	return nil
}

// endStream ends a stream whose protection ended on purpose: unprotected,
// the secondary drops the replica (Bye); when axd stops with a restart
// grace, the secondary keeps it and waits for the next axd (Restarting) —
// whether it confirmed decides how the guard is left (guardPrimary).
func (d *Daemon) endStream(v *vmState, sender *replication.Sender) {
	if d.leaving.Load() == 0 {
		sender.Bye()
		return
	}
	err := sender.Restarting(d.cfg.RestartGrace)
	v.set(func(v *vmState) { v.restartConfirmed = err == nil })
	if err != nil {
		d.log.Warn("the partner did not confirm axd's restart: the guard stops the guest when the lease ends unless axd is back", "vm", v.name, "err", err)
	}
}

// leave marks axd as stopping, before anything that ends with it sees so:
// with a restart grace, partners keep their replicas and wait (endStream),
// and guards stay holding the guests (leaveGuard). The guards' deadline,
// counted from here, ends before every partner's, counted from its receipt
// of the word.
func (d *Daemon) leave() {
	if d.cfg.RestartGrace > 0 && d.leaving.CompareAndSwap(0, int64(guard.Monotonic()+d.cfg.RestartGrace)) {
		// Primaries streaming to this host keep their output held and
		// come back to its replicas (restoreReplica) rather than give up.
		d.repl.Leave(d.cfg.RestartGrace)
	}
}

// stopAll ends every primary's loop (daemon shutdown); guests keep running.
// Pinned output gates are left holding for the next axd to adopt.
func (d *Daemon) stopAll() {
	d.mu.Lock()
	var prots []*protection
	var gates []*netbuffer.Gate
	for _, v := range d.vms {
		v.mu.Lock()
		if v.prot != nil {
			prots = append(prots, v.prot)
		}
		if v.gate != nil && v.gate.Pinned() {
			gates = append(gates, v.gate)
		}
		if v.replica != nil {
			v.replica.Close()
		}
		v.mu.Unlock()
	}
	d.mu.Unlock()
	for _, p := range prots {
		p.stop() // Run waits for them
	}
	for _, g := range gates {
		if err := g.Leave(); err != nil {
			d.log.Warn("output gate: leaving it pinned", "err", err)
		}
	}
}

// Attempts to protect a VM again are spaced out while they keep failing:
// retryUnprotected after the first, doubling up to retryMax, and back to
// the first once an attempt has run for steadyAfter. A partner that is
// heard again on the replication path, or a level change, ends the wait
// at once, so a healed link still finds protection back within a second.
const (
	retryUnprotected = 250 * time.Millisecond
	retryMax         = 30 * time.Second
	steadyAfter      = time.Minute
)

// retryAfter is the wait before attempt fails+1, after fails attempts in a
// row failed.
func retryAfter(fails int) time.Duration {
	if fails <= 0 {
		return 0
	}
	return min(retryUnprotected<<min(fails-1, 8), retryMax) // 250 ms << 7 is past 30 s
}

// runPrimary keeps a VM protected: connect, sync, checkpoint; on any
// failure report the VM unprotected, and retry until protection ends.
func (d *Daemon) runPrimary(ctx context.Context, v *vmState) {
	fails := 0
	for {
		began := time.Now()
		err := d.protectOnce(ctx, v)
		if errors.Is(err, ft.ErrFinished) {
			return
		}
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) >= steadyAfter {
			fails = 0
		}
		var backBy time.Time
		v.set(func(v *vmState) { backBy = v.partnerBackBy })
		if time.Now().Before(backBy) {
			// The partner's axd restarts with the replica kept: the output
			// stays held (the replica can still take over from before it)
			// and the stream comes back on that replica as soon as it can.
			d.fire(v, vm.Lost, fmt.Sprintf("protection paused: the partner's axd restarts (back within %s); output held", time.Until(backBy).Round(time.Second)), nil)
			select {
			case <-ctx.Done():
				return
			case <-time.After(retryUnprotected):
			}
			continue
		}
		fails++
		// Repeated failures for the same reason are logged once.
		tr, _ := d.fire(v, vm.Lost, "protection lost: "+err.Error(), nil)
		// The guest runs on unprotected: let its output out — but only
		// once the secondary must have marked its replica stale, so it
		// can never resume the guest from before that output. An attempt
		// that failed without starting a stream (still unprotected, its
		// output let out already) held nothing.
		held := d.cfg.SilenceTimeout + 2*d.cfg.StaleAfter + 500*time.Millisecond
		if tr.From == vm.Unprotected {
			held = 0
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(held):
		}
		// A fence (done or still being tried) ends protection for good:
		// the transition refuses, and the guest's output is never let out.
		if _, ok := d.fire(v, vm.LossSettled, "", nil); !ok || ctx.Err() != nil {
			<-ctx.Done()
			return
		}
		if wait := retryAfter(fails) - held; wait > 0 && !d.awaitRetry(ctx, v, wait) {
			return
		}
	}
}

// awaitRetry waits up to wait before the next attempt to protect v, less
// when its partner is heard again on the replication path after being
// silent, or when its level changes (retry); false when ctx ends.
func (d *Daemon) awaitRetry(ctx context.Context, v *vmState, wait time.Duration) bool {
	var peer string
	var retry chan struct{}
	v.set(func(v *vmState) { peer, retry = v.peer, v.retry })
	silent := !d.hb.View(peer).ReplHeard
	end := time.NewTimer(wait)
	defer end.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-end.C:
			return true
		case <-retry:
			return true
		case <-tick.C:
		}
		heard := d.hb.View(peer).ReplHeard
		if silent && heard {
			return true
		}
		silent = !heard
	}
}

// protectOnce runs one replication stream until it fails or ctx ends: the
// disks are synchronised first (then the VM is protected at HA), and at FT
// memory and checkpoints follow on the same stream. Level changes switch
// between the two without a new stream.
func (d *Daemon) protectOnce(ctx context.Context, v *vmState) error {
	var spec api.VMSpec
	var peerName string
	var force bool
	var accepted chan error
	v.set(func(v *vmState) { spec, peerName, force, accepted = v.spec, v.peer, v.force, v.accepted })
	report := func(err error) {
		select {
		case accepted <- err:
		default:
		}
	}
	peer := d.cfg.Peers[peerName]
	cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
	mon, err := d.cfg.Hypervisor.Domain(spec.Guest).Control(cctx)
	ccancel()
	if err != nil {
		err = fmt.Errorf("QEMU of %s: %w", spec.Name, err)
		report(err)
		return err
	}
	defer mon.Close()
	qctx, qcancel := context.WithTimeout(ctx, 5*time.Second)
	sizes, err := diskSizes(qctx, mon, spec.Guest.Disks)
	qcancel()
	if err != nil {
		report(err)
		return err
	}
	ramSize := int64(spec.Guest.RAMMiB) << 20
	payload, _ := json.Marshal(streamSpec{Primary: d.cfg.Host, Spec: spec, DiskSizes: sizes, Force: force, Definition: d.definition(ctx, spec.Name)})
	dctx, cancel := context.WithTimeout(ctx, 12*time.Second)
	sender, err := replication.Dial(dctx, peer.Repl, d.security(), peerName, spec.Name, payload, ramSize, sizes...)
	cancel()
	report(err)
	if err != nil {
		if errors.Is(err, replication.ErrRefused) {
			return err
		}
		return fmt.Errorf("replication link to %s: %w", peerName, err)
	}
	defer sender.Close()
	defer func() {
		// The partner's axd restarts and keeps the replica (Server.Leave):
		// runPrimary holds the output and reconnects until it is back.
		var rs *replication.RestartingError
		if errors.As(sender.Err(), &rs) && rs.Secondary {
			v.set(func(v *vmState) { v.partnerBackBy = time.Now().Add(rs.For) })
		}
	}()
	setUserTimeout(sender)
	// The guard closes the stream when the replication path goes silent:
	// a cut link must not leave anything blocked on a TCP write. A stream
	// the partner still answers on is not silent, whatever becomes of the
	// heartbeat datagrams (the partner judges it alike: checkSecondary).
	// It ends with this stream (scancel runs before the wait).
	var guard sync.WaitGroup
	defer guard.Wait()
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	guard.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
			}
			if pv := d.hb.View(peerName); !pv.ReplHeard && time.Since(sender.Heard()) >= d.cfg.SilenceTimeout {
				sender.Close()
				return
			}
		}
	})
	dr := newDiskRepl(sctx, d, spec.Name, sender, mon, spec.Guest.Disks, sizes, sender.TakeDiskBase())
	dr.pid = spec.PID
	defer func() {
		dr.stop()
		// The pump ends once the stream is closed (a write to a partner
		// that is gone fails then): it is waited for, not left behind.
		sender.Close()
		<-dr.pumpDone
	}()
	if _, ok := d.fire(v, vm.StreamStarted, "", func(v *vmState) { v.disks, v.diskBytesSeen = dr, 0 }); !ok {
		return fmt.Errorf("VM %s is %s: protection does not resume", spec.Name, v.state())
	}
	defer v.set(func(v *vmState) { v.disks = nil })
	if len(spec.Guest.Disks) > 0 {
		if err := dr.start(ctx); err != nil {
			return err
		}
		err := dr.waitReady(ctx, func(done, total int64) {
			v.set(func(v *vmState) { v.diskSyncDone, v.diskSyncTotal = done, total })
			if total > 0 {
				d.metrics.DiskSync.WithLabelValues(spec.Name).Set(float64(done) / float64(total))
			}
		})
		if err != nil {
			return err
		}
		if err := dr.attachChildren(ctx); err != nil {
			return err
		}
	}
	// The disks are in sync and every write the guest has flushed from
	// now on is on the partner before the guest sees the flush done: the
	// partner can restart the VM from them (HA) from here on.
	n, err := dr.setLevel(replication.StreamLevelHA, 0)
	if err == nil {
		err = sender.WaitOrdered(ctx, n)
	}
	if err != nil {
		return err
	}
	var pending chan error // a level change waiting for FT to be running
	for {
		var level string
		v.set(func(v *vmState) { level = v.level })
		if level != api.LevelFT {
			d.fire(v, vm.Covered, fmt.Sprintf("disks in sync on %s: HA protection active", peerName), nil)
			if pending != nil {
				pending <- nil
				pending = nil
			}
		wait:
			for {
				select {
				case <-ctx.Done():
					d.endStream(v, sender)
					return ctx.Err()
				case <-sender.Done():
					return sender.Err()
				case r := <-v.levelCh:
					if r.level != api.LevelFT {
						r.reply <- nil
						continue
					}
					d.fire(v, vm.StreamStarted, "", func(v *vmState) { v.level = api.LevelFT })
					d.event(spec.Name, "level", "level ha → ft: synchronising memory")
					pending = r.reply
					break wait
				}
			}
			continue
		}
		err := d.runFT(ctx, v, mon, sender, dr, spec, peerName, &pending)
		var change *toHA
		switch {
		case errors.Is(err, ft.ErrFinished):
			return err
		case ctx.Err() != nil:
			d.endStream(v, sender)
			return ctx.Err()
		case errors.As(err, &change):
			if err := d.leaveFT(ctx, v, sender, dr, "level ft → ha: output released, checkpoints stopped; the disks stay replicated"); err != nil {
				change.reply <- err
				return err
			}
			pending = change.reply
		case err != nil && sender.Err() == nil && d.controlReplaced(ctx, mon, spec):
			// The hypervisor's control path failed under FT for good
			// (libvirtd restarted: the monitor through it is gone) while
			// a new one reaches the guest, which runs again through it:
			// the stream starts again on a new one — FT comes back after
			// a resync, instead of HA on a dead monitor.
			return fmt.Errorf("FT: the hypervisor's control path failed (%w); protection starts again on a new one", err)
		case err != nil && sender.Err() == nil:
			// FT itself failed while the stream is fine: the VM stays
			// protected at HA rather than not at all.
			if lerr := d.leaveFT(ctx, v, sender, dr, "FT stopped: output released, the disks stay replicated"); lerr != nil {
				return lerr
			}
			d.fire(v, vm.Degraded, "FT failed, the VM stays protected at level ha: "+err.Error(), nil)
			if pending != nil {
				pending <- fmt.Errorf("FT could not start (%v); the VM stays at level ha", err)
				pending = nil
			}
		default:
			return err
		}
	}
}

// controlBackWithin bounds the wait for a new control path to a guest
// whose old one failed under FT.
const controlBackWithin = 30 * time.Second

// controlReplaced says whether mon no longer answers (a status query
// within 2 s) while a new control of the guest's hypervisor does — the
// path to the guest failed, not the guest (a domain that ended fails on
// both). A checkpoint cut short may have left the guest paused: it runs
// again through the new control (its output stays held by the gate until
// the transitions let it out).
func (d *Daemon) controlReplaced(ctx context.Context, mon hv.Control, spec api.VMSpec) bool {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := mon.Status(cctx); err == nil {
		return false
	}
	// The new path may take a moment to come back (libvirtd starting):
	// asked again until it does, the VM is found not to run, or
	// controlBackWithin ends (then FT ends as any FT failure does).
	wctx, wcancel := context.WithTimeout(ctx, controlBackWithin)
	defer wcancel()
	var fresh hv.Control
	var st string
	for {
		var err error
		if fresh, err = d.cfg.Hypervisor.Domain(spec.Guest).Control(wctx); err == nil {
			if st, err = fresh.Status(wctx); err == nil {
				break
			}
			fresh.Close()
		}
		if errors.Is(err, hv.ErrNotRunning) {
			return false
		}
		select {
		case <-wctx.Done():
			return false
		case <-time.After(250 * time.Millisecond):
		}
	}
	defer fresh.Close()
	if st == "paused" {
		if err := fresh.Cont(wctx); err != nil {
			d.event(spec.Name, "alarm", fmt.Sprintf("the guest may be left paused by a checkpoint the hypervisor's control path cut short, and resuming it failed: %v", err))
		} else {
			d.event(spec.Name, "restore", "the guest, paused by a checkpoint the hypervisor's control path cut short, runs again")
		}
	}
	return true
}

// toHA ends an FT phase because the level goes to HA.
type toHA struct{ reply chan error }

func (*toHA) Error() string { return "level change to ha" }

// leaveFT moves a stream from FT to HA: guest writes wait for the partner
// again, the partner drops its memory replica and applies what it
// journaled, and only then is held output released — the partner can no
// longer resume the guest from before it.
func (d *Daemon) leaveFT(ctx context.Context, v *vmState, sender *replication.Sender, dr *diskRepl, why string) error {
	n, err := dr.setLevel(replication.StreamLevelHA, 0)
	if err == nil {
		err = sender.WaitOrdered(ctx, n)
	}
	if err != nil {
		return err
	}
	if _, ok := d.fire(v, vm.LeftFT, why, func(v *vmState) {
		v.level, v.lastCommit = api.LevelHA, time.Time{}
		v.epochs.Reset()
	}); !ok {
		return fmt.Errorf("VM %s is %s: its output stays held", v.name, v.state())
	}
	d.metrics.SetLevel(v.name, api.RolePrimary, api.LevelHA)
	return nil
}

// runFT synchronises memory and checkpoints on the stream until it fails,
// ctx ends, a planned failover finishes, or the level goes to HA (*toHA).
func (d *Daemon) runFT(ctx context.Context, v *vmState, mon hv.Control, sender *replication.Sender, dr *diskRepl,
	spec api.VMSpec, peerName string, pending *chan error) error {
	if err := checkSpec(spec, api.LevelFT, d.needsQMP()); err != nil {
		return err
	}
	ramSize := int64(spec.Guest.RAMMiB) << 20
	mode := spec.Tracker
	if mode == "" {
		mode = d.cfg.Tracker
	}
	tracker, err := dirty.Select(mode, spec.PID, spec.Guest.RAMFile, dirty.HashOptions{Size: ramSize})
	if err != nil {
		return err
	}
	defer tracker.Close()
	v.set(func(v *vmState) { v.tracker = tracker.Name() })
	ram, err := ft.OpenRAM(spec.Guest.RAMFile, ramSize)
	if err != nil {
		return err
	}
	defer ram.Close()
	v.set(func(v *vmState) { err = d.attachGate(v) })
	if err != nil {
		return err
	}
	if _, ok := d.fire(v, vm.StreamStarted, "", func(v *vmState) { v.syncSent, v.syncTotal = 0, 0 }); !ok {
		return fmt.Errorf("VM %s is %s: FT does not start", spec.Name, v.state())
	}
	stateDir := filepath.Join(d.cfg.StateDir, "vms", spec.Name)
	os.MkdirAll(stateDir, 0o755)
	if err := giveToQEMU(d.cfg.StateDir, stateDir, spec.PID); err != nil {
		return fmt.Errorf("the directory QEMU saves device state in: %w", err)
	}
	var lastSent uint64
	obs := ft.Observer{
		SyncProgress: func(sent, total int) {
			v.set(func(v *vmState) { v.syncSent, v.syncTotal = sent, total })
			if total > 0 {
				d.metrics.SyncProgress.WithLabelValues(spec.Name).Set(float64(sent) / float64(total))
			}
		},
		Epoch: func(e ft.EpochStats) {
			if v.notePause(e.Epoch, e.Pause, e.Scan, e.DevSave, e.DirtyPages, e.Bytes) {
				d.saveRecord(v) // once per block of epochs
			}
			d.metrics.ObservePause(spec.Name, e.Pause, e.DirtyPages)
			n := sender.BytesSent()
			d.metrics.BytesSent.WithLabelValues(spec.Name).Add(float64(n - lastSent))
			lastSent = n
		},
		Commit: func(epoch uint64, latency time.Duration) {
			v.epochs.Committed(epoch)
			taken, _ := v.epochs.Status()
			d.metrics.ReplLag.WithLabelValues(spec.Name).Set(float64(taken - epoch))
			d.metrics.CommitLatency.WithLabelValues(spec.Name).Observe(latency.Seconds())
			tr, _ := d.fire(v, vm.Covered, fmt.Sprintf("replica on %s committed epoch %d: FT protection active", peerName, epoch),
				func(v *vmState) { v.lastCommit = time.Now() })
			if tr.Changed() {
				if *pending != nil {
					*pending <- nil
					*pending = nil
				}
			}
		},
	}
	var gate *netbuffer.Gate
	var first uint64
	v.set(func(v *vmState) { gate = v.gate })
	first = v.epochs.Start()
	if gate != nil {
		// Hold again from here: output from now on is covered by the
		// first checkpoint of this stream.
		if err := gate.NextEpoch(first); err != nil {
			return err
		}
		if err := gate.Hold(); err != nil {
			return err
		}
	}
	// Output is held: guest writes need not wait for the partner any more,
	// the checkpoint after them covers them.
	if _, err := dr.setLevel(replication.StreamLevelFT, first); err != nil {
		return err
	}
	loop := ft.NewLoop(ft.Config{Interval: d.cfg.Epoch, StateDir: stateDir, Console: spec.Guest.Console, FirstEpoch: first, Base: sender.TakeBase()},
		mon, tracker, ram, &senderStream{s: sender, disk: dr}, diskEpochGate{gate: gate, disk: dr}, obs, d.log.With("vm", spec.Name))
	defer func() { v.epochs.Ended(loop.Taken()) }()
	lctx, lcancel := context.WithCancel(ctx)
	defer lcancel()
	handedOver := make(chan struct{})
	var change *toHA
	var levelCh chan levelReq
	var finish chan chan finishResult
	v.set(func(v *vmState) { finish, levelCh = v.finish, v.levelCh })
	go func() {
		defer close(handedOver)
		for {
			select {
			case <-lctx.Done():
				return
			case r := <-levelCh:
				if r.level == api.LevelFT {
					r.reply <- nil
					continue
				}
				change = &toHA{reply: r.reply}
				lcancel()
				return
			case reply := <-finish:
				// A planned failover request is served by the loop.
				epoch, err := loop.Finish(lctx)
				if err == nil {
					err = sender.Handover(epoch)
				}
				reply <- finishResult{epoch, err}
				return
			}
		}
	}()
	err = loop.Run(lctx)
	if !errors.Is(err, ft.ErrFinished) {
		lcancel()
	}
	<-handedOver // the handover is written before the stream closes
	if change != nil && ctx.Err() == nil {
		return change
	}
	return err
}

// senderStream adapts a replication.Sender to the FT loop's Stream: a
// checkpoint goes on it after every disk write made before its pause.
type senderStream struct {
	s    *replication.Sender
	disk *diskRepl
}

func (a *senderStream) SendSync(pfns []uint64, pages []byte) error { return a.s.SendSync(pfns, pages) }
func (a *senderStream) BeginSync(onBase bool) error                { return a.s.BeginSync(onBase) }
func (a *senderStream) SyncDone() error                            { return a.s.SyncDone() }
func (a *senderStream) SendCheckpoint(cp *ft.Checkpoint) error {
	if a.disk != nil {
		if err := a.disk.awaitBoundary(cp.Epoch); err != nil {
			return err
		}
	}
	return a.s.SendCheckpoint(cp.Epoch, cp.PFNs, cp.Pages, cp.DeviceState, cp.ConsoleOffset)
}
func (a *senderStream) Acks() <-chan uint64 { return a.s.Acks() }
func (a *senderStream) Err() error          { return a.s.Err() }

// setUserTimeout bounds how long unacknowledged data may sit on the stream.
func setUserTimeout(s *replication.Sender) {
	if tc, ok := s.Conn().(*net.TCPConn); ok {
		setTCPUserTimeout(tc, 2*time.Second)
	}
}

// guardPrimary renews the VM's witness lease and fences the VM (pauses its
// guest) when this host can reach neither its partner nor the witness, so
// that the partner can never run the VM at the same time.
func (d *Daemon) guardPrimary(ctx context.Context, v *vmState, closing, streamDone <-chan struct{}) {
	name := v.name
	var leaseUntil time.Time
	var lastRenew time.Time
	var silentSince time.Time
	var armed time.Duration // the guard's deadline as last armed
	var renewed time.Time   // when the witness last renewed the lease
	var guardGone time.Time // when the guard was found gone (zero: it runs)
	// The guard process stops the guest should this goroutine (or axd)
	// stop renewing the lease in time.
	g := d.startGuard(v)
	if g != nil {
		defer func() {
			if g == nil || d.leaveGuard(v, g, armed, streamDone) {
				return
			}
			if err := g.Close(); err != nil {
				d.log.Warn("guard process", "vm", name, "err", err)
			}
		}()
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		peer, st := "", vm.Gone
		v.set(func(v *vmState) { peer, st = v.peer, v.st })
		if st == vm.HandingOver {
			// Planned failover: the lease is left to expire for the partner;
			// this copy stays paused until it has taken over.
			if g != nil {
				g.Disarm()
			}
			continue
		}
		if d.wit != nil && time.Since(lastRenew) >= d.cfg.LeaseTTL/4 {
			lastRenew = time.Now()
			rctx, cancel := context.WithTimeout(ctx, d.cfg.LeaseTTL/4)
			until, err := d.renew(rctx, name)
			cancel()
			switch {
			case err == nil:
				leaseUntil, renewed = until, time.Now()
				v.set(func(v *vmState) { v.leaseUntil = until })
				d.setWitness(true)
			case errors.Is(err, witness.ErrLeaseHeld):
				// The partner took the VM over: this copy must never run again.
				d.setWitness(true)
				d.fenceUntilPaused(v, "the witness says "+err.Error(), closing)
				return
			default:
				d.setWitness(false)
			}
		}
		pv := d.hb.View(peer)
		if pv.ReplHeard || pv.MgmtHeard {
			silentSince = time.Time{}
		} else if silentSince.IsZero() {
			silentSince = time.Now()
		}
		obs := witness.Observation{
			ReplHeard: pv.ReplHeard, MgmtHeard: pv.MgmtHeard,
			WitnessReachable: d.wit == nil || d.witnessState() == "reachable",
			// Our lease counts as valid while the witness granted it (with
			// a margin before it ends), or while the partner says it hears
			// us (it will not take over).
			OwnLeaseValid: d.wit == nil || time.Until(leaseUntil) > d.cfg.LeaseTTL/5 || pv.HearsMe,
		}
		// Fence at once when the lease is about to end unrenewed — the
		// partner may take over as soon as it has — or after FenceAfter of
		// silence from both partner and witness.
		if witness.DecidePrimary(obs) == witness.Fence &&
			(!obs.OwnLeaseValid || (!silentSince.IsZero() && time.Since(silentSince) >= d.cfg.FenceAfter)) {
			d.fenceUntilPaused(v, "neither the partner nor the witness can be reached", closing)
			return
		}
		switch {
		case g != nil:
			if dl, err := d.armGuard(v, g, leaseUntil, pv.HearsMe); err != nil {
				g.Close()
				g, guardGone = nil, time.Now()
			} else if dl > 0 {
				armed = dl
				d.dismissLeftGuard(v, leaseUntil)
			}
		case !guardGone.IsZero() && renewed.After(guardGone) && time.Until(leaseUntil) > d.cfg.LeaseTTL/5:
			// The witness renewed this host's lease after the guard was
			// gone: no one took the VM over.
			g, guardGone = d.replaceGuard(v), time.Time{}
		}
	}
}

// replaceGuard starts a guard again for a primary whose guard is gone:
// it ended after stopping the guest (axd renewed its lease too late: a
// stalled host), or it died. The caller holds the lease, renewed since:
// a guest the guard stopped goes on (as dismissLeftGuard does for the
// guard of an earlier axd), and the VM's checkpoints with it.
func (d *Daemon) replaceGuard(v *vmState) *guard.Handle {
	var pid int
	v.set(func(v *vmState) { pid = v.spec.PID })
	d.continueGuarded(v, pid, "the guard had stopped the guest (axd renewed its lease late) and ended; the witness renewed this host's lease since, so no one took the VM over: guest continued, guard started again")
	return d.startGuard(v)
}

// continueGuarded continues guest pid if a guard stopped it, saying so
// with done; the caller holds the lease (no one took the VM over).
func (d *Daemon) continueGuarded(v *vmState, pid int, done string) {
	if stopped, _ := guard.Stopped(pid); !stopped {
		return
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		d.fire(v, vm.Degraded, fmt.Sprintf("its guard stopped the guest; continuing it failed: %v", err), nil)
		return
	}
	d.event(v.name, "restore", done)
}

// leaveGuard leaves the guard process holding the guest when axd stops with
// a restart grace, and reports whether it did (otherwise the guard is told
// to exit). With the partner's word that it waits (Restarting confirmed),
// the guard stops the guest at the end of the grace unless the next axd
// dismisses it first; without it, at the deadline it was last armed for —
// when the lease ends and the partner may take over.
func (d *Daemon) leaveGuard(v *vmState, g *guard.Handle, armed time.Duration, streamDone <-chan struct{}) bool {
	until := time.Duration(d.leaving.Load())
	if until == 0 || v.role() != api.RolePrimary {
		return false // unprotected, or not a stop: the guard ends
	}
	<-streamDone // endStream has its answer
	var confirmed bool
	v.set(func(v *vmState) { confirmed, v.restartConfirmed = v.restartConfirmed, false })
	if !confirmed {
		until = armed
	}
	if until == 0 {
		return false // never armed: the lease was never held
	}
	pid := g.PID() // Leave lets go of the process
	if err := g.Leave(until); err != nil {
		d.log.Warn("guard process: leaving it holding the guest", "vm", v.name, "err", err)
		return true
	}
	v.set(func(v *vmState) { v.leftGuard = pid })
	d.saveRecord(v)
	d.log.Info("axd stops: the guard holds the guest until the next axd", "vm", v.name, "guard", pid, "partner_waits", confirmed,
		"stop_in", (until - guard.Monotonic()).String())
	return true
}

// dismissLeftGuard ends the guard an earlier axd left holding the guest,
// once this axd holds the lease and its own guard is armed. Should the old
// guard have stopped the guest meanwhile (the restart took longer than its
// deadline), the guest goes on: the lease is this host's, no one took the
// VM over.
func (d *Daemon) dismissLeftGuard(v *vmState, leaseUntil time.Time) {
	var old, pid int
	v.set(func(v *vmState) { old, pid = v.leftGuard, v.spec.PID })
	if old == 0 || time.Until(leaseUntil) <= 0 {
		return
	}
	if err := guard.Dismiss(old, pid); err != nil {
		d.log.Info("the guard left by the previous axd is gone", "vm", v.name, "guard", old, "err", err)
	}
	d.continueGuarded(v, pid, "the guard left by the previous axd had stopped the guest; this host holds the lease: guest continued")
	v.set(func(v *vmState) { v.leftGuard = 0 })
	d.saveRecord(v)
}

// startGuard starts the guard process of a primary (nil without a witness:
// no one takes the VM over then; without QEMU's pid; or when this axd
// starts none).
func (d *Daemon) startGuard(v *vmState) *guard.Handle {
	var pid int
	v.set(func(v *vmState) { pid = v.spec.PID })
	if d.cfg.GuardExe == "" || d.wit == nil || pid <= 0 {
		return nil
	}
	dir, err := names.Join(filepath.Join(d.cfg.StateDir, "vms"), "vm", v.name)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	var g *guard.Handle
	if err == nil {
		g, err = guard.Start(d.cfg.GuardExe, []string{"--guard-pid", strconv.Itoa(pid), "--guard-margin", guardMargin(d.cfg.LeaseTTL).String()},
			filepath.Join(dir, "guard.log"))
	}
	if err != nil {
		d.fire(v, vm.Degraded, "no guard process (the guest would not be stopped if axd died): "+err.Error(), nil)
		return nil
	}
	return g
}

// guardMargin is how long before the deadline a guard stops the guest: for
// its timer's jitter. axd itself fences earlier (a fifth of the TTL).
func guardMargin(ttl time.Duration) time.Duration { return ttl / 20 }

// armGuard tells the guard the earliest moment the partner could run the
// VM: when the lease this host holds ends — or, while the witness cannot be
// reached but the partner says it hears this host, PromoteAfter of silence
// from now (less two heartbeats), which is as long as the partner would
// wait after this host's last heartbeat. It returns the deadline armed (0:
// none new).
func (d *Daemon) armGuard(v *vmState, g *guard.Handle, leaseUntil time.Time, hearsMe bool) (time.Duration, error) {
	now := guard.Monotonic()
	var deadline time.Duration
	if left := time.Until(leaseUntil); left > 0 {
		deadline = now + left
	}
	if hearsMe {
		deadline = max(deadline, now+d.cfg.PromoteAfter-2*heartbeat.Every)
	}
	if deadline == 0 {
		return 0, nil // nothing held yet: the last deadline stands
	}
	if err := g.Arm(deadline); err != nil {
		d.fire(v, vm.Degraded, "the guard process is gone (the guest would not be stopped if axd died; started again once the witness renews the lease): "+err.Error(), nil)
		return 0, err
	}
	return deadline, nil
}

// fenceRetry is how often a fence that did not happen is tried again.
const fenceRetry = 50 * time.Millisecond

// fenceUntilPaused fences the VM and tries again until its guest is
// verified paused, the VM stops being a primary here, its protection is
// closed (the operator took it back), or axd stops.
func (d *Daemon) fenceUntilPaused(v *vmState, why string, closing <-chan struct{}) {
	t := time.NewTicker(fenceRetry)
	defer t.Stop()
	for !d.fence(v, why) {
		select {
		case <-d.ctx.Done():
			return
		case <-closing:
			return
		case <-t.C:
		}
		if v.role() != api.RolePrimary {
			return // unprotected meanwhile: the operator took it back
		}
	}
}

// fence pauses the VM's guest and stops its protection: another host may
// run it now. It reports whether the guest was verified paused (or the VM no
// longer needs fencing: fenced already, or no longer a primary here). Until
// it is, the VM is left fencing with an alarm and its output held (what is
// held is discarded, never released), for the caller to try again.
func (d *Daemon) fence(v *vmState, why string) bool {
	var spec api.VMSpec
	var prot *protection
	// From now on nothing goes out until the guest is paused; once it is,
	// the gate goes and the guest has no output to send.
	if _, ok := d.fire(v, vm.Fence, "fencing: "+why, func(v *vmState) { spec, prot = v.spec, v.prot }); !ok {
		st := v.state()
		return st == vm.Fenced || st.Role() != api.RolePrimary
	}
	// Checkpoints end first: the FT loop resumes the guest after each of
	// its pauses, and it holds the VM's one QMP connection.
	if prot != nil {
		prot.stopStream(2 * time.Second)
	}
	if err := d.pauseGuest(spec); err != nil {
		if spec.PID > 0 {
			if stopped, _ := guard.Stopped(spec.PID); stopped {
				// The guard was quicker: QEMU is stopped whole.
				d.fire(v, vm.Paused, "guest stopped by its guard process (SIGSTOP) to prevent split brain: "+why, nil)
				return true
			}
		}
		// Tried every tick: an event only when the reason changes.
		d.fire(v, vm.FenceFailed, fmt.Sprintf("fence failed: %v (retrying until the guest is paused; it may still run, its output is held; why fence: %s)", err, why), nil)
		return false
	}
	// Output not covered by a committed checkpoint must never be seen:
	// the partner may resume the guest from before it.
	d.fire(v, vm.Paused, "guest paused to prevent split brain: "+why, nil)
	return true
}

// pauseGuest stops the guest's vCPUs and checks QEMU says it is paused.
func (d *Daemon) pauseGuest(spec api.VMSpec) error {
	cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
	mon, err := d.cfg.Hypervisor.Domain(spec.Guest).Control(cctx)
	ccancel()
	if err != nil {
		return fmt.Errorf("cannot reach QEMU: %w", err)
	}
	defer mon.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := mon.Stop(ctx); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	st, err := mon.Status(ctx)
	if err != nil {
		return fmt.Errorf("checking that the guest is paused: %w", err)
	}
	if st != "paused" {
		return fmt.Errorf("QEMU reports the guest %q after stop, not paused", st)
	}
	return nil
}

// plannedFailover moves a protected VM to its secondary: a final checkpoint
// with the guest left paused, a handover, then this copy stops.
func (d *Daemon) plannedFailover(ctx context.Context, name string) error {
	v, err := d.vm(name)
	if err != nil {
		return err
	}
	var finish chan chan finishResult
	var state vm.State
	var peer string
	var spec api.VMSpec
	v.set(func(v *vmState) { finish, state, peer, spec = v.finish, v.st, v.peer, v.spec })
	if state != vm.Protected {
		return fmt.Errorf("VM %s is not a protected primary here (state %q); a planned failover needs a committed replica", name, state)
	}
	reply := make(chan finishResult, 1)
	select {
	case finish <- reply:
	case <-ctx.Done():
		return ctx.Err()
	}
	var r finishResult
	select {
	case r = <-reply:
	case <-ctx.Done():
		return ctx.Err()
	}
	// The FT loop leaves the guest paused and lets go of QMP as it ends.
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	mon, merr := d.cfg.Hypervisor.Domain(spec.Guest).Control(cctx)
	ccancel()
	if merr == nil {
		defer mon.Close()
	}
	resume := func() error {
		if merr != nil {
			return merr
		}
		return mon.Cont(ctx)
	}
	if r.err != nil {
		if err := resume(); err != nil {
			return fmt.Errorf("planned failover of %s: %w; and the guest could not be resumed here: %v", name, r.err, err)
		}
		return fmt.Errorf("planned failover of %s: %w (the guest runs on here)", name, r.err)
	}
	if _, ok := d.fire(v, vm.HandOver, fmt.Sprintf("final checkpoint %d committed on %s; handing over", r.epoch, peer), nil); !ok {
		err := fmt.Errorf("planned failover of %s: the VM became %s meanwhile", name, v.state())
		if rerr := resume(); rerr != nil {
			return fmt.Errorf("%w; and the guest could not be resumed here: %v", err, rerr)
		}
		return err
	}
	// The guest is paused here and its lease no longer renewed: give the
	// lease up, so that the partner takes over at once rather than when the
	// lease expires. Should that fail, it takes over at the expiry.
	if d.wit != nil {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if err := d.wit.Release(rctx, name); err != nil {
			d.event(name, "handover", fmt.Sprintf("the witness did not take the lease back (%v): %s takes over when it expires", err, peer))
		}
		cancel()
	}
	// Keep the paused copy until the partner holds the VM's lease, so a
	// failed handover can resume here.
	deadline := time.Now().Add(10 * time.Second)
	tookOver := d.wit == nil
	for !tookOver && time.Now().Before(deadline) && ctx.Err() == nil {
		if li, err := d.wit.Query(ctx, name); err == nil && li.Holder == peer {
			tookOver = true
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	if !tookOver {
		// The lease is free: the guest resumes here only once it is this
		// host's again; if the partner holds it after all, the VM moved.
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		err := d.takeover(tctx, name)
		cancel()
		var held *witness.LeaseHeldError
		switch {
		case errors.As(err, &held) && held.Holder == peer:
			tookOver = true
		case err != nil:
			why := fmt.Sprintf("%s did not take over within 10 s, and the lease given up for it could not be taken back (%v): the guest stays paused here", peer, err)
			d.fire(v, vm.Fence, why, nil)
			d.wg.Go(func() { d.fenceUntilPaused(v, why, nil) })
			return fmt.Errorf("planned failover of %s: %s", name, why)
		}
	}
	if !tookOver {
		// The partner did not take over: resume here rather than lose the VM.
		d.fire(v, vm.HandOverFailed, fmt.Sprintf("%s did not take over within 10 s; the guest resumes here", peer), nil)
		if err := resume(); err != nil {
			return fmt.Errorf("planned failover of %s: %s did not take over within 10 s, and the guest could not be resumed here: %v", name, peer, err)
		}
		return fmt.Errorf("planned failover of %s: %s did not take over within 10 s; the guest resumed here", name, peer)
	}
	// Paused since its final checkpoint: its RAM is what the partner
	// resumed, the base of the replica it will send back here. The
	// partner's stream back waits for the seed, and for the VM to be gone
	// from here (the deferred end runs after that).
	defer d.seeding(name)()
	d.seedReplica(spec)
	if merr == nil {
		mon.Quit(ctx)
	}
	var prot *protection
	d.fire(v, vm.Moved, fmt.Sprintf("VM %s now runs on %s", name, peer), func(v *vmState) { prot, v.prot = v.prot, nil })
	if prot != nil {
		prot.Close()
	}
	d.stopAgent(v)
	d.mu.Lock()
	delete(d.vms, name)
	d.mu.Unlock()
	return nil
}
