// Package monitor exports what AX does and sees as Prometheus metrics (and,
// later, application health from the in-guest agent).
package monitor

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are axd's Prometheus metrics, all prefixed ax_ and labelled by VM.
type Metrics struct {
	Epochs        *prometheus.CounterVec
	Pause         *prometheus.HistogramVec
	DirtyPages    *prometheus.HistogramVec
	BytesSent     *prometheus.CounterVec
	CommitLatency *prometheus.HistogramVec
	ReplLag       *prometheus.GaugeVec
	Failovers     *prometheus.CounterVec
	Unprotected   *prometheus.GaugeVec
	UnprotectedS  *prometheus.CounterVec
	Level         *prometheus.GaugeVec
	Protected     *prometheus.GaugeVec
	SyncProgress  *prometheus.GaugeVec
	PeerHeard     *prometheus.GaugeVec
	Witness       prometheus.Gauge
	HeldFrames    *prometheus.GaugeVec
	HeldBytes     *prometheus.GaugeVec
	ReleaseDelay  *prometheus.HistogramVec
	OutputDrops   *prometheus.GaugeVec
	DiskBytes     *prometheus.CounterVec
	DiskLag       *prometheus.GaugeVec
	DiskSync      *prometheus.GaugeVec
	JournalBytes  *prometheus.GaugeVec
	JournalWrites *prometheus.GaugeVec
	Reserved      *prometheus.GaugeVec
	Capacity      *prometheus.GaugeVec
	// On a Nova compute host: the promises Placement holds, and axd's
	// rounds with it (zero elsewhere).
	PlacementReservations *prometheus.GaugeVec
	PlacementRounds       *prometheus.CounterVec

	// The witness: this host's lease calls by result (renewals ok,
	// refused, failed; takeovers won, refused, failed), and its members
	// and quorum as last probed.
	WitnessRenewals         *prometheus.CounterVec
	WitnessTakeovers        *prometheus.CounterVec
	WitnessMembers          prometheus.Gauge
	WitnessMembersReachable prometheus.Gauge
	WitnessQuorum           prometheus.Gauge

	// A disk sync on the partner's replica (after a link cut, a restart
	// or a failover): bytes of writes compared with what the replica held,
	// and of them those not sent because it held them already.
	DiskResyncCompared *prometheus.CounterVec
	DiskResyncSkipped  *prometheus.CounterVec
}

// Results of lease calls, the result label of ax_witness_renewals_total
// and ax_witness_takeovers_total.
const (
	RenewOK     = "ok"
	TakeoverWon = "won"
	Refused     = "refused" // another host holds the lease
	Failed      = "failed"  // no answer, or one that decides nothing
)

// Levels as exported by ax_vm_level.
var levelValue = map[string]float64{"none": 0, "ha": 1, "ft": 2}

