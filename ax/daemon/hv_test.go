package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/hvtest"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/monitor/agent"
	"github.com/axproject/ax/replication"
)

// fakeHost is host "b" of a pair with "a", its hypervisor the recording
// fake: no root, no QEMU.
func fakeHost(t *testing.T, capacity reserve.Capacity) (*Daemon, *hvtest.Fake) {
	t.Helper()
	dir := t.TempDir()
	fake := hvtest.New()
	d, err := New(Config{Host: "b", StateDir: filepath.Join(dir, "state"), PSK: []byte("0123456789abcdef0123456789abcdef"),
		Peers:     map[string]Peer{"a": {Repl: "127.0.0.1:1", Mgmt: "127.0.0.1:1"}},
		ImageDirs: []string{"/var/cache/ax/lab"}, Bridges: []string{"br-pub"}, Hypervisor: fake})
	if err != nil {
		t.Fatal(err)
	}
	if d.book, err = reserve.OpenBook(filepath.Join(dir, "reservations.json"), capacity, nil); err != nil {
		t.Fatal(err)
	}
	// What Run would do: goroutines d starts end with this context.
	ctx, cancel := context.WithCancel(context.Background())
	d.ctx = ctx
	t.Cleanup(func() {
		cancel()
		stopped := make(chan struct{})
		go func() { d.wg.Wait(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(stopWithin):
			t.Errorf("host b's goroutines did not end within %v of its context ending:\n%s", stopWithin, allStacks())
		}
	})
	return d, fake
}

var plenty = reserve.Capacity{VCPUs: 8, MemoryBytes: 8 << 30, DiskBytes: 8 << 30}

// events returns the texts of d's events of kind.
func events(d *Daemon, kind string) []string {
	var out []string
	for _, e := range d.eventsSince(0) {
		if e.Kind == kind {
			out = append(out, e.Text)
		}
	}
	return out
}

func sameCalls(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s: the hypervisor was asked\n  %q\nwant\n  %q", what, got, want)
	}
}

// protectedPrimary registers vm1 here as a primary whose protection ctx is
// returned.
func protectedPrimary(d *Daemon) (*vmState, context.Context) {
	v := newVM("vm1", vm.Protected)
	v.level, v.peer = api.LevelFT, "a"
	v.spec = api.VMSpec{Name: "vm1", Guest: api.Guest{Name: "vm1", QEMU: api.QEMU{QMP: "/run/ax/vm1.qmp"}}}
	v.finish = make(chan chan finishResult)
	// No stream runs (it ends at once); the guard waits for the end.
	ctxs := make(chan context.Context, 1)
	v.prot = startProtection(d.ctx, &d.wg, func(ctx context.Context) { ctxs <- ctx },
		func(ctx context.Context, _, _ <-chan struct{}) { <-ctx.Done() })
	d.vms["vm1"] = v
	return v, <-ctxs
}

