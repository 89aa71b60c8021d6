package daemon

import (
	"context"
	"fmt"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/vm"
)

// watchStops listens, while axd runs, for VMs the hypervisor stopped at
// someone else's request (hv.Watcher: libvirt) and ends their protection;
// a lost stream is opened again.
func (d *Daemon) watchStops(ctx context.Context, w hv.Watcher) {
	wait := 2 * time.Second
	for ctx.Err() == nil {
		stops, err := w.Stops(ctx)
		if err != nil {
			// Each failure waits twice as long, up to a minute: a
			// hypervisor gone for good is not logged every 2 s.
			d.log.Warn("hypervisor events: stops on request are not heard until they are back", "err", err, "retry_in", wait)
		} else {
			wait = 2 * time.Second
			for s := range stops {
				d.hypervisorStopped(s.VM, s.How)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		if err != nil {
			wait = min(2*wait, time.Minute)
		}
	}
}

// hypervisorStopped ends the protection of VM name, which the hypervisor
// stopped here on request (how says who and how), and forgets it: its
// replica is dropped and nothing fails over, since nothing failed. A VM
// protected again after it starts anew is discovered afresh. A replica,
// or a primary being fenced or handed over, is left alone: those stops
// are axd's own, or the partner may be taking over.
func (d *Daemon) hypervisorStopped(name, how string) {
	v, err := d.vm(name)
	if err != nil {
		return
	}
	var prot *protection
	var st vm.State
	v.set(func(v *vmState) { st, prot = v.st, v.prot })
	switch st {
	case vm.Running:
	case vm.Syncing, vm.Protected, vm.Unprotected:
		if prot != nil {
			prot.Close() // the stream says bye: the partner drops its replica
		}
	default:
		return
	}
	detail := fmt.Sprintf("%s: %s stopped here on request; protection ended, no failover (axctl protect %s again once it runs)", how, name, name)
	if _, ok := d.fire(v, vm.Stopped, detail, func(v *vmState) {
		v.level, v.peer, v.prot = api.LevelNone, "", nil
		v.declared, v.declaredPeer = api.LevelNone, ""
	}); !ok {
		return
	}
	d.stopAgent(v)
	d.mu.Lock()
	if d.vms[name] == v {
		delete(d.vms, name)
	}
	d.mu.Unlock()
}
