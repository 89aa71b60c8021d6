package daemon

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/guard"
	"github.com/axproject/ax/ax/vm"
)

// stoppedGuest starts a process standing for a guest's QEMU and stops it
// as its guard would (SIGSTOP); the test's end kills it.
func stoppedGuest(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	if err := guard.Stop(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

// alive reports whether pid still exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && i+2 < len(s) && s[i+2] != 'Z'
}

// An axd started again finds its guest stopped by the guard and decides
// by who last held the VM's lease: this host → the guest resumes; the
// partner → this copy is killed and the VM forgotten; the witness cannot
// say → the guest stays stopped, with an alarm.
func TestResumeGuarded(t *testing.T) {
	p := runPair(t, withWitness(t, 2*time.Second))
	ctx := context.Background()
	rec := func(pid int) vm.Record {
		spec := goodSpec()
		spec.PID = pid
		return vm.Record{Version: vm.RecordVersion, VM: "vm1", Role: api.RolePrimary, Level: api.LevelFT, Peer: "b", Spec: &spec}
	}

	t.Run("lease still this host's: resumed", func(t *testing.T) {
		pid := stoppedGuest(t)
		if _, err := p.a.wit.Renew(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
		if !p.a.resumeGuarded(rec(pid)) {
			t.Fatalf("not resumed: %q", events(p.a, "alarm"))
		}
		if stopped, err := guard.Stopped(pid); err != nil || stopped {
			t.Fatalf("guest still stopped (%v) after resume", err)
		}
	})

	t.Run("the partner took it over: killed, forgotten", func(t *testing.T) {
		pid := stoppedGuest(t)
		r := rec(pid)
		if err := p.a.store.Save(r); err != nil {
			t.Fatal(err)
		}
		if err := p.a.wit.Release(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
		if err := p.b.wit.Takeover(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
		if p.a.resumeGuarded(r) {
			t.Fatal("resumed a copy the partner took over")
		}
		for deadline := time.Now().Add(5 * time.Second); alive(pid) && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		if alive(pid) {
			t.Fatal("the old copy still exists")
		}
		if recs, _ := p.a.store.Load(); len(recs) != 0 {
			t.Errorf("the VM's record stays: %+v", recs)
		}
		if ev := events(p.a, "forget"); len(ev) == 0 || !strings.Contains(ev[len(ev)-1], "taken over by b") {
			t.Errorf("forget events %q", ev)
		}
	})

	t.Run("no witness answer: left stopped, alarm", func(t *testing.T) {
		d, _ := fakeHost(t, plenty) // no witness configured
		pid := stoppedGuest(t)
		if d.resumeGuarded(rec(pid)) {
			t.Fatal("resumed without the witness's word")
		}
		if stopped, err := guard.Stopped(pid); err != nil || !stopped {
			t.Fatalf("guest not left stopped (%v)", err)
		}
		if ev := events(d, "alarm"); len(ev) != 1 || !strings.Contains(ev[0], "left stopped") {
			t.Errorf("alarm events %q", ev)
		}
	})
}
