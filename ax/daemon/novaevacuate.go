package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/axproject/ax/ax/durable"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/nova-hook/nova"
)

// After axd promotes a Nova server's domain here, Nova's record still says
// the dead host. axd makes it follow (nova-hook/FAILOVER.md): it forces
// the old host's nova-compute down, evacuates the server to this host
// (where the adopting compute driver, nova-hook/driver, takes over the
// running domain instead of spawning one, told so by a marker file), and
// waits until Nova says this host, ACTIVE. It retries with back-off while
// Nova does not answer, and never holds the promotion or the guest up: it
// runs after them. Until the old host's nova-compute has run again and
// completed the evacuation (_destroy_evacuated_instances destroys any copy
// of the server there, a replica built before included), axd does not
// protect the VM back towards the old host; then it clears forced_down.

// NovaEvacuator is what the evacuation asks of Nova: *nova.Client.
type NovaEvacuator interface {
	ComputeService(ctx context.Context, host string) (nova.ComputeService, error)
	SetForcedDown(ctx context.Context, id string, down bool) error
	Evacuate(ctx context.Context, id, host string) error
	Evacuations(ctx context.Context, id string) ([]nova.Migration, error)
}

var _ NovaEvacuator = (*nova.Client)(nil)

// domainIdentifier is a hypervisor driver that tells who a domain is
// (libvirt: its UUID, Nova's instance UUID, and Nova's metadata).
type domainIdentifier interface {
	Identify(ctx context.Context, name string) (*libvirt.Identity, error)
}

// Evacuation stages besides nova.Follow's, as ax:status and events name
// them.
const (
	evacStarting = "finding the server"
	evacFailed   = "failed"
)

// evacuation is one promoted server's way through Nova.
type evacuation struct {
	vm      string
	peer    string // the old primary, as axd knows it: re-protection towards it is held
	server  string
	from    string // the old host, as Nova knows it
	forced  bool   // axd forced it down (and clears it at the end)
	stage   string
	why     string // the last failure, or why it stopped
	started time.Time
	moved   time.Time // Nova said this host, ACTIVE
}

// holding says whether the evacuation still keeps re-protection towards
// its old host from starting.
func (e *evacuation) holding() bool { return e.stage != string(nova.StageDone) }

func (e *evacuation) text(host string) string {
	switch nova.Stage(e.stage) {
	case nova.StageDone:
		if e.moved.IsZero() {
			return fmt.Sprintf("Nova: server %s is on %s already; nothing to evacuate", e.server, host)
		}
		return fmt.Sprintf("Nova: evacuated from %s to %s in %.1f s; the evacuation is completed", e.from, host, e.moved.Sub(e.started).Seconds())
	case evacFailed:
		return fmt.Sprintf("Nova: evacuation from %s failed: %s; protection towards %s held", e.from, e.why, e.peer)
	case nova.StageCompleting, nova.StageClearing:
		return fmt.Sprintf("Nova: evacuated from %s to %s in %.1f s; protection towards %s held until nova-compute on %s starts again and completes the evacuation",
			e.from, host, e.moved.Sub(e.started).Seconds(), e.peer, e.from)
	}
	s := "Nova: " + e.stage
	if e.why != "" {
		s += " (retried: " + e.why + ")"
	}
	return s
}

// evacMetrics are the evacuation's: counted by result, pending, and how
// long Nova took to say this host.
type evacMetrics struct {
	total   *prometheus.CounterVec // result: moved, completed, failed
	pending prometheus.Gauge
	seconds *prometheus.GaugeVec // vm
}

func newEvacMetrics(reg *prometheus.Registry) *evacMetrics {
	m := &evacMetrics{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ax_nova_evacuations_total",
			Help: "Evacuations of promoted servers in Nova, by result (moved: Nova says this host; completed: the old host's nova-compute completed it; failed)."}, []string{"result"}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ax_nova_evacuations_pending",
			Help: "Promoted servers whose evacuation Nova has not completed: protection towards their old host is held."}),
		seconds: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ax_nova_evacuation_seconds",
			Help: "From the end of the promotion to Nova saying the server is on this host, ACTIVE."}, []string{"vm"}),
	}
	reg.MustRegister(m.total, m.pending, m.seconds)
	return m
}

