package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/hvtest"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/nova-hook/spool"
)

const novaDomain = "instance-0000002a"

// novaXML is a Nova instance's live domain XML whose <ax:level> asks
// level towards peer ("" level: no <ax:level>).
func novaXML(t *testing.T, level, peer string) string {
	t.Helper()
	b, err := os.ReadFile("../hv/libvirt/testdata/nova-domain.xml")
	if err != nil {
		t.Fatal(err)
	}
	x := string(b)
	old := `<ax:level xmlns:ax="https://axproject.github.io/xmlns/ax/1" peer="compute-2">ft</ax:level>`
	if !strings.Contains(x, old) {
		t.Fatal("nova-domain.xml has no <ax:level> to replace")
	}
	repl := ""
	switch {
	case level != "" && peer != "":
		repl = `<ax:level xmlns:ax="https://axproject.github.io/xmlns/ax/1" peer="` + peer + `">` + level + `</ax:level>`
	case level != "":
		repl = `<ax:level xmlns:ax="https://axproject.github.io/xmlns/ax/1">` + level + `</ax:level>`
	}
	return strings.Replace(x, old, repl, 1)
}

// hookVia posts a hook event to d's API as ax-nova-hook does.
func hookVia(t *testing.T, d *Daemon, ev api.HookEvent) error {
	t.Helper()
	body, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	return postVia(d, "/v1/hooks/libvirt", string(body))
}

