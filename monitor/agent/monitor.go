package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"
)

// Event kinds passed to Config.Events.
const (
	EventConnected    = "agent-connected"
	EventDisconnected = "agent-disconnected"
	EventRefused      = "agent-refused"
	EventSilent       = "agent-silent"
	EventHeard        = "agent-heard"
	EventHealth       = "app-health"
	EventRecovery     = "app-recovery"
	EventAction       = "policy-action"
	EventSuppressed   = "events-suppressed"
)

// Config configures a VM's Monitor. Only VM is required.
type Config struct {
	VM         string
	Policy     Policy
	Hysteresis Hysteresis
	// SilentAfter without a valid message makes the agent silent and its
	// applications Unknown (default 15 s, three agent heartbeats).
	SilentAfter time.Duration
	// ExpectAgent says the VM runs an agent: one not heard within
	// SilentAfter of the Monitor's start is silent too (ax_agent_silent,
	// the AXAgentSilent alert). Without it, only an agent that said hello
	// and then went quiet is silent, so VMs without an agent raise nothing.
	ExpectAgent bool
	// Tick is how often Run looks for silence, stale checks and due policy
	// steps (default 1 s).
	Tick   time.Duration
	Limits Limits
	// Actuator receives every action the policy decides; nil drops them
	// (restart-app is still sent to the agent).
	Actuator Actuator
	// Events receives what happened, as a kind (Event…) and a sentence; nil
	// drops them. At most EventBurst events pass at once, then one per
	// second; the rest are counted and summarised.
	//
	// Both callbacks are called in order, without the Monitor's lock held
	// (they may call Status, SetPolicy or Close), and must not block.
	Events  func(kind, text string)
	Metrics *Metrics         // nil: no metrics
	Log     *slog.Logger     // nil: slog.Default()
	Now     func() time.Time // nil: time.Now
}

// Defaults for Config.
const (
	DefaultSilentAfter = 15 * time.Second
	DefaultTick        = time.Second
	EventBurst         = 20
)

// Monitor follows the in-guest agent of one VM across its connections: it
// keeps each application's health, carries out the VM's policy, exports
// metrics and reports events. Its methods are safe for concurrent use.
type Monitor struct {
	cfg Config

	mu        sync.Mutex
	closed    bool
	session   *Session
	agentID   string
	apps      map[string]*App
	names     []string // declared order
	episodes  map[string]*episode
	mem       vmMemory
	created   time.Time
	lastHeard time.Time
	silent    bool
	penalty   time.Duration
	refuseTil time.Time
	evBucket  *bucket
	evDropped int
	connects  *bucket
	logMu     sync.Mutex
	lastWarn  time.Time
	warnsHeld int

	// Callbacks are delivered outside mu, in the order decided: each batch
	// takes a ticket under mu and waits for its turn under dmu.
	issued uint64 // under mu
	dmu    sync.Mutex
	dturn  *sync.Cond
	served uint64 // under dmu
}

// note is a callback decided under mu and delivered after it.
type note struct {
	kind, text string
	action     *Action
}

