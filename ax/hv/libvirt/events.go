package libvirt

import (
	"context"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/axproject/ax/ax/hv"
)

var _ hv.Watcher = (*Driver)(nil)

// EventKind is what happened to a domain, as axd acts on it.
type EventKind string

const (
	Defined   EventKind = "defined"
	Undefined EventKind = "undefined"
	Started   EventKind = "started"
	Paused    EventKind = "paused"
	Resumed   EventKind = "resumed"
	// ShuttingDown: the guest shut itself down; Stopped follows.
	ShuttingDown EventKind = "shutting-down"
	// Stopped: the domain ended as asked (guest shutdown, migrated away,
	// saved, reverted to a snapshot).
	Stopped EventKind = "stopped"
	// Destroyed: someone ended the domain (virsh destroy, a fence).
	Destroyed EventKind = "destroyed"
	// Crashed: QEMU or the guest died (Reason says which).
	Crashed     EventKind = "crashed"
	PMSuspended EventKind = "pmsuspended"
)

// Event is one lifecycle event of a domain.
type Event struct {
	Domain string
	UUID   string
	Kind   EventKind
	// Reason is libvirt's detail of the event ("shutdown", "migrated",
	// "failed", …), for logs.
	Reason string
}

// Events streams the lifecycle events of every domain of this libvirtd
// until ctx ends, the driver closes or the connection is lost; then the
// channel is closed. A consumer that stops reading holds the stream up.
func (d *Driver) Events(ctx context.Context) (<-chan Event, error) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(d.ctx, cancel)
	src, err := d.c().LifecycleEvents(ctx)
	if err != nil {
		stop()
		cancel()
		return nil, fmt.Errorf("libvirt lifecycle events: %w", err)
	}
	out := make(chan Event)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer close(out)
		defer cancel()
		defer stop()
		for {
			var m golibvirt.DomainEventLifecycleMsg
			var ok bool
			select {
			case <-ctx.Done():
				return
			case m, ok = <-src:
				if !ok {
					return
				}
			}
			select {
			case out <- lifecycleEvent(m):
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

// lifecycleEvent translates libvirt's event and detail numbers
// (virDomainEventType and its virDomainEvent*DetailType).
func lifecycleEvent(m golibvirt.DomainEventLifecycleMsg) Event {
	e := Event{Domain: m.Dom.Name, UUID: uuidString(m.Dom.UUID)}
	detail := func(names ...string) string {
		if m.Detail >= 0 && int(m.Detail) < len(names) {
			return names[m.Detail]
		}
		return fmt.Sprintf("detail %d", m.Detail)
	}
	switch golibvirt.DomainEventType(m.Event) {
	case golibvirt.DomainEventDefined:
		e.Kind, e.Reason = Defined, detail("added", "updated", "renamed", "from-snapshot")
	case golibvirt.DomainEventUndefined:
		e.Kind, e.Reason = Undefined, detail("removed", "renamed")
	case golibvirt.DomainEventStarted:
		e.Kind, e.Reason = Started, detail("booted", "migrated", "restored", "from-snapshot", "wakeup", "recreated")
	case golibvirt.DomainEventSuspended:
		e.Kind, e.Reason = Paused, detail("paused", "migrated", "ioerror", "watchdog", "restored", "from-snapshot", "api-error", "postcopy", "postcopy-failed")
	case golibvirt.DomainEventResumed:
		e.Kind, e.Reason = Resumed, detail("unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed")
	case golibvirt.DomainEventStopped:
		e.Reason = detail("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot")
		switch golibvirt.DomainEventStoppedDetailType(m.Detail) {
		case golibvirt.DomainEventStoppedDestroyed:
			e.Kind = Destroyed
		case golibvirt.DomainEventStoppedCrashed, golibvirt.DomainEventStoppedFailed:
			e.Kind = Crashed
		default:
			e.Kind = Stopped
		}
	case golibvirt.DomainEventShutdown:
		e.Kind, e.Reason = ShuttingDown, detail("finished", "guest", "host")
	case golibvirt.DomainEventPmsuspended:
		e.Kind, e.Reason = PMSuspended, detail("memory", "disk")
	case golibvirt.DomainEventCrashed:
		e.Kind, e.Reason = Crashed, detail("panicked", "crashloaded")
	default:
		e.Kind, e.Reason = EventKind(fmt.Sprintf("event-%d", m.Event)), fmt.Sprintf("detail %d", m.Detail)
	}
	return e
}

// uuidString writes a UUID as libvirt does.
func uuidString(u golibvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// Stops is hv.Watcher's stream: the domains destroyed or stopped (shut
// down, saved, migrated away) through libvirt. Crashes are left out: a
// QEMU that died is a failure for axd's other paths to handle.
func (d *Driver) Stops(ctx context.Context) (<-chan hv.Stop, error) {
	events, err := d.Events(ctx)
	if err != nil {
		return nil, err
	}
	out := make(chan hv.Stop)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer close(out)
		for e := range events {
			if e.Kind != Destroyed && e.Kind != Stopped {
				continue
			}
			select {
			case out <- hv.Stop{VM: e.Domain, How: fmt.Sprintf("libvirt %s domain %s (%s)", e.Kind, e.Domain, e.Reason)}:
			case <-ctx.Done():
				// Events ends with ctx and closes events; drain it.
				for range events {
				}
				return
			}
		}
	}()
	return out, nil
}
