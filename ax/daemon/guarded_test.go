package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/guard"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/ax/witness"
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

// A restarted axd whose witness does not answer at first keeps asking:
// once it answers that the partner took the VM over, the stopped copy is
// killed — not left to the operator for want of one answer.
func TestResumeGuardedWitnessLate(t *testing.T) {
	psk := []byte("0123456789abcdef0123456789abcdef")
	w, err := witness.NewServer(witness.ServerConfig{PSK: psk, LeaseTTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var serving sync.WaitGroup
	t.Cleanup(func() { cancel(); serving.Wait() })
	serve := func(ln net.Listener) { serving.Go(func() { w.Serve(ctx, ln) }) }
	// b takes the lease over through a listener of its own...
	early, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serve(early)
	cb, err := witness.NewClient(witness.ClientConfig{Addr: early.Addr().String(), PSK: psk, Holder: "b"})
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		// The witness's grace after its start (one TTL) refuses takeovers.
		if err = cb.Takeover(ctx, "vm1"); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	// ...while the address a's axd knows answers only later.
	addr := freePort(t)
	p := runPair(t, func(_ string, c *Config) { c.Witness, c.LeaseTTL = addr, 2*time.Second })
	pid := stoppedGuest(t)
	spec := goodSpec()
	spec.PID = pid
	r := vm.Record{Version: vm.RecordVersion, VM: "vm1", Role: api.RolePrimary, Level: api.LevelFT, Peer: "b", Spec: &spec}
	if err := p.a.store.Save(r); err != nil {
		t.Fatal(err)
	}
	decided := make(chan bool, 1)
	go func() { decided <- p.a.resumeGuarded(r) }()
	time.Sleep(1500 * time.Millisecond)
	if !alive(pid) {
		t.Fatal("the copy was killed before the witness answered")
	}
	asking := 0
	for _, e := range events(p.a, "alarm") {
		if strings.Contains(e, "vm1") && strings.Contains(e, "asking again") {
			asking++
		}
	}
	if asking != 1 {
		t.Fatalf("alarm events while the witness is silent: %q, want one saying it asks again", events(p.a, "alarm"))
	}
	late, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	serve(late)
	select {
	case resumed := <-decided:
		if resumed {
			t.Fatal("resumed a copy the partner took over")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no decision 30 s after the witness came back")
	}
	for deadline := time.Now().Add(5 * time.Second); alive(pid) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if alive(pid) {
		t.Fatal("the old copy still exists once the witness said b took the VM over")
	}
	if ev := events(p.a, "forget"); len(ev) == 0 || !strings.Contains(ev[len(ev)-1], "taken over by b") {
		t.Errorf("forget events %q", ev)
	}
}

// guardOf is the pid of the guard process of guest pid (0: none runs).
func guardOf(guestPID int) int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "--guard-pid" && args[i+1] == strconv.Itoa(guestPID) {
				pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
				if alive(pid) {
					return pid
				}
			}
		}
	}
	return 0
}

// A guard that stopped the guest and ended — axd renewed its lease too
// late, a stalled host — is not the end of the VM: once the witness has
// renewed this host's lease since, no one took the VM over, so the guest
// goes on and a guard runs again (before, the guest stayed stopped for
// good, its QEMU answering nothing, while axd said unprotected).
func TestGuardGoneGuestContinued(t *testing.T) {
	p := runPair(t, withWitness(t, 2*time.Second), func(h string, c *Config) {
		if h == "a" {
			c.GuardExe = os.Args[0]
		}
	})
	spec := p.vm1Spec(t)
	// The guest: this binary mapping the RAM file as QEMU would.
	guest := exec.Command(os.Args[0])
	guest.Env = append(os.Environ(), guestEnv+"="+spec.Guest.RAMFile)
	if err := guest.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { guest.Wait(); close(exited) }()
	t.Cleanup(func() { guest.Process.Kill(); <-exited })
	gpid := guest.Process.Pid
	until(t, "the guest to map its RAM", func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/maps", gpid))
		return strings.Contains(string(b), spec.Guest.RAMFile)
	}, func() string { return "" })
	t.Setenv(guardEnv, "1") // guards axd starts from now are this binary
	spec.PID = gpid
	if err := p.a.define(spec); err != nil {
		t.Fatal(err)
	}
	p.protectFT(t)
	var first int
	until(t, "a guard for the guest", func() bool { first = guardOf(gpid); return first != 0 }, both(p))
	// What a stalled axd leaves: the guard stopped the guest and ended.
	if err := guard.Stop(gpid); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var again int
	until(t, "the guest continued and a new guard", func() bool {
		stopped, _ := guard.Stopped(gpid)
		again = guardOf(gpid)
		return !stopped && again != 0 && again != first
	}, both(p))
	found := false
	for _, e := range events(p.a, "restore") {
		found = found || strings.Contains(e, "guest continued, guard started again")
	}
	if !found {
		t.Errorf("no event says the guest was continued: %q", events(p.a, "restore"))
	}
	p.waitFT(t) // checkpoints go on
}
