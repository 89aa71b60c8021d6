package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the agent-facing Prometheus metrics, prefixed ax_ and
// labelled by VM. Every label value comes from a bounded set: VMs axd
// manages, at most Limits.MaxChecks validated check names per VM, and the
// fixed reason, state and action names of this package.
type Metrics struct {
	Connected   *prometheus.GaugeVec
	Silent      *prometheus.GaugeVec
	LastHeard   *prometheus.GaugeVec
	AppHealth   *prometheus.GaugeVec
	Reports     *prometheus.CounterVec
	Rejected    *prometheus.CounterVec
	Disconnects *prometheus.CounterVec
	Actions     *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Connected: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_agent_connected", Help: "1 while the VM's in-guest agent has a session open (hello accepted)."}, []string{"vm"}),
		Silent: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_agent_silent", Help: "1 when nothing valid has come for the silence timeout from a VM agent that said hello before (or that axd expects); its applications are then unknown."}, []string{"vm"}),
		LastHeard: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_agent_last_heard_timestamp_seconds", Help: "Unix time of the last valid message from the VM's agent."}, []string{"vm"}),
		AppHealth: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_app_health", Help: "Application health per check: 0 unknown, 1 healthy, 2 degraded, 3 failed."}, []string{"vm", "check"}),
		Reports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_agent_reports_total", Help: "Check reports accepted from the VM's agent, by reported state (ok, fail)."}, []string{"vm", "state"}),
		Rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_agent_rejected_total", Help: "Agent messages or connections refused, by reason (malformed, too-large, protocol, flood, idle, penalty, write)."}, []string{"vm", "reason"}),
		Disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_agent_disconnects_total", Help: "Agent sessions ended, by reason (eof, malformed, too-large, protocol, flood, idle, write, replaced, closed)."}, []string{"vm", "reason"}),
		Actions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_agent_policy_actions_total", Help: "Actions the VM's health policy decided (notify, restart-app, restart-vm, failover)."}, []string{"vm", "action"}),
	}
	reg.MustRegister(m.Connected, m.Silent, m.LastHeard, m.AppHealth, m.Reports, m.Rejected, m.Disconnects, m.Actions)
	return m
}

// The methods below accept a nil *Metrics, so a Monitor without metrics
// needs no checks at its call sites.

// initVM creates vm's counters at zero, so dashboards and alert rules see
// the series (and rate() works) before the first event of each kind.
func (m *Metrics) initVM(vm string) {
	if m == nil {
		return
	}
	for _, k := range ActionKinds {
		m.Actions.WithLabelValues(vm, string(k)).Add(0)
	}
	for _, r := range []Reason{ReasonEOF, ReasonMalformed, ReasonTooLarge, ReasonProtocol, ReasonFlood, ReasonIdle, ReasonWrite, ReasonReplaced, ReasonClosed} {
		m.Disconnects.WithLabelValues(vm, string(r)).Add(0)
	}
	for _, r := range []Reason{ReasonMalformed, ReasonTooLarge, ReasonProtocol, ReasonFlood, ReasonIdle, ReasonPenalty, ReasonWrite} {
		m.Rejected.WithLabelValues(vm, string(r)).Add(0)
	}
	for _, st := range []string{"ok", "fail"} {
		m.Reports.WithLabelValues(vm, st).Add(0)
	}
	m.Silent.WithLabelValues(vm).Set(0)
}

func (m *Metrics) connected(vm string, on bool) {
	if m != nil {
		m.Connected.WithLabelValues(vm).Set(b2f(on))
	}
}

func (m *Metrics) silent(vm string, on bool) {
	if m != nil {
		m.Silent.WithLabelValues(vm).Set(b2f(on))
	}
}

func (m *Metrics) heard(vm string, t time.Time) {
	if m != nil {
		m.LastHeard.WithLabelValues(vm).Set(float64(t.UnixMilli()) / 1000)
	}
}

func (m *Metrics) health(vm, check string, h Health) {
	if m != nil {
		m.AppHealth.WithLabelValues(vm, check).Set(float64(h))
	}
}

// forgetApps drops the health series of vm's checks not in keep.
func (m *Metrics) forgetApps(vm string, gone []string) {
	if m != nil {
		for _, c := range gone {
			m.AppHealth.DeleteLabelValues(vm, c)
		}
	}
}

func (m *Metrics) report(vm, state string) {
	if m != nil {
		m.Reports.WithLabelValues(vm, state).Inc()
	}
}

func (m *Metrics) rejected(vm string, r Reason) {
	if m != nil {
		m.Rejected.WithLabelValues(vm, string(r)).Inc()
	}
}

func (m *Metrics) disconnected(vm string, r Reason) {
	if m != nil {
		m.Disconnects.WithLabelValues(vm, string(r)).Inc()
	}
}

func (m *Metrics) action(vm string, k ActionKind) {
	if m != nil {
		m.Actions.WithLabelValues(vm, string(k)).Inc()
	}
}

// Forget removes every series of vm (it left this host).
func (m *Metrics) Forget(vm string) {
	if m == nil {
		return
	}
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{m.Connected, m.Silent, m.LastHeard, m.AppHealth, m.Reports, m.Rejected, m.Disconnects, m.Actions} {
		v.DeletePartialMatch(prometheus.Labels{"vm": vm})
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
