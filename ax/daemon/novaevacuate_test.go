package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/hvtest"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/nova-hook/nova/novatest"
)

// identifyingFake is the recording fake as a driver that tells each
// domain's identity (libvirt's Identify).
type identifyingFake struct {
	*hvtest.Fake
	ids map[string]*libvirt.Identity
}

func (f *identifyingFake) Identify(_ context.Context, name string) (*libvirt.Identity, error) {
	id, ok := f.ids[name]
	if !ok {
		return nil, errors.New("domain not found: no domain with matching name '" + name + "'")
	}
	return id, nil
}

const svcIDa, svcIDb = "c1a2b3c4-0000-4000-8000-00000000000a", "c1a2b3c4-0000-4000-8000-00000000000b"

// evacHost is host b of the pair, taking levels from a fake Nova where
// vm1 is server novaServerID on host a (dead: its nova-compute does not
// report), ready to promote vm1 from a committed checkpoint.
func evacHost(t *testing.T, novaDomain bool) (*Daemon, *novatest.Cloud, *vmState, string) {
	t.Helper()
	c, cl := novaCloud(t, "a", map[string]string{"ax:level": "ft", "ax:peer": "b"})
	c.Update(novaServerID, func(s *novatest.Server) { s.InstanceName = "vm1" })
	c.AddComputeService("a", svcIDa)
	c.AddComputeService("b", svcIDb)
	c.SetServiceUp("a", false)
	d, fake := fakeHost(t, plenty)
	id := &libvirt.Identity{Name: "vm1", UUID: novaServerID, Running: true}
	if novaDomain {
		id.Nova = &libvirt.NovaInstance{}
	}
	d.cfg.Hypervisor = &identifyingFake{Fake: fake, ids: map[string]*libvirt.Identity{"vm1": id}}
	adopt := filepath.Join(t.TempDir(), "nova-adopt")
	d.nova = newNovaLevels(d, NovaConfig{Cloud: cl, EvacuatePoll: 5 * time.Millisecond, AdoptDir: adopt})
	v := replicaHere(t, d, committedReplica(t, d, 1<<20, []byte("devstate")), api.LevelFT)
	return d, c, v, adopt
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func evacStage(d *Daemon) string {
	e, _ := d.nova.evacuation("vm1")
	return e.stage
}

// A promotion of a Nova server makes Nova's record follow: a's compute
// service forced down, then the evacuation to b, the adopt marker there
// while Nova rebuilds; protection back towards a held until a's
// nova-compute completed the evacuation; then forced_down cleared, once.
func TestNovaEvacuateAfterPromotion(t *testing.T) {
	d, c, v, adopt := evacHost(t, true)
	c.HoldEvacuations(true)
	// b's promise to vm1, held in Placement (no loop runs: only the
	// evacuation's own removal can remove it).
	c.AddProvider(novatest.Provider{UUID: rpB, Host: "b", Inventory: map[string]int{"VCPU": 8, "MEMORY_MB": 4096}})
	d.place = newPlacementMirror(d, d.nova.cloud.(PlacementCloud), "b", time.Hour)
	if err := d.book.Promise("vm1", reserve.Capacity{VCPUs: 1, MemoryBytes: 1 << 20}, false); err != nil {
		t.Fatal(err)
	}
	if err := d.place.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	reservation := nova.ReservationConsumer(rpB, "vm1")
	if err := d.promote(context.Background(), v); err != nil {
		t.Fatal(err)
	}
	if st := v.status(); st.State != "running" {
		t.Fatalf("the guest is %s after promotion", st.State)
	}
	waitFor(t, "the evacuation to be asked", func() bool { return len(c.Migrations()) == 1 })
	marker := filepath.Join(adopt, novaServerID)
	if b, err := os.ReadFile(marker); err != nil || string(b) != "vm1\n" {
		t.Errorf("adopt marker while Nova rebuilds: %q, %v", b, err)
	}
	if fi, err := os.Stat(marker); err == nil && fi.Mode().Perm() != 0o644 {
		t.Errorf("marker mode %v: nova-compute (user nova) must read it", fi.Mode())
	}
	var order []string
	for _, r := range c.Requests() {
		switch {
		case strings.HasPrefix(r, "GET /compute/v2.1/os-services"):
			order = append(order, "service")
		case r == "PUT /compute/v2.1/os-services/"+svcIDa:
			order = append(order, "force-down")
		case r == "POST /compute/v2.1/servers/"+novaServerID+"/action":
			order = append(order, "evacuate")
		case r == "DELETE /placement/allocations/"+reservation:
			order = append(order, "unreserve") // its room given back before the scheduler looks for it
		}
	}
	if want := []string{"unreserve", "service", "force-down", "evacuate"}; !slices.Equal(order, want) {
		t.Errorf("calls %q, want %q", order, want)
	}
	if s := c.ComputeService("a"); !s.ForcedDown {
		t.Error("a's compute service is not forced down")
	}
	if why := d.nova.holds("vm1", "a"); why == "" {
		t.Error("protection towards a not held while Nova rebuilds")
	}
	err := d.protect("vm1", api.ProtectRequest{Level: api.LevelFT, Peer: "a"})
	if err == nil || !strings.Contains(err.Error(), "not protecting vm1 towards a yet") {
		t.Errorf("protect towards a during the evacuation: %v", err)
	}
	c.FinishEvacuations()
	waitFor(t, "Nova to say b, ACTIVE", func() bool { return evacStage(d) == string(nova.StageCompleting) })
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("adopt marker left after Nova recorded the evacuation: %v", err)
	}
	if n := testutil.ToFloat64(d.nova.evac.seconds.WithLabelValues("vm1")); n <= 0 {
		t.Errorf("ax_nova_evacuation_seconds %v", n)
	}
	time.Sleep(50 * time.Millisecond) // polls while a stays dead
	if d.nova.holds("vm1", "a") == "" || evacStage(d) != string(nova.StageCompleting) {
		t.Fatalf("released before a's nova-compute completed the evacuation (%s)", evacStage(d))
	}
	if testutil.ToFloat64(d.nova.evac.pending) != 1 {
		t.Error("ax_nova_evacuations_pending is not 1")
	}
	c.RestartCompute("a")
	waitFor(t, "the evacuation to complete", func() bool { return evacStage(d) == string(nova.StageDone) })
	if s := c.ComputeService("a"); s.ForcedDown {
		t.Error("forced_down not cleared")
	}
	time.Sleep(50 * time.Millisecond)
	if n := c.Count("PUT", "/os-services/"+svcIDa); n != 2 {
		t.Errorf("%d writes of a's forced_down, want 2 (set, cleared once)", n)
	}
	if why := d.nova.holds("vm1", "a"); why != "" {
		t.Errorf("still held after the evacuation completed: %s", why)
	}
	waitFor(t, "ax:status to say it is completed", func() bool {
		return strings.Contains(c.Metadata(novaServerID)[nova.StatusKey], "the evacuation is completed")
	})
	if testutil.ToFloat64(d.nova.evac.total.WithLabelValues("completed")) != 1 || testutil.ToFloat64(d.nova.evac.pending) != 0 {
		t.Error("metrics: completed not counted or still pending")
	}
	if ev := events(d, "nova"); !slices.ContainsFunc(ev, func(s string) bool { return strings.Contains(s, "evacuated from a to b") }) {
		t.Errorf("nova events %q", ev)
	}
}

