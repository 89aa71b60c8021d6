package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/hvtest"
	"github.com/axproject/ax/ax/vm"
)

// freePort returns a loopback address no one listens on now, for TCP and UDP.
func freePort(t *testing.T) string {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		if u, err := net.ListenPacket("udp", addr); err == nil {
			u.Close()
			return addr
		}
	}
	t.Fatal("no free loopback port")
	return ""
}

// pair runs hosts a and b on loopback, each with its own recording fake
// hypervisor: real streams, heartbeats and replicas, no QEMU, no root.
type pair struct {
	a, b         *Daemon
	fakeA, fakeB *hvtest.Fake
	dir          string
	cfg          map[string]Config
	stop         map[string]func()
}

func runPair(t *testing.T, opts ...func(host string, c *Config)) *pair {
	t.Helper()
	for attempt := 1; ; attempt++ {
		p, err := tryPair(t, opts)
		if err == nil {
			return p
		}
		// freePort's ports are free when picked, not when bound: another
		// test process may take one in between.
		if !errors.Is(err, syscall.EADDRINUSE) || attempt == 3 {
			t.Fatal(err)
		}
		t.Logf("%v: again on other ports", err)
	}
}

func tryPair(t *testing.T, opts []func(host string, c *Config)) (*pair, error) {
	t.Helper()
	p := &pair{dir: t.TempDir(), fakeA: hvtest.New(), fakeB: hvtest.New(),
		cfg: map[string]Config{}, stop: map[string]func(){}}
	psk := []byte("0123456789abcdef0123456789abcdef")
	replA, mgmtA, replB, mgmtB := freePort(t), freePort(t), freePort(t), freePort(t)
	host := func(host string, repl, mgmt string, peer string, peerAddr Peer, fake *hvtest.Fake) Config {
		return Config{Host: host, Socket: filepath.Join(p.dir, host+".sock"), StateDir: filepath.Join(p.dir, host),
			ReplListen: repl, MgmtListen: mgmt, PSK: psk, Peers: map[string]Peer{peer: peerAddr},
			ImageDirs: []string{"/var/cache/ax/lab"}, Bridges: []string{"br-pub"}, Tracker: "hash", Hypervisor: fake}
	}
	p.cfg["a"] = host("a", replA, mgmtA, "b", Peer{Repl: replB, Mgmt: mgmtB}, p.fakeA)
	p.cfg["b"] = host("b", replB, mgmtB, "a", Peer{Repl: replA, Mgmt: mgmtA}, p.fakeB)
	for _, h := range []string{"a", "b"} {
		c := p.cfg[h]
		for _, o := range opts {
			o(h, &c)
		}
		p.cfg[h] = c
	}
	var err error
	if p.a, err = p.tryStart(t, "a"); err != nil {
		return nil, err
	}
	if p.b, err = p.tryStart(t, "b"); err != nil {
		p.stop["a"]()
		return nil, err
	}
	return p, nil
}

// start runs axd on host h (again, after stop: same state directory).
func (p *pair) start(t *testing.T, h string) *Daemon {
	t.Helper()
	d, err := p.tryStart(t, h)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// tryStart runs axd on host h; an error if it ended before it was ready.
func (p *pair) tryStart(t *testing.T, h string) (*Daemon, error) {
	t.Helper()
	d, err := New(p.cfg[h])
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() { done <- d.Run(ctx, func() { close(ready) }) }()
	stopped := false
	p.stop[h] = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("axd %s: %v", h, err)
			}
		case <-time.After(stopWithin):
			t.Errorf("axd %s did not stop within %v of its context ending; its goroutines:\n%s", h, stopWithin, allStacks())
		}
	}
	t.Cleanup(p.stop[h])
	select {
	case <-ready:
		return d, nil
	case err := <-done:
		stopped = true // Run has returned: nothing to stop, nor wait for
		cancel()
		return nil, fmt.Errorf("axd %s: %w", h, err)
	}
}

// stopWithin is how long a stopping axd may take in these tests: a hang
// fails the test with every goroutine's stack instead of the whole package
// timing out.
const stopWithin = time.Minute