// NewMetrics creates and registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	ms := func(b ...float64) []float64 { return b }
	m := &Metrics{
		Epochs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_epochs_total", Help: "FT checkpoints taken on the primary."}, []string{"vm"}),
		Pause: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ax_pause_seconds", Help: "Time the guest was paused per checkpoint (stop to cont).",
			Buckets: ms(.001, .002, .005, .01, .015, .02, .03, .05, .1, .2, .5)}, []string{"vm"}),
		DirtyPages: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ax_dirty_pages", Help: "Dirty 4 KiB pages per checkpoint.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 10)}, []string{"vm"}),
		BytesSent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_replication_bytes_total", Help: "Page and device-state bytes sent to the secondary."}, []string{"vm"}),
		CommitLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ax_commit_latency_seconds", Help: "From a checkpoint's pause to its commit on the secondary.",
			Buckets: ms(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5)}, []string{"vm"}),
		ReplLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_replication_lag_epochs", Help: "Checkpoints taken but not yet committed."}, []string{"vm"}),
		Failovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_failovers_total", Help: "VMs this host took over from a failed or departing partner."}, []string{"vm"}),
		Unprotected: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_vm_unprotected_seconds", Help: "How long a VM declared FT or HA has run here without a partner able to take it over (0 while protected)."}, []string{"vm"}),
		UnprotectedS: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_vm_unprotected_seconds_total", Help: "Time a VM declared FT or HA spent unprotected here, summed over the gaps that ended."}, []string{"vm"}),
		Level: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_vm_level", Help: "Availability level asked for the VM: 0 none, 1 HA, 2 FT."}, []string{"vm", "role"}),
		Protected: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_vm_protected", Help: "1 when the VM is protected at its level now, 0 when not (alarm)."}, []string{"vm"}),
		SyncProgress: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_sync_progress_ratio", Help: "Initial synchronisation progress, 0 to 1."}, []string{"vm"}),
		PeerHeard: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_peer_heard", Help: "1 when the partner's heartbeats arrive on the path."}, []string{"peer", "path"}),
		Witness: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ax_witness_reachable", Help: "1 when the witness answered the last lease request."}),
		WitnessRenewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_witness_renewals_total", Help: "Lease renewals this host asked of the witness, by result: ok, refused (another host holds the lease), failed (no answer)."}, []string{"result"}),
		WitnessTakeovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_witness_takeovers_total", Help: "Lease takeovers this host asked of the witness, by result: won, refused (the lease is held), failed (no answer)."}, []string{"result"}),
		WitnessMembers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ax_witness_members", Help: "Members of the witness as last probed: the etcd cluster's, or 1 for an axd --witness."}),
		WitnessMembersReachable: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ax_witness_members_reachable", Help: "Members of the witness that answered the last probe."}),
		WitnessQuorum: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ax_witness_quorum", Help: "1 when the witness could decide about leases at the last probe (etcd: a majority follows a leader), 0 when not (alarm)."}),
		HeldFrames: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_output_held_frames", Help: "Guest frames held until the checkpoint covering them commits."}, []string{"vm"}),
		HeldBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_output_held_bytes", Help: "Bytes of guest frames held until their checkpoint commits."}, []string{"vm"}),
		ReleaseDelay: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ax_output_release_delay_seconds", Help: "From a guest frame's capture to its release after the commit of its checkpoint.",
			Buckets: ms(.005, .01, .02, .05, .075, .1, .15, .2, .5, 1, 2)}, []string{"vm"}),
		OutputDrops: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_output_dropped_frames", Help: "Guest frames dropped by the output gate since it was attached, by reason (never released early)."}, []string{"vm", "reason"}),
		DiskBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_disk_replicated_bytes_total", Help: "Guest disk bytes sent to the partner (initial sync and writes)."}, []string{"vm"}),
		DiskLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_disk_replica_lag_writes", Help: "Disk writes (and level changes) sent but not yet acknowledged by the partner."}, []string{"vm"}),
		DiskSync: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_disk_sync_progress_ratio", Help: "Initial disk synchronisation progress, 0 to 1."}, []string{"vm"}),
		DiskResyncCompared: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_disk_resync_compared_bytes_total", Help: "Disk bytes the initial disk sync compared with what the partner's replica held when the stream opened."}, []string{"vm"}),
		DiskResyncSkipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_disk_resync_skipped_bytes_total", Help: "Disk bytes the initial disk sync did not send because the partner's replica held them already."}, []string{"vm"}),
		JournalBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_disk_journal_bytes", Help: "Secondary: disk write bytes journaled until their checkpoint commits."}, []string{"vm"}),
		JournalWrites: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_disk_journal_depth", Help: "Secondary: disk writes journaled until their checkpoint commits."}, []string{"vm"}),
		Reserved: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_reserved_capacity", Help: "Capacity this host has promised to partners' VMs for failover, by resource (vcpus, memory_bytes, disk_bytes)."}, []string{"resource"}),
		Capacity: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_host_capacity", Help: "This host's capacity reservations are counted against, by resource."}, []string{"resource"}),
		PlacementReservations: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ax_placement_reservations", Help: "Promises to partners' VMs by whether Placement holds them (held) or not (failed: see axctl status)."}, []string{"state"}),
		PlacementRounds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ax_placement_rounds_total", Help: "Rounds making Placement's reservations match the promises to partners' VMs, by result (ok, error)."}, []string{"result"}),
	}
	reg.MustRegister(m.WitnessRenewals, m.WitnessTakeovers, m.WitnessMembers, m.WitnessMembersReachable, m.WitnessQuorum)
	// Every result at zero, so that rates and alert rules see them
	// before the first of each.
	for _, r := range []string{RenewOK, Refused, Failed} {
		m.WitnessRenewals.WithLabelValues(r)
	}
	for _, r := range []string{TakeoverWon, Refused, Failed} {
		m.WitnessTakeovers.WithLabelValues(r)
	}
	reg.MustRegister(m.DiskBytes, m.DiskLag, m.DiskSync, m.DiskResyncCompared, m.DiskResyncSkipped, m.JournalBytes, m.JournalWrites, m.Reserved, m.Capacity,
		m.PlacementReservations, m.PlacementRounds)
	// Every state and result at zero, so that the dashboard and the
	// alerts see them on every host, and rates before the first round.
	for _, st := range []string{"held", "failed"} {
		m.PlacementReservations.WithLabelValues(st)
	}
	for _, r := range []string{"ok", "error"} {
		m.PlacementRounds.WithLabelValues(r)
	}
	reg.MustRegister(m.Epochs, m.Pause, m.DirtyPages, m.BytesSent, m.CommitLatency, m.ReplLag,
		m.Failovers, m.Unprotected, m.UnprotectedS, m.Level, m.Protected, m.SyncProgress, m.PeerHeard, m.Witness,
		m.HeldFrames, m.HeldBytes, m.ReleaseDelay, m.OutputDrops)
	return m
}