// novaSpec is what the driver discovers of the Nova instance: 1 MiB of
// RAM in a file, no disks, reached by name.
func novaSpec(t *testing.T) api.VMSpec {
	t.Helper()
	ram := filepath.Join(t.TempDir(), "instance.ram")
	if err := os.WriteFile(ram, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := goodSpec()
	spec.Name, spec.Guest.Name, spec.Tracker = novaDomain, novaDomain, "hash"
	spec.Guest.RAMMiB, spec.Guest.Disks, spec.Guest.RAMFile, spec.Guest.QEMU = 1, nil, ram, api.QEMU{}
	return spec
}

func hookEvent(op, xml string) api.HookEvent {
	sub := map[string]string{"stopped": "end", "release": "end"}[op]
	if sub == "" {
		sub = "begin"
	}
	return api.HookEvent{Domain: novaDomain, Operation: op, SubOperation: sub, Extra: "-", XML: xml, Time: time.Now()}
}

// What axd does at each operation of libvirt's qemu hook.
func TestDecideHook(t *testing.T) {
	nova := &libvirt.Identity{Name: novaDomain, Nova: &libvirt.NovaInstance{Name: "web-1"}, Level: "ft"}
	plain := &libvirt.Identity{Name: "web", Level: "ft"}
	for _, c := range []struct {
		op       string
		dom      *libvirt.Identity
		known    bool
		st       vm.State
		declared bool
		want     hookAction
		why      string
	}{
		{"prepare", nova, false, vm.Gone, false, hookRecord, "nothing to do"},
		{"start", nova, false, vm.Gone, false, hookRecord, "nothing to do"},
		{"started", nova, false, vm.Gone, false, hookApply, "applied"},
		{"started", nova, true, vm.Running, false, hookApply, "applied"},
		{"started", nova, true, vm.Running, true, hookRecord, "declared level by itself"},
		{"started", nova, true, vm.Ready, false, hookRecord, "already secondary"},
		{"started", nova, true, vm.Protected, false, hookRecord, "already primary"},
		{"started", plain, false, vm.Gone, false, hookRecord, "not a Nova instance"},
		{"stopped", nova, true, vm.Protected, true, hookEnd, "protection ends"},
		{"stopped", nova, true, vm.Syncing, true, hookEnd, "protection ends"},
		{"release", nova, true, vm.Unprotected, true, hookEnd, "protection ends"},
		{"stopped", nova, true, vm.Fenced, true, hookRecord, "left to the failover"},
		{"stopped", nova, true, vm.HandingOver, true, hookRecord, "left to the failover"},
		{"stopped", nova, true, vm.Ready, false, hookRecord, "not protected here"},
		{"release", nova, false, vm.Gone, false, hookRecord, "not protected here"},
		{"migrate", nova, true, vm.Protected, true, hookRecord, "nothing to do"},
		{"restore", nova, false, vm.Gone, false, hookRecord, "nothing to do"},
		{"reconnect", nova, true, vm.Protected, true, hookRecord, "nothing to do"},
		{"attach", nova, false, vm.Gone, false, hookRecord, "nothing to do"},
	} {
		got, why := decideHook(c.op, c.dom, c.known, c.st, c.declared)
		if got != c.want || !strings.Contains(why, c.why) {
			t.Errorf("%s of %s (known %v, %s, declared %v): %v %q, want %v %q", c.op, c.dom.Name, c.known, c.st, c.declared, got, why, c.want, c.why)
		}
	}
}

// Input axd refuses: a clear error, nothing recorded, nothing asked of
// the hypervisor.
func TestLibvirtHookRefuses(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	disc := &discoveringFake{Fake: fake}
	d.cfg.Hypervisor = disc
	good := novaXML(t, "ft", "a")
	withName := func(ev api.HookEvent, name string) api.HookEvent { ev.Domain = name; return ev }
	withOp := func(ev api.HookEvent, op string) api.HookEvent { ev.Operation = op; return ev }
	for _, c := range []struct {
		name string
		ev   api.HookEvent
		want string
	}{
		{"malformed XML", hookEvent("started", "<domain type='kvm'><name>instance-0000002a"), "unreadable domain XML"},
		{"no XML", hookEvent("started", ""), "unreadable domain XML"},
		{"hostile name", withName(hookEvent("started", good), "../../etc/passwd"), "vm name"},
		{"name with a newline", withName(hookEvent("started", good), "web\nFAKE"), "vm name"},
		{"hostile name in the XML", hookEvent("started", strings.Replace(good, "<name>"+novaDomain, "<name>a;rm -rf", 1)), "vm name"},
		{"XML of another domain", withName(hookEvent("started", good), "instance-0000002b"), "domain instance-0000002a's"},
		{"unknown operation", withOp(hookEvent("started", good), "explode"), "unknown operation"},
		{"bad level", hookEvent("started", novaXML(t, "gold", "a")), "<ax:level>"},
		{"oversize XML", hookEvent("started", good+strings.Repeat(" ", api.MaxHookXML)), "XML over"},
	} {
		if err := hookVia(t, d, c.ev); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
	for _, c := range []struct{ name, body, want string }{
		{"oversize event", `{"xml":"` + strings.Repeat("x", api.MaxHookEvent) + `"}`, "over"},
		{"not JSON", "<domain/>", "bad request"},
	} {
		if err := postVia(d, "/v1/hooks/libvirt", c.body); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
	if ev := events(d, "hook"); len(ev) != 0 {
		t.Errorf("refused events recorded: %q", ev)
	}
	if len(disc.asked) != 0 || len(fake.Calls()) != 0 {
		t.Errorf("the hypervisor was asked: %v %v", disc.asked, fake.Calls())
	}
}

// untilEvent waits for a hook event of vm saying want.
func untilEvent(t *testing.T, d *Daemon, want string) {
	t.Helper()
	untilKindEvent(t, d, "hook", want)
}

// untilKindEvent waits for an event of kind saying want.
func untilKindEvent(t *testing.T, d *Daemon, kind, want string) {
	t.Helper()
	until(t, "event "+want, func() bool {
		for _, e := range events(d, kind) {
			if strings.Contains(e, want) {
				return true
			}
		}
		return false
	}, func() string { return strings.Join(events(d, kind), "\n") })
}

// Domains the hook leaves alone: not Nova's, no level, level none, a
// partner it cannot choose. Each says why; none is protected.
func TestLibvirtHookLeavesAlone(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	disc := &discoveringFake{Fake: fake}
	d.cfg.Hypervisor = disc
	plain := "<domain type='kvm' id='3'><name>" + novaDomain + "</name><metadata><ax:level xmlns:ax='" + libvirt.AXNamespace + "'>ft</ax:level></metadata></domain>"
	if err := hookVia(t, d, hookEvent("started", plain)); err != nil {
		t.Fatal(err)
	}
	untilEvent(t, d, "not a Nova instance: left alone")
	for _, c := range []struct{ xml, want string }{
		{novaXML(t, "", ""), "no level asked"},
		{novaXML(t, "none", ""), "level none asked"},
	} {
		if err := hookVia(t, d, hookEvent("started", c.xml)); err != nil {
			t.Fatal(err)
		}
		untilEvent(t, d, c.want)
	}
	d.cfg.Peers["c"] = Peer{Repl: "127.0.0.1:1", Mgmt: "127.0.0.1:1"}
	if err := hookVia(t, d, hookEvent("started", novaXML(t, "ft", ""))); err != nil {
		t.Fatal(err)
	}
	untilEvent(t, d, "names no partner, and axd on b has 2")
	if len(disc.asked) != 0 {
		t.Errorf("discovered %v", disc.asked)
	}
	if _, err := d.vm(novaDomain); err == nil {
		t.Error("a domain left alone was defined")
	}
}

// A Nova instance started with <ax:level>: discovered and protected
// towards the partner it names; stopped: protection ends, no failover.
func TestLibvirtHookProtectsAndEnds(t *testing.T) {
	spec := novaSpec(t)
	var disc *discoveringFake
	p := runPair(t, func(host string, c *Config) {
		if host == "a" {
			disc = &discoveringFake{Fake: c.Hypervisor.(*hvtest.Fake), specs: map[string]api.VMSpec{novaDomain: spec}}
			c.Hypervisor = disc
		}
	})
	status := novaDomainStatus
	seen := func() string {
		return fmt.Sprintf("a %+v\nb %+v\n%s", status(p.a), status(p.b), strings.Join(events(p.a, "hook"), "\n"))
	}
	for _, op := range []string{"prepare", "start"} {
		if err := hookVia(t, p.a, hookEvent(op, novaXML(t, "ft", "b"))); err != nil {
			t.Fatalf("%s: %v", op, err)
		}
	}
	if err := hookVia(t, p.a, hookEvent("started", novaXML(t, "ft", "b"))); err != nil {
		t.Fatal(err)
	}
	until(t, "FT protection from the hook", func() bool {
		a, b := status(p.a), status(p.b)
		return a.State == "protected" && a.Level == api.LevelFT && b.Role == api.RoleSecondary && b.State == "ready"
	}, seen)
	untilEvent(t, p.a, "protected at ft towards b, as <ax:level> in the domain's metadata asks")
	if ev := events(p.a, "hook"); !strings.Contains(ev[0], "prepare (Nova instance web-1, project demo): nothing to do") {
		t.Errorf("first hook event %q", ev[0])
	}
	// started again while protected (a libvirtd restart's reconnect, a
	// replayed event): left as it is.
	if err := hookVia(t, p.a, hookEvent("started", novaXML(t, "ft", "b"))); err != nil {
		t.Fatal(err)
	}
	untilEvent(t, p.a, "already primary here")
	if err := hookVia(t, p.a, hookEvent("stopped", novaXML(t, "ft", "b"))); err != nil {
		t.Fatal(err)
	}
	until(t, "protection ended", func() bool { return status(p.a).Role == api.RoleLocal }, seen)
	untilEvent(t, p.a, "protection ended, the domain stopped (no failover)")
	// b was told to drop its replica (a loaded machine may have lost the
	// stream first, and b keeps a stale replica): it never runs it.
	if b := status(p.b); b.Role == api.RolePrimary || b.Role == api.RoleLocal {
		t.Errorf("b took the stopped domain over: %+v", b)
	}
	if _, started := p.fakeB.Started(novaDomain); started {
		t.Error("b started the stopped domain")
	}
	if err := hookVia(t, p.a, hookEvent("release", novaXML(t, "ft", "b"))); err != nil {
		t.Fatal(err)
	}
	untilEvent(t, p.a, "release (Nova instance web-1, project demo): not protected here")
	if len(disc.asked) != 1 {
		t.Errorf("discovered %d times", len(disc.asked))
	}
}

// Events the hook spooled while axd was down are replayed when it
// starts: a started domain still running is protected.
func TestLibvirtHookReplay(t *testing.T) {
	spec := novaSpec(t)
	spoolDir := filepath.Join(t.TempDir(), "spool")
	t0 := time.Now().Add(-time.Minute)
	for i, op := range []string{"prepare", "start", "started"} {
		ev := hookEvent(op, novaXML(t, "ha", ""))
		ev.Time = t0.Add(time.Duration(i) * time.Second)
		if _, err := spool.Put(spoolDir, ev); err != nil {
			t.Fatal(err)
		}
	}
	bad := hookEvent("started", "<domain")
	bad.Time = t0.Add(-time.Second)
	spool.Put(spoolDir, bad)
	p := runPair(t, func(host string, c *Config) {
		if host == "a" {
			c.HookSpool = spoolDir
			c.Hypervisor = &discoveringFake{Fake: c.Hypervisor.(*hvtest.Fake), specs: map[string]api.VMSpec{novaDomain: spec}}
		}
	})
	untilEvent(t, p.a, "protected at ha towards b")
	untilEvent(t, p.a, "4 spooled events replayed from "+spoolDir+"; 1 refused or unreadable")
	replayed := 0
	for _, e := range events(p.a, "hook") {
		if strings.Contains(e, "libvirt hook (replayed, of ") {
			replayed++
		}
	}
	if replayed != 3 {
		t.Errorf("%d replayed events: %q", replayed, events(p.a, "hook"))
	}
	if es, _ := os.ReadDir(spoolDir); len(es) != 0 {
		t.Errorf("spool left %v", es)
	}
}

// pausingFake is a hypervisor whose domains are paused until run is set,
// as Nova keeps a new instance until Neutron says its port is plugged.
type pausingFake struct {
	*discoveringFake
	run atomic.Bool
}

func (f *pausingFake) Paused(_ context.Context, name string) (bool, error) {
	if name != novaDomain {
		return false, errors.New("libvirt domain " + name + ": Domain not found")
	}
	return !f.run.Load(), nil
}

// TestLibvirtHookWaitsWhilePaused: the hook's started of a domain that is
// paused is not protected (whose checkpoints would resume it before Nova
// does, and Nova's resume then fails the instance) until it runs; then it
// is, without another event.
func TestLibvirtHookWaitsWhilePaused(t *testing.T) {
	defer func(p time.Duration) { pausedPoll = p }(pausedPoll)
	pausedPoll = 20 * time.Millisecond
	spec := novaSpec(t)
	var pf *pausingFake
	p := runPair(t, func(host string, c *Config) {
		if host == "a" {
			pf = &pausingFake{discoveringFake: &discoveringFake{Fake: c.Hypervisor.(*hvtest.Fake), specs: map[string]api.VMSpec{novaDomain: spec}}}
			c.Hypervisor = pf
		}
	})
	if err := hookVia(t, p.a, hookEvent("started", novaXML(t, "ft", "b"))); err != nil {
		t.Fatal(err)
	}
	untilKindEvent(t, p.a, "protect", "is paused (Nova starts an instance paused until Neutron says its port is plugged): protected once it runs")
	time.Sleep(300 * time.Millisecond)
	if st := novaDomainStatus(p.a); st.Role == api.RolePrimary {
		t.Fatalf("protected while paused: %+v", st)
	}
	if len(pf.asked) != 0 || slices.ContainsFunc(pf.Calls(), func(c string) bool { return strings.Contains(c, "cont") || strings.Contains(c, "stop") }) {
		t.Fatalf("a paused domain was discovered or driven: asked %q, calls %q", pf.asked, pf.Calls())
	}
	pf.run.Store(true)
	until(t, "FT protection once it runs", func() bool {
		a := novaDomainStatus(p.a)
		return a.State == "protected" && a.Level == api.LevelFT
	}, func() string { return strings.Join(events(p.a, "protect"), "\n") })
	untilKindEvent(t, p.a, "protect", "runs (it was paused for")
	// A domain whose state cannot be read: the discovery says why.
	if err := p.a.protectDomain(context.Background(), "instance-00000bad", api.LevelFT, "b"); err == nil || !strings.Contains(err.Error(), "is not defined here, and discovering it failed") {
		t.Errorf("a domain the hypervisor does not know: %v", err)
	}
}
