package nova_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/axproject/ax/nova-hook/nova"
)

const svcA, svcB = "c1a2b3c4-0000-4000-8000-00000000000a", "c1a2b3c4-0000-4000-8000-00000000000b"

// The evacuation's calls against the fake Nova, each at its microversion:
// Nova refuses to evacuate while a's compute service is up; forced down,
// the server moves to b and its migration is done; a's nova-compute
// starting again completes it; forced_down is cleared.
func TestEvacuateCalls(t *testing.T) {
	c, cl := cloud(t)
	c.AddComputeService("a", svcA)
	c.AddComputeService("b", svcB)
	ctx := context.Background()
	svc, err := cl.ComputeService(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if svc.ID != svcA || svc.Host != "a" || svc.State != "up" || svc.ForcedDown {
		t.Fatalf("service of a: %+v", svc)
	}
	if _, err := cl.ComputeService(ctx, "zz"); !errors.Is(err, nova.ErrNoService) {
		t.Errorf("service of an unknown host: %v, want ErrNoService", err)
	}
	if err := cl.Evacuate(ctx, web, "b"); err == nil || !strings.Contains(err.Error(), "still in use") {
		t.Errorf("evacuating while a's compute is up: %v, want Nova's refusal", err)
	}
	c.SetServiceUp("a", false) // a died
	if err := cl.SetForcedDown(ctx, svc.ID, true); err != nil {
		t.Fatal(err)
	}
	if s := c.ComputeService("a"); !s.ForcedDown {
		t.Fatal("not forced down")
	}
	if err := cl.Evacuate(ctx, web, "b"); err != nil {
		t.Fatal(err)
	}
	s, err := cl.Server(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	if s.Host != "b" || s.Status != "ACTIVE" {
		t.Errorf("after the evacuation: host %s, %s", s.Host, s.Status)
	}
	ms, err := cl.Evacuations(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Source != "a" || ms[0].Dest != "b" || ms[0].Status != "done" || ms[0].Type != "evacuation" || ms[0].Created.IsZero() {
		t.Fatalf("evacuations %+v", ms)
	}
	if ms, err := cl.Evacuations(ctx, db); err != nil || len(ms) != 0 {
		t.Errorf("another server's evacuations: %+v, %v", ms, err)
	}
	c.RestartCompute("a")
	if ms, _ = cl.Evacuations(ctx, web); len(ms) != 1 || ms[0].Status != "completed" {
		t.Fatalf("after a's nova-compute started: %+v", ms)
	}
	if err := cl.SetForcedDown(ctx, svc.ID, false); err != nil {
		t.Fatal(err)
	}
	if s := c.ComputeService("a"); s.ForcedDown {
		t.Error("forced_down not cleared (gophercloud's UpdateOpts drops a false)")
	}
	// The shared client keeps its microversion: servers still embed
	// their flavor's extra specs.
	if s, err := cl.Server(ctx, web); err != nil || s.FlavorSpecs["ax:level"] != "ft" {
		t.Errorf("server after the evacuation calls: %+v, %v", s, err)
	}
	for _, bad := range []func() error{
		func() error { return cl.SetForcedDown(ctx, "../x", true) },
		func() error { return cl.Evacuate(ctx, web, "b/../a") },
		func() error { _, err := cl.Evacuations(ctx, "x?y"); return err },
	} {
		if err := bad(); err == nil {
			t.Error("a bad id or host was sent")
		}
	}
}
