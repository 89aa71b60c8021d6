package lab

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
)

func TestTickContinuity(t *testing.T) {
	cases := []struct {
		name      string
		pre, post string
		at, first uint64
		wantErr   bool
	}{
		{"clean boundary", "AXTICK 1\nAXTICK 2\n", "AXTICK 3\nAXTICK 4\n", 2, 3, false},
		{"boundary inside a line", "AXTICK 1\nAXTICK 2\nAXTI", "CK 3\nAXTICK 4\n", 2, 3, false},
		{"kernel noise between", "AXTICK 7\n", "[ 1.2] virtio_net: link up\nAXTICK 8\n", 7, 8, false},
		{"resumed from boot", "AXTICK 7\n", "AXTICK 1\nAXTICK 2\n", 7, 1, true},
		{"resumed from a later state", "AXTICK 7\n", "AXTICK 9\n", 7, 9, true},
		{"no tick after", "AXTICK 7\n", "", 7, 0, true},
	}
	for _, c := range cases {
		at, first, err := TickContinuity([]byte(c.pre), []byte(c.post))
		if (err != nil) != c.wantErr || at != c.at || first != c.first {
			t.Errorf("%s: got %d, %d, %v; want %d, %d, error %v", c.name, at, first, err, c.at, c.first, c.wantErr)
		}
	}
}

// ftLab brings up a lab with a guest (memory dirtier on) and both axd.
func ftLab(t *testing.T, prefix string) (*Lab, *VM, string, DaemonConfig) {
	t.Helper()
	return ftLabWith(t, prefix)
}

// ftLabWith is ftLab with extra axd flags.
func ftLabWith(t *testing.T, prefix string, axdFlags ...string) (*Lab, *VM, string, DaemonConfig) {
	t.Helper()
	return labWithGuest(t, prefix, GuestConfig{Dirty: 4}, axdFlags...)
}

// labWithGuest brings up a lab with a guest of gcfg (image filled in),
// serving, and both axd with extra flags; the VM is defined on a.
func labWithGuest(t *testing.T, prefix string, gcfg GuestConfig, axdFlags ...string) (*Lab, *VM, string, DaemonConfig) {
	t.Helper()
	return labWithDaemons(t, prefix, gcfg, DaemonConfig{Extra: axdFlags})
}

// labWithDaemons is labWithGuest with the daemons' configuration (its axd
// binary filled in).
func labWithDaemons(t *testing.T, prefix string, gcfg GuestConfig, dcfg DaemonConfig) (*Lab, *VM, string, DaemonConfig) {
	t.Helper()
	requireLab(t)
	ctx := context.Background()
	l, err := Open(Config{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx)
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range []string{HostA, HostB} {
				if data, err := os.ReadFile(filepath.Join(l.StateDir, "axd-"+h+".log")); err == nil {
					t.Logf("axd-%s log (tail):\n%s", h, tail(string(data), 40))
				}
			}
			for _, h := range EtcdHosts {
				if data, err := os.ReadFile(filepath.Join(l.StateDir, "etcd-"+h+".log")); err == nil {
					t.Logf("etcd-%s log (tail):\n%s", h, tail(string(data), 10))
				}
			}
			filepath.WalkDir(l.StateDir, func(p string, e fs.DirEntry, err error) error {
				if err == nil && e.Name() == "guard.log" {
					if data, err := os.ReadFile(p); err == nil {
						t.Logf("%s:\n%s", p, tail(string(data), 10))
					}
				}
				return nil
			})
		}
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("down: %v", err)
		}
		if left := l.Leftovers(nil); len(left) > 0 {
			t.Errorf("teardown left: %v", left)
		}
	})
	img := testImage(t)
	gcfg.Kernel, gcfg.Initrd = img.Kernel, img.Initrd
	vm, err := l.StartGuest(ctx, gcfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitServing(ctx, vm, 120*time.Second); err != nil {
		t.Fatal(err)
	}
	dcfg.Axd = axdBinary(t)
	if err := l.StartDaemons(ctx, dcfg); err != nil {
		t.Fatal(err)
	}
	if err := l.DefineGuest(ctx, vm); err != nil {
		t.Fatal(err)
	}
	return l, vm, filepath.Join(guestBinaries(t), "ax-workload"), dcfg
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func axdBinary(t *testing.T) string {
	t.Helper()
	dir := guestBinaries(t)
	p := filepath.Join(dir, "axd")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	cmd := exec.Command("go", "build", "-o", p, "github.com/axproject/ax/cmd/axd")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build axd: %v %s", err, out)
	}
	return p
}