// NewMonitor makes the Monitor of cfg.VM. Call Run to follow silence and
// timed policy steps, Serve for each agent connection, Close when the VM
// leaves the host.
func NewMonitor(cfg Config) (*Monitor, error) {
	if cfg.VM == "" {
		return nil, errors.New("agent monitor: empty VM name")
	}
	if err := cfg.Policy.Validate(); err != nil {
		return nil, fmt.Errorf("agent monitor of %s: %w", cfg.VM, err)
	}
	cfg.Policy = cfg.Policy.withDefaults()
	cfg.Hysteresis = cfg.Hysteresis.withDefaults()
	cfg.Limits = cfg.Limits.withDefaults()
	if cfg.SilentAfter <= 0 {
		cfg.SilentAfter = DefaultSilentAfter
	}
	if cfg.Tick <= 0 {
		cfg.Tick = DefaultTick
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	cfg.Log = cfg.Log.With("vm", cfg.VM)
	now := cfg.Now()
	m := &Monitor{cfg: cfg, apps: map[string]*App{}, episodes: map[string]*episode{},
		created: now, evBucket: newBucket(1, EventBurst, now),
		connects: newBucket(cfg.Limits.ConnectRate, cfg.Limits.ConnectBurst, now)}
	m.dturn = sync.NewCond(&m.dmu)
	cfg.Metrics.initVM(cfg.VM)
	cfg.Metrics.connected(cfg.VM, false)
	cfg.Metrics.silent(cfg.VM, false)
	return m, nil
}

// SetPolicy replaces the VM's policy; applications failed now are judged by
// it from the next tick.
func (m *Monitor) SetPolicy(p Policy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cfg.Policy = p.withDefaults()
	return nil
}

// Serve runs a session on conn until the agent goes, misbehaves, a newer
// connection replaces it, ctx ends or the Monitor closes; it closes conn and
// returns a *SessionError saying why. A VM whose agent misbehaved is refused
// at once (ReasonPenalty) until its penalty runs out.
func (m *Monitor) Serve(ctx context.Context, conn net.Conn) error {
	now := m.cfg.Now()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		conn.Close()
		return &SessionError{VM: m.cfg.VM, Reason: ReasonClosed, Err: net.ErrClosed}
	}
	if now.Before(m.refuseTil) {
		wait := m.refuseTil.Sub(now)
		m.mu.Unlock()
		conn.Close()
		m.cfg.Metrics.rejected(m.cfg.VM, ReasonPenalty)
		return &SessionError{VM: m.cfg.VM, Reason: ReasonPenalty, RetryAfter: wait,
			Err: fmt.Errorf("refused for another %s after misbehaviour", wait.Round(time.Millisecond))}
	}
	if !m.connects.take(1, now) {
		wait := m.punish(now)
		notes := m.event(nil, EventRefused, fmt.Sprintf("agent of %s reconnects too often; refused for %s", m.cfg.VM, wait))
		m.flush(notes) // unlocks mu
		conn.Close()
		m.cfg.Metrics.rejected(m.cfg.VM, ReasonFlood)
		m.logEnd(ReasonFlood, errReconnects)
		return &SessionError{VM: m.cfg.VM, Reason: ReasonFlood, RetryAfter: wait, Err: errReconnects}
	}
	s := newSession(m, conn)
	old := m.session
	m.session = s
	m.mu.Unlock()
	if old != nil {
		old.end(ReasonReplaced, nil)
	}

	reason, err := s.run(ctx)

	var notes []note
	m.mu.Lock()
	if m.session == s {
		m.session = nil
		m.cfg.Metrics.connected(m.cfg.VM, false)
	}
	text := fmt.Sprintf("agent of %s disconnected: %s", m.cfg.VM, reason)
	if err != nil && reason != ReasonEOF && reason != ReasonClosed && reason != ReasonReplaced {
		text += ": " + err.Error()
	}
	var retry time.Duration
	metrics := m.cfg.Metrics
	if m.closed {
		metrics = nil // Close removed the VM's series; keep them removed
	}
	switch {
	case reason.misbehaviour():
		retry = m.punish(m.cfg.Now())
		text += fmt.Sprintf(" (refused for %s)", retry)
		metrics.rejected(m.cfg.VM, reason)
	case s.greeted:
		m.penalty = 0
	}
	metrics.disconnected(m.cfg.VM, reason)
	notes = m.event(notes, EventDisconnected, text)
	m.flush(notes) // unlocks mu
	m.logEnd(reason, err)
	return &SessionError{VM: m.cfg.VM, Reason: reason, Err: err, RetryAfter: retry}
}

var errReconnects = errors.New("agent reconnects faster than the host allows")

// punish starts or doubles the VM's penalty; mu must be held.
func (m *Monitor) punish(now time.Time) time.Duration {
	m.penalty = min(max(2*m.penalty, m.cfg.Limits.Penalty), m.cfg.Limits.MaxPenalty)
	m.refuseTil = now.Add(m.penalty)
	return m.penalty
}

// logEnd logs a session's end: misbehaviour as a warning at most once a
// minute (the rest are counted into the next one), the rest at debug level.
func (m *Monitor) logEnd(reason Reason, err error) {
	if !reason.misbehaviour() {
		m.cfg.Log.Debug("agent disconnected", "reason", reason, "err", err)
		return
	}
	m.logMu.Lock()
	defer m.logMu.Unlock()
	now := time.Now()
	if !m.lastWarn.IsZero() && now.Sub(m.lastWarn) < time.Minute {
		m.warnsHeld++
		return
	}
	m.cfg.Log.Warn("agent disconnected", "reason", reason, "err", err, "similar_since_last", m.warnsHeld)
	m.lastWarn, m.warnsHeld = now, 0
}

// Run follows silence, stale checks and timed policy steps until ctx ends.
func (m *Monitor) Run(ctx context.Context) error {
	t := time.NewTicker(m.cfg.Tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			m.tick()
		}
	}
}

// Close ends the current session and removes the VM's metrics. It is safe
// to call more than once.
func (m *Monitor) Close() error {
	m.mu.Lock()
	s := m.session
	m.session = nil // messages still in flight are dropped
	m.closed = true
	m.mu.Unlock()
	if s != nil {
		s.end(ReasonClosed, nil)
	}
	m.cfg.Metrics.Forget(m.cfg.VM)
	return nil
}