// evacuateMaxWait is the longest wait between two tries of a failed call
// (the first is the poll, doubled at each failure).
const evacuateMaxWait = 30 * time.Second

// expect records the evacuation of domain name, about to run here promoted
// from peer, before it runs: from then on re-protection towards peer waits
// for it (a replica built there before Nova completed the evacuation would
// be destroyed by peer's nova-compute). nil: one runs already.
func (n *novaLevels) expect(name, peer string) *evacuation {
	n.mu.Lock()
	if e, ok := n.evacs[name]; ok && e.holding() && e.stage != evacFailed {
		n.mu.Unlock()
		return nil // one runs already
	}
	e := &evacuation{vm: name, peer: peer, stage: evacStarting, started: time.Now()}
	n.evacs[name] = e
	n.mu.Unlock()
	n.evacMetricsSet()
	return e
}

// start runs the evacuation expect recorded, once the VM runs here, if Nova
// knows the domain as a server. It returns at once.
func (n *novaLevels) start(e *evacuation) {
	if e != nil {
		n.d.wg.Go(func() { n.evacuate(n.d.ctx, e) })
	}
}

// forget drops the evacuation expect recorded for a promotion that did not
// happen.
func (n *novaLevels) forget(e *evacuation) {
	if e == nil {
		return
	}
	n.mu.Lock()
	if n.evacs[e.vm] == e {
		delete(n.evacs, e.vm)
	}
	n.mu.Unlock()
	n.evacMetricsSet()
}

// holds says why re-protection of name towards peer must wait ("" : it
// need not).
func (n *novaLevels) holds(name, peer string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.evacs[name]
	if !ok || !e.holding() || e.peer != peer {
		return ""
	}
	return fmt.Sprintf("Nova has not completed the evacuation of server %s from %s (%s): a replica built on %s now would be destroyed by its nova-compute",
		e.server, e.from, e.stage, peer)
}

// evacuation is a copy of name's evacuation, false without one.
func (n *novaLevels) evacuation(name string) (evacuation, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.evacs[name]
	if !ok {
		return evacuation{}, false
	}
	return *e, true
}

func (n *novaLevels) evacMetricsSet() {
	n.mu.Lock()
	pending := 0
	for _, e := range n.evacs {
		if e.holding() {
			pending++
		}
	}
	n.mu.Unlock()
	n.evac.pending.Set(float64(pending))
}

// setStage moves e on, with an event and the server's ax:status.
func (n *novaLevels) setStage(ctx context.Context, e *evacuation, stage, why string) {
	n.mu.Lock()
	e.stage, e.why = stage, why
	if stage == string(nova.StageCompleting) && e.moved.IsZero() {
		e.moved = time.Now()
	}
	cp := *e
	n.mu.Unlock()
	n.evacMetricsSet()
	n.saveEvac(cp)
	text := cp.text(n.host)
	n.d.event(e.vm, "nova", text)
	if cp.server != "" {
		// Written straight away: until Nova says this host the server is
		// not among the ones the reconciler writes to.
		wctx, cancel := context.WithTimeout(ctx, novaRequestTimeout)
		if err := n.cloud.SetStatus(wctx, cp.server, text); err != nil {
			n.warnf("Nova: writing server %s's %s: %v", cp.server, nova.StatusKey, err)
		}
		cancel()
	}
}

// evacuate runs e to its end (or axd's): the promoted domain's server
// found, the adopt marker written, then follow.
func (n *novaLevels) evacuate(ctx context.Context, e *evacuation) {
	id, ok := n.identify(ctx, e)
	if !ok {
		return
	}
	n.mu.Lock()
	e.server = id
	n.mu.Unlock()
	if n.d.place != nil {
		n.d.place.drop(ctx, e.vm) // its room here is for the evacuation now
	}
	n.follow(ctx, e)
}

