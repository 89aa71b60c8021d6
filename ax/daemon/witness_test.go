package daemon

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/axproject/ax/ax/ctl"
	"github.com/axproject/ax/monitor"
	"github.com/axproject/ax/test/etcdtest"
)

// The operator's view of an etcd witness of three members, from a pair of
// axd: axctl status shows the witness and the lease left, the lease calls
// are counted by result, and with two members killed the quorum gauge
// falls to 0 and the host raises its alarm.
func TestEtcdWitnessOperatorView(t *testing.T) {
	c := etcdtest.Start(t, 3)
	p := runPair(t, withEtcdCluster(c))
	p.defineVM(t)
	p.fakeB.NoPIDs()
	p.protectFT(t)

	// All three up: status, axctl status and the gauges say so.
	until(t, "a probed the witness", func() bool {
		w := p.a.status().WitnessHealth
		return w != nil && w.Kind == "etcd" && len(w.Members) == 3 && w.Reachable == 3 && w.Quorum && w.LeaseTTLMS == 1000
	}, func() string { return fmt.Sprintf("%+v", p.a.status().WitnessHealth) })
	if a := vm1(p.a); a.LeaseExpires.IsZero() || a.LeaseLeftMS <= 0 || a.LeaseLeftMS > 1000 {
		t.Errorf("a, the primary, shows its lease ending %v, %.0f ms left; want within the TTL of 1 s", a.LeaseExpires, a.LeaseLeftMS)
	}
	if b := vm1(p.b); !b.LeaseExpires.IsZero() || b.LeaseLeftMS != 0 {
		t.Errorf("b, the secondary, shows a lease: %v, %.0f ms left", b.LeaseExpires, b.LeaseLeftMS)
	}
	out := axctlStatus(t, p.cfg["a"].Socket)
	t.Logf("axctl status on a:\n%s", out)
	for _, want := range []string{"witness: etcd 3/3 members reachable, quorum, lease TTL 1s\n", "LEASE"} {
		if !strings.Contains(out, want) {
			t.Errorf("axctl status lacks %q:\n%s", want, out)
		}
	}
	wantGauges(t, p.a.metrics, 3, 3, 1)
	if n := testutil.ToFloat64(p.a.metrics.WitnessRenewals.WithLabelValues(monitor.RenewOK)); n < 1 {
		t.Errorf("a renewed vm1's lease %v times, by ax_witness_renewals_total{result=\"ok\"}", n)
	}

	// A planned failover: b takes the lease over, refused until a gave
	// it up, and won once.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.a.plannedFailover(ctx, "vm1"); err != nil {
		t.Fatalf("planned failover: %v\nb: %+v", err, p.b.eventsSince(0))
	}
	until(t, "b counts the takeover it won", func() bool {
		return testutil.ToFloat64(p.b.metrics.WitnessTakeovers.WithLabelValues(monitor.TakeoverWon)) >= 1
	}, func() string { return fmt.Sprintf("b: %+v", p.b.eventsSince(0)) })
	until(t, "b, now the primary, renews", func() bool {
		return testutil.ToFloat64(p.b.metrics.WitnessRenewals.WithLabelValues(monitor.RenewOK)) >= 1 && vm1(p.b).LeaseLeftMS > 0
	}, both(p))

	// Two of three killed: no quorum, the gauge at 0 and an alarm on both
	// hosts. etcdtest starts no member again: only the fall is seen.
	killed := 0
	for _, m := range c.Members {
		if killed < 2 {
			m.Kill()
			killed++
		}
	}
	for _, d := range []*Daemon{p.a, p.b} {
		until(t, d.cfg.Host+" sees the witness without quorum", func() bool {
			w := d.status().WitnessHealth
			return w != nil && !w.Quorum && w.Reachable == 1 && len(w.Members) == 3 && strings.Contains(w.Alarm, "no quorum")
		}, func() string { return fmt.Sprintf("%+v", d.status().WitnessHealth) })
		wantGauges(t, d.metrics, 3, 1, 0)
		alarms := 0
		for _, e := range d.eventsSince(0) {
			if e.Kind == "alarm" && e.VM == "" && strings.Contains(e.Text, "witness etcd has no quorum (1 of 3 members reachable)") {
				alarms++
			}
		}
		if alarms != 1 {
			t.Errorf("%s raised %d alarms of the witness without quorum, want 1: %+v", d.cfg.Host, alarms, d.eventsSince(0))
		}
	}
	out = axctlStatus(t, p.cfg["b"].Socket)
	t.Logf("axctl status on b:\n%s", out)
	for _, want := range []string{"witness: etcd 1/3 members reachable, NO QUORUM, lease TTL 1s\n", "ALARM witness: witness etcd has no quorum"} {
		if !strings.Contains(out, want) {
			t.Errorf("axctl status lacks %q:\n%s", want, out)
		}
	}
	// b's renewals fail now: counted as such.
	until(t, "b counts failed renewals", func() bool {
		return testutil.ToFloat64(p.b.metrics.WitnessRenewals.WithLabelValues(monitor.Failed)) >= 1
	}, both(p))
}

// axctlStatus runs axctl status against the axd at socket.
func axctlStatus(t *testing.T, socket string) string {
	t.Helper()
	var out strings.Builder
	if err := ctl.Main(context.Background(), socket, []string{"status"}, &out); err != nil {
		t.Fatalf("axctl status: %v", err)
	}
	return out.String()
}

// wantGauges checks the witness's gauges: members, reachable, quorum.
func wantGauges(t *testing.T, m *monitor.Metrics, members, reachable, quorum float64) {
	t.Helper()
	got := [3]float64{testutil.ToFloat64(m.WitnessMembers), testutil.ToFloat64(m.WitnessMembersReachable), testutil.ToFloat64(m.WitnessQuorum)}
	if want := [3]float64{members, reachable, quorum}; got != want {
		t.Errorf("ax_witness_members, _members_reachable, _quorum = %v, want %v", got, want)
	}
}

// Without a witness axd probes none: status has no witness part, and the
// host raises no alarm about it.
func TestNoWitnessNoProbe(t *testing.T) {
	p := runPair(t)
	time.Sleep(witnessProbeEvery / 2)
	if st := p.a.status(); st.Witness != "none" || st.WitnessHealth != nil {
		t.Errorf("without a witness: %q, %+v", st.Witness, st.WitnessHealth)
	}
	for _, e := range p.a.eventsSince(0) {
		if e.Kind == "alarm" {
			t.Errorf("alarm without a witness: %+v", e)
		}
	}
}