// Nova down when the VM is promoted: the guest runs, and the calls are
// retried, with back-off, until Nova answers.
func TestNovaEvacuateRetriesWhileNovaIsDown(t *testing.T) {
	d, c, v, _ := evacHost(t, true)
	c.SetDown(true)
	if err := d.promote(context.Background(), v); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a retried call", func() bool {
		e, _ := d.nova.evacuation("vm1")
		return strings.Contains(e.why, "503") || strings.Contains(e.why, "Service Unavailable") || strings.Contains(e.why, "down")
	})
	if v.status().State != "running" {
		t.Error("the promoted guest waits for Nova")
	}
	n := len(c.Requests())
	time.Sleep(60 * time.Millisecond)
	if m := len(c.Requests()) - n; m > 6 {
		t.Errorf("%d requests in 60 ms to a Nova that is down: no back-off", m)
	}
	if ev := events(d, "nova"); !slices.ContainsFunc(ev, func(s string) bool { return strings.Contains(s, "retried") }) {
		t.Errorf("no event says the call is retried: %q", ev)
	}
	c.SetDown(false)
	waitFor(t, "the evacuation once Nova answers", func() bool { return evacStage(d) == string(nova.StageCompleting) })
	waitFor(t, "ax:status to say what is held", func() bool {
		return strings.Contains(c.Metadata(novaServerID)[nova.StatusKey], "held until nova-compute on a starts again")
	})
}

