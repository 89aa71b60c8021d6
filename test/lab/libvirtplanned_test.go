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
	if out, err := l.Virsh(ctx, from, "list", "--name"); err != nil || strings.Contains(out, domain) {
		t.Errorf("virsh list on %s after the planned failover: %q %v: the domain still runs there", from, out, err)
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