// Status is a snapshot of the VM's agent and applications.
type Status struct {
	VM        string      `json:"vm"`
	AgentID   string      `json:"agent_id,omitempty"`
	Connected bool        `json:"connected"`
	Silent    bool        `json:"silent"`
	LastHeard time.Time   `json:"last_heard,omitzero"`
	Policy    ActionKind  `json:"policy"`
	Apps      []AppStatus `json:"apps,omitempty"`
}

// AppStatus is one application's part of Status.
type AppStatus struct {
	Check       string    `json:"check"`
	Kind        string    `json:"kind"`
	Health      Health    `json:"health"`
	Since       time.Time `json:"since"`
	Detail      string    `json:"detail,omitempty"`
	Recoverable bool      `json:"recoverable"`
}

// Status returns the current state.
func (m *Monitor) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := Status{VM: m.cfg.VM, AgentID: m.agentID, Connected: m.session != nil && m.session.greeted,
		Silent: m.silent, LastHeard: m.lastHeard, Policy: m.cfg.Policy.OnFailed}
	for _, n := range m.names {
		a := m.apps[n]
		st.Apps = append(st.Apps, AppStatus{Check: a.Name, Kind: a.Kind, Health: a.Health, Since: a.Since,
			Detail: a.Detail, Recoverable: a.Recoverable})
	}
	return st
}

// handle applies an accepted message from s. It is called on s's reader
// goroutine; a non-nil error ends the session as a protocol violation.
func (m *Monitor) handle(s *Session, msg *Message) error {
	now := m.cfg.Now()
	var notes []note
	m.mu.Lock()
	if m.session != s { // replaced while this message was in flight
		m.mu.Unlock()
		return nil
	}
	switch msg.Type {
	case TypeHello:
		notes = m.hello(s, msg.Hello, now, notes)
	case TypeReport:
		a := m.apps[msg.Report.Check]
		if a == nil {
			m.mu.Unlock()
			return fmt.Errorf("report of undeclared check %q", msg.Report.Check)
		}
		notes = m.heard(now, notes)
		m.cfg.Metrics.report(m.cfg.VM, msg.Report.State)
		before := a.Observe(msg.Report.State == StateOK, msg.Report.Detail, now, m.cfg.Hysteresis)
		notes = m.changed(a, before, now, notes)
	case TypeHeartbeat:
		notes = m.heard(now, notes)
		s.send(&Message{Type: TypeAck, Ack: &Ack{Seq: msg.Heartbeat.Seq}})
	case TypeRecovery:
		r := msg.Recovery
		if m.apps[r.Check] == nil {
			m.mu.Unlock()
			return fmt.Errorf("recovery of undeclared check %q", r.Check)
		}
		notes = m.heard(now, notes)
		outcome := "failed"
		if r.OK {
			outcome = "ran"
		}
		notes = m.event(notes, EventRecovery, fmt.Sprintf("%s/%s: recovery action %s in the guest: %s", m.cfg.VM, r.Check, outcome, r.Detail))
	}
	m.flush(notes)
	return nil
}

func (m *Monitor) hello(s *Session, h *Hello, now time.Time, notes []note) []note {
	apps := make(map[string]*App, len(h.Checks))
	names := make([]string, 0, len(h.Checks))
	for _, c := range h.Checks {
		apps[c.Name] = newApp(c, m.apps[c.Name], m.cfg.Hysteresis)
		names = append(names, c.Name)
	}
	var gone []string
	for n := range m.apps {
		if apps[n] == nil {
			gone = append(gone, n)
			delete(m.episodes, n)
		}
	}
	m.cfg.Metrics.forgetApps(m.cfg.VM, gone)
	m.apps, m.names, m.agentID = apps, names, h.AgentID
	for _, n := range names {
		m.cfg.Metrics.health(m.cfg.VM, n, apps[n].Health)
	}
	s.greeted = true
	m.mem.everGreeted = true
	m.cfg.Metrics.connected(m.cfg.VM, true)
	notes = m.heard(now, notes)
	s.send(&Message{Type: TypeAck, Ack: &Ack{Seq: h.Seq}})
	return m.event(notes, EventConnected, fmt.Sprintf("agent %s of %s connected with %d checks", h.AgentID, m.cfg.VM, len(h.Checks)))
}

