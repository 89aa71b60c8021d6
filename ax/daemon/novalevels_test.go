package daemon

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/hvtest"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/nova-hook/nova/novatest"
)

// novaServerID is Nova's id of novaDomain (its <uuid> in nova-domain.xml).
const novaServerID = "5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00"

// novaCloud is a fake OpenStack with novaDomain's server on host, its
// metadata meta, and the nova.Client axd would use for it.
func novaCloud(t *testing.T, host string, meta map[string]string) (*novatest.Cloud, *nova.Client) {
	t.Helper()
	c := novatest.New(t)
	c.AddServer(novatest.Server{ID: novaServerID, Name: "web-1", InstanceName: novaDomain, Host: host, Flavor: "m1.small", Metadata: meta})
	cl, err := nova.New(nova.Config{Cloud: "ax-test", CloudsFile: c.CloudsYAML(t, t.TempDir()), Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c, cl
}

// novaDomainStatus is novaDomain's status on d (zero if d does not know it).
func novaDomainStatus(d *Daemon) api.VMStatus {
	for _, s := range d.status().VMs {
		if s.Name == novaDomain {
			return s
		}
	}
	return api.VMStatus{}
}

// novaHost is fakeHost (host b, partner a) taking levels from cloud,
// reconciled by the test's calls.
func novaHost(t *testing.T, cloud NovaCloud) (*Daemon, *discoveringFake) {
	t.Helper()
	d, fake := fakeHost(t, plenty)
	disc := &discoveringFake{Fake: fake}
	d.cfg.Hypervisor = disc
	d.nova = newNovaLevels(d, NovaConfig{Cloud: cloud})
	return d, disc
}

const (
	id2 = "6f2d1c1e-6a3b-4c55-9d1e-0a7e2b9f4c11"
	id3 = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
	id4 = "9a8b7c6d-5e4f-4031-9213-f4e5d6c7b8a9"
	id5 = "2e3f4a5b-6c7d-4e8f-9012-3a4b5c6d7e8f"
)

// What axd refuses from Nova is written back as ax:status with the
// reason, counted, and never applied: nothing discovered, nothing
// protected.
func TestNovaLevelsRefuse(t *testing.T) {
	c, cl := novaCloud(t, "b", map[string]string{"ax:level": "gold"})
	c.AddServer(novatest.Server{ID: id2, Name: "p1", InstanceName: "instance-00000030", Host: "b", Metadata: map[string]string{"ax:level": "ft", "ax:peer": "../../etc"}})
	c.AddServer(novatest.Server{ID: id3, Name: "p2", InstanceName: "instance-00000031", Host: "b", Metadata: map[string]string{"ax:level": "ha", "ax:peer": "zz"}})
	c.AddServer(novatest.Server{ID: id4, Name: "p3", InstanceName: "a;rm -rf", Host: "b", Metadata: map[string]string{"ax:level": "ha"}})
	c.AddServer(novatest.Server{ID: id5, Name: "p4", InstanceName: "instance-00000032", Host: "b", Flavor: "m1.gold", FlavorSpecs: map[string]string{"ax:level": "platinum"}})
	// Nova refuses metadata writes before a server is launched: none is tried.
	const building = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f"
	c.AddServer(novatest.Server{ID: building, Name: "p5", InstanceName: "instance-00000033", Host: "b", Status: "BUILD", Metadata: map[string]string{"ax:level": "gold"}})
	d, disc := novaHost(t, cl)
	if err := d.nova.reconcile(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{
		novaServerID: `refused: server metadata ax:level is "gold": AX takes ft, ha or none; nothing applied`,
		id2:          `refused: server metadata ax:peer is "../../etc", not a host name`,
		id3:          "refused: ha asked (server metadata ax:level) but server metadata ax:peer names zz, not a partner of b (its partners: a)",
		id4:          `refused: instance name "a;rm -rf" is not a domain name AX takes`,
		id5:          `refused: flavor m1.gold extra spec ax:level is "platinum"`,
	} {
		if got := c.Metadata(id)[nova.StatusKey]; !strings.HasPrefix(got, want) {
			t.Errorf("server %s ax:status %q, want %q", id, got, want)
		}
	}
	if len(disc.asked) != 0 || len(disc.Calls()) != 0 {
		t.Errorf("the hypervisor was asked: %v %v", disc.asked, disc.Calls())
	}
	if n := c.Count("PUT", building); n != 0 || testutil.ToFloat64(d.nova.writes.WithLabelValues("error")) != 0 {
		t.Errorf("%d writes tried on a BUILD server", n)
	}
	c.Update(building, func(s *novatest.Server) { s.Status = "ACTIVE" })
	if err := d.nova.reconcile(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if got := c.Metadata(building)[nova.StatusKey]; !strings.HasPrefix(got, `refused: server metadata ax:level is "gold"`) {
		t.Errorf("ax:status once ACTIVE %q", got)
	}
	if st := d.status(); len(st.VMs) != 0 {
		t.Errorf("VMs defined: %+v", st.VMs)
	}
	if got := testutil.ToFloat64(d.nova.refused); got != 4 {
		// id3 and id4 are refused by axd, not by what Nova holds.
		t.Errorf("ax_nova_levels_refused %v, want 4", got)
	}
	if n := len(events(d, "nova")); n < 3 {
		t.Errorf("nova events %q", events(d, "nova"))
	}
}

// Writing ax:status bumps the server's updated_at, so changes-since
// brings it back: it is read again and, the text being the same, not
// written again — also when the text is longer than Nova keeps.
func TestNovaLevelsWritebackLoopGuard(t *testing.T) {
	c, cl := novaCloud(t, "b", map[string]string{"ax:level": "none"})
	long := strings.Repeat("p", 120)
	c.AddServer(novatest.Server{ID: id2, Name: "long", InstanceName: "instance-00000030", Host: "b",
		Metadata: map[string]string{"ax:level": "ha", "ax:peer": strings.Repeat("q", 128)}})
	d, _ := novaHost(t, cl)
	d.cfg.Peers[long] = Peer{Repl: "127.0.0.1:1", Mgmt: "127.0.0.1:1"}
	ctx := context.Background()
	if err := d.nova.reconcile(ctx, true); err != nil {
		t.Fatal(err)
	}
	if got := c.Metadata(novaServerID)[nova.StatusKey]; got != "none: not protected (server metadata ax:level)" {
		t.Errorf("ax:status %q", got)
	}
	if got := c.Metadata(id2)[nova.StatusKey]; len(got) != nova.MaxValue || !strings.HasPrefix(got, "refused: ha asked") {
		t.Errorf("long ax:status (%d bytes) %q", len(got), got)
	}
	puts := c.Count("PUT", "/metadata/ax:status")
	if puts != 2 {
		t.Fatalf("%d writes, want 2", puts)
	}
	// Polls across whole seconds (Nova's updated_at is in seconds): each
	// brings the written servers back, none writes.
	for i := 0; i < 3; i++ {
		time.Sleep(400 * time.Millisecond)
		if err := d.nova.reconcile(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.Count("PUT", "/metadata/ax:status"); got != puts {
		t.Errorf("%d writes after 3 more polls, want %d: %q", got, puts, c.Requests())
	}
	if c.Count("GET", "changes-since=") != 3 {
		t.Errorf("polls %q", c.Requests())
	}
	// A change in Nova is a new text: written once.
	c.SetMetadata(novaServerID, "ax:level", "ft")
	c.SetMetadata(novaServerID, "ax:peer", "zz")
	for i := 0; i < 2; i++ {
		if err := d.nova.reconcile(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.Metadata(novaServerID)[nova.StatusKey]; !strings.Contains(got, "names zz, not a partner of b") {
		t.Errorf("ax:status after the change %q", got)
	}
	if got := c.Count("PUT", "/metadata/ax:status"); got != puts+1 {
		t.Errorf("%d writes after a change, want %d", got, puts+1)
	}
	if got := testutil.ToFloat64(d.nova.writes.WithLabelValues("ok")); got != float64(puts+1) {
		t.Errorf("ax_nova_status_writes_total{ok} %v", got)
	}
}

// Nova down: an alarm (once), the metric, nothing changed; Nova back:
// an event, and what changed meanwhile is picked up by changes-since.
func TestNovaLevelsOutage(t *testing.T) {
	c, cl := novaCloud(t, "b", map[string]string{"ax:level": "gold"})
	d, _ := novaHost(t, cl)
	ctx := context.Background()
	if err := d.nova.reconcile(ctx, true); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(d.nova.reachable); got != 1 {
		t.Errorf("ax_nova_reachable %v while Nova answers", got)
	}
	c.SetDown(true)
	for i := 0; i < 3; i++ {
		if err := d.nova.reconcile(ctx, false); err == nil || !strings.Contains(err.Error(), "503") {
			t.Fatalf("reconcile while Nova is down: %v", err)
		}
	}
	if a := events(d, "alarm"); len(a) != 1 || !strings.Contains(a[0], "Nova cannot be reached") || !strings.Contains(a[0], "keeps every level") {
		t.Errorf("alarms %q", a)
	}
	if got := testutil.ToFloat64(d.nova.reachable); got != 0 {
		t.Errorf("ax_nova_reachable %v while Nova is down", got)
	}
	if got := testutil.ToFloat64(d.nova.polls.WithLabelValues("error")); got != 3 {
		t.Errorf("ax_nova_polls_total{error} %v", got)
	}
	time.Sleep(1100 * time.Millisecond) // a later second in Nova's updated_at
	c.SetMetadata(novaServerID, "ax:level", "none")
	c.SetDown(false)
	if err := d.nova.reconcile(ctx, false); err != nil {
		t.Fatalf("after the outage: %v", err)
	}
	if got := c.Metadata(novaServerID)[nova.StatusKey]; got != "none: not protected (server metadata ax:level)" {
		t.Errorf("ax:status after the outage %q", got)
	}
	found := false
	for _, e := range events(d, "nova") {
		found = found || strings.Contains(e, "Nova answers again after")
	}
	if !found || testutil.ToFloat64(d.nova.reachable) != 1 {
		t.Errorf("recovery not noted: %q", events(d, "nova"))
	}
	if len(events(d, "alarm")) != 1 {
		t.Errorf("alarms %q", events(d, "alarm"))
	}
}

// The status AX writes for each state it holds a domain in.
func TestNovaLevelsStatusText(t *testing.T) {
	d, _ := novaHost(t, &nova.Client{})
	n := d.nova
	put := func(st vm.State, level string) {
		v := newVM(novaDomain, st)
		v.level, v.peer = level, "a"
		d.mu.Lock()
		d.vms[novaDomain] = v
		d.mu.Unlock()
	}
	srv := func(status string, meta map[string]string, asked nova.Asked) *novaServer {
		return &novaServer{s: nova.Server{ID: novaServerID, InstanceName: novaDomain, Status: status, Metadata: meta}, asked: asked}
	}
	ft := nova.Asked{Level: "ft", From: "server metadata ax:level"}
	for _, c := range []struct {
		name  string
		st    vm.State // vm.Gone: unknown to axd
		level string
		e     *novaServer
		want  string
		write bool
	}{
		{"nothing asked, never written", vm.Gone, "", srv("ACTIVE", nil, nova.Asked{}), "no level asked", false},
		{"nothing asked, written before", vm.Gone, "", srv("ACTIVE", map[string]string{"ax:status": "x"}, nova.Asked{}), "no level asked", true},
		{"asked, not running", vm.Gone, "", srv("SHUTOFF", nil, ft), "ft towards a asked (server metadata ax:level): applied when the server is ACTIVE (it is SHUTOFF)", true},
		{"asked, not yet", vm.Running, "none", srv("ACTIVE", nil, ft), "ft towards a asked (server metadata ax:level): not protected yet", true},
		{"protected as asked", vm.Protected, "ft", srv("ACTIVE", nil, ft), "ft towards a: protected (server metadata ax:level)", true},
		{"protected at another level", vm.Protected, "ha", srv("ACTIVE", nil, ft), "ha towards a: protected; ft asked (server metadata ax:level)", true},
		{"a replica", vm.Ready, "ft", srv("ACTIVE", nil, ft), "a replica here of the primary on a (ready)", true},
		{"failed", vm.Running, "none", &novaServer{s: nova.Server{InstanceName: novaDomain, Status: "ACTIVE"}, asked: ft, failed: "no shared RAM", want: ft},
			"ft towards a asked (server metadata ax:level) not applied: no shared RAM", true},
	} {
		d.mu.Lock()
		delete(d.vms, novaDomain)
		d.mu.Unlock()
		if c.st != vm.Gone {
			put(c.st, c.level)
		}
		got, write := n.status(c.e)
		if !strings.HasPrefix(got, c.want) || write != c.write {
			t.Errorf("%s: %q (write %v), want %q (write %v)", c.name, got, write, c.want, c.write)
		}
	}
}

// A server's level changed in Nova — ft, then ha, then none — is
// applied live on the running domain, each step written back as its
// ax:status and counted; an outage of Nova between changes leaves FT as
// it is.
func TestNovaLevelsApplyLive(t *testing.T) {
	spec := novaSpec(t)
	cloud, cl := novaCloud(t, "a", map[string]string{"ax:level": "ft", "owner": "ops"})
	var disc *discoveringFake
	p := runPair(t, func(host string, c *Config) {
		if host == "a" {
			disc = &discoveringFake{Fake: c.Hypervisor.(*hvtest.Fake), specs: map[string]api.VMSpec{novaDomain: spec}}
			c.Hypervisor = disc
			c.Nova = &NovaConfig{Cloud: cl, Poll: 100 * time.Millisecond, Resync: 2 * time.Second}
		}
	})
	status := novaDomainStatus
	seen := func() string {
		return fmt.Sprintf("a %+v\nb %+v\nax:status %q\n%s", status(p.a), status(p.b), cloud.Metadata(novaServerID)[nova.StatusKey],
			strings.Join(events(p.a, "nova"), "\n"))
	}
	axStatus := func(want string) func() bool {
		return func() bool { return cloud.Metadata(novaServerID)[nova.StatusKey] == want }
	}
	until(t, "FT from Nova", func() bool {
		a, b := status(p.a), status(p.b)
		return a.State == "protected" && a.Level == api.LevelFT && b.Role == api.RoleSecondary
	}, seen)
	until(t, "ax:status of FT", axStatus("ft towards b: protected (server metadata ax:level)"), seen)

	// Nova down: what is applied stays, an alarm says so; back: noted.
	cloud.SetDown(true)
	until(t, "an alarm while Nova is down", func() bool { return len(events(p.a, "alarm")) > 0 }, seen)
	if a := status(p.a); a.State != "protected" || a.Level != api.LevelFT || !strings.Contains(events(p.a, "alarm")[0], "Nova cannot be reached") {
		t.Errorf("while Nova is down: %+v, alarms %q", a, events(p.a, "alarm"))
	}
	cloud.SetDown(false)
	until(t, "Nova back", func() bool { return strings.Contains(strings.Join(events(p.a, "nova"), "\n"), "Nova answers again") }, seen)

	cloud.SetMetadata(novaServerID, "ax:level", "ha")
	until(t, "HA from Nova", func() bool { a := status(p.a); return a.State == "protected" && a.Level == api.LevelHA }, seen)
	until(t, "ax:status of HA", axStatus("ha towards b: protected (server metadata ax:level)"), seen)

	cloud.SetMetadata(novaServerID, "ax:level", "none")
	until(t, "none from Nova", func() bool { return status(p.a).Role == api.RoleLocal }, seen)
	until(t, "ax:status of none", axStatus("none: not protected (server metadata ax:level)"), seen)
	if b := status(p.b); b.Role == api.RolePrimary || b.Role == api.RoleLocal {
		t.Errorf("b runs the domain: %+v", b)
	}
	if m := cloud.Metadata(novaServerID); m["owner"] != "ops" {
		t.Errorf("other metadata lost: %v", m)
	}
	if got := testutil.ToFloat64(p.a.nova.applies.WithLabelValues("ok")); got != 3 {
		t.Errorf("ax_nova_applies_total{ok} %v, want 3: %s", got, seen())
	}
	if len(disc.asked) != 1 {
		t.Errorf("discovered %d times", len(disc.asked))
	}
	// Settled: polls go on, nothing is written.
	puts := cloud.Count("PUT", "/metadata/ax:status")
	time.Sleep(1500 * time.Millisecond)
	if got := cloud.Count("PUT", "/metadata/ax:status"); got != puts {
		t.Errorf("%d writes while nothing changed (%d before)", got-puts, puts)
	}
}

// With Nova configured, the hook's started takes Nova's answer (here
// the flavor's), not the domain's <ax:level>.
func TestNovaLevelsHookAsksNova(t *testing.T) {
	spec := novaSpec(t)
	cloud, cl := novaCloud(t, "a", nil)
	// Nova's server is BUILD while libvirt starts its domain: the
	// reconciler waits for ACTIVE, the hook does not.
	cloud.Update(novaServerID, func(s *novatest.Server) {
		s.Flavor, s.FlavorSpecs, s.Status = "m1.ha", map[string]string{"ax:level": "ha"}, "BUILD"
	})
	p := runPair(t, func(host string, c *Config) {
		if host == "a" {
			c.Hypervisor = &discoveringFake{Fake: c.Hypervisor.(*hvtest.Fake), specs: map[string]api.VMSpec{novaDomain: spec}}
			c.Nova = &NovaConfig{Cloud: cl, Poll: time.Hour, Resync: time.Hour}
		}
	})
	if err := hookVia(t, p.a, hookEvent("started", novaXML(t, "ft", "b"))); err != nil {
		t.Fatal(err)
	}
	untilEvent(t, p.a, "protected at ha towards b, as flavor m1.ha extra spec ax:level in Nova asks")
	if cloud.Count("GET", "/servers/"+novaServerID) != 1 {
		t.Errorf("requests %q", cloud.Requests())
	}
	if got := testutil.ToFloat64(p.a.nova.applies.WithLabelValues("ok")); got != 0 {
		t.Errorf("the reconciler applied %v levels to a BUILD server", got)
	}
}

// A server deleted in Nova (changes-since shows it DELETED) or moved to
// another host (seen at the resync: the host filter hides it) is no
// longer reconciled here, and an event says so.
func TestNovaLevelsServerLeaves(t *testing.T) {
	c, cl := novaCloud(t, "b", map[string]string{"ax:level": "none"})
	c.AddServer(novatest.Server{ID: id2, Name: "moving", InstanceName: "instance-00000030", Host: "b", Metadata: map[string]string{"ax:level": "none"}})
	d, _ := novaHost(t, cl)
	ctx := context.Background()
	if err := d.nova.reconcile(ctx, true); err != nil {
		t.Fatal(err)
	}
	if n := len(d.nova.servers); n != 2 {
		t.Fatalf("%d servers reconciled", n)
	}
	c.Update(novaServerID, func(s *novatest.Server) { s.Deleted = true })
	c.Update(id2, func(s *novatest.Server) { s.Host = "c" })
	if err := d.nova.reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, ok := d.nova.servers[novaServerID]; ok {
		t.Error("the deleted server is still reconciled")
	}
	if _, ok := d.nova.servers[id2]; !ok {
		t.Error("the moved server left before the resync: the host filter cannot show a move")
	}
	if err := d.nova.reconcile(ctx, true); err != nil {
		t.Fatal(err)
	}
	if n := len(d.nova.servers); n != 0 {
		t.Errorf("%d servers still reconciled after the resync", n)
	}
	ev := strings.Join(events(d, "nova"), "\n")
	for _, want := range []string{"web-1 (" + novaServerID + ") was deleted", "moving (" + id2 + ") is no longer on host b"} {
		if !strings.Contains(ev, want) {
			t.Errorf("no event says %q: %s", want, ev)
		}
	}
}

// A level that fails to apply is written back with why, tried again at
// each resync, and while it keeps failing the same way ax:status is not
// written again.
func TestNovaLevelsApplyFails(t *testing.T) {
	c, cl := novaCloud(t, "b", map[string]string{"ax:level": "ft"})
	d, disc := novaHost(t, cl) // the driver cannot discover novaDomain
	ctx := context.Background()
	failures := func() int {
		n := 0
		for _, e := range events(d, "nova") {
			if strings.Contains(e, "ft (server metadata ax:level) not applied") {
				n++
			}
		}
		return n
	}
	reconcile := func(full bool, wantFailures int) {
		t.Helper()
		if err := d.nova.reconcile(ctx, full); err != nil {
			t.Fatal(err)
		}
		until(t, fmt.Sprintf("%d failed applies", wantFailures), func() bool { return failures() >= wantFailures },
			func() string { return strings.Join(events(d, "nova"), "\n") })
		until(t, "the apply done", func() bool {
			d.nova.mu.Lock()
			defer d.nova.mu.Unlock()
			return !d.nova.applying[novaDomain]
		}, func() string { return "still applying" })
	}
	reconcile(true, 1)
	reconcile(false, 1)
	want := "ft towards a asked (server metadata ax:level) not applied: VM instance-0000002a is not defined here, and discovering it failed"
	if got := c.Metadata(novaServerID)[nova.StatusKey]; !strings.HasPrefix(got, want) {
		t.Fatalf("ax:status %q, want %q", got, want)
	}
	puts := c.Count("PUT", "/metadata/ax:status")
	if puts != 1 {
		t.Errorf("%d writes, want 1: none while the apply ran", puts)
	}
	reconcile(true, 2)
	reconcile(true, 3)
	reconcile(false, 3)
	if got := c.Count("PUT", "/metadata/ax:status"); got != puts {
		t.Errorf("%d writes of the same failure, want %d", got, puts)
	}
	if len(disc.asked) != 3 {
		t.Errorf("discovered %d times, want 3 (once, then at each resync)", len(disc.asked))
	}
	if got := testutil.ToFloat64(d.nova.applies.WithLabelValues("error")); got != 3 {
		t.Errorf("ax_nova_applies_total{error} %v", got)
	}
}