// trialRun is how long each trial runs protected before its host is
// killed: at least 30 s, plus a random part so the kill lands at a random
// moment of the epoch cycle. AX_FT_TRIAL_RUN overrides the 30 s (local use).
func trialRun() time.Duration {
	base := 30 * time.Second
	if d, err := time.ParseDuration(os.Getenv("AX_FT_TRIAL_RUN")); err == nil {
		base = d
	}
	return base + randomPart()
}

// TestIntegrationFTFailoverTrials is the FT claim: ten times, the primary
// host is killed (QEMU and axd by SIGKILL, links cut) at a random moment
// while the memory dirtier and a ledger client run; each time the partner
// resumes the guest from its last committed checkpoint — the tick goes on
// from the value at that checkpoint, the console shows no kernel fault, the
// ledger answers. The VM then moves back the other way, re-protected from
// the survivor towards the revived host.
func TestIntegrationFTFailoverTrials(t *testing.T) {
	l, vm, bin, dcfg := ftLab(t, "itft")
	trials := 10
	if n, err := strconv.Atoi(os.Getenv("AX_FT_TRIALS")); err == nil {
		trials = n // local use
	}
	failoverTrials(t, l, vm, bin, dcfg, HostA, HostB, "trial", trials)
}

// failoverTrials runs n FT failover trials of vm, the first from host from
// to host to, then alternating: each kills the primary host at a random
// moment, checks the guest resumed on the partner from its last committed
// checkpoint with no acknowledged record lost, revives the killed host and
// waits until the VM is protected towards it again. It returns the
// primary's host after the last trial; name prefixes the trials' files.
func failoverTrials(t *testing.T, l *Lab, vm *VM, bin string, dcfg DaemonConfig, from, to, name string, n int) string {
	t.Helper()
	ctx := context.Background()
	var failovers []time.Duration
	for i := 1; i <= n; i++ {
		record := filepath.Join(l.StateDir, fmt.Sprintf("%s%d.rec", name, i))
		tr, err := l.FailoverTrial(ctx, vm.Name, from, to, trialRun(), bin, record)
		if err != nil {
			t.Fatalf("%s %d (%s → %s): %v", name, i, from, to, err)
		}
		t.Logf("%s %d %s→%s: failover %.2f s, epoch %d, tick %d → %d, pause p50 %.1f ms, acked %d, lost %d",
			name, i, from, to, tr.Failover.Seconds(), tr.LastEpoch, tr.TickAtCommit, tr.FirstTick, tr.PauseP50MS, tr.Acked, tr.Lost)
		if tr.Acked == 0 {
			t.Errorf("%s %d: the client got no ack before the kill", name, i)
		}
		if tr.Lost > 0 {
			t.Errorf("%s %d: %d of %d acknowledged records are missing after failover: output escaped before its checkpoint committed", name, i, tr.Lost, tr.Acked)
		}
		failovers = append(failovers, tr.Failover)
		if i == 1 {
			checkFailoverMetric(t, l, to, vm.Name)
		}
		if err := l.RecoverHost(ctx, from, dcfg); err != nil {
			t.Fatalf("%s %d: recover %s: %v", name, i, from, err)
		}
		// Declared FT, the VM is protected again towards the host that
		// came back, with no command.
		back := time.Now()
		waitVM(t, l, l.Client(to), vm.Name, 120*time.Second, "FT protection towards the returned host, by itself", func(s api.VMStatus) bool {
			return s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == from && s.State == "protected"
		})
		t.Logf("%s %d: %s protected again towards %s %.1f s after its axd started", name, i, vm.Name, from, time.Since(back).Seconds())
		from, to = to, from
	}
	t.Logf("failover times: %v", failovers)
	return from
}