func TestFence(t *testing.T) {
	verified := []string{"vm1 dial", "vm1 stop", "vm1 status", "vm1 close"}
	cases := []struct {
		name  string
		setup func(*hvtest.Fake)
		calls []string
		why   string // what the alarm says when the fence failed
	}{
		{"paused and verified", func(*hvtest.Fake) {}, verified, ""},
		{"QMP unreachable", func(f *hvtest.Fake) { f.Fail(hvtest.OpDial, errors.New("connection refused")) },
			[]string{"vm1 dial"}, "connection refused"},
		{"stop refused", func(f *hvtest.Fake) { f.Fail(hvtest.OpStop, errors.New("qmp stop: timeout")) },
			[]string{"vm1 dial", "vm1 stop", "vm1 close"}, "stop"},
		{"still running after stop", func(f *hvtest.Fake) { f.SetStatus("vm1", "running") }, verified, `"running" after stop`},
		{"status unknown", func(f *hvtest.Fake) { f.Fail(hvtest.OpStatus, errors.New("qmp query-status: EOF")) }, verified, "query-status"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, fake := fakeHost(t, plenty)
			v, protection := protectedPrimary(d)
			c.setup(fake)
			ok := d.fence(v, "neither the partner nor the witness can be reached")
			sameCalls(t, "fence", fake.Calls(), c.calls)
			if protection.Err() == nil {
				t.Error("protection still runs after a fence")
			}
			st := v.status()
			if c.why == "" {
				if !ok || st.State != "fenced" || len(events(d, "fenced")) != 1 || len(events(d, "alarm")) != 0 {
					t.Fatalf("fence: ok %v, state %q, events %+v", ok, st.State, d.eventsSince(0))
				}
				return
			}
			// A fence that did not happen is never reported as done.
			if ok || st.State == "fenced" || len(events(d, "fenced")) != 0 {
				t.Fatalf("failed fence reported done: ok %v, state %q, events %+v", ok, st.State, d.eventsSince(0))
			}
			if st.State != vm.Fencing.String() || !strings.Contains(st.Alarm, "fence failed") || !strings.Contains(st.Alarm, c.why) {
				t.Errorf("state %q alarm %q, want fencing with an alarm saying %q", st.State, st.Alarm, c.why)
			}
			alarms := events(d, "alarm")
			if len(alarms) != 1 || !strings.HasPrefix(alarms[0], "fence failed: ") {
				t.Errorf("alarm events %q", alarms)
			}
			// Tried again on the next tick: the same failure is not
			// announced again.
			if d.fence(v, "neither the partner nor the witness can be reached") {
				t.Fatal("second attempt succeeded with the fault still there")
			}
			if n := len(events(d, "alarm")); n != 1 {
				t.Errorf("%d alarm events after a repeated failure, want 1", n)
			}
			// The fault goes: the retry pauses the guest and says so.
			fake.Fail(hvtest.OpDial, nil)
			fake.Fail(hvtest.OpStop, nil)
			fake.Fail(hvtest.OpStatus, nil)
			fake.SetStatus("vm1", "")
			fake.Reset()
			if !d.fence(v, "neither the partner nor the witness can be reached") {
				t.Fatal("retry without the fault did not fence")
			}
			sameCalls(t, "retry", fake.Calls(), verified)
			if st := v.status(); st.State != "fenced" || fake.State("vm1") != "paused" || len(events(d, "fenced")) != 1 {
				t.Errorf("after the retry: state %q, guest %q, events %+v", st.State, fake.State("vm1"), d.eventsSince(0))
			}
		})
	}
}