// A promoted domain that is no Nova instance leaves Nova alone.
func TestNovaEvacuateNotANovaDomain(t *testing.T) {
	d, c, v, _ := evacHost(t, false)
	if err := d.promote(context.Background(), v); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the event", func() bool {
		return slices.ContainsFunc(events(d, "nova"), func(s string) bool { return strings.Contains(s, "not a Nova instance") })
	})
	if n := c.Count("PUT", "os-services") + c.Count("POST", "/action"); n != 0 {
		t.Errorf("%d force-down or evacuate calls for a domain Nova did not create", n)
	}
	if d.nova.holds("vm1", "a") != "" {
		t.Error("protection held for a domain Nova did not create")
	}
}

// An axd restarted while Nova has not completed the evacuation still
// holds protection towards the old host, goes on waiting, and clears the
// forced_down its predecessor set.
func TestNovaEvacuateAcrossRestart(t *testing.T) {
	d, c, v, adopt := evacHost(t, true)
	ctx, stop := context.WithCancel(d.ctx)
	d.ctx = ctx // the first axd's goroutines end with stop
	if err := d.promote(context.Background(), v); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "Nova to say b, ACTIVE", func() bool { return evacStage(d) == string(nova.StageCompleting) })
	stop()
	time.Sleep(20 * time.Millisecond)

	d2, _ := fakeHost(t, plenty)
	d2.cfg.StateDir = d.cfg.StateDir
	cl, err := nova.New(nova.Config{Cloud: "ax-test", CloudsFile: c.CloudsYAML(t, t.TempDir()), Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	d2.nova = newNovaLevels(d2, NovaConfig{Cloud: cl, EvacuatePoll: 5 * time.Millisecond, AdoptDir: adopt})
	if why := d2.nova.holds("vm1", "a"); why == "" {
		t.Fatal("the restarted axd does not hold protection towards a")
	}
	d2.nova.resumeEvacs(d2.ctx)
	c.RestartCompute("a")
	waitFor(t, "the evacuation to complete", func() bool { return evacStage(d2) == string(nova.StageDone) })
	if s := c.ComputeService("a"); s.ForcedDown {
		t.Error("forced_down set by the first axd not cleared by the second")
	}
	if d2.nova.holds("vm1", "a") != "" {
		t.Error("still held")
	}
	if files, _ := filepath.Glob(filepath.Join(d.cfg.StateDir, "nova-evacuations", "*")); len(files) != 0 {
		t.Errorf("a finished evacuation is still kept: %v", files)
	}
	if n := c.Count("POST", "/action"); n != 1 {
		t.Errorf("%d evacuate calls, want 1", n)
	}
}

// The marker in the default directory, below axd's state directory, is
// reachable by nova-compute's user (nova): search on the way there.
func TestNovaAdoptMarkerReachable(t *testing.T) {
	d, _ := fakeHost(t, plenty)
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chmod(d.cfg.StateDir, 0o700)
	_, cl := novaCloud(t, "a", nil)
	d.nova = newNovaLevels(d, NovaConfig{Cloud: cl})
	if err := d.nova.writeMarker(novaServerID, "vm1"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{d.cfg.StateDir, filepath.Join(d.cfg.StateDir, "nova-adopt")} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm()&0o001 == 0 {
			t.Errorf("%s: %v, %v: nova cannot go through it", p, fi.Mode(), err)
		}
	}
	if fi, err := os.Stat(filepath.Join(d.cfg.StateDir, "nova-adopt", novaServerID)); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("marker: %v", err)
	}
	if err := d.nova.writeMarker("../../etc/passwd", "vm1"); err == nil {
		t.Error("a marker named by something else than a UUID was written")
	}
}

