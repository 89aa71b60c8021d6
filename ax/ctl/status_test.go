package ctl

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

// axctl status says which VMs run below their declared level, for how
// long, and alarms; a protected VM gets no such line.
func TestStatusShowsDeclaredLevelGaps(t *testing.T) {
	st := &api.Status{Host: "b", VMs: []api.VMStatus{
		{Name: "vm1", Level: api.LevelNone, Role: api.RoleLocal, State: "running", Declared: api.LevelFT, DeclaredPeer: "a", UnprotectedS: 12.34},
		{Name: "vm2", Level: api.LevelHA, Role: api.RolePrimary, State: "protected", Declared: api.LevelHA, DeclaredPeer: "a"},
		{Name: "vm3", Level: api.LevelFT, Role: api.RolePrimary, State: "unprotected", Declared: api.LevelFT, DeclaredPeer: "a",
			UnprotectedS: 2, Alarm: "replication link down"},
	}}
	var out strings.Builder
	printStatus(&out, st)
	text := out.String()
	for _, want := range []string{
		"UNPROTECTED vm1: declared ft, not protected for 12.3 s; axd protects it again by itself when a (or another partner) can take the replica",
		"ALARM vm3: replication link down",
		"UNPROTECTED vm3: declared ft, not protected for 2.0 s",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "UNPROTECTED vm2") {
		t.Errorf("a protected VM shown unprotected:\n%s", text)
	}
}

// axctl status says what the witness is, how many of its members answer,
// whether it has a quorum, and per primary the lease left.
func TestStatusShowsWitness(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	etcd := func(quorum bool, reachable ...bool) *api.WitnessHealth {
		w := &api.WitnessHealth{Kind: "etcd", Quorum: quorum, LeaseTTLMS: 2000}
		for i, r := range reachable {
			m := api.WitnessMember{Name: fmt.Sprintf("m%d", i), Endpoint: fmt.Sprintf("10.0.0.%d:2379", i+1), Reachable: r}
			if r {
				w.Reachable++
			} else {
				m.Error = "no answer within 300ms"
			}
			w.Members = append(w.Members, m)
		}
		if !quorum {
			w.Alarm = "witness etcd has no quorum"
		}
		return w
	}
	for _, c := range []struct {
		name      string
		witness   string
		health    *api.WitnessHealth
		vm        api.VMStatus
		want, not []string
	}{
		{name: "no witness", witness: "none",
			vm:   api.VMStatus{Name: "vm1", Role: api.RoleLocal},
			want: []string{"host h, witness none\n"}, not: []string{"witness:", "ALARM"}},
		{name: "not probed yet", witness: "reachable",
			want: []string{"host h, witness reachable\n"}, not: []string{"witness:"}},
		{name: "axd witness", witness: "reachable",
			health: &api.WitnessHealth{Kind: "axd", Members: []api.WitnessMember{{Endpoint: "w:7100", Reachable: true}}, Reachable: 1, Quorum: true, LeaseTTLMS: 1000},
			want:   []string{"witness: axd 1/1 members reachable, quorum, lease TTL 1s\n"}, not: []string{"witness member", "ALARM"}},
		{name: "axd witness unreachable", witness: "unreachable",
			health: &api.WitnessHealth{Kind: "axd", Members: []api.WitnessMember{{Endpoint: "w:7100", Error: "connection refused"}}, LeaseTTLMS: 1000, Alarm: "witness axd has no quorum"},
			want: []string{"witness: axd 0/1 members reachable, NO QUORUM, lease TTL 1s\n", "witness member w:7100: unreachable: connection refused\n",
				"ALARM witness: witness axd has no quorum\n"}},
		{name: "etcd all up", witness: "reachable", health: etcd(true, true, true, true),
			want: []string{"witness: etcd 3/3 members reachable, quorum, lease TTL 2s\n"}, not: []string{"witness member", "ALARM"}},
		{name: "etcd one down", witness: "reachable", health: etcd(true, true, false, true),
			want: []string{"witness: etcd 2/3 members reachable, quorum, lease TTL 2s\n", "witness member m1 (10.0.0.2:2379): unreachable: no answer within 300ms\n"},
			not:  []string{"ALARM"}},
		{name: "etcd without quorum", witness: "unreachable", health: etcd(false, false, false, true),
			want: []string{"witness: etcd 1/3 members reachable, NO QUORUM, lease TTL 2s\n", "witness member m0 (10.0.0.1:2379)", "witness member m1 (10.0.0.2:2379)",
				"ALARM witness: witness etcd has no quorum\n"},
			not: []string{"member m2"}},
		{name: "lease left", witness: "reachable",
			vm:   api.VMStatus{Name: "vm1", Role: api.RolePrimary, State: "protected", LeaseExpires: now.Add(1700 * time.Millisecond), LeaseLeftMS: 1700},
			want: []string{"LEASE", "protected  1.7 s "}},
		{name: "lease expired", witness: "unreachable",
			vm:   api.VMStatus{Name: "vm1", Role: api.RolePrimary, State: "fenced", LeaseExpires: now.Add(-time.Second)},
			want: []string{"fenced  EXPIRED "}},
		{name: "no lease: a replica", witness: "reachable",
			vm:   api.VMStatus{Name: "vm1", Role: api.RoleSecondary, State: "ready"},
			want: []string{"ready  -  "}},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := &api.Status{Host: "h", Now: now, Witness: c.witness, WitnessHealth: c.health}
			if c.vm.Name != "" {
				st.VMs = []api.VMStatus{c.vm}
			}
			var out strings.Builder
			printStatus(&out, st)
			text := out.String()
			for _, want := range c.want {
				if !strings.Contains(text, want) {
					t.Errorf("status lacks %q:\n%s", want, text)
				}
			}
			for _, not := range c.not {
				if strings.Contains(text, not) {
					t.Errorf("status has %q:\n%s", not, text)
				}
			}
		})
	}
}

// axctl status says how many promises Placement holds, which it does not
// and why, and when axd cannot reach it; nothing without promises.
func TestStatusShowsPlacement(t *testing.T) {
	promises := map[string]api.Capacity{"vm1": {VCPUs: 1}, "vm2": {VCPUs: 2}}
	for _, c := range []struct {
		name      string
		r         *api.Reservation
		want, not []string
	}{
		{name: "not on Nova", r: &api.Reservation{Promises: promises}, not: []string{"placement", "PLACEMENT"}},
		{name: "nothing promised", r: &api.Reservation{Placement: &api.PlacementHold{Provider: "rp-1"}}, not: []string{"placement", "PLACEMENT"}},
		{name: "all held", r: &api.Reservation{Promises: promises, Placement: &api.PlacementHold{Provider: "rp-1", Held: []string{"vm1", "vm2"}}},
			want: []string{"placement: 2 of 2 promises held on resource provider rp-1\n"}, not: []string{"PLACEMENT"}},
		{name: "one refused", r: &api.Reservation{Promises: promises, Placement: &api.PlacementHold{Provider: "rp-1", Held: []string{"vm1"},
			Failed: map[string]string{"vm2": "the requested amount would exceed the capacity"}}},
			want: []string{"placement: 1 of 2 promises held on resource provider rp-1\n", "PLACEMENT vm2: not held: the requested amount would exceed the capacity\n"}},
		{name: "unreachable", r: &api.Reservation{Promises: promises, Placement: &api.PlacementHold{Error: "connection refused"}},
			want: []string{"PLACEMENT: the promises to partners' VMs are not all held in Placement: connection refused\n"}, not: []string{"placement:"}},
	} {
		var out strings.Builder
		printStatus(&out, &api.Status{Host: "b", Reservation: c.r})
		text := out.String()
		for _, w := range c.want {
			if !strings.Contains(text, w) {
				t.Errorf("%s: status lacks %q:\n%s", c.name, w, text)
			}
		}
		for _, n := range c.not {
			if strings.Contains(text, n) {
				t.Errorf("%s: status has %q:\n%s", c.name, n, text)
			}
		}
	}
}
