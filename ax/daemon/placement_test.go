package daemon

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/nova-hook/nova/novatest"
)

const (
	rpA = "1c0a7d52-8b1e-4c8e-9a55-2f3b4c5d6e70"
	rpB = "7d6c5b4a-3f2e-4d1c-8b0a-9f8e7d6c5b4a"
)

// placementHost is novaHost with host b's compute node in c's Placement
// (8 vCPUs, 4096 MiB, 100 GB) and the mirror, its rounds run by the test.
func placementHost(t *testing.T) (*Daemon, *novatest.Cloud) {
	t.Helper()
	c, cl := novaCloud(t, "b", nil)
	c.AddProvider(novatest.Provider{UUID: rpA, Host: "a", Inventory: map[string]int{"VCPU": 8, "MEMORY_MB": 4096, "DISK_GB": 100}})
	c.AddProvider(novatest.Provider{UUID: rpB, Host: "b", Inventory: map[string]int{"VCPU": 8, "MEMORY_MB": 4096, "DISK_GB": 100}})
	d, _ := novaHost(t, cl)
	d.place = newPlacementMirror(d, cl, "b", time.Hour)
	return d, c
}

// The book's promises are held in Placement as allocations by AX's
// consumers on this host's provider, each made to match the book at each
// round: what AX holds is AX's (type, project, user), a reservation the
// book no longer has is removed, an instance's allocation is left alone
// (and its type asked once), and a round that changes nothing writes
// nothing.
func TestPlacementHoldsPromises(t *testing.T) {
	d, c := placementHost(t)
	ctx := context.Background()
	c.Allocate(novaServerID, rpB, map[string]int{"VCPU": 1, "MEMORY_MB": 512})
	cl, _ := nova.New(nova.Config{Cloud: "ax-test", CloudsFile: c.CloudsYAML(t, t.TempDir()), Timeout: 2 * time.Second})
	gone := nova.ReservationConsumer(rpB, "gone")
	if err := cl.Reserve(ctx, gone, rpB, nova.Resources{"VCPU": 1}); err != nil {
		t.Fatal(err)
	}
	if err := d.book.Promise("vm1", reserve.Capacity{VCPUs: 2, MemoryBytes: 1<<30 + 1, DiskBytes: 3 << 30}, false); err != nil {
		t.Fatal(err)
	}
	if err := d.place.sync(ctx); err != nil {
		t.Fatal(err)
	}
	vm1 := nova.ReservationConsumer(rpB, "vm1")
	got := c.Consumers()
	r, ok := got[vm1]
	if !ok || !nova.Resources(r.Allocations[rpB]).Equal(nova.Resources{"VCPU": 2, "MEMORY_MB": 1025, "DISK_GB": 3}) || len(r.Allocations) != 1 {
		t.Fatalf("vm1's reservation: %+v (present %v); want 2 VCPU, 1025 MEMORY_MB, 3 DISK_GB on b's provider alone", r, ok)
	}
	if r.Type != nova.ReservationType || r.Project != "p-1" || r.User != "u-1" {
		t.Errorf("vm1's reservation is held by %s/%s, type %q; want axd's project and user, type %s", r.Project, r.User, r.Type, nova.ReservationType)
	}
	if _, ok := got[gone]; ok {
		t.Error("a reservation the book does not have was left in Placement")
	}
	if inst, ok := got[novaServerID]; !ok || inst.Generation != 1 {
		t.Errorf("the instance's allocation was touched: %+v", inst)
	}
	st := d.reservation().Placement
	if st == nil || st.Provider != rpB || len(st.Held) != 1 || st.Held[0] != "vm1" || st.Error != "" {
		t.Errorf("status: %+v", st)
	}
	if e := events(d, "placement"); len(e) != 1 || !strings.Contains(e[0], "Placement holds this host's promise to vm1") || !strings.Contains(e[0], vm1) {
		t.Errorf("events %q", e)
	}

	// Nothing changed: nothing written, the instance's type not asked again.
	puts := c.Count("PUT", "/placement/allocations/")
	if err := d.place.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if n := c.Count("PUT", "/placement/allocations/"); n != puts {
		t.Errorf("a round with nothing changed wrote %d allocations", n-puts)
	}
	if n := c.Count("GET", "/placement/allocations/"+novaServerID); n != 1 {
		t.Errorf("the instance's consumer type was asked %d times, want once", n)
	}

	// A promise grown is written over, at the consumer's generation.
	if err := d.book.Promise("vm1", reserve.Capacity{VCPUs: 2, MemoryBytes: 2 << 30, DiskBytes: 3 << 30}, false); err != nil {
		t.Fatal(err)
	}
	if err := d.place.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if r := c.Consumers()[vm1]; r.Allocations[rpB]["MEMORY_MB"] != 2048 || r.Generation != 2 {
		t.Errorf("vm1's reservation after its promise grew: %+v", r)
	}
	if testutil.ToFloat64(d.metrics.PlacementReservations.WithLabelValues("held")) != 1 {
		t.Error("ax_placement_reservations{state=held} is not 1")
	}

	// A promise released is removed from Placement.
	d.book.Release("vm1")
	if err := d.place.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Consumers()[vm1]; ok {
		t.Error("vm1's reservation is still in Placement after its promise was released")
	}
	if _, ok := c.Consumers()[novaServerID]; !ok {
		t.Error("the instance's allocation was removed")
	}
}