// committedReplica opens vm1's replica on d with one committed checkpoint
// whose device state is dev.
func committedReplica(t *testing.T, d *Daemon, ramSize int64, dev []byte) *replication.Replica {
	t.Helper()
	dir, err := names.Join(filepath.Join(d.cfg.StateDir, "replicas"), "vm", "vm1")
	if err != nil {
		t.Fatal(err)
	}
	rep, err := replication.OpenReplica(dir, ramSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	if dev == nil {
		return rep
	}
	if err := rep.BeginSync(); err != nil {
		t.Fatal(err)
	}
	if err := rep.FinishSync(replication.SyncDone{RAMSize: uint64(ramSize)}); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	page := replication.Page{PFN: 1, Data: bytes.Repeat([]byte{7}, replication.PageSize)}
	if err := replication.NewWriter(&buf, 0).WriteCheckpoint(1, []replication.Page{page}, dev); err != nil {
		t.Fatal(err)
	}
	r := replication.NewReader(&buf, 0)
	a := rep.NewAssembler(0)
	for {
		f, err := r.ReadFrame()
		if err == io.EOF {
			t.Fatal("no checkpoint assembled")
		}
		if err != nil {
			t.Fatal(err)
		}
		cp, err := a.Add(f)
		if err != nil {
			t.Fatal(err)
		}
		if cp != nil {
			if err := rep.Apply(cp); err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	if !rep.Usable() {
		t.Fatal("replica not usable after its checkpoint")
	}
	return rep
}

// replicaHere registers vm1 as a secondary holding rep, promised here.
func replicaHere(t *testing.T, d *Daemon, rep *replication.Replica, level string) *vmState {
	t.Helper()
	spec := goodSpec()
	spec.Guest.RAMMiB, spec.Guest.Disks = 1, nil
	spec, err := d.adoptSpec("vm1", "a", streamSpec{Primary: "a", Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	// Promoting: checkSecondary has decided, promote runs.
	v := newVM("vm1", vm.Promoting)
	v.level, v.peer, v.spec, v.replica, v.haReady = level, "a", spec, rep, true
	d.vms["vm1"] = v
	if err := d.book.Promise("vm1", reserve.Capacity{VCPUs: 1, MemoryBytes: 1 << 20}, false); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestPromote(t *testing.T) {
	const ram = 1 << 20
	dev := []byte("device state of epoch 1")
	cases := []struct {
		name     string
		level    string
		dev      []byte // nil: no committed checkpoint
		calls    []string
		incoming bool
		how      string
	}{
		{"FT resumes the committed checkpoint", api.LevelFT, dev,
			[]string{"vm1 plug " + replicaTap("vm1") + " br-pub", "vm1 start", "vm1 dial", "vm1 load", "vm1 cont", "vm1 announce", "vm1 close"},
			true, "resumed vm1 from epoch 1"},
		{"HA boots from the disks", api.LevelHA, nil,
			[]string{"vm1 plug " + replicaTap("vm1") + " br-pub", "vm1 start", "vm1 dial", "vm1 close"},
			false, "restarted vm1 from its replicated disks (HA)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, fake := fakeHost(t, plenty)
			rep := committedReplica(t, d, ram, c.dev)
			v := replicaHere(t, d, rep, c.level)
			if err := d.promote(context.Background(), v); err != nil {
				t.Fatal(err)
			}
			sameCalls(t, "promote", fake.Calls(), c.calls)
			g, ok := fake.Started("vm1")
			dir := filepath.Join(d.cfg.StateDir, "vms", "vm1")
			if !ok || g.Incoming != c.incoming || g.QMP != filepath.Join(dir, "qmp.sock") || g.Tap != replicaTap("vm1") {
				t.Errorf("started %+v", g)
			}
			if c.incoming {
				if g.RAMFile != rep.RAMPath() {
					t.Errorf("resumed over %s, want the replica's RAM %s", g.RAMFile, rep.RAMPath())
				}
				if got := fake.Loaded("vm1"); !bytes.Equal(got, c.dev) {
					t.Errorf("device state loaded %q, want %q", got, c.dev)
				}
			} else if g.RAMFile == rep.RAMPath() || fake.Loaded("vm1") != nil {
				t.Errorf("a fresh boot used the replica's memory or device state: %+v", g)
			}
			if fake.State("vm1") != "running" {
				t.Errorf("guest %q, want running", fake.State("vm1"))
			}
			st := v.status()
			if st.Role != api.RoleLocal || st.State != "running" || st.Level != api.LevelNone {
				t.Errorf("after promotion: %+v", st)
			}
			v.set(func(v *vmState) {
				if v.spec.PID == 0 || v.replica != nil || v.st != vm.Running {
					t.Errorf("registered as %+v", v.spec)
				}
			})
			if _, promised := d.book.Promises()["vm1"]; promised {
				t.Error("the promise was not released: the VM runs here now")
			}
			if ev := events(d, "promoted"); len(ev) != 1 || !strings.Contains(ev[0], c.how) {
				t.Errorf("promoted events %q, want %q", ev, c.how)
			}
		})
	}
}

func TestPromoteFailsAfterLaunch(t *testing.T) {
	const ram = 1 << 20
	d, fake := fakeHost(t, plenty)
	rep := committedReplica(t, d, ram, []byte("dev"))
	v := replicaHere(t, d, rep, api.LevelFT)
	dir := filepath.Join(d.cfg.StateDir, "vms", "vm1")
	failed := dir + ".failed"
	cases := []struct {
		name  string
		op    hvtest.Op
		calls []string
	}{
		{"device state not loaded", hvtest.OpLoad, []string{"vm1 start", "vm1 dial", "vm1 load", "vm1 close", "vm1 kill"}},
		{"guest not resumed", hvtest.OpCont, []string{"vm1 start", "vm1 dial", "vm1 load", "vm1 cont", "vm1 close", "vm1 kill"}},
		{"QMP never answers", hvtest.OpDial, nil},
	}
	defer func(w time.Duration) { startedQMPWait = w }(startedQMPWait)
	startedQMPWait = 0 // one try
	for i, c := range cases {
		fake.Reset()
		fake.Fail(c.op, errors.New("injected"))
		err := d.promote(context.Background(), v)
		fake.Fail(c.op, nil)
		if err == nil || !strings.Contains(err.Error(), "injected") {
			t.Fatalf("%s: promote: %v", c.name, err)
		}
		calls := fake.Calls()[1:] // after the tap
		if c.calls != nil {
			sameCalls(t, c.name, calls, c.calls)
		} else if calls[len(calls)-1] != "vm1 kill" {
			t.Errorf("%s: the QEMU was not killed: %q", c.name, calls)
		}
		if fake.State("vm1") != "killed" {
			t.Errorf("%s: QEMU left %q", c.name, fake.State("vm1"))
		}
		// The attempt's files are kept aside, only the last attempt's.
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("%s: the failed attempt's directory is still in the way: %v", c.name, err)
		}
		if _, err := os.Stat(filepath.Join(failed, "devstate")); err != nil {
			t.Errorf("%s: the failed attempt's files were not kept: %v", c.name, err)
		}
		if i > 0 {
			if _, err := os.Stat(filepath.Join(failed, "older")); !os.IsNotExist(err) {
				t.Errorf("%s: an older failed attempt was kept: %v", c.name, err)
			}
		}
		os.WriteFile(filepath.Join(failed, "older"), nil, 0o600)
		if st := v.status(); st.Role != api.RoleSecondary {
			t.Errorf("%s: a failed promotion changed the role: %+v", c.name, st)
		}
	}
	// The replica is intact: the next attempt resumes the VM.
	fake.Reset()
	if err := d.promote(context.Background(), v); err != nil {
		t.Fatalf("promotion after failures: %v", err)
	}
	if fake.State("vm1") != "running" || v.role() != api.RoleLocal {
		t.Errorf("after the retry: guest %q, role %q", fake.State("vm1"), v.role())
	}
}

func TestPromoteKillFails(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	v := replicaHere(t, d, committedReplica(t, d, 1<<20, []byte("dev")), api.LevelFT)
	fake.Fail(hvtest.OpCont, errors.New("injected"))
	fake.Fail(hvtest.OpKill, errors.New("still there"))
	err := d.promote(context.Background(), v)
	if err == nil || !strings.Contains(err.Error(), "could not be stopped") || !strings.Contains(err.Error(), "injected") {
		t.Errorf("promote: %v", err)
	}
}

func TestPromoteFailsBeforeLaunch(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	v := replicaHere(t, d, committedReplica(t, d, 1<<20, []byte("dev")), api.LevelFT)
	for _, op := range []hvtest.Op{hvtest.OpPlug, hvtest.OpStart} {
		fake.Reset()
		fake.Fail(op, errors.New("injected"))
		if err := d.promote(context.Background(), v); err == nil || !strings.Contains(err.Error(), "injected") {
			t.Errorf("%s failing: promote: %v", op, err)
		}
		fake.Fail(op, nil)
		if slices.Contains(fake.Calls(), "vm1 kill") || slices.Contains(fake.Calls(), "vm1 dial") {
			t.Errorf("%s failing: %q", op, fake.Calls())
		}
	}
}

// The documented answer to a capacity refusal is the same protect with
// --force: it must succeed, with nothing left of the refused attempt.
func TestOpenReplicaForceAfterRefusal(t *testing.T) {
	d, _ := fakeHost(t, reserve.Capacity{VCPUs: 4, MemoryBytes: 1 << 20, DiskBytes: 1 << 30})
	spec := goodSpec()
	spec.Guest.RAMMiB = 4 // more than this host has
	payload := func(force bool) []byte {
		b, err := json.Marshal(streamSpec{Primary: "a", Spec: spec, DiskSizes: []int64{1 << 20}, Force: force})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	_, err := d.openReplica("vm1", "a", payload(false), nil)
	if !errors.Is(err, reserve.ErrOverCommitted) {
		t.Fatalf("over capacity: %v", err)
	}
	if _, ok := d.vms["vm1"]; ok {
		t.Fatal("a refused replica stays registered")
	}
	if _, ok := d.book.Promises()["vm1"]; ok {
		t.Fatal("a refused replica stays promised")
	}
	rep, err := d.openReplica("vm1", "a", payload(true), nil)
	if err != nil {
		t.Fatalf("--force after a refusal: %v", err)
	}
	v := d.vms["vm1"]
	closeAtEnd(t, v, rep)
	if st := v.status(); st.Role != api.RoleSecondary || st.State != "syncing" {
		t.Errorf("registered as %+v", st)
	}
	if p, ok := d.book.Promises()["vm1"]; !ok || !p.Forced {
		t.Errorf("promise %+v %v, want a forced one", p, ok)
	}
}

func TestPlannedFailover(t *testing.T) {
	cases := []struct {
		name    string
		finish  finishResult
		fail    hvtest.Op
		calls   []string
		err     string // "" the VM moved
		running bool   // the guest runs here afterwards
	}{
		{"handed over", finishResult{epoch: 7}, "", []string{"vm1 dial", "vm1 quit", "vm1 close"}, "", false},
		{"final checkpoint failed: resumed here", finishResult{err: errors.New("partner lost")}, "",
			[]string{"vm1 dial", "vm1 cont", "vm1 close"}, "the guest runs on here", true},
		{"final checkpoint failed and resume failed", finishResult{err: errors.New("partner lost")}, hvtest.OpCont,
			[]string{"vm1 dial", "vm1 cont", "vm1 close"}, "could not be resumed", false},
		{"final checkpoint failed, QMP unreachable", finishResult{err: errors.New("partner lost")}, hvtest.OpDial,
			[]string{"vm1 dial"}, "could not be resumed", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, fake := fakeHost(t, plenty)
			v, protection := protectedPrimary(d)
			if c.fail != "" {
				fake.Fail(c.fail, errors.New("injected"))
			}
			// The FT loop's part: take the final checkpoint, leave the guest paused.
			loop := make(chan struct{})
			go func() {
				defer close(loop)
				reply := <-v.finish
				if mon, err := fake.Domain(v.spec.Guest).Control(context.Background()); err == nil {
					mon.Stop(context.Background())
					mon.Close()
				}
				fake.Reset()
				reply <- c.finish
			}()
			err := d.plannedFailover(context.Background(), "vm1")
			<-loop
			sameCalls(t, "failover", fake.Calls(), c.calls)
			if c.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				if _, ok := d.vms["vm1"]; ok || protection.Err() == nil || fake.State("vm1") != "quit" {
					t.Errorf("after handing over: registered %v, protection %v, guest %q", ok, protection.Err(), fake.State("vm1"))
				}
				if ev := events(d, "moved"); len(ev) != 1 {
					t.Errorf("moved events %q", ev)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), "partner lost") {
				t.Fatalf("failover: %v, want it to say %q", err, c.err)
			}
			if _, ok := d.vms["vm1"]; !ok {
				t.Error("the VM was unregistered although it did not move")
			}
			if got := fake.State("vm1") == "running"; got != c.running {
				t.Errorf("guest %q", fake.State("vm1"))
			}
		})
	}
}

func TestAgentRestartVM(t *testing.T) {
	for _, c := range []struct {
		name  string
		fail  hvtest.Op
		calls []string
		event string
	}{
		{"reset", "", []string{"vm1 dial", "vm1 reset", "vm1 close"}, "restarted the VM"},
		{"QMP unreachable", hvtest.OpDial, []string{"vm1 dial"}, "restart-vm for web failed"},
		{"reset refused", hvtest.OpReset, []string{"vm1 dial", "vm1 reset", "vm1 close"}, "restart-vm for web failed"},
	} {
		d, fake := fakeHost(t, plenty)
		d.ctx = context.Background()
		v := newVM("vm1", vm.Running)
		v.spec = api.VMSpec{Name: "vm1", Guest: api.Guest{Name: "vm1", QEMU: api.QEMU{QMP: "/q"}}}
		d.vms["vm1"] = v
		if c.fail != "" {
			fake.Fail(c.fail, errors.New("injected"))
		}
		d.agentAction(agent.Action{VM: "vm1", Kind: agent.RestartVM, Check: "web", Reason: "web failed 3 checks"})
		sameCalls(t, c.name, fake.Calls(), c.calls)
		if ev := events(d, "app-action"); len(ev) != 1 || !strings.Contains(ev[0], c.event) {
			t.Errorf("%s: events %q, want %q", c.name, ev, c.event)
		}
	}
}

// The protect path reaches QEMU through the hypervisor and lets go of it
// when the partner cannot be reached.
func TestProtectOnceClosesQMP(t *testing.T) {
	for _, c := range []struct {
		name  string
		fail  hvtest.Op
		calls []string
		want  string
	}{
		{"partner unreachable", "", []string{"vm1 dial", "vm1 close"}, "replication link to a"},
		{"QEMU unreachable", hvtest.OpDial, []string{"vm1 dial"}, "QEMU of vm1"},
	} {
		d, fake := fakeHost(t, plenty)
		v, _ := protectedPrimary(d)
		v.accepted = make(chan error, 1)
		if c.fail != "" {
			fake.Fail(c.fail, errors.New("injected"))
		}
		err := d.protectOnce(context.Background(), v)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
		if got := <-v.accepted; got == nil {
			t.Errorf("%s: protect was told the partner accepted", c.name)
		}
		sameCalls(t, c.name, fake.Calls(), c.calls)
	}
}

// Attempts to protect again are spaced out while they keep failing (no
// alarm storm, no busy host), and a level change asks for the next one at
// once.
func TestProtectRetriesBackOff(t *testing.T) {
	want := []time.Duration{0, 250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second,
		4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second}
	for fails, w := range want {
		if got := retryAfter(fails); got != w {
			t.Errorf("retryAfter(%d) = %s, want %s", fails, got, w)
		}
	}

	d, fake := fakeHost(t, plenty)
	fake.Fail(hvtest.OpDial, errors.New("injected"))
	v := newVM("vm1", vm.Unprotected)
	v.level, v.declared, v.peer = api.LevelFT, api.LevelFT, "a"
	v.spec = api.VMSpec{Name: "vm1", Guest: api.Guest{Name: "vm1", QEMU: api.QEMU{QMP: "/q"}}}
	v.levelCh, v.accepted, v.retry = make(chan levelReq), make(chan error, 1), make(chan struct{}, 1)
	d.vms["vm1"] = v
	ctx, cancel := context.WithCancel(d.ctx)
	done := make(chan struct{})
	go func() { defer close(done); d.runPrimary(ctx, v) }()
	defer func() { cancel(); <-done }()
	// Attempts at 0, 0.25, 0.75, 1.75 and 3.75 s: 4 by 3.5 s, where a
	// fixed 250 ms would have made 14.
	time.Sleep(3500 * time.Millisecond)
	n := len(fake.Calls())
	if n < 3 || n > 4 {
		t.Fatalf("%d attempts in 3.5 s, want 4 (3 on a loaded machine): %q", n, fake.Calls())
	}
	// The 5th attempt comes 2 s after the 4th (3.75 s), the 6th 4 s after
	// that (7.75 s). A level change while no stream runs applies after
	// 2 s (5.5 s) and asks for the next attempt at once: 6 by 6.5 s.
	if err := d.setLevel(context.Background(), "vm1", api.ProtectRequest{Level: api.LevelHA}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if got := len(fake.Calls()); got < n+2 {
		t.Errorf("no attempt right after the level change: %d attempts 3 s before it, %d 1 s after", n, got)
	}
	var lvl string
	v.set(func(v *vmState) { lvl = v.level })
	if lvl != api.LevelHA {
		t.Errorf("level %s after the change", lvl)
	}
}

// undefinedHere is a hypervisor on which no domain is defined (libvirt's
// Defined, as a partner with no definition of the VM answers).
type undefinedHere struct{ *hvtest.Fake }

func (undefinedHere) Defined(_ context.Context, name string) error {
	return fmt.Errorf("libvirt domain %s: Domain not found: define the domain on this host first", name)
}

func TestOpenReplicaNeedsTheDefinition(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	d.cfg.Hypervisor = undefinedHere{fake}
	b, err := json.Marshal(streamSpec{Primary: "a", Spec: goodSpec(), DiskSizes: []int64{1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.openReplica("vm1", "a", b, nil); err == nil || !strings.Contains(err.Error(), "define the domain on this host first") {
		t.Fatalf("a replica of a domain not defined here: %v", err)
	}
	if _, ok := d.vms["vm1"]; ok {
		t.Error("the refused replica is registered")
	}
	if _, ok := d.book.Promises()["vm1"]; ok {
		t.Error("the refused replica is promised")
	}
}

// definingHere is undefinedHere that defines a domain from a peer's
// definition (libvirt's DefineFromPeer), refusing one that says "hostile".
type definingHere struct {
	undefinedHere
	defined map[string]string // name → the definition it was defined from
	bridges []string          // what the last call was given
}

func (h *definingHere) Defined(ctx context.Context, name string) error {
	if _, ok := h.defined[name]; ok {
		return nil
	}
	return h.undefinedHere.Defined(ctx, name)
}

func (h *definingHere) DefineFromPeer(_ context.Context, name string, def []byte, bridges []string) (bool, error) {
	h.bridges = bridges
	if strings.Contains(string(def), "hostile") {
		return false, fmt.Errorf("the primary's definition of %s is refused: it has <hostdev>", name)
	}
	h.defined[name] = string(def)
	return true, nil
}

// With --define-replicas a partner with no definition of the VM makes one
// from the primary's (checked by the driver), says so, and opens the
// replica; without the flag, or with a definition refused, the replica is
// refused as before, the refusal saying why.
func TestOpenReplicaDefinesFromPeer(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	h := &definingHere{undefinedHere: undefinedHere{fake}, defined: map[string]string{}}
	d.cfg.Hypervisor = h
	open := func(def string) error {
		b, err := json.Marshal(streamSpec{Primary: "a", Spec: goodSpec(), DiskSizes: []int64{1 << 20}, Definition: def})
		if err != nil {
			t.Fatal(err)
		}
		rep, err := d.openReplica("vm1", "a", b, nil)
		if err == nil {
			closeAtEnd(t, d.vms["vm1"], rep)
		}
		return err
	}
	if err := open("<domain>vm1</domain>"); err == nil || !strings.Contains(err.Error(), "define the domain on this host first") || len(h.defined) > 0 {
		t.Fatalf("without --define-replicas: %v (defined %v)", err, h.defined)
	}
	d.cfg.DefineReplicas = true
	d.cfg.Bridges = []string{"br-pub", "brq*"}
	if err := open("<domain>hostile</domain>"); err == nil || !strings.Contains(err.Error(), "define the domain on this host first") || !strings.Contains(err.Error(), "<hostdev>") {
		t.Fatalf("a definition refused: %v", err)
	}
	if _, ok := d.vms["vm1"]; ok {
		t.Fatal("a replica refused for its definition is registered")
	}
	if err := open(""); err == nil || !strings.Contains(err.Error(), "define the domain on this host first") {
		t.Fatalf("no definition sent: %v", err)
	}
	if err := open("<domain>vm1</domain>"); err != nil {
		t.Fatalf("with the primary's definition: %v", err)
	}
	if h.defined["vm1"] != "<domain>vm1</domain>" || !slices.Equal(h.bridges, d.cfg.Bridges) {
		t.Errorf("defined %v with bridges %v", h.defined, h.bridges)
	}
	if e := events(d, "define"); len(e) != 1 || !strings.Contains(e[0], "domain vm1 defined here from a's definition") {
		t.Errorf("events %q", e)
	}
}

// definedHere is a hypervisor on which every domain is defined, its NIC
// the tap named tap.
type definedHere struct {
	*hvtest.Fake
	tap string
	err error
}

func (definedHere) Defined(context.Context, string) error { return nil }

func (definedHere) BridgeReady(bridge string) error {
	if bridge != "br-pub" {
		return fmt.Errorf("bridge %s: Link not found: a failover could not plug the VM's tap here", bridge)
	}
	return nil
}

func (h definedHere) DefinedTap(context.Context, string) (string, error) { return h.tap, h.err }

// TestOpenReplicaTapFromTheDefinition: a replica of a domain defined here
// is plugged under the tap this host's definition names (the name its
// network agents know the port by), not the primary's; without one it
// gets the name derived from the VM's; a definition that cannot be read
// refuses the replica.
func TestOpenReplicaTapFromTheDefinition(t *testing.T) {
	for _, c := range []struct {
		tap, want string
		err       error
	}{
		{"tapb9408799-77", "tapb9408799-77", nil},
		{"", replicaTap("vm1"), nil},
		{"", "", errors.New("libvirt domain vm1: XML: broken")},
	} {
		d, fake := fakeHost(t, plenty)
		d.cfg.Hypervisor = definedHere{fake, c.tap, c.err}
		spec := goodSpec()
		spec.Guest.Tap, spec.Bridge = "tap-of-a", "br-pub"
		b, err := json.Marshal(streamSpec{Primary: "a", Spec: spec, DiskSizes: []int64{1 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		rep, err := d.openReplica("vm1", "a", b, nil)
		if c.err != nil {
			if err == nil || !strings.Contains(err.Error(), "broken") {
				t.Errorf("an unreadable definition: %v", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("definition's tap %q: %v", c.tap, err)
		}
		rep.Close()
		d.mu.Lock()
		got := d.vms["vm1"].spec.Guest.Tap
		d.mu.Unlock()
		if got != c.want {
			t.Errorf("definition's tap %q: the replica's tap is %q, want %q", c.tap, got, c.want)
		}
	}
}

// TestOpenReplicaNeedsTheBridge: a replica whose bridge is missing here is
// refused at protection, not at the failover that could not plug it.
func TestOpenReplicaNeedsTheBridge(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	d.cfg.Hypervisor = definedHere{Fake: fake, tap: "tap0"}
	d.cfg.Bridges = []string{"br-pub", "brq*"}
	spec := goodSpec()
	spec.Bridge = "brqa71967f9-9a"
	b, err := json.Marshal(streamSpec{Primary: "a", Spec: spec, DiskSizes: []int64{1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.openReplica("vm1", "a", b, nil); err == nil || !strings.Contains(err.Error(), "a failover could not plug") {
		t.Fatalf("a replica whose bridge is missing here: %v", err)
	}
	if _, ok := d.vms["vm1"]; ok {
		t.Error("the refused replica is registered")
	}
}

// TestPromoteRetriesWithDisks: a promotion that fails after the replica's
// disks were prepared and moved for the VM gives them back, and the next
// attempt starts the VM from them, as of the committed checkpoint.
func TestPromoteRetriesWithDisks(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	v := replicaHere(t, d, committedReplica(t, d, 1<<20, []byte("dev")), api.LevelFT)
	rd, err := openReplicaDisks(filepath.Join(d.cfg.StateDir, "replicas", "vm1", "disks"), []int64{4096})
	if err != nil {
		t.Fatal(err)
	}
	rd.SetLevel(replication.StreamLevelFT)
	rd.Write(1, replication.DiskWrite{Offset: 0, Data: []byte("committed")})
	if err := rd.Commit(1); err != nil {
		t.Fatal(err)
	}
	rd.Write(2, replication.DiskWrite{Offset: 0, Data: []byte("NOT COMMITTED")})
	v.set(func(v *vmState) {
		v.replicaDisks = rd
		v.spec.Guest.Disks = []api.Disk{{Node: "libvirt-1-format", Path: "/var/lib/nova/instances/u/disk", Format: "qcow2"}}
	})
	for _, op := range []hvtest.Op{hvtest.OpStart, hvtest.OpCont} {
		fake.Reset()
		fake.Fail(op, errors.New("injected"))
		if err := d.promote(context.Background(), v); err == nil || !strings.Contains(err.Error(), "injected") {
			t.Fatalf("%s failing: %v", op, err)
		}
		fake.Fail(op, nil)
		if _, err := os.Stat(replicaDiskPath(rd.dir, 0)); err != nil {
			t.Fatalf("%s failing: the disk is not back in the replica's directory: %v", op, err)
		}
	}
	fake.Reset()
	if err := d.promote(context.Background(), v); err != nil {
		t.Fatalf("the attempt after two failures: %v", err)
	}
	g, ok := fake.Started("vm1")
	if !ok || len(g.Disks) != 1 {
		t.Fatalf("started %+v", g)
	}
	data, err := os.ReadFile(g.Disks[0].Path)
	if err != nil || !bytes.HasPrefix(data, []byte("committed")) {
		t.Errorf("the VM's disk %s: %q, %v; want the committed epoch's", g.Disks[0].Path, data[:16], err)
	}
}

// A partner promises the vCPUs the guest runs with (one when the spec
// says none), and a spec asking more vCPUs than it has is refused for
// them; a count out of bounds is refused before anything.
func TestOpenReplicaPromisesVCPUs(t *testing.T) {
	d, _ := fakeHost(t, reserve.Capacity{VCPUs: 1, MemoryBytes: 1 << 30, DiskBytes: 1 << 30})
	open := func(vcpus int) (*replication.Replica, error) {
		spec := goodSpec()
		spec.Guest.VCPUs = vcpus
		b, err := json.Marshal(streamSpec{Primary: "a", Spec: spec, DiskSizes: []int64{1 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		return d.openReplica("vm1", "a", b, nil)
	}
	for _, n := range []int{-1, maxVCPUs + 1} {
		if _, err := open(n); err == nil || !strings.Contains(err.Error(), "vCPUs") {
			t.Errorf("%d vCPUs: %v; want a refusal saying so", n, err)
		}
	}
	// 5 vCPUs on a host of one may be promised 4 (DefaultVCPURatio).
	if _, err := open(5); !errors.Is(err, reserve.ErrOverCommitted) || !strings.Contains(err.Error(), "vcpus over capacity: 0 promised to other guests, 5 asked, 4 available") {
		t.Errorf("5 vCPUs on a host of 4: %v", err)
	}
	rep, err := open(3)
	if err != nil {
		t.Fatal(err)
	}
	v := d.vms["vm1"]
	closeAtEnd(t, v, rep)
	if p := d.book.Promises()["vm1"]; p.Need.VCPUs != 3 {
		t.Errorf("promised %+v, want 3 vCPUs", p.Need)
	}
}

// withDefinition is a hypervisor that gives a VM's definition.
type withDefinition struct {
	*hvtest.Fake
	def []byte
	err error
}

func (h withDefinition) Definition(context.Context, string) ([]byte, error) { return h.def, h.err }

// The primary sends its definition of the VM, when its driver has one to
// give and it is not bigger than a partner takes.
func TestDefinitionForPartner(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	if got := d.definition(context.Background(), "vm1"); got != "" {
		t.Errorf("a driver without definitions gave %q", got)
	}
	for _, c := range []struct {
		h    withDefinition
		want string
	}{
		{withDefinition{Fake: fake, def: []byte("<domain/>")}, "<domain/>"},
		{withDefinition{Fake: fake, def: make([]byte, libvirt.MaxPeerDefinition+1)}, ""},
		{withDefinition{Fake: fake, err: errors.New("libvirt down")}, ""},
	} {
		d.cfg.Hypervisor = c.h
		if got := d.definition(context.Background(), "vm1"); got != c.want {
			t.Errorf("%d bytes, %v: sent %d bytes, want %d", len(c.h.def), c.h.err, len(got), len(c.want))
		}
	}
}

// closeAtEnd closes replica rep of v, and its disks, at the test's end.
func closeAtEnd(t *testing.T, v *vmState, rep *replication.Replica) {
	t.Cleanup(func() {
		rep.Close()
		v.set(func(v *vmState) {
			if v.replicaDisks != nil {
				v.replicaDisks.Close()
			}
		})
	})
}
