package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/ratelog"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/nova-hook/nova"
)

// On a Nova compute host axd takes each server's level from Nova (server
// metadata ax:level, flavor extra spec, image property: package nova),
// applies it live through the paths axctl uses, and writes back what it
// did as the server's ax:status. Nova is polled: what changed since the
// newest change seen, every Poll, and everything every Resync (a server
// that left the host, an image property changed, a refused apply tried
// again). While Nova cannot be reached nothing AX applied changes.

// NovaCloud is what axd asks of OpenStack: *nova.Client.
type NovaCloud interface {
	Servers(ctx context.Context, host string, since time.Time) ([]nova.Server, error)
	Server(ctx context.Context, id string) (nova.Server, error)
	ImageLevel(ctx context.Context, id string) (string, error)
	SetStatus(ctx context.Context, id, text string) error
	// The evacuation of a server promoted here (novaevacuate.go).
	NovaEvacuator
}

var _ NovaCloud = (*nova.Client)(nil)

// NovaConfig makes axd take its VMs' levels from Nova.
type NovaConfig struct {
	Cloud NovaCloud
	// Host is this compute host's name in Nova (its [DEFAULT] host; "":
	// Config.Host).
	Host string
	// Poll is how often changes are asked for (0: 3 s); Resync how often
	// every server of the host is (0: 60 s).
	Poll, Resync time.Duration
	// EvacuatePoll is how often an evacuation asks Nova how far it is,
	// and its first back-off (0: 2 s).
	EvacuatePoll time.Duration
	// AdoptDir is where axd tells the adopting compute driver which
	// instances it promoted here, a file per instance UUID ("":
	// StateDir/nova-adopt, /var/lib/ax/nova-adopt for the package's axd;
	// the driver's [ax] adopt_dir must name the same).
	AdoptDir string
	// NoPlacement: the capacity promised to partners' VMs is not held in
	// Placement (placement.go), where it is by default.
	NoPlacement bool
}

// novaRequestTimeout bounds one round of requests to Nova.
const novaRequestTimeout = 20 * time.Second

// novaLevels is the reconciler between Nova's levels and axd's VMs.
type novaLevels struct {
	d     *Daemon
	cloud NovaCloud
	host  string
	poll  time.Duration
	sync  time.Duration

	polls     *prometheus.CounterVec // result: ok, error
	applies   *prometheus.CounterVec // result: ok, error
	writes    *prometheus.CounterVec // result: ok, error
	reachable prometheus.Gauge
	refused   prometheus.Gauge
	warn      *ratelog.Limiter

	mu      sync.Mutex
	servers map[string]*novaServer // by server id: Nova's servers on this host
	images  map[string]string      // image id → its ax_level, since the last resync
	since   time.Time              // the newest updated_at seen (Nova's clock)
	down    time.Time              // since when Nova has not answered (zero: it does)
	// hooked: domains the hook is protecting from Nova's answer (Level),
	// and since when: the reconciler leaves them to it meanwhile.
	hooked   map[string]time.Time
	applying map[string]bool // domains an apply runs for

	// Evacuations of the servers promoted here, by domain.
	evacs    map[string]*evacuation
	evac     *evacMetrics
	evacPoll time.Duration
	adoptDir string
	evacDir  string // unfinished evacuations, kept across restarts
}

// novaServer is a server of this host as last read, and what AX made of it.
type novaServer struct {
	s       nova.Server
	asked   nova.Asked
	refused string // why its level is refused ("" : it is not)
	readErr string // why its level could not be read (Glance)
	// failed: the last apply of want failed, why; tried again at the
	// next resync or when what Nova asks changes.
	failed string
	want   nova.Asked
}

