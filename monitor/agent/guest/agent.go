package guest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/axproject/ax/monitor/agent"
)

// Pacing of what the agent sends, kept under the host's default limits
// (agent.DefaultLimits) whatever the configuration: results of one check
// that pile up while the agent waits are coalesced into the latest.
const (
	sendRate     = 20 // messages per second
	sendBurst    = 40
	dialTimeout  = 3 * time.Second
	writeTimeout = 10 * time.Second
	ackMisses    = 3 // heartbeats without an ack before reconnecting
)

// Agent runs the configured checks and keeps the host informed over the
// first transport that connects, reconnecting with backoff for as long as it
// runs: an axd restart or a failover looks to it like a connection that
// drops and later comes back.
type Agent struct {
	cfg     *Config
	dialers []Dialer
	log     *slog.Logger
	checks  []*runner
	byName  map[string]*runner

	mu sync.Mutex // guards runners' state
	// wake has a value when a result is pending.
	wake chan struct{}
	// recoveries carries outcomes of recovery actions to the connection
	// loop; one per check at most is ever in flight, so it never fills.
	recoveries chan *agent.Recovery
	// wg counts check and recovery goroutines.
	wg sync.WaitGroup
}

// runner is one check's loop and the agent's memory of it.
type runner struct {
	ch    *Check
	probe prober
	rerun chan struct{}

	// Under Agent.mu.
	have, ok     bool
	detail       string
	at           time.Time
	pending      bool
	recovering   bool
	lastRecovery time.Time
}

// New makes an agent for cfg (validated by ParseConfig or LoadConfig).
func New(cfg *Config, log *slog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	if log == nil {
		log = slog.Default()
	}
	a := &Agent{cfg: cfg, dialers: dialers(cfg), log: log, byName: map[string]*runner{},
		wake: make(chan struct{}, 1), recoveries: make(chan *agent.Recovery, len(cfg.Checks))}
	for i := range cfg.Checks {
		r := &runner{ch: &cfg.Checks[i], probe: newProber(&cfg.Checks[i]), rerun: make(chan struct{}, 1)}
		a.checks = append(a.checks, r)
		a.byName[r.ch.Name] = r
	}
	return a, nil
}

// Run runs the checks and the connection to the host until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		a.wg.Wait()
	}()
	for _, r := range a.checks {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.runCheck(ctx, r)
		}()
	}
	a.log.Info("agent running", "id", a.cfg.AgentID, "checks", len(a.checks), "transports", fmt.Sprint(a.dialers))
	backoff := 100 * time.Millisecond
	warned := false
	for {
		var errs []error // why this round did not reach a host that answers
		for _, d := range a.dialers {
			dctx, dcancel := context.WithTimeout(ctx, dialTimeout)
			c, err := d.Dial(dctx)
			dcancel()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", d, err))
				continue
			}
			errs = nil
			acked, err := a.session(ctx, c, d.String())
			c.Close()
			if ctx.Err() != nil {
				return nil
			}
			if acked {
				a.log.Info("connection to host ended", "transport", d, "err", err)
				backoff, warned = 100*time.Millisecond, false
			} else {
				// A virtio-serial port opens with nobody on the host side.
				errs = append(errs, fmt.Errorf("%s: no answer: %w", d, err))
			}
			break
		}
		if len(errs) > 0 { // warn once per outage, not once per attempt
			if !warned {
				a.log.Warn("cannot reach the host; retrying", "err", errors.Join(errs...))
				warned = true
			} else {
				a.log.Debug("cannot reach the host", "err", errors.Join(errs...))
			}
		}
		// Jitter keeps many guests from reconnecting in step after a
		// failover.
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, time.Duration(a.cfg.MaxBackoff))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// runCheck runs one check every interval (or at once when asked) and
// records its result.
func (a *Agent) runCheck(ctx context.Context, r *runner) {
	iv := time.Duration(r.ch.Interval)
	// Spread the checks' first runs over a tenth of their interval.
	t := time.NewTimer(rand.N(iv/10 + 1))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.rerun:
			t.Stop()
		}
		pctx, cancel := context.WithTimeout(ctx, time.Duration(r.ch.Timeout))
		err := r.probe(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		a.record(r, err)
		t.Reset(iv)
	}
}

