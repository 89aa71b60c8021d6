package lab

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
)

// leaseTTL is the lab witness's lease length (axd's default).
const leaseTTL = time.Second

// BenchRestart reports, on the lab guest at FT, what axd's restarts and
// crashes cost, measured in one run: a restart of axd (SIGTERM, started
// again, as systemctl restart does) on the primary and on the secondary →
// protected again; a planned failover → the guest running on the partner
// (against the lease TTL it no longer waits for) and protected back the
// other way with no command; axd SIGKILLed, then hung (SIGSTOP), on the
// primary → its guest stopped by the guard (at once; before the lease
// ends), running on the partner, and protected back once axd is started
// again.
func BenchRestart(ctx context.Context, l *Lab, f labFlags, runs int, out io.Writer, log *slog.Logger) (err error) {
	vm, down, err := benchLab(ctx, l, f, log)
	if err != nil {
		return err
	}
	defer down(&err)
	cfg, err := f.daemonConfig()
	if err != nil {
		return err
	}
	primary, secondary := HostA, HostB
	if err := l.protectAndWait(ctx, l.Client(primary), vm.Name, secondary); err != nil {
		return err
	}
	// Pages the initial syncs sent: the first, onto an empty replica; the
	// resyncs after each interruption, on what the partner's replica held.
	syncSent := func() int {
		s, _ := l.vmStatus(ctx, l.Client(primary), vm.Name)
		return s.SyncSent
	}
	firstSync := syncSent()
	var resyncs []float64 // pages, per restart of the primary's then the secondary's axd
	protected := func(h, peer string, within time.Duration) error {
		c := l.Client(h)
		for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if s, err := l.vmStatus(ctx, c, vm.Name); err == nil && s.Role == api.RolePrimary &&
				s.Level == api.LevelFT && s.Peer == peer && s.State == "protected" {
				return nil
			}
		}
		return fmt.Errorf("%s not FT-protected on %s towards %s within %s:%s", vm.Name, h, peer, within, l.eventsText(ctx, c))
	}
	restart := func(h string) (time.Duration, error) {
		pid, err := l.AxdPID(h)
		if err != nil {
			return 0, err
		}
		t0 := time.Now()
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			return 0, err
		}
		if err := waitGone(pid, 30*time.Second); err != nil {
			return 0, err
		}
		if err := l.StartAxd(ctx, h, cfg); err != nil {
			return 0, err
		}
		if err := protected(primary, secondary, 3*time.Minute); err != nil {
			return 0, err
		}
		return time.Since(t0), nil
	}
	var onPrimary, onSecondary []time.Duration
	for range runs {
		d, err := restart(primary)
		if err != nil {
			return fmt.Errorf("restart of axd on the primary: %w", err)
		}
		onPrimary = append(onPrimary, d)
		resyncs = append(resyncs, float64(syncSent()))
		time.Sleep(2 * time.Second)
		if d, err = restart(secondary); err != nil {
			return fmt.Errorf("restart of axd on the secondary: %w", err)
		}
		onSecondary = append(onSecondary, d)
		resyncs = append(resyncs, float64(syncSent()))
		time.Sleep(2 * time.Second)
	}

	// A 5 s cut of the replication link, then healed: what the resync
	// sends against a full copy of the guest's RAM.
	if err := l.SetLink(ctx, primary, ReplLink, false); err != nil {
		return err
	}
	time.Sleep(5 * time.Second)
	if err := l.SetLink(ctx, primary, ReplLink, true); err != nil {
		return err
	}
	if err := protected(primary, secondary, 3*time.Minute); err != nil {
		return fmt.Errorf("after the link cut: %w", err)
	}
	cutResync := syncSent()
	time.Sleep(2 * time.Second)

	// Planned failovers, there and back.
	var handover, back []time.Duration
	var backResyncs []float64 // pages the sync back sent, on the old primary's RAM as the base
	for range 2 {
		t0 := time.Now()
		if err := l.Client(primary).Failover(ctx, vm.Name); err != nil {
			return fmt.Errorf("planned failover: %w", err)
		}
		to := l.Client(secondary)
		for deadline := t0.Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if s, err := l.vmStatus(ctx, to, vm.Name); err == nil && s.Role != api.RoleSecondary {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("planned failover: the guest does not run on %s", secondary)
			}
		}
		handover = append(handover, time.Since(t0))
		primary, secondary = secondary, primary
		if err := protected(primary, secondary, 3*time.Minute); err != nil {
			return err
		}
		back = append(back, time.Since(t0))
		backResyncs = append(backResyncs, float64(syncSent()))
		time.Sleep(2 * time.Second)
	}

	// axd killed on the primary (its guard stops the guest at once), then
	// axd hung on the new primary (SIGSTOP: its guard's pipe stays open,
	// its renewals stop: the guard stops the guest before the lease ends).
	// Each time the partner takes over; axd started again kills the stopped
	// copy and the VM is protected back towards it.
	type crash struct {
		stopped, running, back time.Duration
		resync                 int // pages synced back, on the killed copy's RAM
	}
	var crashes []crash
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGSTOP} {
		old, err := qemuPIDs(l, primary)
		if err != nil || len(old) != 1 {
			return fmt.Errorf("QEMU on %s: %v %v", primary, old, err)
		}
		pid, err := l.AxdPID(primary)
		if err != nil {
			return err
		}
		if err := syscall.Kill(pid, sig); err != nil {
			return err
		}
		tk, err := l.watchTakeover(ctx, vm.Name, old[0], secondary, time.Now(), 30*time.Second)
		if err != nil {
			return fmt.Errorf("axd %s: %w", sig, err)
		}
		c := crash{stopped: tk.Stopped, running: tk.Running}
		if sig == syscall.SIGSTOP {
			syscall.Kill(pid, syscall.SIGKILL)
			if err := waitGone(pid, 10*time.Second); err != nil {
				return err
			}
		}
		t1 := time.Now()
		if err := l.StartAxd(ctx, primary, cfg); err != nil {
			return err
		}
		if err := protected(secondary, primary, 3*time.Minute); err != nil {
			return err
		}
		c.back = time.Since(t1)
		primary, secondary = secondary, primary
		c.resync = syncSent()
		crashes = append(crashes, c)
		time.Sleep(2 * time.Second)
	}

	fmt.Fprintf(out, "axd restarts and crashes, guest at FT (%d MiB, memory dirtier %g MiB/s), lease TTL %s:\n", vm.RAMMiB, f.dirty, leaseTTL)
	fmt.Fprintf(out, "  restart of axd on the primary → protected again   %s s (median %.2f s)\n", durations(onPrimary), medianSeconds(onPrimary))
	fmt.Fprintf(out, "  restart of axd on the secondary → protected again %s s (median %.2f s)\n", durations(onSecondary), medianSeconds(onSecondary))
	ramPages := float64(vm.RAMMiB << 8)
	fmt.Fprintf(out, "  memory resync after those restarts (primary, secondary, ...): %s pages, of the first sync's %d (%.3f median) and the RAM's %.0f (%.3f)\n",
		pageCounts(resyncs), firstSync, median(resyncs)/float64(max(firstSync, 1)), ramPages, median(resyncs)/ramPages)
	fmt.Fprintf(out, "  memory resync after a 5 s replication link cut: %d pages = %.3f of a full copy of the RAM (goal ≤ 0.1), %.3f of the first sync\n",
		cutResync, float64(cutResync)/ramPages, float64(cutResync)/float64(max(firstSync, 1)))
	fmt.Fprintf(out, "  planned failover → guest running on the partner   %s s = %.2f × lease TTL (the lease is handed over, not waited for)\n",
		durations(handover), medianSeconds(handover)/leaseTTL.Seconds())
	fmt.Fprintf(out, "  planned failover → protected back the other way   %s s, no command; the sync back sent %s pages (%.3f of the RAM: the old primary's RAM is the base)\n",
		durations(back), pageCounts(backResyncs), median(backResyncs)/ramPages)
	for i, what := range []string{"axd SIGKILLed", "axd hung (SIGSTOP)"} {
		c := crashes[i]
		fmt.Fprintf(out, "  %-19s → guest stopped by its guard %.2f s = %.2f × lease TTL; partner running it after %.2f s; axd started again → protected back %.2f s, syncing %d pages (%.3f of the RAM)\n",
			what, c.stopped.Seconds(), c.stopped.Seconds()/leaseTTL.Seconds(), c.running.Seconds(), c.back.Seconds(), c.resync, float64(c.resync)/ramPages)
	}
	return nil
}

func medianSeconds(ds []time.Duration) float64 {
	v := make([]float64, len(ds))
	for i, d := range ds {
		v[i] = d.Seconds()
	}
	return median(v)
}

// waitGone waits until process pid has exited: gone, or a zombie whose
// threads have all ended (a group leader turns zombie before the other
// threads finish exiting, and the process's sockets close only with the
// last of them).
func waitGone(pid int, timeout time.Duration) error {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if isZombie(pid) {
			tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
			if err != nil || len(tasks) <= 1 {
				return nil
			}
		}
	}
	return fmt.Errorf("pid %d still runs after %s", pid, timeout)
}

// durations lists ds in seconds, "a / b / c".
// pageCounts lists page counts, "a / b / c".
func pageCounts(ns []float64) string {
	out := ""
	for i, n := range ns {
		if i > 0 {
			out += " / "
		}
		out += fmt.Sprintf("%.0f", n)
	}
	return out
}

func durations(ds []time.Duration) string {
	out := ""
	for i, d := range ds {
		if i > 0 {
			out += " / "
		}
		out += secs(d)
	}
	return out
}
