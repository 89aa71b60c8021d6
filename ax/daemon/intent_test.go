package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/test/etcdtest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// withWitness serves a witness (PSK mode, the pair's key) on loopback for
// the pair, its lease ttl long and its restart grace already over.
func withWitness(t *testing.T, ttl time.Duration) func(string, *Config) {
	t.Helper()
	// The witness starts with its clock behind, so that the grace after its
	// start (one TTL) is over once the clock is put right.
	var skew atomic.Int64
	skew.Store(int64(-ttl - 4*time.Second))
	w, err := witness.NewServer(witness.ServerConfig{PSK: []byte("0123456789abcdef0123456789abcdef"), LeaseTTL: ttl,
		Now: func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }})
	if err != nil {
		t.Fatal(err)
	}
	skew.Store(0)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	return func(_ string, c *Config) { c.Witness, c.LeaseTTL = ln.Addr().String(), ttl }
}

// A planned failover hands the lease over (the partner need not wait for it
// to expire), and the VM, declared FT, is protected again in the other
// direction without any command; the time it ran unprotected is reported.
// Declaring it none then ends that.
func TestPlannedFailoverReprotects(t *testing.T) {
	// A lease longer than the 10 s a planned failover waits for the
	// partner: the handover succeeds only if the lease is given up.
	p := runPair(t, withWitness(t, 16*time.Second))
	p.defineVM(t)
	p.fakeB.NoPIDs() // the promoted VM's memory is tracked by its RAM file
	p.protectFT(t)
	if a := vm1(p.a); a.Declared != api.LevelFT || a.DeclaredPeer != "b" || a.UnprotectedS != 0 {
		t.Fatalf("a declares %q towards %q, unprotected %.1f s", a.Declared, a.DeclaredPeer, a.UnprotectedS)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.a.plannedFailover(ctx, "vm1"); err != nil {
		t.Fatalf("planned failover: %v\nb: %+v", err, p.b.eventsSince(0))
	}
	until(t, "FT protection b→a, by itself", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return b.Role == api.RolePrimary && b.Level == api.LevelFT && b.Peer == "a" && b.State == "protected" && a.State == "ready"
	}, func() string {
		return fmt.Sprintf("%s\nb: %+v\na: %+v", both(p)(), p.b.eventsSince(0), p.a.eventsSince(0))
	})
	// a kept the RAM its paused copy left as the base of b's stream back.
	seeded := false
	for _, e := range p.a.eventsSince(0) {
		seeded = seeded || e.Kind == "seed"
	}
	if !seeded {
		t.Errorf("a did not keep its copy's RAM as the base of the replica: %+v", p.a.eventsSince(0))
	}
	b := vm1(p.b)
	if b.Declared != api.LevelFT || b.DeclaredPeer != "a" || b.UnprotectedS != 0 {
		t.Errorf("b declares %q towards %q, unprotected %.1f s", b.Declared, b.DeclaredPeer, b.UnprotectedS)
	}
	// The gap is reported just after the transition (after the store is
	// written): status can show the VM protected a moment before.
	until(t, "an event saying how long vm1 ran unprotected", func() bool {
		for _, e := range p.b.eventsSince(0) {
			if e.Kind == "reprotected" && strings.Contains(e.Text, "declared level ft again, after") {
				return true
			}
		}
		return false
	}, func() string { return fmt.Sprintf("%+v", p.b.eventsSince(0)) })
	if n := testutil.ToFloat64(p.b.metrics.UnprotectedS.WithLabelValues("vm1")); n <= 0 {
		t.Errorf("ax_vm_unprotected_seconds_total %v, want the gap counted", n)
	}

	// Declared none: protection ends and does not come back by itself.
	if err := p.b.setLevel(ctx, "vm1", api.ProtectRequest{Level: api.LevelNone}); err != nil {
		t.Fatal(err)
	}
	until(t, "unprotected", func() bool { return vm1(p.b).Role == api.RoleLocal && vm1(p.a).Name == "" }, both(p))
	time.Sleep(3 * reprotectFirst / 2)
	if b := vm1(p.b); b.Role != api.RoleLocal || b.Declared != api.LevelNone {
		t.Errorf("after level none: %s, declared %q", b.Role, b.Declared)
	}
}

// axd stopped on the primary with a restart grace: the partner keeps its
// replica and does not take the VM over while the grace holds, although the
// primary is silent and its lease has ended; an axd back within it resumes
// the stream on that replica. Stopped for longer, the partner takes over.
func TestRestartGraceHoldsThePartner(t *testing.T) {
	const grace = 3 * time.Second
	p := runPair(t, withWitness(t, time.Second), func(h string, c *Config) {
		if h == "a" {
			c.RestartGrace = grace
		}
	})
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)
	// Within the grace: back, on the same replica.
	p.stop["a"]()
	time.Sleep(grace / 2)
	if b := vm1(p.b); b.Role != api.RoleSecondary || b.State != "ready" {
		t.Fatalf("b while a's axd restarts: %+v", b)
	}
	p.a = p.start(t, "a")
	p.waitFT(t)
	restarts, dropped := 0, false
	for _, e := range p.b.eventsSince(0) {
		if strings.Contains(e.Text, "axd restarts: replica kept") {
			restarts++
		}
		dropped = dropped || strings.Contains(e.Text, "replica dropped")
	}
	if restarts != 1 || dropped {
		t.Fatalf("b heard of %d restarts, dropped its replica %v: %+v", restarts, dropped, p.b.eventsSince(0))
	}
	// Beyond the grace: the partner takes over — not before.
	p.stop["a"]()
	t0 := time.Now()
	until(t, "b runs the VM", func() bool { b := vm1(p.b); return b.Role == api.RoleLocal && b.State == "running" }, both(p))
	if waited := time.Since(t0); waited < grace-200*time.Millisecond {
		t.Fatalf("b took the VM over %s after a's axd stopped, within the grace of %s", waited, grace)
	}
}