// TestIntegrationFTWithoutOutputCommit is the control for the trials'
// zero-loss claim: the same failovers with the output gate turned off must
// lose acknowledged records — so the check in the trials can fail.
func TestIntegrationFTWithoutOutputCommit(t *testing.T) {
	l, vm, bin, dcfg := ftLabWith(t, "itctl", "--output-commit=false")
	ctx := context.Background()
	from, to := HostA, HostB
	lost := 0
	for i := 1; i <= 4 && lost == 0; i++ {
		record := filepath.Join(l.StateDir, fmt.Sprintf("control%d.rec", i))
		tr, err := l.FailoverTrialRate(ctx, vm.Name, from, to, 4*time.Second+time.Duration(rand.Int64N(int64(time.Second))), bin, record, 100)
		if err != nil {
			t.Fatalf("control trial %d: %v", i, err)
		}
		t.Logf("control trial %d %s→%s (output not held): acked %d, lost %d", i, from, to, tr.Acked, tr.Lost)
		lost += tr.Lost
		if err := l.RecoverHost(ctx, from, dcfg); err != nil {
			t.Fatal(err)
		}
		from, to = to, from
	}
	if lost == 0 {
		t.Fatal("without output commit no acknowledged record was lost in 4 failovers at 100 appends/s: the loss check cannot tell the gate's effect")
	}
}

// checkFailoverMetric scrapes host h's axd (from the witness host, over the
// management network) and expects one failover of vm.
func checkFailoverMetric(t *testing.T, l *Lab, h, vm string) {
	t.Helper()
	body, err := l.Scrape(context.Background(), HostW, MetricsAddr(h))
	if err != nil {
		t.Fatalf("scrape %s: %v", h, err)
	}
	want := fmt.Sprintf(`ax_failovers_total{vm="%s"} 1`, vm)
	if !strings.Contains(body, want) {
		var got []string
		for _, line := range strings.Split(body, "\n") {
			if strings.HasPrefix(line, "ax_") {
				got = append(got, line)
			}
		}
		t.Errorf("metrics of %s lack %q; ax_ series:\n%s", h, want, strings.Join(got, "\n"))
	}
}

