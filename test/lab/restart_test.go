package lab

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/test/workload"
)

// axdPID is the pid of axd on host h, as the lab recorded it.
func axdPID(t *testing.T, l *Lab, h string) int {
	t.Helper()
	pid, err := l.AxdPID(h)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// TestIntegrationAxdRestart: axd restarted the way `systemctl restart`
// does it (SIGTERM, then started again) on the primary, then on the
// secondary, at FT with the ledger client appending all along: no
// failover, protection back by itself each time, no acknowledged record
// lost, the client's connection never reset.
func TestIntegrationAxdRestart(t *testing.T) {
	l, vm, bin, cfg := ftLab(t, "itrst")
	ctx := context.Background()
	ca, cb := l.Client(HostA), l.Client(HostB)
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	record := filepath.Join(l.StateDir, "restart.rec")
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	client, err := l.StartClient(ctx, bin, addr, 20, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()
	time.Sleep(3 * time.Second)
	first, _ := l.vmStatus(ctx, ca, vm.Name) // its initial sync: every data page
	for _, h := range []string{HostA, HostB} {
		var evB uint64 // b's events from here on
		if evs, _ := cb.Events(ctx, 0); len(evs) > 0 {
			evB = evs[len(evs)-1].Seq
		}
		pid := axdPID(t, l, h)
		t0 := time.Now()
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := waitGone(pid, 30*time.Second); err != nil {
			t.Fatalf("axd on %s after SIGTERM: %v", h, err)
		}
		stopped := time.Since(t0)
		if err := l.StartAxd(ctx, h, cfg); err != nil {
			t.Fatal(err)
		}
		waitVM(t, l, ca, vm.Name, 180*time.Second, "FT protection back after the restart of axd on "+h, func(s api.VMStatus) bool {
			return s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == HostB && s.State == "protected"
		})
		t.Logf("axd on %s: stopped %.2f s after SIGTERM, VM protected again %.2f s after SIGTERM", h, stopped.Seconds(), time.Since(t0).Seconds())
		if s, err := l.vmStatus(ctx, cb, vm.Name); err != nil || s.Role != api.RoleSecondary {
			t.Fatalf("b after the restart on %s: %+v %v", h, s, err)
		}
		// The partner kept its replica across the restart (a told b so; b's
		// replica files outlive b's axd), and the new stream resynchronised
		// on it: only the pages the guest changed meanwhile travelled.
		again, _ := l.vmStatus(ctx, ca, vm.Name)
		t.Logf("axd on %s restarted: resync %d pages, first sync %d (%.3f of it)", h, again.SyncSent, first.SyncSent,
			float64(again.SyncSent)/float64(max(first.SyncSent, 1)))
		if first.SyncSent == 0 || again.SyncSent*2 > first.SyncSent {
			t.Errorf("after the restart on %s the resync sent %d pages, the first sync %d: not incremental", h, again.SyncSent, first.SyncSent)
		}
		if h == HostA {
			// One guard holds the guest: the one the stopping axd left was
			// dismissed by the new axd once its own was armed.
			if n := guardsOf(t, l, h); n != 1 {
				t.Errorf("%d guard processes for the guest on %s after the restart, want 1", n, h)
			}
			told, dropped := false, false
			evs, _ := cb.Events(ctx, evB)
			for _, e := range evs {
				told = told || strings.Contains(e.Text, "axd restarts: replica kept")
				dropped = dropped || strings.Contains(e.Text, "replica dropped")
			}
			if !told || dropped {
				t.Errorf("b across the restart of a's axd: told %v, replica dropped %v:%s", told, dropped, l.eventsText(ctx, cb))
			}
		} else {
			if ev := l.eventsText(ctx, cb); !strings.Contains(ev, "reopened after axd started: ready to take over") {
				t.Errorf("b's restarted axd did not reopen its replica ready to take over:%s", ev)
			}
			// b said it restarts: a held its output and came back to it.
			if ev := l.eventsText(ctx, ca); !strings.Contains(ev, "the partner's axd restarts") {
				t.Errorf("a did not hear that b's axd restarts:%s", ev)
			}
		}
		time.Sleep(3 * time.Second) // the client appends on the protected VM
	}
	summary := client.Stop()
	t.Logf("client: %s", summary)
	if !strings.Contains(summary, " reconnects=0") {
		t.Errorf("the client's connection was reset across the restarts: %s", summary)
	}
	if events := l.eventsText(ctx, cb); strings.Contains(events, " promote ") {
		t.Errorf("b promoted the VM across a restart of axd:%s", events)
	}
	acked, missing := ledgerLoss(t, l, record, addr)
	t.Logf("acked %d, missing %d", acked, missing)
	if acked == 0 || missing > 0 {
		t.Fatalf("%d acknowledged records, %d missing from the ledger", acked, missing)
	}
}

// TestIntegrationFTAxdKilledTrials: axd SIGKILLed on the primary at FT at
// a random moment, with the ledger client appending and both hosts sampled
// every 20 ms — is a QEMU on the old primary still running (not stopped by
// its guard), does the partner run the VM. Each trial: never both, no
// acknowledged record lost, the partner runs the VM; axd started again on
// the old primary kills its stopped copy, and the VM, declared FT, is
// protected back towards it with no command — the next trial kills the
// other way. AX_AXD_TRIALS sets the number of trials (default 10).
func TestIntegrationFTAxdKilledTrials(t *testing.T) {
	l, vm, bin, cfg := ftLab(t, "itaxt")
	axdKillTrialsLoseNothing(t, l, vm, bin, cfg, api.LevelFT)
}

// TestIntegrationHAAxdKilledTrials: the same at HA, the ledger keeping its
// records on the guest's disk: the partner boots the guest afresh from its
// replicated disk, never while the old copy runs, and every acknowledged
// record is there. AX_AXD_TRIALS sets the number of trials (default 10).
func TestIntegrationHAAxdKilledTrials(t *testing.T) {
	l, vm, bin, cfg := labWithGuest(t, "ithat", GuestConfig{Dirty: 1, DiskMiB: 64, DiskFormat: "raw"})
	axdKillTrialsLoseNothing(t, l, vm, bin, cfg, api.LevelHA)
}

// axdKillTrialsLoseNothing runs AX_AXD_TRIALS (default 10) axd-kill trials
// at level and fails at the first that loses an acknowledged record.
func axdKillTrialsLoseNothing(t *testing.T, l *Lab, vm *VM, bin string, cfg DaemonConfig, level string) {
	trials := 10
	if n, err := strconv.Atoi(os.Getenv("AX_AXD_TRIALS")); err == nil {
		trials = n
	}
	axdKillTrials(t, l, vm, bin, cfg, level, trials, func(i, acked, missing int) bool {
		if acked == 0 || missing > 0 {
			t.Fatalf("%s trial %d: %d acknowledged records, %d missing after the takeover", level, i, acked, missing)
		}
		return true
	})
}

// TestIntegrationFTAxdKilledUngated is the control for those trials'
// zero-loss claim: the same kills with output commit off (axd
// --output-commit=false: the guest's output is never held) must lose
// acknowledged records in some trial — the partner resumes from the last
// checkpoint, before acks the clients saw — so the check above can fail.
func TestIntegrationFTAxdKilledUngated(t *testing.T) {
	l, vm, bin, cfg := ftLabWith(t, "itaxu", "--output-commit=false")
	lost := 0
	axdKillTrials(t, l, vm, bin, cfg, api.LevelFT, 6, func(i, acked, missing int) bool {
		lost += missing
		return missing == 0 // one trial that lost records is enough
	})
	if lost == 0 {
		t.Fatal("no acknowledged record lost in 6 kills with output commit off: the trials' check could not tell")
	}
}

// lateGuard is how long the first axd-kill trial holds the guard after axd
// died: under the lease's TTL (the partner must not run the VM while the old
// copy still does), far over the guard's usual reaction.
const lateGuard = 400 * time.Millisecond

// axdKillTrials runs up to trials kills of axd on the primary (see
// TestIntegrationFTAxdKilledTrials), alternating a→b and b→a; after each it
// calls check with the acknowledged and missing record counts, and stops
// when check returns false.
func axdKillTrials(t *testing.T, l *Lab, vm *VM, bin string, cfg DaemonConfig, level string, trials int, check func(i, acked, missing int) bool) {
	ctx := context.Background()
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	from, to := HostA, HostB
	if err := l.protectLevelAndWait(ctx, l.Client(from), vm.Name, to, level); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= trials; i++ {
		cf := l.Client(from)
		waitVM(t, l, cf, vm.Name, 180*time.Second, level+" protection "+from+"→"+to, func(s api.VMStatus) bool {
			return s.Role == api.RolePrimary && s.Level == level && s.Peer == to && s.State == "protected"
		})
		if s, err := l.vmStatus(ctx, cf, vm.Name); err == nil && i == 1 {
			t.Logf("%s trial 1: disks replicated by %q", level, s.DiskMode)
		}
		record := filepath.Join(l.StateDir, fmt.Sprintf("axdkill%d.rec", i))
		client, err := l.StartClient(ctx, bin, addr, 20, record)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(2*time.Second + time.Duration(rand.Int64N(int64(4*time.Second))))
		old, err := qemuPIDs(l, from)
		if err != nil || len(old) != 1 {
			client.Stop()
			t.Fatalf("trial %d: QEMU on %s: %v %v", i, from, old, err)
		}
		// The first kill finds the guard slow: it is held (SIGSTOP) from
		// before axd dies until lateGuard after, while the guest runs on
		// with axd gone — what a loaded host does to the guard's reaction.
		// Nothing the guest does in that time may be acknowledged and then
		// lost: at HA its disk requests to the dead axd must wait.
		var late []int
		if i == 1 {
			late = guardPIDs(t, l, from)
			if len(late) != 1 {
				client.Stop()
				t.Fatalf("trial %d: guards of the QEMU on %s: %v, want one", i, from, late)
			}
			if err := syscall.Kill(late[0], syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
		}
		if err := syscall.Kill(axdPID(t, l, from), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		killed := time.Now()
		if late != nil {
			time.Sleep(lateGuard)
			if err := syscall.Kill(late[0], syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
		}
		tk, err := l.watchTakeover(ctx, vm.Name, old[0], to, killed, 30*time.Second)
		if err != nil {
			client.Stop()
			t.Fatalf("trial %d: %v", i, err)
		}
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			if err = l.pingLedger(ctx, addr); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			client.Stop()
			t.Fatalf("trial %d: ledger on %s: %v", i, to, err)
		}
		time.Sleep(2 * time.Second) // the client reconnects and appends there
		client.Stop()
		acked, missing := ledgerLoss(t, l, record, addr)
		slow := ""
		if late != nil {
			// How many acknowledgements left the guest after axd died:
			// whatever they were, none may be missing on the partner.
			acks, _ := workload.ReadRecord(record)
			before, after := 0, 0
			for _, a := range acks {
				switch {
				case a.Time.After(killed.Add(-lateGuard)) && !a.Time.After(killed):
					before++
				case a.Time.After(killed) && a.Time.Before(killed.Add(lateGuard)):
					after++
				}
			}
			slow = fmt.Sprintf(" (guard held for %s; records acknowledged in that time %d, in as long before the kill %d)", lateGuard, after, before)
		}
		t.Logf("%s trial %d %s→%s%s: axd killed, guest stopped after %.2f s, %s running it after %.2f s; acked %d, missing %d",
			level, i, from, to, slow, tk.Stopped.Seconds(), to, tk.Running.Seconds(), acked, missing)
		if !check(i, acked, missing) {
			return
		}
		if err := l.StartAxd(ctx, from, cfg); err != nil {
			t.Fatal(err)
		}
		if err := waitGone(old[0], 15*time.Second); err != nil {
			t.Fatalf("trial %d: the old copy on %s after its axd came back: %v%s", i, from, err, l.eventsText(ctx, cf))
		}
		from, to = to, from
	}
}

// ledgerLoss compares the acknowledgements the ledger client recorded in
// record with what the ledger at addr holds: how many were acknowledged,
// how many of those are missing.
func ledgerLoss(t *testing.T, l *Lab, record, addr string) (acked, missing int) {
	t.Helper()
	acks, err := workload.ReadRecord(record)
	if err != nil {
		t.Fatal(err)
	}
	var recs []string
	if err := l.InNetns(HostC, func() error {
		recs, err = workload.List(context.Background(), addr, 10*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return len(acks), len(workload.Verify(acks, recs).Missing)
}

// guardsOf counts the guard processes (axd --guard-pid QEMU) of the QEMU of
// host h, once the count settles (a dismissed guard takes a moment to end).
func guardsOf(t *testing.T, l *Lab, h string) int {
	t.Helper()
	n := 0
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		n = len(guardPIDs(t, l, h))
		if n <= 1 || time.Now().After(deadline) {
			return n
		}
	}
}

// guardPIDs lists the live guard processes of the QEMU of host h.
func guardPIDs(t *testing.T, l *Lab, h string) []int {
	t.Helper()
	pids, err := qemuPIDs(l, h)
	if err != nil || len(pids) != 1 {
		t.Fatalf("QEMU on %s: %v %v", h, pids, err)
	}
	want := "--guard-pid\x00" + strconv.Itoa(pids[0]) + "\x00"
	var guards []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && strings.Contains(string(b), want) && !isZombie(atoi(e.Name())) {
			guards = append(guards, atoi(e.Name()))
		}
	}
	return guards
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }
