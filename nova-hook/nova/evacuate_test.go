package nova_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/nova-hook/nova/novatest"
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

// Follow ends on what it cannot go past: a server Nova does not have, and
// an evacuation Nova put in ERROR (the old host stays forced down: the
// operator looks at it).
func TestFollowEnds(t *testing.T) {
	c, cl := cloud(t)
	c.AddComputeService("a", svcA)
	c.AddComputeService("b", svcB)
	c.SetServiceUp("a", false)
	ctx := context.Background()
	f := &nova.Follow{Server: "00000000-0000-4000-8000-000000000001", To: "b", Poll: time.Millisecond}
	if _, err := f.Run(ctx, cl); !errors.Is(err, nova.ErrNotFound) {
		t.Errorf("an unknown server: %v, want ErrNotFound", err)
	}
	c.HoldEvacuations(true)
	var stages []nova.Stage
	f = &nova.Follow{Server: web, To: "b", Poll: time.Millisecond, Stage: func(s nova.Stage, _ nova.FollowResult) { stages = append(stages, s) }}
	done := make(chan error, 1)
	go func() { _, err := f.Run(ctx, cl); done <- err }()
	for len(c.Migrations()) == 0 {
		time.Sleep(time.Millisecond)
	}
	c.Update(web, func(s *novatest.Server) { s.Status = "ERROR" })
	if err := <-done; !errors.Is(err, nova.ErrEvacuationFailed) {
		t.Errorf("an evacuation in ERROR: %v", err)
	}
	if want := []nova.Stage{nova.StageForcing, nova.StageEvacuating, nova.StageMoving}; !slices.Equal(stages, want) {
		t.Errorf("stages %q, want %q", stages, want)
	}
	if !c.ComputeService("a").ForcedDown {
		t.Error("forced_down cleared after a failed evacuation")
	}
}

// A Follow that starts when the server is on its new host already (axd
// restarted after Nova said so) waits for the evacuation to complete and
// evacuates nothing again.
func TestFollowResumes(t *testing.T) {
	c, cl := cloud(t)
	c.AddComputeService("a", svcA)
	c.AddComputeService("b", svcB)
	c.SetServiceUp("a", false)
	ctx := context.Background()
	if err := cl.SetForcedDown(ctx, svcA, true); err != nil {
		t.Fatal(err)
	}
	if err := cl.Evacuate(ctx, web, "b"); err != nil {
		t.Fatal(err)
	}
	reached := make(chan nova.Stage, 8)
	f := &nova.Follow{Server: web, To: "b", Poll: time.Millisecond, Forced: true, Stage: func(s nova.Stage, _ nova.FollowResult) { reached <- s }}
	type result struct {
		res nova.FollowResult
		err error
	}
	done := make(chan result, 1)
	go func() { res, err := f.Run(ctx, cl); done <- result{res, err} }()
	for s := range reached {
		if s == nova.StageCompleting {
			break
		}
	}
	c.RestartCompute("a")
	r := <-done
	if r.err != nil || r.res.From != "a" || !r.res.Moved {
		t.Fatalf("resumed follow: %+v, %v", r.res, r.err)
	}
	if c.ComputeService("a").ForcedDown {
		t.Error("forced_down (set before) not cleared")
	}
	if n := c.Count("POST", "/action"); n != 1 {
		t.Errorf("%d evacuations asked, want the first alone", n)
	}
}