// TestIntegrationFTReplicationLinkCut: with the replication link cut while
// the witness and the management network see both hosts, b must not
// promote, a must go on running its guest unprotected and raise the alarm;
// when the link returns, protection resumes by itself.
func TestIntegrationFTReplicationLinkCut(t *testing.T) {
	l, vm, _, _ := ftLab(t, "itcut")
	ctx := context.Background()
	ca, cb := l.Client(HostA), l.Client(HostB)
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	first, _ := l.vmStatus(ctx, ca, vm.Name) // its initial sync: every data page
	time.Sleep(2 * time.Second)
	tickBefore, _ := LastTick(vm.Console)
	if err := l.SetLink(ctx, HostA, ReplLink, false); err != nil {
		t.Fatal(err)
	}
	// Well past the promotion delay.
	deadline := time.Now().Add(5 * time.Second)
	alarmSeen, staleSeen := false, false
	for time.Now().Before(deadline) {
		sb, err := l.vmStatus(ctx, cb, vm.Name)
		if err != nil || sb.Role != api.RoleSecondary {
			t.Fatalf("b promoted or lost the replica while a was alive: %+v %v\nevents on b: %s", sb, err, l.eventsText(ctx, cb))
		}
		// a runs on without b: b's replica falls behind what clients see
		// and must be marked unusable.
		staleSeen = staleSeen || sb.State == "stale"
		if sa, err := l.vmStatus(ctx, ca, vm.Name); err == nil && sa.State == "unprotected" && sa.Alarm != "" {
			alarmSeen = true
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !alarmSeen {
		sa, _ := l.vmStatus(ctx, ca, vm.Name)
		t.Fatalf("a did not report the VM unprotected with an alarm: %+v", sa)
	}
	if !staleSeen {
		t.Error("b did not mark its replica stale while a ran on unprotected")
	}
	if tick, _ := LastTick(vm.Console); tick < tickBefore+30 {
		t.Fatalf("guest on a stalled while unprotected: tick %d → %d", tickBefore, tick)
	}
	evs, _ := ca.Events(ctx, 0)
	alarmEvent := false
	for _, e := range evs {
		alarmEvent = alarmEvent || e.Kind == "alarm"
	}
	if !alarmEvent {
		t.Error("no alarm event on a")
	}
	if err := l.SetLink(ctx, HostA, ReplLink, true); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		sa, _ := l.vmStatus(ctx, ca, vm.Name)
		if sa.State == "protected" && time.Since(sa.LastCommit) < time.Second {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("protection did not resume after the link returned: %+v", sa)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if sb, err := l.vmStatus(ctx, cb, vm.Name); err != nil || sb.State != "ready" {
		t.Fatalf("b after the link returned: %+v %v", sb, err)
	}
	// The resynchronisation started from what b's replica held: only the
	// pages the guest changed since travelled again.
	again, _ := l.vmStatus(ctx, ca, vm.Name)
	t.Logf("initial sync %d pages; resync after the cut %d pages (%.3f of it; the guest has %d)",
		first.SyncSent, again.SyncSent, float64(again.SyncSent)/float64(first.SyncSent), vm.RAMMiB<<8)
	if first.SyncSent == 0 || again.SyncSent*2 > first.SyncSent {
		t.Errorf("the resync sent %d pages, the first sync %d: not incremental", again.SyncSent, first.SyncSent)
	}
}

// TestIntegrationFTPlannedFailover: axctl failover moves a protected guest
// to its partner: final checkpoint with the guest paused, handover, the
// partner resumes it exactly there, the old copy ends.
func TestIntegrationFTPlannedFailover(t *testing.T) {
	l, vm, _, _ := ftLab(t, "itplan")
	ctx := context.Background()
	ca, cb := l.Client(HostA), l.Client(HostB)
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	t0 := time.Now()
	if err := ca.Failover(ctx, vm.Name); err != nil {
		t.Fatalf("failover: %v\nevents on a: %s\nevents on b: %s", err, l.eventsText(ctx, ca), l.eventsText(ctx, cb))
	}
	var sb api.VMStatus
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		sb, err = l.vmStatus(ctx, cb, vm.Name)
		if err == nil && (sb.Role == api.RoleLocal || sb.Role == api.RolePrimary) {
			break // b runs it (and may be protecting it again already)
		}
		if time.Now().After(deadline) {
			t.Fatalf("on b: %+v %v\nevents on b: %s", sb, err, l.eventsText(ctx, cb))
		}
	}
	t.Logf("planned failover: guest running on b %.2f s after the request", time.Since(t0).Seconds())
	// a may hold the replica b protects it back with already — never a
	// copy of its own.
	if sa, err := l.vmStatus(ctx, ca, vm.Name); err == nil && sa.Role != api.RoleSecondary {
		t.Errorf("a still runs the VM after handing it over: %+v", sa)
	}
	if err := waitGone(vm.PID, 5*time.Second); err != nil {
		t.Errorf("the old QEMU on a: %v", err)
	}
	// b protects it back towards a at once: on a loaded machine its
	// first checkpoints can hold the guest for seconds.
	var post []byte
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if post, _ = os.ReadFile(sb.Console); hasTickLine(post) {
			break
		}
	}
	pre, _ := os.ReadFile(vm.Console)
	if sb.ConsoleOffset < 0 || sb.ConsoleOffset > int64(len(pre)) {
		t.Fatalf("console offset %d of %d", sb.ConsoleOffset, len(pre))
	}
	if len(pre) != int(sb.ConsoleOffset) {
		t.Errorf("a's guest printed after its final checkpoint: %d bytes beyond offset %d", len(pre)-int(sb.ConsoleOffset), sb.ConsoleOffset)
	}
	at, first, err := TickContinuity(pre[:sb.ConsoleOffset], post)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("tick %d at the final checkpoint, %d first on b", at, first)
	if err := l.pingLedger(ctx, fmt.Sprintf("%s:%d", vm.IP, LedgerPort)); err != nil {
		t.Fatalf("ledger on b: %v", err)
	}
	// Declared FT, the VM is protected again in the other direction with
	// no command, and b says how long it ran unprotected.
	waitVM(t, l, cb, vm.Name, 120*time.Second, "FT protection b→a by itself", func(s api.VMStatus) bool {
		return s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == HostA && s.State == "protected"
	})
	t.Logf("protected again b→a %.2f s after the failover request", time.Since(t0).Seconds())
	if sa, err := l.vmStatus(ctx, ca, vm.Name); err != nil || sa.Role != api.RoleSecondary || sa.State != "ready" {
		t.Errorf("a after b protected vm1 again: %+v %v", sa, err)
	}
	// The gap's event follows the transition (after the store is written).
	var events string
	i := -1
	for deadline := time.Now().Add(5 * time.Second); i < 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		events = l.eventsText(ctx, cb)
		i = strings.Index(events, "declared level ft again, after ")
	}
	if i < 0 {
		t.Fatalf("b's events do not say how long vm1 ran unprotected:%s", events)
	}
	t.Logf("b: %s", strings.SplitN(events[i:], "\n", 2)[0])
}

