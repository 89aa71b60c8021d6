package lab

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

// plannedLibvirtFailover moves a protected libvirt domain from its primary
// to its partner with axctl failover: the partner's libvirtd runs it (same
// UUID), nothing of it runs on the old primary any more (its QEMU is gone,
// virsh lists it as not running), and, declared FT, it is protected back
// towards the old primary with no command.
func plannedLibvirtFailover(t *testing.T, l *Lab, domain, from, to, uuid string) {
	t.Helper()
	ctx := context.Background()
	old, err := qemuPIDs(l, from)
	if err != nil || len(old) != 1 {
		t.Fatalf("QEMU on %s before the planned failover: %v %v", from, old, err)
	}
	t0 := time.Now()
	if err := l.Client(from).Failover(ctx, domain); err != nil {
		t.Fatalf("planned failover %s → %s: %v\nevents on %s:%s\nevents on %s:%s", from, to, err,
			from, l.eventsText(ctx, l.Client(from)), to, l.eventsText(ctx, l.Client(to)))
	}
	waitVM(t, l, l.Client(to), domain, 30*time.Second, "the domain running on "+to, func(s api.VMStatus) bool {
		return s.Role == api.RoleLocal || s.Role == api.RolePrimary
	})
	t.Logf("planned failover %s → %s: %s running on %s %.2f s after the request", from, to, domain, to, time.Since(t0).Seconds())
	if out, err := l.Virsh(ctx, to, "domstate", domain); err != nil || strings.TrimSpace(out) != "running" {
		t.Errorf("virsh domstate %s on %s: %q %v, want running", domain, to, strings.TrimSpace(out), err)
	}
	if got, err := l.Virsh(ctx, to, "domuuid", domain); err != nil || strings.TrimSpace(got) != uuid {
		t.Errorf("the domain on %s has UUID %q (%v), want %s", to, strings.TrimSpace(got), err, uuid)
	}
	if err := waitGone(old[0], 10*time.Second); err != nil {
		t.Errorf("the old QEMU on %s after the planned failover: %v", from, err)
	}
	// libvirtd hears of its QEMU's end a moment after it (monitor EOF).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, err := l.Virsh(ctx, from, "list", "--name")
		if err == nil && !strings.Contains(out, domain) {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("virsh list on %s 10 s after the planned failover: %q %v: the domain still runs there", from, out, err)
			break
		}
	}
	back := time.Now()
	waitVM(t, l, l.Client(to), domain, 120*time.Second, "FT protection "+to+"→"+from+" by itself", func(s api.VMStatus) bool {
		return s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == from && s.State == "protected"
	})
	t.Logf("%s protected again from %s towards %s %.1f s later", domain, to, from, time.Since(back).Seconds())
	if err := l.pingLedger(ctx, fmt.Sprintf("%s:%d", GuestIP, LedgerPort)); err != nil {
		t.Errorf("ledger on %s after the planned failover: %v", to, err)
	}
}

// libvirtdRestarted restarts libvirtd on both hosts under a domain
// protected at FT from primary to partner (a package upgrade does so on a
// real host): axd dials libvirtd again and checkpoints go on through it,
// the domain keeps running, and the partner never takes it over.
func libvirtdRestarted(t *testing.T, l *Lab, domain, primary, partner string) {
	t.Helper()
	ctx := context.Background()
	cp := l.Client(primary)
	t0 := time.Now()
	for _, h := range []string{primary, partner} {
		if err := l.StopLibvirtd(h); err != nil {
			t.Fatal(err)
		}
		if err := l.StartLibvirtd(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	restarted := time.Now()
	before, err := l.vmStatus(ctx, cp, domain)
	if err != nil {
		t.Fatal(err)
	}
	// Protected, with checkpoints committed after both libvirtds were back:
	// QMP (through libvirt) works again on the primary.
	after := waitVM(t, l, cp, domain, 60*time.Second, "FT checkpoints through the restarted libvirtd", func(s api.VMStatus) bool {
		return s.State == "protected" && s.Level == api.LevelFT && s.Committed > before.Committed+20 && s.LastCommit.After(restarted)
	})
	t.Logf("libvirtd restarted on %s and %s (%.1f s): %s protected, %d checkpoints committed since, %.1f s after",
		primary, partner, restarted.Sub(t0).Seconds(), domain, after.Committed-before.Committed, time.Since(restarted).Seconds())
	// Paused for each checkpoint, running between them: seen running
	// within a second, or a checkpoint cut short left it paused.
	var states []string
	for deadline := time.Now().Add(time.Second); ; time.Sleep(20 * time.Millisecond) {
		st, err := l.Virsh(ctx, primary, "domstate", domain)
		if st = strings.TrimSpace(st); err == nil && st == "running" {
			break
		}
		states = append(states, st)
		if time.Now().After(deadline) {
			t.Errorf("virsh domstate %s on %s after libvirtd restarted: never running in 1 s (%q, %v)", domain, primary, states, err)
			break
		}
	}
	if evs, err := l.Client(partner).Events(ctx, 0); err == nil {
		for _, e := range evs {
			if (e.Kind == "promote" || e.Kind == "promoted") && e.Time.After(t0) {
				t.Errorf("%s took %s over across the restart of libvirtd: %s", partner, domain, e.Text)
			}
		}
	}
}
