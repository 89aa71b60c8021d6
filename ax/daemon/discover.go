package daemon

import (
	"context"
	"fmt"
	"time"

	"github.com/axproject/ax/ax/hv"
)

// needsQMP says whether this host's hypervisor driver reaches a VM by the
// QMP socket its spec names; a Discoverer (libvirt) reaches it by name.
func (d *Daemon) needsQMP() bool {
	_, byName := d.cfg.Hypervisor.(hv.Discoverer)
	return !byName
}

// discoverTimeout bounds asking the hypervisor about a VM.
const discoverTimeout = 10 * time.Second

// discover defines the VM name from what the hypervisor says of it, when
// axd does not know it and the driver can tell (hv.Discoverer): so that
// axctl protect DOMAIN works for a libvirt domain nobody defined. A VM
// axd knows, or a driver that cannot tell, is left to the caller.
func (d *Daemon) discover(ctx context.Context, name string) error {
	if _, err := d.vm(name); err == nil {
		return nil
	}
	if _, ok := d.cfg.Hypervisor.(hv.Discoverer); !ok {
		return nil
	}
	return d.rediscover(ctx, name)
}

// rediscover defines the VM name afresh from what the hypervisor says of
// it now, known to axd or not (a libvirt domain's RAM file is named after
// its id, new at each start).
func (d *Daemon) rediscover(ctx context.Context, name string) error {
	disc, ok := d.cfg.Hypervisor.(hv.Discoverer)
	if !ok {
		return fmt.Errorf("VM %s: axd runs its VMs over QMP and cannot discover them (run axd with --libvirt)", name)
	}
	ctx, cancel := context.WithTimeout(ctx, discoverTimeout)
	defer cancel()
	spec, err := disc.DiscoverSpec(ctx, name)
	if err != nil {
		return fmt.Errorf("VM %s is not defined here, and discovering it failed: %w", name, err)
	}
	if spec.Name != name {
		return fmt.Errorf("VM %s: the hypervisor described VM %q", name, spec.Name)
	}
	if err := d.define(spec); err != nil {
		return err
	}
	d.event(name, "define", fmt.Sprintf("VM %s discovered from the hypervisor (%d MiB, RAM file %s, tap %s, %d disks, pid %d)",
		name, spec.Guest.RAMMiB, spec.Guest.RAMFile, spec.Guest.Tap, len(spec.Guest.Disks), spec.PID))
	return nil
}