// allStacks returns the stacks of all goroutines.
func allStacks() string {
	buf := make([]byte, 8<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// defineVM defines vm1 on a: 1 MiB of RAM in a file, no disks.
func (p *pair) defineVM(t *testing.T) {
	t.Helper()
	if err := p.a.define(p.vm1Spec(t)); err != nil {
		t.Fatal(err)
	}
}

// vm1Spec is vm1's spec on a: 1 MiB of RAM in a file of the pair's, no
// disks, hash tracking.
func (p *pair) vm1Spec(t *testing.T) api.VMSpec {
	t.Helper()
	spec := goodSpec()
	spec.Tracker = "hash"
	spec.Guest.RAMMiB, spec.Guest.Disks = 1, nil
	spec.Guest.RAMFile = filepath.Join(p.dir, "vm1.ram")
	if err := os.WriteFile(spec.Guest.RAMFile, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return spec
}

// status returns vm1's status on d (zero if d does not know it).
func vm1(d *Daemon) api.VMStatus {
	for _, s := range d.status().VMs {
		if s.Name == "vm1" {
			return s
		}
	}
	return api.VMStatus{}
}

// until waits for cond, failing with what was last seen after 30 s.
func until(t *testing.T, what string, cond func() bool, seen func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 30 s; last seen %s", what, seen())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func both(p *pair) func() string {
	return func() string {
		return fmt.Sprintf("a %+v\nb %+v\na's last events:\n%s\nb's last events:\n%s", vm1(p.a), vm1(p.b), lastEvents(p.a, 12), lastEvents(p.b, 12))
	}
}

// lastEvents returns d's last n events, one per line.
func lastEvents(d *Daemon, n int) string {
	evs := d.eventsSince(0)
	evs = evs[max(0, len(evs)-n):]
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "  %s %s %s: %s\n", e.Time.Format("15:04:05.000"), e.VM, e.Kind, e.Text)
	}
	return b.String()
}

// Protect, change level both ways and unprotect, against the fake: the
// states each host goes through, what the hypervisor was asked, what the
// store kept.
func TestProtectAndChangeLevel(t *testing.T) {
	p := runPair(t)
	p.defineVM(t)
	ctx := context.Background()
	store := func() []vm.Record {
		recs, err := p.a.store.Load()
		if err != nil {
			t.Fatal(err)
		}
		return recs
	}

	if err := p.a.protect("vm1", api.ProtectRequest{Level: api.LevelHA, Peer: "b"}); err != nil {
		t.Fatal(err)
	}
	until(t, "HA protection", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return a.State == "protected" && a.Level == api.LevelHA && b.Role == api.RoleSecondary && b.State == "ready"
	}, both(p))
	// The store is written just after the state changes (observe, outside
	// the VM's lock): status may show it first.
	until(t, "the store after protect", func() bool {
		recs := store()
		return len(recs) == 1 && recs[0].State == "protected" && recs[0].Role == api.RolePrimary && recs[0].Peer == "b"
	}, func() string { return fmt.Sprintf("%+v", store()) })
	if err := p.a.protect("vm1", api.ProtectRequest{Level: api.LevelFT, Peer: "b"}); err == nil || !strings.Contains(err.Error(), "already primary") {
		t.Errorf("protecting twice: %v", err)
	}

	// ha → ft: memory synchronised, checkpoints taken with the guest
	// paused and resumed by the hypervisor, committed on b.
	if err := p.a.setLevel(ctx, "vm1", api.ProtectRequest{Level: api.LevelFT}); err != nil {
		t.Fatal(err)
	}
	until(t, "FT protection", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return a.State == "protected" && a.Level == api.LevelFT && a.Committed >= 3 && b.State == "ready" && b.Level == api.LevelFT
	}, both(p))
	calls := strings.Join(p.fakeA.Calls(), ",")
	if !strings.Contains(calls, "vm1 stop,vm1 save,vm1 cont") {
		t.Errorf("checkpoints did not pause, save and resume the guest: %s", calls)
	}
	if p.fakeA.State("vm1") != "running" {
		t.Errorf("guest %q between checkpoints", p.fakeA.State("vm1"))
	}

	// ft → ha: checkpoints stop, the VM stays protected.
	if err := p.a.setLevel(ctx, "vm1", api.ProtectRequest{Level: api.LevelHA}); err != nil {
		t.Fatal(err)
	}
	until(t, "back at HA", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return a.State == "protected" && a.Level == api.LevelHA && a.Output == "not held" && b.Level == api.LevelHA
	}, both(p))
	p.fakeA.Reset()
	time.Sleep(200 * time.Millisecond) // four checkpoint intervals
	if calls := p.fakeA.Calls(); len(calls) != 0 {
		t.Errorf("the hypervisor is still driven at HA: %q", calls)
	}

	if err := p.a.setLevel(ctx, "vm1", api.ProtectRequest{Level: api.LevelNone}); err != nil {
		t.Fatal(err)
	}
	until(t, "unprotected", func() bool {
		return vm1(p.a).State == "running" && vm1(p.a).Role == api.RoleLocal && vm1(p.b).Name == ""
	}, both(p))
	if recs := store(); len(recs) != 1 || recs[0].State != "running" || recs[0].NextEpoch < 4 {
		t.Errorf("store after unprotect: %+v (the next epoch must be above those used)", recs)
	}
	kinds := map[string]int{}
	for _, e := range p.a.eventsSince(0) {
		kinds[e.Kind]++
	}
	if kinds["protect"] != 1 || kinds["protected"] != 2 || kinds["unprotect"] != 1 || kinds["level"] < 2 || kinds["alarm"] != 0 {
		t.Errorf("events on a: %v\n%+v", kinds, p.a.eventsSince(0))
	}
	// The epochs of a new protection start above every epoch used.
	var next uint64
	v, _ := p.a.vm("vm1")
	next = v.epochs.Next()
	if err := p.a.protect("vm1", api.ProtectRequest{Level: api.LevelFT, Peer: "b"}); err != nil {
		t.Fatal(err)
	}
	until(t, "FT again", func() bool { a := vm1(p.a); return a.State == "protected" && a.Committed > 0 }, both(p))
	if c := vm1(p.a).Committed; c < next {
		t.Errorf("re-protected at epoch %d, below %d", c, next)
	}
}