// SetLevel exports vm's level and role, replacing an earlier role's series.
// It also creates vm's counters at zero, so dashboards and alert rules see
// them before their first event.
func (m *Metrics) SetLevel(vm, role, level string) {
	m.Level.DeletePartialMatch(prometheus.Labels{"vm": vm})
	m.Level.WithLabelValues(vm, role).Set(levelValue[level])
	m.Failovers.WithLabelValues(vm).Add(0)
	m.Epochs.WithLabelValues(vm).Add(0)
	m.BytesSent.WithLabelValues(vm).Add(0)
	m.DiskBytes.WithLabelValues(vm).Add(0)
	m.DiskResyncCompared.WithLabelValues(vm).Add(0)
	m.DiskResyncSkipped.WithLabelValues(vm).Add(0)
	// Disk gauges start at zero too (a VM without disks keeps them there).
	m.DiskLag.WithLabelValues(vm).Add(0)
	m.JournalWrites.WithLabelValues(vm).Add(0)
	m.JournalBytes.WithLabelValues(vm).Add(0)
	m.DiskSync.WithLabelValues(vm).Add(0)
	if level == "none" {
		m.Protected.WithLabelValues(vm).Set(0)
	}
}

// ObservePause records one checkpoint's pause and dirty set.
func (m *Metrics) ObservePause(vm string, pause time.Duration, dirty int) {
	m.Epochs.WithLabelValues(vm).Inc()
	m.Pause.WithLabelValues(vm).Observe(pause.Seconds())
	m.DirtyPages.WithLabelValues(vm).Observe(float64(dirty))
}

// Forget removes every series of vm (it left this host).
func (m *Metrics) Forget(vm string) {
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{m.Epochs, m.Pause, m.DirtyPages, m.BytesSent, m.CommitLatency, m.ReplLag, m.Level, m.Protected, m.SyncProgress, m.Unprotected,
		m.HeldFrames, m.HeldBytes, m.ReleaseDelay, m.OutputDrops, m.DiskBytes, m.DiskLag, m.DiskSync, m.DiskResyncCompared, m.DiskResyncSkipped,
		m.JournalBytes, m.JournalWrites} {
		v.DeletePartialMatch(prometheus.Labels{"vm": vm})
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// SetPeer exports what is heard of peer on each path.
func (m *Metrics) SetPeer(peer string, repl, mgmt bool) {
	m.PeerHeard.WithLabelValues(peer, "replication").Set(b2f(repl))
	m.PeerHeard.WithLabelValues(peer, "management").Set(b2f(mgmt))
}

// SetWitnessHealth exports the witness's members, those that answered, and
// whether it has a quorum, as last probed.
func (m *Metrics) SetWitnessHealth(members, reachable int, quorum bool) {
	m.WitnessMembers.Set(float64(members))
	m.WitnessMembersReachable.Set(float64(reachable))
	m.WitnessQuorum.Set(b2f(quorum))
}