func (a *Agent) record(r *runner, err error) {
	a.mu.Lock()
	first, was := !r.have, r.ok
	r.have, r.ok, r.at, r.pending = true, err == nil, time.Now(), true
	r.detail = ""
	if err != nil {
		r.detail = agent.CleanDetail(err.Error())
	}
	a.mu.Unlock()
	if first || was != (err == nil) {
		if err != nil {
			a.log.Warn("check failing", "check", r.ch.Name, "err", err)
		} else {
			a.log.Info("check passing", "check", r.ch.Name)
		}
	}
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// pendingReports takes the results not yet sent, at most n of them.
func (a *Agent) pendingReports(n int) (reps []agent.Report, more bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.checks {
		if !r.pending {
			continue
		}
		if len(reps) == n {
			return reps, true
		}
		r.pending = false
		st := agent.StateOK
		if !r.ok {
			st = agent.StateFail
		}
		reps = append(reps, agent.Report{Check: r.ch.Name, State: st, Detail: r.detail, Time: r.at.UnixMilli()})
	}
	return reps, false
}

// markAllPending makes every known result go out on a new connection.
func (a *Agent) markAllPending() {
	a.mu.Lock()
	for _, r := range a.checks {
		r.pending = r.have
	}
	a.mu.Unlock()
}

// errNoAck ends a connection whose host stopped answering heartbeats, as a
// half-open vsock connection after a failover does.
var errNoAck = errors.New("host stopped acknowledging heartbeats")

// session speaks the protocol on one connection. acked reports whether the
// host acknowledged the hello.
func (a *Agent) session(ctx context.Context, c Conn, transport string) (acked bool, err error) {
	var seq uint64
	next := func() uint64 { seq++; return seq }
	send := func(m *agent.Message) error {
		c.SetWriteDeadline(time.Now().Add(writeTimeout))
		return agent.WriteMessage(c, m)
	}
	hello := &agent.Hello{Version: agent.Version, AgentID: a.cfg.AgentID, Seq: next()}
	for _, r := range a.checks {
		hello.Checks = append(hello.Checks, r.ch.info())
	}
	if err := send(&agent.Message{Type: agent.TypeHello, Hello: hello}); err != nil {
		return false, fmt.Errorf("hello: %w", err)
	}
	a.markAllPending()

	type incoming struct {
		m   *agent.Message
		err error
	}
	in := make(chan incoming)
	done := make(chan struct{})
	var rwg sync.WaitGroup
	rwg.Add(1)
	go func() {
		defer rwg.Done()
		fr := agent.NewFrameReader(c, agent.MaxFrame)
		for {
			m, err := fr.Next()
			select {
			case in <- incoming{m, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		close(done)
		c.Close() // unblocks the reader
		rwg.Wait()
	}()

	hb := time.Duration(a.cfg.Heartbeat)
	heartbeat := time.NewTicker(hb)
	defer heartbeat.Stop()
	lastAck := time.Now()
	pace := newPacer(sendRate, sendBurst)
	var paceTimer <-chan time.Time
	wake := a.wake
	flush := func() error {
		reps, more := a.pendingReports(pace.available())
		for i := range reps {
			pace.take()
			reps[i].Seq = next()
			if err := send(&agent.Message{Type: agent.TypeReport, Report: &reps[i]}); err != nil {
				return fmt.Errorf("report: %w", err)
			}
		}
		if more { // wait for tokens rather than for the next result
			wake, paceTimer = nil, time.After(pace.wait())
		} else {
			wake, paceTimer = a.wake, nil
		}
		return nil
	}
	if err := flush(); err != nil {
		return false, err
	}
	for {
		select {
		case <-ctx.Done():
			return acked, nil
		case <-wake:
			if err := flush(); err != nil {
				return acked, err
			}
		case <-paceTimer:
			if err := flush(); err != nil {
				return acked, err
			}
		case rec := <-a.recoveries:
			rec.Seq = next()
			pace.take()
			if err := send(&agent.Message{Type: agent.TypeRecovery, Recovery: rec}); err != nil {
				return acked, fmt.Errorf("recovery: %w", err)
			}
		case <-heartbeat.C:
			if time.Since(lastAck) > ackMisses*hb {
				return acked, errNoAck
			}
			pace.take()
			if err := send(&agent.Message{Type: agent.TypeHeartbeat,
				Heartbeat: &agent.Heartbeat{Seq: next(), Time: time.Now().UnixMilli()}}); err != nil {
				return acked, fmt.Errorf("heartbeat: %w", err)
			}
		case r := <-in:
			if r.err != nil {
				return acked, fmt.Errorf("from host: %w", r.err)
			}
			switch r.m.Type {
			case agent.TypeAck:
				// Acks of an earlier connection may linger in a
				// virtio-serial port; only ours count.
				if r.m.Ack.Seq <= seq {
					lastAck = time.Now()
					if !acked && r.m.Ack.Seq == hello.Seq {
						acked = true
						a.log.Info("connected to host", "transport", transport)
					}
				}
			case agent.TypeRecover:
				a.recover(ctx, r.m.Recover.Check)
			default:
				return acked, fmt.Errorf("from host: unexpected %s message", r.m.Type)
			}
		}
	}
}

// recover runs the check's own recovery action if the guest's rules allow
// it now; the host only names the check. The outcome is reported either way.
func (a *Agent) recover(ctx context.Context, name string) {
	r := a.byName[name]
	if r == nil {
		a.log.Warn("host asked to recover an unknown check", "check", name)
		return // naming it in a reply would be a protocol error on the host
	}
	refuse := func(why string) {
		a.log.Warn("recovery refused", "check", name, "why", why)
		select { // dropped if refusals pile up; the host asks again anyway
		case a.recoveries <- &agent.Recovery{Check: name, OK: false, Detail: agent.CleanDetail("not run: " + why)}:
		default:
		}
	}
	a.mu.Lock()
	switch {
	case r.ch.Recover == nil:
		a.mu.Unlock()
		refuse("no recovery action configured for this check")
		return
	case r.recovering:
		a.mu.Unlock()
		a.log.Info("recovery already running", "check", name)
		return
	case r.have && r.ok:
		a.mu.Unlock()
		refuse("the check passes here")
		return
	case !r.lastRecovery.IsZero() && time.Since(r.lastRecovery) < time.Duration(r.ch.Recover.MinInterval):
		left := time.Duration(r.ch.Recover.MinInterval) - time.Since(r.lastRecovery)
		a.mu.Unlock()
		refuse(fmt.Sprintf("ran %s ago, next allowed in %s", time.Since(r.lastRecovery).Round(time.Second), left.Round(time.Second)))
		return
	}
	r.recovering, r.lastRecovery = true, time.Now()
	a.mu.Unlock()
	a.log.Warn("running recovery action", "check", name, "command", r.ch.Recover.Command)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		rctx, cancel := context.WithTimeout(ctx, time.Duration(r.ch.Recover.Timeout))
		out, code, err := execBounded(rctx, r.ch.Recover.Command)
		cancel()
		rec := &agent.Recovery{Check: name, OK: err == nil && code == 0}
		switch {
		case err != nil:
			rec.Detail = err.Error()
		default:
			rec.Detail = fmt.Sprintf("exit %d", code)
			if out != "" {
				rec.Detail += ": " + out
			}
		}
		rec.Detail = agent.CleanDetail(rec.Detail)
		a.log.Info("recovery action ended", "check", name, "ok", rec.OK, "detail", rec.Detail)
		a.mu.Lock()
		r.recovering = false
		a.mu.Unlock()
		select {
		case a.recoveries <- rec:
		case <-ctx.Done():
			return
		}
		select { // judge the application again now, not an interval later
		case r.rerun <- struct{}{}:
		default:
		}
	}()
}

// pacer is a token bucket for what the agent sends.
type pacer struct {
	rate, burst, tokens float64
	last                time.Time
}

func newPacer(rate, burst float64) *pacer {
	return &pacer{rate: rate, burst: burst, tokens: burst, last: time.Now()}
}

func (p *pacer) refill() {
	now := time.Now()
	p.tokens = min(p.burst, p.tokens+now.Sub(p.last).Seconds()*p.rate)
	p.last = now
}

// available is how many messages may go now.
func (p *pacer) available() int {
	p.refill()
	return int(p.tokens)
}

// take spends a token; heartbeats and recoveries may drive it below zero,
// which delays the next reports.
func (p *pacer) take() { p.tokens-- }

// wait is how long until one token is there.
func (p *pacer) wait() time.Duration {
	p.refill()
	if p.tokens >= 1 {
		return 0
	}
	return time.Duration((1 - p.tokens) / p.rate * float64(time.Second))
}