// axd restarted on the primary (stopped, started again on the same state
// directory) finds its VM, still running, and protects it again by itself
// at its level; a VM whose hypervisor no longer runs it is forgotten.
func TestRestartResumesProtection(t *testing.T) {
	p := runPair(t)
	p.defineVM(t)
	if err := p.a.protect("vm1", api.ProtectRequest{Level: api.LevelFT, Peer: "b"}); err != nil {
		t.Fatal(err)
	}
	until(t, "FT protection", func() bool { a := vm1(p.a); return a.State == "protected" && a.Committed > 2 }, both(p))
	before := vm1(p.a).Committed
	var next uint64
	p.stop["a"]()
	v, _ := p.a.vm("vm1")
	next = v.epochs.Next()
	until(t, "b drops the replica of a stopped axd", func() bool { return vm1(p.b).Name == "" }, both(p))

	p.a = p.start(t, "a")
	until(t, "protected again after the restart", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return a.Role == api.RolePrimary && a.Level == api.LevelFT && a.State == "protected" && b.State == "ready"
	}, both(p))
	if c := vm1(p.a).Committed; c < next || c <= before {
		t.Errorf("after the restart epoch %d committed, want above %d and %d", c, before, next)
	}
	restored := false
	for _, e := range p.a.eventsSince(0) {
		restored = restored || (e.Kind == "restore" && strings.Contains(e.Text, "level ft towards b"))
	}
	if !restored {
		t.Errorf("no restore event: %+v", p.a.eventsSince(0))
	}

	// The VM's QEMU went away while axd was down: nothing to restore.
	p.stop["a"]()
	p.fakeA.Fail(hvtest.OpDial, errors.New("connection refused"))
	p.a = p.start(t, "a")
	until(t, "forgotten", func() bool {
		for _, e := range p.a.eventsSince(0) {
			if e.Kind == "forget" && strings.Contains(e.Text, "connection refused") {
				return true
			}
		}
		return false
	}, func() string { return fmt.Sprintf("%+v", p.a.eventsSince(0)) })
	if recs, err := p.a.store.Load(); err != nil || len(recs) != 0 || vm1(p.a).Name != "" {
		t.Errorf("a VM whose QEMU is gone stays: %+v %v %+v", recs, err, vm1(p.a))
	}
}