// follow takes e's server through nova.Follow, the adopt marker in place
// until Nova says this host; e is saved at each stage, so that an axd
// restarted goes on from there (and keeps holding re-protection).
func (n *novaLevels) follow(ctx context.Context, e *evacuation) {
	n.mu.Lock()
	id, forced, moved := e.server, e.forced, !e.moved.IsZero()
	n.mu.Unlock()
	if !moved {
		if err := n.writeMarker(id, e.vm); err != nil {
			n.setStage(ctx, e, evacFailed, "the adopting driver's marker: "+err.Error())
			n.evac.total.WithLabelValues("failed").Inc()
			return
		}
	}
	f := &nova.Follow{Server: id, To: n.host, Poll: n.evacPoll, MaxWait: evacuateMaxWait, Timeout: novaRequestTimeout, Forced: forced,
		Stage: func(s nova.Stage, res nova.FollowResult) {
			n.mu.Lock()
			e.from, e.forced = res.From, res.Forced
			first := e.moved.IsZero()
			n.mu.Unlock()
			if s == nova.StageCompleting {
				n.removeMarker(id) // Nova recorded the evacuation: the driver is done with it
				if first {
					n.evac.total.WithLabelValues("moved").Inc()
					n.evac.seconds.WithLabelValues(e.vm).Set(time.Since(e.started).Seconds())
				}
			}
			if s == nova.StageDone {
				n.removeMarker(id)
				n.evac.total.WithLabelValues("completed").Inc()
			}
			n.setStage(ctx, e, string(s), "")
		},
		Retry: func(_ nova.Stage, err error) { n.retried(e, err) },
	}
	_, err := f.Run(ctx, n.cloud)
	switch {
	case err == nil || ctx.Err() != nil:
	case errors.Is(err, nova.ErrNotFound):
		n.removeMarker(id)
		n.identifyDrop(e, err.Error())
	default:
		n.removeMarker(id)
		n.setStage(ctx, e, evacFailed, err.Error())
		n.evac.total.WithLabelValues("failed").Inc()
	}
}

// retried notes a failed call Follow tries again: the first failure of a
// kind is an event, the next ones a rate-limited log.
func (n *novaLevels) retried(e *evacuation, err error) {
	msg := nova.Truncate(err.Error(), 300)
	n.mu.Lock()
	first := e.why != msg
	e.why = msg
	stage := e.stage
	n.mu.Unlock()
	if first {
		n.d.event(e.vm, "nova", fmt.Sprintf("Nova: %s: %s; retried", stage, msg))
		return
	}
	n.warnf("Nova: %s of %s: %s", stage, e.vm, msg)
}

// identify finds the Nova server of e's domain through the hypervisor;
// false when it is none (then nothing is done).
func (n *novaLevels) identify(ctx context.Context, e *evacuation) (string, bool) {
	di, ok := n.d.cfg.Hypervisor.(domainIdentifier)
	drop := func(why string) (string, bool) {
		n.identifyDrop(e, why)
		return "", false
	}
	if !ok {
		return drop("the hypervisor driver does not say which Nova server the promoted domain is (axd runs with --libvirt on a compute host)")
	}
	ictx, cancel := context.WithTimeout(ctx, novaRequestTimeout)
	id, err := di.Identify(ictx, e.vm)
	cancel()
	switch {
	case err != nil:
		return drop("the promoted domain's identity: " + err.Error())
	case id.Nova == nil || id.UUID == "":
		return drop("the promoted domain is not a Nova instance (no nova:instance metadata)")
	case !canonicalUUID(id.UUID):
		return drop(fmt.Sprintf("the promoted domain's UUID %q is not one Nova writes", nova.Truncate(id.UUID, 40)))
	}
	return strings.ToLower(id.UUID), true
}

// identifyDrop ends e before it asked Nova anything: the domain is no
// server of this Nova.
func (n *novaLevels) identifyDrop(e *evacuation, why string) {
	n.mu.Lock()
	delete(n.evacs, e.vm)
	n.mu.Unlock()
	n.evacMetricsSet()
	n.forgetEvac(e.vm)
	n.d.event(e.vm, "nova", "Nova: "+why+": its record in Nova is left as it is")
}