// Two axd: after a planned failover a → b of a Nova server, b evacuates
// it in Nova and does not protect it back towards a — though a answers —
// until a's nova-compute completed the evacuation; then it does, by
// itself.
func TestNovaEvacuateHoldsReprotection(t *testing.T) {
	c, cl := novaCloud(t, "a", map[string]string{"ax:level": "ft"})
	c.Update(novaServerID, func(s *novatest.Server) { s.InstanceName = "vm1" })
	c.AddComputeService("a", svcIDa)
	c.AddComputeService("b", svcIDb)
	adopt := filepath.Join(t.TempDir(), "nova-adopt")
	p := runPair(t, withWitness(t, 16*time.Second), func(h string, cfg *Config) {
		if h != "b" {
			return
		}
		cfg.Hypervisor = &identifyingFake{Fake: cfg.Hypervisor.(*hvtest.Fake),
			ids: map[string]*libvirt.Identity{"vm1": {Name: "vm1", UUID: novaServerID, Running: true, Nova: &libvirt.NovaInstance{}}}}
		cfg.Nova = &NovaConfig{Cloud: cl, EvacuatePoll: 10 * time.Millisecond, AdoptDir: adopt}
	})
	c.AddProvider(novatest.Provider{UUID: rpB, Host: "b", Inventory: map[string]int{"VCPU": 8, "MEMORY_MB": 4096}})
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)
	// b's promise to vm1 is held in Placement while it is partner.
	reservation := nova.ReservationConsumer(rpB, "vm1")
	until(t, "b's promise to vm1 held in Placement", func() bool {
		_, ok := c.Consumers()[reservation]
		return ok
	}, func() string { return fmt.Sprintf("%+v", p.b.eventsSince(0)) })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.a.plannedFailover(ctx, "vm1"); err != nil {
		t.Fatalf("planned failover: %v", err)
	}
	until(t, "Nova to say b", func() bool {
		e, _ := p.b.nova.evacuation("vm1")
		return e.stage == string(nova.StageCompleting)
	}, func() string { return fmt.Sprintf("%+v", p.b.eventsSince(0)) })
	if _, ok := c.Consumers()[reservation]; ok {
		t.Error("vm1's reservation is still in Placement after its promotion")
	}
	if s := c.ComputeService("a"); !s.ForcedDown {
		t.Error("a's nova-compute not forced down")
	}
	time.Sleep(3 * reprotectFirst / 2)
	if b := vm1(p.b); b.Role != api.RoleLocal || b.Declared != api.LevelFT {
		t.Fatalf("b protected vm1 towards a before Nova completed the evacuation: %+v", b)
	}
	// It waits: no attempt is made and refused (an alarm each time).
	for _, e := range events(p.b, "alarm") {
		if strings.Contains(e, "not protecting vm1 towards a yet") {
			t.Errorf("re-protection was tried and refused instead of waiting: %s", e)
		}
	}
	c.RestartCompute("a")
	until(t, "FT protection b→a once the evacuation is completed", func() bool {
		b := vm1(p.b)
		return b.Role == api.RolePrimary && b.Level == api.LevelFT && b.Peer == "a" && b.State == "protected"
	}, func() string { return fmt.Sprintf("%+v\n%+v", vm1(p.b), p.b.eventsSince(0)) })
	if s := c.ComputeService("a"); s.ForcedDown {
		t.Error("forced_down not cleared")
	}
}