// A seed no stream synced on is dropped after seedUnusedFor; one of a VM
// known here, or younger, is kept.
func TestDropUnusedSeeds(t *testing.T) {
	d, _ := fakeHost(t, reserve.Capacity{VCPUs: 4, MemoryBytes: 1 << 30})
	ram := filepath.Join(t.TempDir(), "ram")
	if err := os.WriteFile(ram, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"old", "young"} {
		spec := goodSpec()
		spec.Name, spec.Guest.RAMMiB, spec.Guest.RAMFile = name, 1, ram
		d.seedReplica(spec)
	}
	old := filepath.Join(d.cfg.StateDir, "replicas", "old")
	past := time.Now().Add(-seedUnusedFor - time.Minute)
	if err := os.Chtimes(filepath.Join(old, "state.json"), past, past); err != nil {
		t.Fatal(err)
	}
	d.dropUnusedSeeds()
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("an unused seed older than %s was kept: %v", seedUnusedFor, err)
	}
	if _, ok := replication.SeedAge(filepath.Join(d.cfg.StateDir, "replicas", "young")); !ok {
		t.Error("a young seed was dropped")
	}
}

// A replica outlives a restart of its host's axd: the restarted axd reopens
// it ready to take over, so the VM is still taken over there when its
// primary dies before its stream came back.
func TestReplicaRestoredAfterRestart(t *testing.T) {
	p := runPair(t, withWitness(t, time.Second))
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)
	p.stop["b"]()
	p.stop["a"]() // a dies while b's axd is away: no stream, no word to b
	p.b = p.start(t, "b")
	until(t, "b reopened its replica ready to take over", func() bool {
		for _, e := range p.b.eventsSince(0) {
			if strings.Contains(e.Text, "ready to take over from checkpoint") {
				return true
			}
		}
		return false
	}, func() string { return fmt.Sprintf("%+v", p.b.eventsSince(0)) })
	until(t, "b runs the VM from the restored replica", func() bool {
		b := vm1(p.b)
		return b.Role == api.RoleLocal && b.State == "running"
	}, func() string { return fmt.Sprintf("%+v", p.b.eventsSince(0)) })
}

// withEtcdWitness has the pair hold its leases on a real etcd (one member)
// instead of axd --witness.
func withEtcdWitness(t *testing.T) func(string, *Config) {
	t.Helper()
	return withEtcdCluster(etcdtest.Start(t, 1))
}

// withEtcdCluster has the pair hold its leases on the etcd cluster c.
func withEtcdCluster(c *etcdtest.Cluster) func(string, *Config) {
	addr := witness.EtcdScheme + strings.Join(c.Endpoints(), ",")
	return func(_ string, cfg *Config) { cfg.Witness, cfg.LeaseTTL = addr, time.Second }
}

// The etcd witness behind the same seam: a planned failover releases the
// lease in etcd, the partner takes it over by etcd's transaction, runs the
// VM and protects it back — and a primary stopped for good is taken over
// once its etcd lease lapses.
func TestEtcdWitnessFailovers(t *testing.T) {
	p := runPair(t, withEtcdWitness(t), func(_ string, c *Config) { c.RestartGrace = 2 * time.Second })
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.a.plannedFailover(ctx, "vm1"); err != nil {
		t.Fatalf("planned failover: %v\nb: %+v", err, p.b.eventsSince(0))
	}
	until(t, "FT protection b→a, by itself", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return b.Role == api.RolePrimary && b.State == "protected" && a.State == "ready"
	}, func() string {
		return fmt.Sprintf("%s\nb: %+v\na: %+v", both(p)(), p.b.eventsSince(0), p.a.eventsSince(0))
	})
	var li witness.LeaseInfo
	until(t, "b holds vm1's lease in etcd", func() bool {
		var err error
		li, err = p.b.wit.Query(ctx, "vm1")
		return err == nil && li.Holder == "b" && !li.Expired
	}, func() string { return fmt.Sprintf("%+v", li) })
	// b's axd stops and does not come back within its grace: a takes over
	// once b's etcd lease lapsed and the grace ended.
	p.fakeA.NoPIDs()
	p.stop["b"]()
	until(t, "a runs the VM once b's etcd lease lapsed", func() bool {
		a := vm1(p.a)
		return a.Role == api.RoleLocal && a.State == "running"
	}, func() string { return fmt.Sprintf("%+v", p.a.eventsSince(0)) })
}

// protectFT protects vm1 at FT from a to b and waits for it (waitFT).
func (p *pair) protectFT(t *testing.T) {
	t.Helper()
	if err := p.a.protect("vm1", api.ProtectRequest{Level: api.LevelFT, Peer: "b"}); err != nil {
		t.Fatal(err)
	}
	p.waitFT(t)
}

// waitFT waits until vm1 is FT-protected from a to b: b's replica ready
// and a few checkpoints committed.
func (p *pair) waitFT(t *testing.T) {
	t.Helper()
	until(t, "FT protection a→b", func() bool {
		a, b := vm1(p.a), vm1(p.b)
		return a.State == "protected" && a.Committed > 2 && b.State == "ready"
	}, both(p))
}