// heard records a valid message and ends a silence.
func (m *Monitor) heard(now time.Time, notes []note) []note {
	m.lastHeard = now
	m.cfg.Metrics.heard(m.cfg.VM, now)
	if m.silent {
		m.silent = false
		m.mem.silentActed = false
		m.cfg.Metrics.silent(m.cfg.VM, false)
		notes = m.event(notes, EventHeard, fmt.Sprintf("agent of %s heard again", m.cfg.VM))
	}
	return notes
}

// changed exports a health change and runs the policy on it.
func (m *Monitor) changed(a *App, before Health, now time.Time, notes []note) []note {
	if a.Health == before {
		return notes
	}
	m.cfg.Metrics.health(m.cfg.VM, a.Name, a.Health)
	text := fmt.Sprintf("%s/%s: %s → %s", m.cfg.VM, a.Name, before, a.Health)
	if a.Detail != "" && a.Health != Healthy {
		text += ": " + a.Detail
	}
	notes = m.event(notes, EventHealth, text)
	if before == Failed {
		delete(m.episodes, a.Name)
	}
	if a.Health == Failed {
		notes = m.policyFailed(a, now, notes)
	}
	return notes
}

func (m *Monitor) policyFailed(a *App, now time.Time, notes []note) []note {
	ep := m.episodes[a.Name]
	if ep == nil {
		ep = &episode{}
		m.episodes[a.Name] = ep
	}
	canSend := m.session != nil && m.session.greeted
	for _, act := range m.cfg.Policy.decideFailed(m.cfg.VM, a, ep, &m.mem, canSend, now) {
		if act.Kind == RestartApp && !m.session.send(&Message{Type: TypeRecover, Recover: &Recover{Check: a.Name}}) {
			act.Reason += " (not sent: the agent is not reading)"
		}
		notes = m.act(notes, act)
	}
	return notes
}

// tick looks for silence, stale checks and due policy steps.
func (m *Monitor) tick() {
	now := m.cfg.Now()
	var notes []note
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	since := m.lastHeard
	if since.IsZero() {
		since = m.created
	}
	quiet := now.Sub(since)
	if quiet > m.cfg.SilentAfter && !m.silent && (m.mem.everGreeted || m.cfg.ExpectAgent) {
		m.silent = true
		m.cfg.Metrics.silent(m.cfg.VM, true)
		notes = m.event(notes, EventSilent, fmt.Sprintf("agent of %s silent for %s", m.cfg.VM, quiet.Round(time.Second)))
	}
	if m.silent {
		for _, act := range m.cfg.Policy.decideSilent(m.cfg.VM, quiet, &m.mem, now) {
			notes = m.act(notes, act)
		}
	}
	for _, n := range m.names {
		a := m.apps[n]
		before := a.Health
		if a.Expire(now, m.silent, m.cfg.Hysteresis) {
			notes = m.changed(a, before, now, notes)
		}
		if a.Health == Failed {
			notes = m.policyFailed(a, now, notes)
		}
	}
	m.flush(notes)
}

func (m *Monitor) act(notes []note, a Action) []note {
	m.cfg.Metrics.action(m.cfg.VM, a.Kind)
	notes = m.event(notes, EventAction, a.String())
	return append(notes, note{action: &a})
}

// event queues an event unless the VM's event budget is spent.
func (m *Monitor) event(notes []note, kind, text string) []note {
	now := m.cfg.Now()
	if !m.evBucket.take(1, now) {
		m.evDropped++
		return notes
	}
	if m.evDropped > 0 {
		notes = append(notes, note{kind: EventSuppressed, text: fmt.Sprintf("%d events of %s suppressed", m.evDropped, m.cfg.VM)})
		m.evDropped = 0
	}
	return append(notes, note{kind: kind, text: text})
}

// flush unlocks mu and delivers notes in the order they were decided,
// holding no lock while it calls back, so callbacks may call Status,
// SetPolicy or Close.
func (m *Monitor) flush(notes []note) {
	if len(notes) == 0 {
		m.mu.Unlock()
		return
	}
	ticket := m.issued
	m.issued++
	m.mu.Unlock()
	m.dmu.Lock()
	for m.served != ticket {
		m.dturn.Wait()
	}
	m.dmu.Unlock()
	defer func() {
		m.dmu.Lock()
		m.served++
		m.dturn.Broadcast()
		m.dmu.Unlock()
	}()
	for _, n := range notes {
		if n.action != nil {
			if m.cfg.Actuator != nil {
				m.cfg.Actuator.Act(*n.action)
			}
			continue
		}
		if m.cfg.Events != nil {
			m.cfg.Events(n.kind, n.text)
		}
	}
}

// checkNames returns the declared check names (tests).
func (m *Monitor) checkNames() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.names)
}
