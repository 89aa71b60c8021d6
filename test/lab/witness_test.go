package lab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

// etcdLab is ftLab with the etcd witness: a 3-member cluster on w1–w3,
// TLS with client certificates.
func etcdLab(t *testing.T, prefix string) (*Lab, *VM, string, DaemonConfig) {
	t.Helper()
	return labWithDaemons(t, prefix, GuestConfig{Dirty: 4}, DaemonConfig{Witness: WitnessEtcd})
}

// TestIntegrationEtcdWitness: the FT claims on the etcd witness — an
// isolated primary fences before its partner takes over; host-kill trials
// lose no acknowledged record; with one member down failovers still work;
// with two down (no quorum) nothing is promoted and the primary runs on,
// protected, with the witness reported unreachable; with quorum back the VM
// is protected as before, nothing lost, and fails over again.
func TestIntegrationEtcdWitness(t *testing.T) {
	l, vm, bin, dcfg := etcdLab(t, "itetcd")
	ctx := context.Background()
	if err := l.protectAndWait(ctx, l.Client(HostA), vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	primaryIsolated(t, l, vm, HostA, HostB)
	if err := l.KillHost(ctx, HostA); err != nil {
		t.Fatal(err)
	}
	if err := l.RecoverHost(ctx, HostA, dcfg); err != nil {
		t.Fatal(err)
	}
	waitVM(t, l, l.Client(HostB), vm.Name, 120*time.Second, "FT protection towards a after its isolation", func(s api.VMStatus) bool {
		return s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == HostA && s.State == "protected"
	})

	trials := 2
	if n, err := strconv.Atoi(os.Getenv("AX_ETCD_TRIALS")); err == nil {
		trials = n // local use
	}
	primary := failoverTrials(t, l, vm, bin, dcfg, HostB, HostA, "etcd-trial", trials)

	if err := l.KillEtcdMember(HostW1); err != nil {
		t.Fatal(err)
	}
	t.Logf("etcd member on %s killed", HostW1)
	primary = failoverTrials(t, l, vm, bin, dcfg, primary, other(primary), "one-member-down", 1)

	// No quorum: the partner must not promote, the primary runs on.
	record := filepath.Join(l.StateDir, "no-quorum.rec")
	client, err := l.StartClient(ctx, bin, fmt.Sprintf("%s:%d", GuestIP, LedgerPort), 20, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()
	if err := l.KillEtcdMember(HostW2); err != nil {
		t.Fatal(err)
	}
	lost := time.Now()
	cp, cs := l.Client(primary), l.Client(other(primary))
	sawUnreachable := false
	for time.Since(lost) < 8*time.Second { // 4 × the lease etcd grants
		sp, err := l.vmStatus(ctx, cp, vm.Name)
		if err != nil {
			t.Fatal(err)
		}
		if sp.State != "protected" || sp.Role != api.RolePrimary {
			t.Fatalf("%.1f s without etcd quorum, the primary on %s is %s/%s: %s", time.Since(lost).Seconds(), primary, sp.Role, sp.State, sp.Alarm)
		}
		sawUnreachable = sawUnreachable || sp.Witness != "reachable"
		ss, err := l.vmStatus(ctx, cs, vm.Name)
		if err == nil && ss.Role != api.RoleSecondary {
			t.Fatalf("%.1f s without etcd quorum, %s holds the VM as %s/%s", time.Since(lost).Seconds(), other(primary), ss.Role, ss.State)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !sawUnreachable {
		t.Errorf("without etcd quorum the primary's status never said the witness was unreachable")
	}
	st, err := cp.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h := st.WitnessHealth; h == nil || h.Kind != "etcd" || h.Quorum || h.Reachable != 1 || len(h.Members) != 3 || h.Alarm == "" {
		t.Errorf("without etcd quorum, %s's witness health is %+v; want etcd, 1 of 3 members reachable, no quorum, an alarm", primary, h)
	} else {
		t.Logf("without quorum, %s says: %s", primary, h.Alarm)
	}
	if m, err := l.Scrape(ctx, primary, MetricsAddr(primary)); err != nil || !strings.Contains(m, "\nax_witness_quorum 0\n") {
		t.Errorf("without etcd quorum, %s's metrics do not say ax_witness_quorum 0 (%v)", primary, err)
	}
	initial := EtcdInitialCluster()
	for _, h := range []string{HostW1, HostW2} {
		if err := l.StartEtcdMember(ctx, h, initial); err != nil {
			t.Fatal(err)
		}
	}
	back := time.Now()
	waitVM(t, l, cp, vm.Name, 60*time.Second, "witness reachable again with quorum back", func(s api.VMStatus) bool {
		return s.Witness == "reachable" && s.State == "protected"
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		st, err := cp.Status(ctx)
		if err == nil && st.WitnessHealth != nil && st.WitnessHealth.Quorum && st.WitnessHealth.Reachable == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("quorum back, but %s's witness health is not 3/3 with quorum: %+v (%v)", primary, st, err)
		}
	}
	t.Logf("quorum back: witness reachable to %s %.1f s after the members restarted", primary, time.Since(back).Seconds())
	client.Stop()
	acked, missing := ledgerLoss(t, l, record, fmt.Sprintf("%s:%d", GuestIP, LedgerPort))
	if acked == 0 || missing > 0 {
		t.Fatalf("through the quorum loss: %d acked, %d missing", acked, missing)
	}
	t.Logf("through the quorum loss: %d records acked, none missing", acked)
	failoverTrials(t, l, vm, bin, dcfg, primary, other(primary), "quorum-back", 1)
}

// TestIntegrationEtcdPartitions: a and b cannot reach each other. With the
// primary beside the etcd majority and the partner beside one member only,
// the partner never promotes and the primary runs on. The reverse: the
// primary fences before its partner, now with the majority, runs the guest,
// and no acknowledged record is lost.
func TestIntegrationEtcdPartitions(t *testing.T) {
	l, vm, bin, _ := etcdLab(t, "itpart")
	ctx := context.Background()
	ca, cb := l.Client(HostA), l.Client(HostB)
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	w := func(hs ...string) []string {
		var addrs []string
		for _, h := range hs {
			addrs = append(addrs, HostAddrs[h].Mgmt)
		}
		return addrs
	}
	separate := func(cut bool) {
		t.Helper()
		state := map[bool]string{true: "down", false: "up"}[cut]
		if err := ip(ctx, "-n", l.Netns(HostA), "link", "set", ReplLink, state); err != nil {
			t.Fatal(err)
		}
		if err := l.Unreachable(ctx, HostA, cut, w(HostB)...); err != nil {
			t.Fatal(err)
		}
		if err := l.Unreachable(ctx, HostB, cut, w(HostA)...); err != nil {
			t.Fatal(err)
		}
	}

	// The partner with one member of three: it must never promote.
	if err := l.Unreachable(ctx, HostB, true, w(HostW1, HostW2)...); err != nil {
		t.Fatal(err)
	}
	separate(true)
	cut := time.Now()
	for time.Since(cut) < 8*time.Second {
		if s, err := l.vmStatus(ctx, cb, vm.Name); err == nil && s.Role != api.RoleSecondary {
			t.Fatalf("b, beside one etcd member of three, holds the VM as %s/%s %.1f s after the partition", s.Role, s.State, time.Since(cut).Seconds())
		}
		if s, err := l.vmStatus(ctx, ca, vm.Name); err != nil || s.Role != api.RolePrimary || s.State == "fenced" {
			t.Fatalf("a, beside the etcd majority, stopped running the VM %.1f s after the partition: %+v %v", time.Since(cut).Seconds(), s, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("partner beside the minority: no promotion in 8 s, primary running")
	separate(false)
	if err := l.Unreachable(ctx, HostB, false, w(HostW1, HostW2)...); err != nil {
		t.Fatal(err)
	}
	healed := time.Now()
	waitVM(t, l, ca, vm.Name, 60*time.Second, "a protected towards b again after the partition healed", func(s api.VMStatus) bool {
		return s.State == "protected" && s.Peer == HostB
	})
	t.Logf("partition healed: protected again in %.1f s", time.Since(healed).Seconds())

	// The primary with one member of three: it fences, then b promotes.
	record := filepath.Join(l.StateDir, "partition.rec")
	addr := fmt.Sprintf("%s:%d", GuestIP, LedgerPort)
	client, err := l.StartClient(ctx, bin, addr, 20, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()
	time.Sleep(3 * time.Second)
	if err := l.Unreachable(ctx, HostA, true, w(HostW1, HostW2)...); err != nil {
		t.Fatal(err)
	}
	separate(true)
	cut = time.Now()
	var fencedAt time.Duration
	for fencedAt == 0 {
		s, err := l.vmStatus(ctx, ca, vm.Name)
		if err == nil && s.State == "fenced" {
			fencedAt = time.Since(cut)
			break
		}
		if s, err := l.vmStatus(ctx, cb, vm.Name); err == nil && s.Role == api.RoleLocal {
			t.Fatalf("b runs the VM (%.2f s) before a fenced it", time.Since(cut).Seconds())
		}
		if time.Since(cut) > 20*time.Second {
			t.Fatalf("a, beside one etcd member of three, did not fence within 20 s: %+v %v", s, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	waitVM(t, l, cb, vm.Name, 30*time.Second, "b, beside the etcd majority, takes over", func(s api.VMStatus) bool {
		return s.Role == api.RoleLocal && s.State == "running"
	})
	promotedAt := time.Since(cut)
	t.Logf("primary beside the minority: a fenced %.2f s after the partition, b running %.2f s after", fencedAt.Seconds(), promotedAt.Seconds())
	time.Sleep(2 * time.Second)
	client.Stop()
	acked, missing := ledgerLoss(t, l, record, addr)
	if acked == 0 || missing > 0 {
		t.Fatalf("across the partition: %d acked, %d missing", acked, missing)
	}
	t.Logf("across the partition: %d records acked, none missing", acked)
}

// other is a's partner b, and b's a.
func other(h string) string {
	if h == HostA {
		return HostB
	}
	return HostA
}