// A promise Placement refuses for want of room is shown, with Placement's
// words, and the round goes on; Placement down is an alarm once, shown in
// status, and when it answers again the reservations are made.
func TestPlacementRefusedAndDown(t *testing.T) {
	d, c := placementHost(t)
	ctx := context.Background()
	c.Allocate(novaServerID, rpB, map[string]int{"VCPU": 1, "MEMORY_MB": 3072})
	if err := d.book.Promise("big", reserve.Capacity{VCPUs: 1, MemoryBytes: 2 << 30}, false); err != nil {
		t.Fatal(err)
	}
	if err := d.book.Promise("small", reserve.Capacity{VCPUs: 1, MemoryBytes: 256 << 20}, false); err != nil {
		t.Fatal(err)
	}
	if err := d.place.sync(ctx); err != nil {
		t.Fatalf("a refusal for want of room failed the round: %v", err)
	}
	st := d.reservation().Placement
	if len(st.Held) != 1 || st.Held[0] != "small" || !strings.Contains(st.Failed["big"], "exceed the capacity") {
		t.Errorf("status: %+v; want small held, big refused with Placement's words", st)
	}
	if testutil.ToFloat64(d.metrics.PlacementReservations.WithLabelValues("failed")) != 1 {
		t.Error("ax_placement_reservations{state=failed} is not 1")
	}
	found := false
	for _, e := range events(d, "placement") {
		found = found || strings.Contains(e, "Placement does not hold this host's promise to big") && strings.Contains(e, "may fill this host")
	}
	if !found {
		t.Errorf("no event says big is not held: %q", events(d, "placement"))
	}

	c.SetPlacementDown(true)
	for range 2 {
		if err := d.place.sync(ctx); err == nil {
			t.Fatal("a round with Placement down did not fail")
		}
	}
	if a := events(d, "alarm"); len(a) != 1 || !strings.Contains(a[0], "Placement's reservations cannot be made to match") {
		t.Errorf("alarms %q; want one", a)
	}
	if st := d.reservation().Placement; !strings.Contains(st.Error, "placement is down") {
		t.Errorf("status while Placement is down: %+v", st)
	}
	if testutil.ToFloat64(d.metrics.PlacementRounds.WithLabelValues("error")) != 2 {
		t.Error("ax_placement_rounds_total{result=error} is not 2 after two rounds with Placement down")
	}
	c.SetPlacementDown(false)
	c.Allocate(novaServerID, rpB, map[string]int{"VCPU": 1, "MEMORY_MB": 512}) // the instance shrank
	if err := d.place.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if st := d.reservation().Placement; st.Error != "" || len(st.Held) != 2 || len(st.Failed) != 0 {
		t.Errorf("status after Placement is back: %+v", st)
	}
	e := events(d, "placement")
	if !strings.Contains(e[len(e)-1], "match this host's promises again") && !strings.Contains(strings.Join(e, "\n"), "match this host's promises again") {
		t.Errorf("no event says Placement matches again: %q", e)
	}
}

// The mirror's loop makes a round at start and at each change of the
// book; drop removes one VM's reservation at once.
func TestPlacementRunAndDrop(t *testing.T) {
	d, c := placementHost(t)
	d.reservationChanged() // the mirror's metrics before any round, as Run's restore does
	if err := d.book.Promise("vm1", reserve.Capacity{VCPUs: 1, MemoryBytes: 64 << 20}, false); err != nil {
		t.Fatal(err)
	}
	d.wg.Go(func() { d.place.run(d.ctx) })
	vm1, vm2 := nova.ReservationConsumer(rpB, "vm1"), nova.ReservationConsumer(rpB, "vm2")
	held := func(c *novatest.Cloud, id string) func() bool {
		return func() bool { _, ok := c.Consumers()[id]; return ok }
	}
	seen := func() string { return strings.Join(events(d, "placement"), "\n") }
	until(t, "vm1 held at start", held(c, vm1), seen)
	if err := d.book.Promise("vm2", reserve.Capacity{VCPUs: 1, MemoryBytes: 64 << 20}, false); err != nil {
		t.Fatal(err)
	}
	d.reservationChanged()
	until(t, "vm2 held once promised", held(c, vm2), seen)
	d.book.Release("vm2")
	d.place.drop(context.Background(), "vm2")
	if held(c, vm2)() {
		t.Error("vm2's reservation is still held after drop")
	}
	if st := d.reservation().Placement; len(st.Held) != 1 || st.Held[0] != "vm1" {
		t.Errorf("status after drop: %+v", st)
	}
}