// TestIntegrationFTPrimaryIsolated: host a stays alive but loses every link
// (partner and witness unreachable). It must pause its guest (fence) and b
// must take over only after that — never both running.
func TestIntegrationFTPrimaryIsolated(t *testing.T) {
	l, vm, _, _ := ftLab(t, "itiso")
	if err := l.protectAndWait(context.Background(), l.Client(HostA), vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	primaryIsolated(t, l, vm, HostA, HostB)
}

// primaryIsolated cuts every link of host from, vm's primary protected
// towards to, and checks from pauses the guest before to runs it. The
// guest must run on from as the lab started it (its QMP socket is asked).
func primaryIsolated(t *testing.T, l *Lab, vm *VM, from, to string) {
	t.Helper()
	ctx := context.Background()
	ca, cb := l.Client(from), l.Client(to)
	time.Sleep(2 * time.Second)
	if err := l.CutLinks(ctx, from); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	sa := waitVM(t, l, ca, vm.Name, 10*time.Second, from+" fences its guest", func(s api.VMStatus) bool { return s.State == "fenced" })
	fencedAt := time.Since(cut)
	// Fenced by axd (QMP stop: paused) or by the VM's guard (SIGSTOP: a
	// stopped process, whose monitor cannot answer).
	if _, state, err := procStat(vm.PID); err != nil || state != 'T' {
		mon, err := qemu.Dial(vm.QMP, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		st, err := mon.Status(ctx)
		mon.Close()
		if err != nil || st != "paused" {
			t.Fatalf("%s's guest after fencing: status %q %v (%+v)", from, st, err, sa)
		}
	}
	waitVM(t, l, cb, vm.Name, 20*time.Second, to+" takes over", func(s api.VMStatus) bool {
		return s.Role == api.RoleLocal && s.State == "running"
	})
	promotedAt := time.Since(cut)
	t.Logf("%s fenced %.2f s after its links were cut, %s running %.2f s after", from, fencedAt.Seconds(), to, promotedAt.Seconds())
	if promotedAt < fencedAt {
		t.Fatalf("%s ran the guest (%.2f s) before %s paused it (%.2f s)", to, promotedAt.Seconds(), from, fencedAt.Seconds())
	}
	if err := l.pingLedger(ctx, fmt.Sprintf("%s:%d", vm.IP, LedgerPort)); err != nil {
		t.Fatalf("ledger on %s: %v", to, err)
	}
}

// TestIntegrationFTAxdKilled: only axd dies on the primary (SIGKILL); its
// QEMU runs on. The VM's guard process stops that guest before the lease
// can end, and only then does b take over — never two guests running. axd
// started again on a finds its guest stopped and the lease b's: it kills
// that copy and forgets the VM.
func TestIntegrationFTAxdKilled(t *testing.T) {
	l, vm, _, cfg := ftLab(t, "itaxk")
	axdKilledTrial(t, l, vm, cfg, api.LevelFT)
}

// TestIntegrationHAAxdKilled: the same at HA, where b restarts the guest
// from its replicated disk — the guard stands between the two copies there
// too.
func TestIntegrationHAAxdKilled(t *testing.T) {
	l, vm, _, cfg := labWithGuest(t, "ithak", GuestConfig{Dirty: 1, DiskMiB: 64, DiskFormat: "raw"})
	axdKilledTrial(t, l, vm, cfg, api.LevelHA)
}

func axdKilledTrial(t *testing.T, l *Lab, vm *VM, cfg DaemonConfig, level string) {
	ctx := context.Background()
	ca := l.Client(HostA)
	if err := l.protectLevelAndWait(ctx, ca, vm.Name, HostB, level); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if err := syscall.Kill(axdPID(t, l, HostA), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Sampled every 10 ms: is a's QEMU stopped, does b run the guest (at
	// HA: has it started it)?
	tk, err := l.watchTakeover(ctx, vm.Name, vm.PID, HostB, time.Now(), 20*time.Second)
	t.Logf("axd on a killed at %s: its guest stopped after %.2f s, b starting it after %.2f s", level, tk.Stopped.Seconds(), tk.Running.Seconds())
	if err != nil {
		t.Fatal(err)
	}
	if _, st, err := procStat(vm.PID); err != nil || st != 'T' {
		t.Fatalf("a's QEMU state %c (%v) after b took over, want stopped", st, err)
	}
	ledger := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if err = l.pingLedger(ctx, ledger); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("ledger on b: %v", err)
	}

	if err := l.StartAxd(ctx, HostA, cfg); err != nil {
		t.Fatal(err)
	}
	if err := waitGone(vm.PID, 15*time.Second); err != nil {
		t.Fatalf("the old copy on a after axd came back: %v%s", err, l.eventsText(ctx, ca))
	}
	// a may hold vm1's replica again by now (b protects it again at its
	// declared level), never a copy of its own.
	if s, err := l.vmStatus(ctx, ca, vm.Name); err == nil && s.Role != api.RoleSecondary {
		t.Errorf("a still runs the VM b runs: %+v", s)
	}
	if !strings.Contains(l.eventsText(ctx, ca), "was taken over by "+HostB+" while axd was away") {
		t.Errorf("a's events say nothing of the copy it killed:%s", l.eventsText(ctx, ca))
	}
}

// TestIntegrationFTAxdKilledNoTakeover: axd dies on the primary while its
// partner's axd is down too, so no one can take the VM over. The guard
// stops the guest before the lease ends all the same; axd started again
// finds the lease still a's, resumes the guest, and protects it again once
// b is back.
func TestIntegrationFTAxdKilledNoTakeover(t *testing.T) {
	l, vm, _, cfg := ftLab(t, "itaxn")
	ctx := context.Background()
	ca := l.Client(HostA)
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	axdPID := func(h string) int {
		pid := 0
		for _, p := range l.state.Procs {
			if p.Name == "axd-"+h {
				pid = p.PID // the last one started
			}
		}
		if pid == 0 {
			t.Fatalf("no axd on %s in the lab's state", h)
		}
		return pid
	}
	if err := syscall.Kill(axdPID(HostB), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// a runs on unprotected (the witness answers it), then its axd dies.
	waitVM(t, l, ca, vm.Name, 10*time.Second, "a notices b is gone", func(s api.VMStatus) bool { return s.State == "unprotected" })
	if err := syscall.Kill(axdPID(HostA), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for {
		if _, st, err := procStat(vm.PID); err == nil && st == 'T' {
			break
		}
		if time.Since(killed) > 5*time.Second {
			t.Fatal("a's guard did not stop the guest within 5 s of axd's death")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("guest stopped %.2f s after axd died", time.Since(killed).Seconds())

	if err := l.StartAxd(ctx, HostA, cfg); err != nil {
		t.Fatal(err)
	}
	waitVM(t, l, ca, vm.Name, 10*time.Second, "a restores the VM", func(s api.VMStatus) bool { return s.Role == api.RolePrimary })
	if _, st, err := procStat(vm.PID); err != nil || st == 'T' || st == 'Z' {
		t.Fatalf("a's QEMU state %c (%v) after axd came back with the lease still a's, want running%s", st, err, l.eventsText(ctx, ca))
	}
	if !strings.Contains(l.eventsText(ctx, ca), "no one took it over") {
		t.Errorf("a's events do not say why the guest resumed:%s", l.eventsText(ctx, ca))
	}
	if err := l.StartAxd(ctx, HostB, cfg); err != nil {
		t.Fatal(err)
	}
	waitVM(t, l, ca, vm.Name, 90*time.Second, "protected again at FT", func(s api.VMStatus) bool {
		return s.Level == api.LevelFT && s.State == "protected" && s.Committed > 0
	})
	if err := l.pingLedger(ctx, fmt.Sprintf("%s:%d", vm.IP, LedgerPort)); err != nil {
		t.Fatalf("ledger on a: %v", err)
	}
}