func newNovaLevels(d *Daemon, c NovaConfig) *novaLevels {
	n := &novaLevels{d: d, cloud: c.Cloud, host: c.Host, poll: c.Poll, sync: c.Resync, warn: ratelog.New(time.Minute),
		servers: map[string]*novaServer{}, images: map[string]string{}, hooked: map[string]time.Time{}, applying: map[string]bool{},
		evacs: map[string]*evacuation{}, evacPoll: c.EvacuatePoll, adoptDir: c.AdoptDir}
	if n.host == "" {
		n.host = d.cfg.Host
	}
	if n.evacPoll <= 0 {
		n.evacPoll = 2 * time.Second
	}
	if n.adoptDir == "" {
		n.adoptDir = filepath.Join(d.cfg.StateDir, "nova-adopt")
	}
	n.evacDir = filepath.Join(d.cfg.StateDir, "nova-evacuations")
	if n.poll <= 0 {
		n.poll = 3 * time.Second
	}
	if n.sync <= 0 {
		n.sync = time.Minute
	}
	n.polls = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ax_nova_polls_total",
		Help: "Requests for this host's servers to Nova, by result (ok, error)."}, []string{"result"})
	n.applies = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ax_nova_applies_total",
		Help: "Levels asked in Nova that axd applied, by result (ok, error)."}, []string{"result"})
	n.writes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ax_nova_status_writes_total",
		Help: "Writes of servers' ax:status metadata, by result (ok, error)."}, []string{"result"})
	n.reachable = prometheus.NewGauge(prometheus.GaugeOpts{Name: "ax_nova_reachable",
		Help: "1 while Nova answered axd's last request, 0 while it does not."})
	n.refused = prometheus.NewGauge(prometheus.GaugeOpts{Name: "ax_nova_levels_refused",
		Help: "Servers of this host whose ax:level or ax_level is not ft, ha or none, or whose ax:peer is not a host name (see their ax:status)."})
	d.reg.MustRegister(n.polls, n.applies, n.writes, n.reachable, n.refused)
	n.evac = newEvacMetrics(d.reg)
	n.loadEvacs()
	return n
}