// canonicalUUID: 8-4-4-4-12 hex digits, the only shape a marker's name
// takes.
func canonicalUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// writeMarker tells the adopting compute driver that instance id runs
// here, promoted by axd: its rebuild adopts the domain instead of
// spawning one. nova-compute (user nova) reads it.
func (n *novaLevels) writeMarker(id, vm string) error {
	if !canonicalUUID(id) {
		return errors.New("not a UUID")
	}
	if err := os.MkdirAll(n.adoptDir, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(n.adoptDir, 0o755); err != nil {
		return err
	}
	if rel, err := filepath.Rel(n.d.cfg.StateDir, n.adoptDir); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		// nova-compute's user (nova) goes through axd's state directory.
		if err := reachable(n.d.cfg.StateDir, n.adoptDir); err != nil {
			return err
		}
	}
	tmp := filepath.Join(n.adoptDir, "."+id+".tmp")
	if err := os.WriteFile(tmp, []byte(vm+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(n.adoptDir, id))
}

func (n *novaLevels) removeMarker(id string) {
	if !canonicalUUID(id) {
		return
	}
	if err := os.Remove(filepath.Join(n.adoptDir, id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		n.warnf("Nova: removing the adopt marker of %s: %v", id, err)
	}
}

// evacRecord is an evacuation as axd keeps it across its restarts, in
// StateDir/nova-evacuations/VM.json.
type evacRecord struct {
	VM      string    `json:"vm"`
	Peer    string    `json:"peer"`
	Server  string    `json:"server"`
	From    string    `json:"from,omitempty"`
	Forced  bool      `json:"forced,omitempty"`
	Stage   string    `json:"stage"`
	Why     string    `json:"why,omitempty"`
	Started time.Time `json:"started"`
	Moved   time.Time `json:"moved,omitzero"`
}

func (n *novaLevels) evacPath(vm string) (string, error) {
	return names.Join(n.evacDir, "vm", vm+".json")
}

// saveEvac keeps e (a done one is forgotten): an axd restarted before
// Nova completed the evacuation holds re-protection still, and goes on.
func (n *novaLevels) saveEvac(e evacuation) {
	if e.stage == string(nova.StageDone) || e.server == "" {
		n.forgetEvac(e.vm)
		return
	}
	p, err := n.evacPath(e.vm)
	if err == nil {
		err = os.MkdirAll(n.evacDir, 0o700)
	}
	if err == nil {
		var b []byte
		b, err = json.Marshal(evacRecord{VM: e.vm, Peer: e.peer, Server: e.server, From: e.from, Forced: e.forced,
			Stage: e.stage, Why: e.why, Started: e.started, Moved: e.moved})
		if err == nil {
			err = durable.ReplaceFile(p, b, 0o600)
		}
	}
	if err != nil {
		n.warnf("Nova: keeping the evacuation of %s: %v", e.vm, err)
	}
}

func (n *novaLevels) forgetEvac(vm string) {
	if p, err := n.evacPath(vm); err == nil {
		os.Remove(p)
	}
}

// loadEvacs takes the evacuations an earlier axd left unfinished; run
// goes on with them.
func (n *novaLevels) loadEvacs() {
	files, _ := filepath.Glob(filepath.Join(n.evacDir, "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		var r evacRecord
		if err == nil {
			err = json.Unmarshal(b, &r)
		}
		if err == nil && (names.Check("vm", r.VM) != nil || !canonicalUUID(r.Server) || filepath.Base(f) != r.VM+".json") {
			err = errors.New("not an evacuation axd wrote")
		}
		if err != nil {
			n.d.log.Warn("Nova: an evacuation left by an earlier axd is unreadable; ignored", "file", f, "err", err)
			continue
		}
		n.evacs[r.VM] = &evacuation{vm: r.VM, peer: r.Peer, server: r.Server, from: r.From, forced: r.Forced,
			stage: r.Stage, why: r.Why, started: r.Started, moved: r.Moved}
	}
}

// resumeEvacs goes on with the evacuations loaded at the start; a failed
// one stays as it is (held) until the VM is promoted again.
func (n *novaLevels) resumeEvacs(ctx context.Context) {
	n.mu.Lock()
	var todo []*evacuation
	for _, e := range n.evacs {
		if e.holding() && e.stage != evacFailed {
			todo = append(todo, e)
		}
	}
	n.mu.Unlock()
	n.evacMetricsSet()
	for _, e := range todo {
		n.d.event(e.vm, "nova", fmt.Sprintf("Nova: going on with the evacuation of server %s from %s (%s), left by the last axd", e.server, e.from, e.stage))
		n.d.wg.Go(func() { n.follow(ctx, e) })
	}
}
