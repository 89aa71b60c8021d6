package openstack

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/nova-hook/nova"
)

// TestOpenStackEvacuate checks the evacuation axd runs after promoting a
// server against a real Nova (Zed): a server runs on host a (Nova's fake
// driver); a's nova-compute dies; with the adopt marker set as axd sets it,
// nova.Follow (what axd calls after a promotion) forces a down and
// evacuates the server to b, whose nova-compute runs AX's adopting mixin
// over the fake driver — it adopts, it does not spawn; Nova says b,
// ACTIVE. a's nova-compute starts again and completes the evacuation;
// forced_down is cleared; the server stays on b. Before, b held a
// reservation in Placement for the server, as axd on its partner does:
// see holdReservation.
func TestOpenStackEvacuate(t *testing.T) {
	requireCloud(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir := t.TempDir()
	c := startCloud(ctx, t, filepath.Join(dir, "cloud"))
	compute, image := adminClients(ctx, t, c)
	// On a: b's nova-compute is not up yet, the scheduler has a alone.
	id := makeServer(ctx, t, compute, "promoted", makeFlavor(ctx, t, compute, "ax.ft", nil), makeImage(ctx, t, image, "ax-ft", nil), nil)

	// b: nova-compute with the adopting mixin over the fake driver.
	adopt := filepath.Join(dir, "nova-adopt")
	if err := os.MkdirAll(adopt, 0o755); err != nil {
		t.Fatal(err)
	}
	wrapper, err := c.WriteAdoptWrapper("../../nova-hook/driver/ax_adopt.py", "testdata/ax_adopt_fake.py")
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	// Its resource tracker runs every 2 s: the reservation below sees it.
	if err := c.StartCompute(ctx, "b", wrapper, "update_resources_interval = 2\nperiodic_fuzzy_delay = 0\n"+
		"compute_driver = ax_adopt_fake.AdoptingFakeDriver\n[ax]\nadopt_dir = "+adopt+"\n"); err != nil {
		t.Fatal(err)
	}
	t.Logf("nova-compute b up and mapped in %s", time.Since(t0).Round(time.Second))
	cl, err := nova.New(nova.Config{Cloud: "ax", CloudsFile: c.CloudsYAML()})
	if err != nil {
		t.Fatal(err)
	}
	reservation := holdReservation(ctx, t, cl, filepath.Join(c.Dir, "log", "nova-compute-b.log"))

	// Host a dies; axd on b promoted the server and marked it.
	if err := c.Stop("nova-compute"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(adopt, id), []byte("instance-00000001\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// axd gives the promoted server's room back before the evacuation.
	if err := cl.Unreserve(ctx, reservation); err != nil {
		t.Fatal(err)
	}
	if err := cl.Unreserve(ctx, reservation); err != nil {
		t.Errorf("removing a reservation already removed: %v", err)
	}
	var mu sync.Mutex
	stages := map[nova.Stage]time.Time{}
	var retries []string
	f := &nova.Follow{Server: id, To: "b", Poll: 500 * time.Millisecond, MaxWait: 5 * time.Second,
		Stage: func(s nova.Stage, res nova.FollowResult) {
			mu.Lock()
			stages[s] = time.Now()
			mu.Unlock()
			t.Logf("follow: %s (from %s)", s, res.From)
		},
		Retry: func(s nova.Stage, err error) {
			mu.Lock()
			retries = append(retries, fmt.Sprintf("%s: %v", s, err))
			mu.Unlock()
		},
	}
	type result struct {
		res nova.FollowResult
		err error
	}
	done := make(chan result, 1)
	fctx, fcancel := context.WithCancel(ctx)
	defer fcancel()
	began := time.Now()
	go func() {
		res, err := f.Run(fctx, cl)
		done <- result{res, err}
	}()
	reached := func(s nova.Stage) bool {
		mu.Lock()
		defer mu.Unlock()
		_, ok := stages[s]
		return ok
	}
	for !reached(nova.StageCompleting) {
		select {
		case r := <-done:
			t.Fatalf("follow ended before Nova said b: %+v, %v (retried: %q)", r.res, r.err, retries)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Since(began) > 3*time.Minute {
			t.Fatalf("Nova did not say b, ACTIVE within 3 min (retried: %q)", retries)
		}
	}
	mu.Lock()
	moved := stages[nova.StageCompleting].Sub(began)
	mu.Unlock()
	t.Logf("evacuation: Nova says b, ACTIVE %s after the follow began", moved.Round(10*time.Millisecond))
	os.Remove(filepath.Join(adopt, id)) // as axd does once Nova says b

	s, err := cl.Server(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if s.Host != "b" || s.Status != "ACTIVE" {
		t.Fatalf("server after the evacuation: host %s, %s", s.Host, s.Status)
	}
	blog := filepath.Join(c.Dir, "log", "nova-compute-b.log")
	if !logged(blog, "AX: adopted the running domain of instance "+id) {
		t.Errorf("nova-compute b did not log the adoption of %s", id)
	}
	if logged(blog, "AX test: spawn of instance "+id) {
		t.Errorf("nova-compute b spawned %s instead of adopting it", id)
	}
	if svc, err := cl.ComputeService(ctx, "a"); err != nil || !svc.ForcedDown {
		t.Errorf("a's compute service: %+v, %v; want forced down", svc, err)
	}
	ms, err := cl.Evacuations(ctx, id)
	if err != nil || len(ms) != 1 || ms[0].Status != "done" || ms[0].Source != "a" || ms[0].Dest != "b" {
		t.Errorf("evacuations before a's nova-compute is back: %+v, %v; want one a → b, done", ms, err)
	}

	// a's nova-compute starts again: it completes the evacuation.
	t1 := time.Now()
	if err := c.Restart("nova-compute"); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(4 * time.Minute):
		t.Fatalf("the evacuation was not completed within 4 min of a's nova-compute starting again (retried: %q)", retries)
	}
	if r.err != nil || !r.res.Forced || !r.res.Moved || r.res.From != "a" {
		t.Fatalf("follow: %+v, %v", r.res, r.err)
	}
	t.Logf("completed and forced_down cleared %s after a's nova-compute started again", time.Since(t1).Round(100*time.Millisecond))
	ms, err = cl.Evacuations(ctx, id)
	if err != nil || len(ms) != 1 || ms[0].Status != "completed" {
		t.Errorf("evacuations: %+v, %v; want one, completed", ms, err)
	}
	if svc, err := cl.ComputeService(ctx, "a"); err != nil || svc.ForcedDown {
		t.Errorf("a's compute service: %+v, %v; want forced_down cleared", svc, err)
	}
	if s, err := cl.Server(ctx, id); err != nil || s.Host != "b" || s.Status != "ACTIVE" {
		t.Errorf("server after a came back: %+v, %v; want host b, ACTIVE", s, err)
	}
	if len(retries) > 0 {
		t.Logf("calls retried: %q", retries)
	}
}

// holdReservation makes the reservation axd on b holds for a server it is
// partner of (instance-00000001: 1 vCPU, 512 MiB) in the real Placement,
// and checks what axd relies on: Placement counts it and refuses what
// does not fit, with the error axd shows; its consumer is AX's; b's
// resource tracker, whose log is blog, runs and leaves it alone. It
// returns the reservation's consumer.
func holdReservation(ctx context.Context, t *testing.T, cl *nova.Client, blog string) string {
	t.Helper()
	rp, err := cl.ComputeNode(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := cl.Inventory(ctx, rp)
	if err != nil || inv["VCPU"] < 1 || inv["MEMORY_MB"] < 512 {
		t.Fatalf("b's inventory %v, %v", inv, err)
	}
	consumer := nova.ReservationConsumer(rp, "instance-00000001")
	want := nova.Resources{"VCPU": 1, "MEMORY_MB": 512}
	if err := cl.Reserve(ctx, consumer, rp, want); err != nil {
		t.Fatal(err)
	}
	if err := cl.Reserve(ctx, consumer, rp, want); err != nil {
		t.Fatalf("writing the same reservation again (at its generation): %v", err)
	}
	if typ, err := cl.ConsumerType(ctx, consumer); err != nil || typ != nova.ReservationType {
		t.Errorf("the reservation's consumer type %q, %v; want %s", typ, err, nova.ReservationType)
	}
	err = cl.Reserve(ctx, nova.ReservationConsumer(rp, "too-big"), rp, nova.Resources{"MEMORY_MB": inv["MEMORY_MB"] + 1})
	if !errors.Is(err, nova.ErrNoCapacity) || !strings.Contains(err.Error(), "MEMORY_MB") {
		t.Errorf("a reservation larger than b: %v; want ErrNoCapacity with Placement's words", err)
	}
	t.Logf("a reservation larger than b: %v", err)
	// b's resource tracker runs (every 2 s): it finds a consumer that is no
	// instance of its own, says so, and leaves it.
	deadline := time.Now().Add(time.Minute)
	for !logged(blog, "Instance "+consumer+" has allocations against this compute host but is not found in the database") {
		if time.Now().After(deadline) {
			t.Fatalf("b's resource tracker did not look at the reservation within a minute (%s)", blog)
		}
		time.Sleep(time.Second)
	}
	time.Sleep(5 * time.Second) // two more runs
	allocs, err := cl.Allocations(ctx, rp)
	if err != nil || !allocs[consumer].Equal(want) {
		t.Fatalf("b's allocations after its resource tracker ran: %v, %v; want the reservation kept", allocs, err)
	}
	t.Logf("reservation %s on b (%s) kept by b's resource tracker", consumer, rp)
	return consumer
}