// run polls Nova until ctx ends.
func (n *novaLevels) run(ctx context.Context) {
	n.resumeEvacs(ctx)
	t := time.NewTicker(n.poll)
	defer t.Stop()
	var synced time.Time
	for {
		full := time.Since(synced) >= n.sync
		if err := n.reconcile(ctx, full); err == nil && full {
			synced = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// reconcile reads what changed in Nova (everything when full), applies
// what it asks, and writes back each server's ax:status that changed.
func (n *novaLevels) reconcile(ctx context.Context, full bool) error {
	ctx, cancel := context.WithTimeout(ctx, novaRequestTimeout)
	defer cancel()
	n.mu.Lock()
	since := n.since
	if full {
		since = time.Time{}
		n.images = map[string]string{} // image properties change too
	}
	n.mu.Unlock()
	list, err := n.cloud.Servers(ctx, n.host, since)
	if list == nil && err != nil {
		n.polls.WithLabelValues("error").Inc()
		n.unreachable(err)
		return err
	}
	n.polls.WithLabelValues("ok").Inc()
	n.reached()
	if err != nil {
		// Servers Nova describes with ids AX does not take: the others
		// are reconciled.
		n.warnf("Nova: servers of host %s skipped: %v", n.host, err)
	}
	seen := map[string]bool{}
	for _, s := range list {
		seen[s.ID] = true
		n.read(ctx, s)
	}
	if full {
		n.mu.Lock()
		for id, e := range n.servers {
			if !seen[id] {
				delete(n.servers, id)
				n.d.event(eventVM(e.s.InstanceName), "nova", fmt.Sprintf("Nova: server %s (%s) is no longer on host %s: AX no longer takes its level from Nova here; its protection is left as it is",
					e.s.Name, id, n.host))
			}
		}
		n.mu.Unlock()
	}
	n.settle(ctx, full)
	return nil
}

// read takes one server Nova listed: it leaves the host's list when it
// is deleted or elsewhere, else its level is read again.
func (n *novaLevels) read(ctx context.Context, s nova.Server) {
	n.mu.Lock()
	if s.Updated.After(n.since) {
		n.since = s.Updated
	}
	old := n.servers[s.ID]
	if s.Status == "DELETED" || s.Host != n.host {
		if old != nil {
			delete(n.servers, s.ID)
			n.d.event(eventVM(s.InstanceName), "nova", fmt.Sprintf("Nova: server %s (%s) %s: AX no longer takes its level from Nova here",
				s.Name, s.ID, map[bool]string{true: "was deleted", false: fmt.Sprintf("moved to host %q", nova.Truncate(s.Host, 64))}[s.Status == "DELETED"]))
		}
		n.mu.Unlock()
		return
	}
	n.mu.Unlock()
	e := &novaServer{s: s}
	a, err := nova.Ask(s, func() (string, error) { return n.imageLevel(ctx, s.ImageID) })
	var r *nova.Refusal
	switch {
	case errors.As(err, &r):
		e.refused = r.Reason
	case err != nil:
		e.readErr = err.Error()
	default:
		e.asked = a
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if old != nil && old.asked == e.asked {
		e.failed, e.want = old.failed, old.want
	}
	if old == nil || old.asked != e.asked || old.refused != e.refused {
		switch {
		case e.refused != "":
			n.d.event(eventVM(s.InstanceName), "nova", fmt.Sprintf("Nova: server %s (%s): refused: %s", s.Name, s.ID, e.refused))
		case e.asked.Level != "":
			n.d.event(eventVM(s.InstanceName), "nova", fmt.Sprintf("Nova: server %s (%s) asks %s (%s)", s.Name, s.ID, e.asked.Level, e.asked.From))
		}
	}
	if e.readErr != "" && old != nil {
		// Glance did not answer: what was read before stands.
		old.s = s
		n.warnf("Nova: server %s (%s): %s; its last level read stands", s.Name, s.ID, e.readErr)
		return
	}
	n.servers[s.ID] = e
}

// eventVM is the VM an event about domain name is of: "" when the name
// Nova gave is not one AX takes (its events name no such VM).
func eventVM(name string) string {
	if names.Check("vm", name) != nil {
		return ""
	}
	return name
}

// imageLevel is image id's ax_level, read once per resync.
func (n *novaLevels) imageLevel(ctx context.Context, id string) (string, error) {
	n.mu.Lock()
	lvl, ok := n.images[id]
	n.mu.Unlock()
	if ok {
		return lvl, nil
	}
	lvl, err := n.cloud.ImageLevel(ctx, id)
	if err != nil {
		return "", err
	}
	n.mu.Lock()
	n.images[id] = lvl
	n.mu.Unlock()
	return lvl, nil
}

// settle applies what each server asks that axd does not do yet, and
// writes each ax:status that changed.
func (n *novaLevels) settle(ctx context.Context, full bool) {
	n.mu.Lock()
	ids := make([]string, 0, len(n.servers))
	refused := 0
	for id, e := range n.servers {
		ids = append(ids, id)
		if e.refused != "" {
			refused++
		}
	}
	for name, at := range n.hooked {
		if time.Since(at) >= hookApplyTimeout {
			delete(n.hooked, name)
		}
	}
	n.mu.Unlock()
	n.refused.Set(float64(refused))
	sort.Strings(ids)
	for _, id := range ids {
		n.mu.Lock()
		e, ok := n.servers[id]
		var cp novaServer
		if ok {
			cp = *e
		}
		n.mu.Unlock()
		if !ok {
			continue
		}
		n.act(&cp, full)
		// The apply act started may have ended already: its result is in
		// the entry, not in cp, and a status from cp would say "not
		// protected yet" where the next settle says why it failed.
		n.mu.Lock()
		applying := n.applying[cp.s.InstanceName]
		if e, ok := n.servers[id]; ok {
			cp = *e
		}
		n.mu.Unlock()
		text, write := n.status(&cp)
		switch {
		case !write || nova.Truncate(text, nova.MaxValue) == cp.s.Metadata[nova.StatusKey]:
			continue
		case !nova.Writable(cp.s.Status) || applying:
			continue // written once it is launched, or once the apply ends
		}
		if err := n.cloud.SetStatus(ctx, id, text); err != nil {
			n.writes.WithLabelValues("error").Inc()
			n.warnf("Nova: writing server %s's %s: %v", id, nova.StatusKey, err)
			continue
		}
		n.writes.WithLabelValues("ok").Inc()
		// Nova has it now: the change this write makes to the server's
		// updated_at brings it back at the next poll, with this text, and
		// nothing is written again.
		n.mu.Lock()
		if e, ok := n.servers[id]; ok {
			m := make(map[string]string, len(e.s.Metadata)+1)
			for k, v := range e.s.Metadata {
				m[k] = v
			}
			m[nova.StatusKey] = nova.Truncate(text, nova.MaxValue)
			e.s.Metadata = m
		}
		n.mu.Unlock()
	}
}

// vmView is what axd does with a domain now.
type vmView struct {
	known    bool
	st       vm.State
	level    string
	peer     string
	declared string
}

func (n *novaLevels) view(name string) vmView {
	v, err := n.d.vm(name)
	if err != nil {
		return vmView{}
	}
	var w vmView
	v.set(func(v *vmState) {
		w = vmView{known: true, st: v.st, level: v.level, peer: v.peer, declared: v.declared}
	})
	return w
}

// partner is the host a server's level goes towards: ax:peer, else the
// host's only partner; "" and why when there is none to take.
func (n *novaLevels) partner(a nova.Asked) (string, string) {
	peer, err := n.d.levelPartner(a.Peer, "server metadata "+nova.PeerKey)
	if err != nil {
		return "", err.Error()
	}
	return peer, ""
}

// act starts applying what e asks when axd does something else; what
// failed to apply is tried again at a resync (retry), or when Nova asks
// something else. Until it is applied, e's status says why it is not.
func (n *novaLevels) act(e *novaServer, retry bool) {
	a, name := e.asked, e.s.InstanceName
	if a.Level == "" || e.refused != "" || e.s.Status != "ACTIVE" || names.Check("vm", name) != nil {
		return
	}
	if e.failed != "" && e.want == a && !retry {
		return
	}
	peer, why := n.partner(a)
	if a.Level != api.LevelNone && why != "" {
		return
	}
	w := n.view(name)
	role := w.st.Role()
	switch {
	case role == api.RoleSecondary:
		return
	case a.Level == api.LevelNone && role != api.RolePrimary && !(w.known && w.declared != api.LevelNone):
		return
	case a.Level != api.LevelNone && role == api.RolePrimary && w.level == a.Level:
		return
	case a.Level != api.LevelNone && role == api.RoleLocal && w.declared == a.Level:
		return // axd protects it again by itself (intent.go)
	}
	n.mu.Lock()
	busy := n.applying[name] || time.Since(n.hooked[name]) < hookApplyTimeout
	if !busy {
		n.applying[name] = true
	}
	n.mu.Unlock()
	if busy {
		return
	}
	id, sname := e.s.ID, e.s.Name
	n.d.wg.Go(func() {
		err := n.apply(name, a, peer, w)
		n.mu.Lock()
		delete(n.applying, name)
		if cur, ok := n.servers[id]; ok {
			cur.failed, cur.want = "", a
			if err != nil {
				cur.failed = err.Error()
			}
		}
		n.mu.Unlock()
		if err != nil {
			n.applies.WithLabelValues("error").Inc()
			n.d.event(name, "nova", fmt.Sprintf("Nova: server %s (%s): %s (%s) not applied: %v", sname, id, a.Level, a.From, err))
			return
		}
		n.applies.WithLabelValues("ok").Inc()
		if a.Level == api.LevelNone {
			n.d.event(name, "nova", fmt.Sprintf("Nova: server %s (%s): protection ended, as %s asks", sname, id, a.From))
			return
		}
		n.d.event(name, "nova", fmt.Sprintf("Nova: server %s (%s): protected at %s towards %s, as %s asks", sname, id, a.Level, peer, a.From))
	})
}

// apply does what a asks of domain name, which axd holds as w: the
// paths axctl's protect, level and unprotect take.
func (n *novaLevels) apply(name string, a nova.Asked, peer string, w vmView) error {
	ctx, cancel := context.WithTimeout(n.d.ctx, hookApplyTimeout)
	defer cancel()
	switch {
	case a.Level == api.LevelNone:
		return n.d.setLevel(ctx, name, api.ProtectRequest{Level: api.LevelNone})
	case !w.known || w.st.Role() == api.RoleLocal:
		return n.d.protectDomain(ctx, name, a.Level, peer)
	}
	return n.d.setLevel(ctx, name, api.ProtectRequest{Level: a.Level, Peer: peer})
}

// status is the ax:status of e, and whether it is to be written: for a
// server with a level asked or refused, or one AX wrote to before; an
// evacuation of it after a promotion here says how far it is.
func (n *novaLevels) status(e *novaServer) (string, bool) {
	text, write := n.levelStatus(e)
	if ev, ok := n.evacuation(e.s.InstanceName); ok && ev.server == e.s.ID {
		if text == "" {
			return ev.text(n.host), true
		}
		return text + "; " + ev.text(n.host), true
	}
	return text, write
}

func (n *novaLevels) levelStatus(e *novaServer) (string, bool) {
	_, had := e.s.Metadata[nova.StatusKey]
	a := e.asked
	switch {
	case e.refused != "":
		return "refused: " + e.refused + "; nothing applied", true
	case e.readErr != "":
		return "", false
	case a.Level == "":
		return "no level asked (server metadata or flavor " + nova.LevelKey + ", image " + nova.ImageLevelKey + "): AX leaves it as it is", had
	case names.Check("vm", e.s.InstanceName) != nil:
		return fmt.Sprintf("refused: instance name %q is not a domain name AX takes", nova.Truncate(e.s.InstanceName, 40)), true
	}
	peer, why := n.partner(a)
	if why != "" && a.Level != api.LevelNone {
		return "refused: " + a.Level + " asked (" + a.From + ") but " + why, true
	}
	w := n.view(e.s.InstanceName)
	role := w.st.Role()
	if role == api.RolePrimary {
		text := fmt.Sprintf("%s towards %s: %s", w.level, w.peer, w.st)
		if w.level != a.Level {
			text += fmt.Sprintf("; %s asked (%s)", a.Level, a.From)
			if e.failed != "" && e.want == a {
				text += " not applied: " + e.failed
			}
			return text, true
		}
		return text + " (" + a.From + ")", true
	}
	if role == api.RoleSecondary {
		return fmt.Sprintf("a replica here of the primary on %s (%s)", w.peer, w.st), true
	}
	if a.Level == api.LevelNone {
		return "none: not protected (" + a.From + ")", true
	}
	if e.s.Status != "ACTIVE" {
		return fmt.Sprintf("%s towards %s asked (%s): applied when the server is ACTIVE (it is %s)", a.Level, peer, a.From, e.s.Status), true
	}
	if e.failed != "" && e.want == a {
		return fmt.Sprintf("%s towards %s asked (%s) not applied: %s", a.Level, peer, a.From, e.failed), true
	}
	return fmt.Sprintf("%s towards %s asked (%s): not protected yet", a.Level, peer, a.From), true
}

// unreachable notes a failed request to Nova: an alarm once, then the
// metric and a rate-limited log.
func (n *novaLevels) unreachable(err error) {
	n.reachable.Set(0)
	n.mu.Lock()
	first := n.down.IsZero()
	if first {
		n.down = time.Now()
	}
	n.mu.Unlock()
	if first {
		// Bounded: the error quotes what the far end answered.
		n.d.event("", "alarm", fmt.Sprintf("Nova cannot be reached (%s): AX keeps every level it applied; what changes in Nova is applied when it answers again",
			nova.Truncate(err.Error(), 400)))
		return
	}
	n.warnf("Nova still cannot be reached: %v", err)
}

// reached notes Nova answered; after an outage, an event says so.
func (n *novaLevels) reached() {
	n.reachable.Set(1)
	n.mu.Lock()
	down := n.down
	n.down = time.Time{}
	n.mu.Unlock()
	if !down.IsZero() {
		n.d.event("", "nova", fmt.Sprintf("Nova answers again after %s: levels asked meanwhile are applied now", time.Since(down).Round(time.Second)))
	}
}

func (n *novaLevels) warnf(format string, a ...any) {
	if ok, held := n.warn.Allow(); ok {
		n.d.log.Warn(fmt.Sprintf(format, a...), "held_back", held)
	}
}

var _ LevelSource = (*novaLevels)(nil)

// Level is Nova's answer for a domain the hook saw start: the reconciler
// leaves that domain to the hook for a while.
func (n *novaLevels) Level(ctx context.Context, dom *libvirt.Identity) (Choice, error) {
	if dom.Nova == nil || dom.UUID == "" {
		return Choice{}, nil
	}
	s, err := n.cloud.Server(ctx, dom.UUID)
	if err != nil {
		return Choice{}, fmt.Errorf("Nova did not answer for server %s (%v); its level is applied when Nova answers", dom.UUID, err)
	}
	if s.InstanceName != dom.Name {
		return Choice{}, fmt.Errorf("Nova's server %s is domain %q, not %s", dom.UUID, nova.Truncate(s.InstanceName, 40), dom.Name)
	}
	if s.Host != n.host {
		return Choice{}, fmt.Errorf("Nova has server %s on host %q, not %s", dom.UUID, nova.Truncate(s.Host, 64), n.host)
	}
	a, err := nova.Ask(s, func() (string, error) { return n.imageLevel(ctx, s.ImageID) })
	if err != nil {
		return Choice{}, err
	}
	n.mu.Lock()
	n.hooked[dom.Name] = time.Now()
	n.mu.Unlock()
	if a.Level == "" {
		return Choice{From: "none in Nova: no " + nova.LevelKey + " in its server metadata or flavor, no " + nova.ImageLevelKey + " in its image"}, nil
	}
	return Choice{Level: a.Level, Peer: a.Peer, From: a.From + " in Nova"}, nil
}
