package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// fakeAgent is the guest's end of a session in tests.
type fakeAgent struct {
	t    *testing.T
	conn net.Conn
	seq  uint64
	in   chan *Message // what the host sent; closed when reading fails
}

// harness is a Monitor with metrics, recorded events and actions.
type harness struct {
	m       *Monitor
	reg     *prometheus.Registry
	mu      sync.Mutex
	events  []string
	actions []Action
}

func newHarness(t *testing.T, cfg Config) *harness {
	t.Helper()
	h := &harness{reg: prometheus.NewRegistry()}
	if cfg.VM == "" {
		cfg.VM = "vm1"
	}
	cfg.Log = slog.New(slog.DiscardHandler)
	cfg.Metrics = NewMetrics(h.reg)
	cfg.Events = func(kind, text string) {
		h.mu.Lock()
		h.events = append(h.events, kind+": "+text)
		h.mu.Unlock()
	}
	cfg.Actuator = ActuatorFunc(func(a Action) {
		h.mu.Lock()
		h.actions = append(h.actions, a)
		h.mu.Unlock()
	})
	m, err := NewMonitor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	h.m = m
	return h
}

func (h *harness) eventsMatching(sub string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, e := range h.events {
		if strings.Contains(e, sub) {
			out = append(out, e)
		}
	}
	return out
}

func (h *harness) actionKinds() []ActionKind {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []ActionKind
	for _, a := range h.actions {
		out = append(out, a.Kind)
	}
	return out
}

// metric returns the value of the series name{labels}, or -1 when absent.
func (h *harness) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, s := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range s.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue series
				}
			}
			switch {
			case s.Gauge != nil:
				return s.Gauge.GetValue()
			case s.Counter != nil:
				return s.Counter.GetValue()
			}
		}
	}
	return -1
}

func (h *harness) seriesCount(t *testing.T, name string) int {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric())
		}
	}
	return 0
}

// serve starts a session over a pipe and returns the agent's end and the
// channel that receives Serve's error.
func (h *harness) serve(t *testing.T) (*fakeAgent, <-chan error) {
	t.Helper()
	a, done := h.serveRaw(t)
	t.Cleanup(func() { a.conn.Close() })
	return a, done
}

// serveRaw is serve leaving the agent's end to the caller to close.
func (h *harness) serveRaw(t *testing.T) (*fakeAgent, <-chan error) {
	host, guest := net.Pipe()
	return h.serveOn(t, host, guest)
}

// socketPair returns the two ends of a connected unix stream socket pair.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// serveOn runs a session on host with the fake agent on guest.
func (h *harness) serveOn(t *testing.T, host, guest net.Conn) (*fakeAgent, <-chan error) {
	done := make(chan error, 1)
	go func() { done <- h.m.Serve(context.Background(), host) }()
	a := &fakeAgent{t: t, conn: guest, in: make(chan *Message, 64)}
	go func() {
		defer close(a.in)
		fr := NewFrameReader(guest, 0)
		for {
			m, err := fr.Next()
			if err != nil {
				return
			}
			a.in <- m
		}
	}()
	return a, done
}

func (a *fakeAgent) send(m *Message) error {
	switch {
	case m.Hello != nil:
		a.seq++
		m.Hello.Seq = a.seq
	case m.Report != nil:
		a.seq++
		m.Report.Seq = a.seq
	case m.Heartbeat != nil:
		a.seq++
		m.Heartbeat.Seq = a.seq
	case m.Recovery != nil:
		a.seq++
		m.Recovery.Seq = a.seq
	}
	a.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	return WriteMessage(a.conn, m)
}

func (a *fakeAgent) mustSend(m *Message) {
	a.t.Helper()
	if err := a.send(m); err != nil {
		a.t.Fatalf("send %s: %v", m.Type, err)
	}
}

func (a *fakeAgent) hello(checks ...CheckInfo) {
	a.t.Helper()
	a.mustSend(&Message{Type: TypeHello, Hello: &Hello{Version: Version, AgentID: "test-agent", Checks: checks}})
	a.expect(TypeAck)
}

func (a *fakeAgent) report(check string, ok bool, detail string) {
	a.t.Helper()
	st := StateOK
	if !ok {
		st = StateFail
	}
	a.mustSend(&Message{Type: TypeReport, Report: &Report{Check: check, State: st, Detail: detail, Time: time.Now().UnixMilli()}})
}

func (a *fakeAgent) expect(typ string) *Message {
	a.t.Helper()
	select {
	case m, ok := <-a.in:
		if !ok {
			a.t.Fatalf("connection closed while waiting for %s", typ)
		}
		if m.Type != typ {
			a.t.Fatalf("got %s, want %s", m.Type, typ)
		}
		return m
	case <-time.After(5 * time.Second):
		a.t.Fatalf("no %s from the host", typ)
	}
	return nil
}

func waitEnd(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("session did not end")
	}
	return nil
}

func tcpCheck(name string, recoverable bool) CheckInfo {
	return CheckInfo{Name: name, Kind: KindTCP, IntervalMS: 1000, Threshold: 2, Recover: recoverable}
}

func TestSessionFailedAppIsRecovered(t *testing.T) {
	h := newHarness(t, Config{Policy: Policy{OnFailed: RestartApp, RecoverEvery: time.Hour}})
	a, done := h.serve(t)
	a.hello(tcpCheck("ledger", true))
	if got := h.metric(t, "ax_agent_connected", "vm", "vm1"); got != 1 {
		t.Errorf("ax_agent_connected = %v, want 1", got)
	}
	a.report("ledger", true, "")
	a.report("ledger", false, "connection refused")
	a.report("ledger", false, "connection refused")
	rec := a.expect(TypeRecover)
	if rec.Recover.Check != "ledger" {
		t.Fatalf("recover %+v", rec.Recover)
	}
	if got := h.metric(t, "ax_app_health", "vm", "vm1", "check", "ledger"); got != float64(Failed) {
		t.Errorf("ax_app_health = %v, want %d (failed)", got, Failed)
	}
	a.mustSend(&Message{Type: TypeRecovery, Recovery: &Recovery{Check: "ledger", OK: true, Detail: "exit 0"}})
	a.report("ledger", true, "")
	a.report("ledger", true, "")
	a.mustSend(&Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Time: 1}})
	a.expect(TypeAck) // everything before it has been handled
	st := h.m.Status()
	if !st.Connected || len(st.Apps) != 1 || st.Apps[0].Health != Healthy {
		t.Fatalf("status %+v", st)
	}
	if got := h.metric(t, "ax_agent_reports_total", "vm", "vm1", "state", "fail"); got != 2 {
		t.Errorf("fail reports = %v, want 2", got)
	}
	if got := h.metric(t, "ax_agent_policy_actions_total", "vm", "vm1", "action", "restart-app"); got != 1 {
		t.Errorf("restart-app actions = %v, want 1", got)
	}
	if k := h.actionKinds(); len(k) != 1 || k[0] != RestartApp {
		t.Errorf("actions %v, want [restart-app]", k)
	}
	for _, want := range []string{"healthy → degraded", "degraded → failed", "failed → healthy", "recovery action ran", "agent-connected"} {
		if len(h.eventsMatching(want)) == 0 {
			t.Errorf("no event %q in %q", want, h.events)
		}
	}
	a.conn.Close()
	if r := ReasonOf(waitEnd(t, done)); r != ReasonEOF {
		t.Errorf("reason %q, want eof", r)
	}
	if got := h.metric(t, "ax_agent_connected", "vm", "vm1"); got != 0 {
		t.Errorf("ax_agent_connected after the end = %v, want 0", got)
	}
}

func TestSessionFloodIsDisconnected(t *testing.T) {
	h := newHarness(t, Config{Limits: Limits{Rate: 50, Burst: 20, Penalty: time.Hour}})
	a, done := h.serve(t)
	a.hello(tcpCheck("ledger", false))
	sent := 0
	start := time.Now()
	for ; sent < 100000; sent++ {
		if err := a.send(&Message{Type: TypeReport, Report: &Report{Check: "ledger", State: StateOK}}); err != nil {
			break
		}
	}
	err := waitEnd(t, done)
	if r := ReasonOf(err); r != ReasonFlood {
		t.Fatalf("session ended with %v, want flood", err)
	}
	el := time.Since(start)
	// The burst and what refilled while the agent was sending, give or take
	// the frames in flight.
	if limit := 20 + int(50*el.Seconds()) + 2; sent > limit {
		t.Errorf("agent got %d messages in within %v; the bucket allows about %d", sent, el, limit)
	}
	t.Logf("flood: %d messages accepted in %v before the disconnect", sent, el.Round(time.Millisecond))
	if got := h.metric(t, "ax_agent_disconnects_total", "vm", "vm1", "reason", "flood"); got != 1 {
		t.Errorf("flood disconnects = %v, want 1", got)
	}
	// It is refused for its penalty, at once and cheaply.
	_, done = h.serve(t)
	if r := ReasonOf(waitEnd(t, done)); r != ReasonPenalty {
		t.Fatalf("reconnect during the penalty: %q, want penalty", r)
	}
	if got := h.metric(t, "ax_agent_rejected_total", "vm", "vm1", "reason", "penalty"); got != 1 {
		t.Errorf("penalty rejections = %v, want 1", got)
	}
}

func TestSessionByteRateIsBounded(t *testing.T) {
	h := newHarness(t, Config{Limits: Limits{ByteRate: 1000, ByteBurst: 4000}})
	a, done := h.serve(t)
	a.hello(tcpCheck("ledger", false))
	detail := strings.Repeat("d", MaxDetail)
	for i := 0; i < 100; i++ {
		if a.send(&Message{Type: TypeReport, Report: &Report{Check: "ledger", State: StateFail, Detail: detail}}) != nil {
			break
		}
	}
	if r := ReasonOf(waitEnd(t, done)); r != ReasonFlood {
		t.Fatalf("reason %q, want flood", r)
	}
}

func TestSessionMisbehaviour(t *testing.T) {
	valid := func(m *Message) []byte {
		b, err := Encode(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	frame := func(payload string) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
	}
	hello := valid(&Message{Type: TypeHello, Hello: &Hello{Version: Version, AgentID: "a", Seq: 1,
		Checks: []CheckInfo{tcpCheck("c", false)}}})
	report := func(seq uint64, check string) []byte {
		return valid(&Message{Type: TypeReport, Report: &Report{Seq: seq, Check: check, State: StateOK}})
	}
	many := &Hello{Version: Version, AgentID: "a", Seq: 1}
	for i := 0; i < 5; i++ {
		many.Checks = append(many.Checks, tcpCheck(fmt.Sprintf("c%d", i), false))
	}
	tests := []struct {
		name   string
		frames [][]byte
		want   Reason
	}{
		{"garbage", [][]byte{[]byte("GET / HTTP/1.1\r\n\r\n")}, ReasonTooLarge},
		{"malformed json", [][]byte{frame(`{"type":`)}, ReasonMalformed},
		{"empty frame", [][]byte{frame("")}, ReasonMalformed},
		{"huge frame", [][]byte{binary.BigEndian.AppendUint32(nil, 1<<30)}, ReasonTooLarge},
		{"report before hello", [][]byte{report(1, "c")}, ReasonProtocol},
		{"second hello", [][]byte{hello, valid(&Message{Type: TypeHello, Hello: &Hello{Version: Version, AgentID: "a", Seq: 2}})}, ReasonProtocol},
		{"undeclared check", [][]byte{hello, report(2, "other")}, ReasonProtocol},
		{"sequence repeats", [][]byte{hello, report(2, "c"), report(2, "c")}, ReasonProtocol},
		{"host message", [][]byte{hello, valid(&Message{Type: TypeRecover, Recover: &Recover{Check: "c"}})}, ReasonProtocol},
		{"too many checks for this host", [][]byte{valid(&Message{Type: TypeHello, Hello: many})}, ReasonProtocol},
		{"malformed after hello", [][]byte{hello, frame(`{"type":"report","report":{"seq":2,"check":"c","state":"ok","time":0,"exec":"rm"}}`)}, ReasonMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, Config{Limits: Limits{MaxChecks: 4}})
			host, guest := net.Pipe()
			defer guest.Close()
			done := make(chan error, 1)
			go func() { done <- h.m.Serve(context.Background(), host) }()
			go func() { // drain acks
				buf := make([]byte, 4096)
				for {
					if _, err := guest.Read(buf); err != nil {
						return
					}
				}
			}()
			for _, f := range tt.frames {
				guest.SetWriteDeadline(time.Now().Add(2 * time.Second))
				if _, err := guest.Write(f); err != nil {
					break
				}
			}
			err := waitEnd(t, done)
			if r := ReasonOf(err); r != tt.want {
				t.Fatalf("session ended with %v, want %s", err, tt.want)
			}
			if got := h.metric(t, "ax_agent_disconnects_total", "vm", "vm1", "reason", string(tt.want)); got != 1 {
				t.Errorf("disconnects{reason=%s} = %v, want 1", tt.want, got)
			}
			if len(h.eventsMatching("refused for")) != 1 {
				t.Errorf("no penalty event: %q", h.events)
			}
		})
	}
}

func TestSessionTimeouts(t *testing.T) {
	lim := Limits{HelloTimeout: 100 * time.Millisecond, FrameTimeout: 100 * time.Millisecond,
		IdleTimeout: 200 * time.Millisecond, WriteTimeout: 100 * time.Millisecond}
	t.Run("no hello", func(t *testing.T) {
		h := newHarness(t, Config{Limits: lim})
		_, done := h.serve(t)
		if r := ReasonOf(waitEnd(t, done)); r != ReasonIdle {
			t.Fatalf("reason %q, want idle", r)
		}
	})
	t.Run("trickling frame", func(t *testing.T) {
		h := newHarness(t, Config{Limits: lim})
		a, done := h.serve(t)
		a.hello(tcpCheck("c", false))
		a.conn.Write([]byte{0, 0, 1, 0, '{'})
		if r := ReasonOf(waitEnd(t, done)); r != ReasonIdle {
			t.Fatalf("reason %q, want idle", r)
		}
	})
	t.Run("silent connection", func(t *testing.T) {
		h := newHarness(t, Config{Limits: lim})
		a, done := h.serve(t)
		a.hello(tcpCheck("c", false))
		if r := ReasonOf(waitEnd(t, done)); r != ReasonIdle {
			t.Fatalf("reason %q, want idle", r)
		}
	})
	t.Run("agent does not read", func(t *testing.T) {
		h := newHarness(t, Config{Limits: lim})
		host, guest := net.Pipe()
		defer guest.Close()
		done := make(chan error, 1)
		go func() { done <- h.m.Serve(context.Background(), host) }()
		WriteMessage(guest, &Message{Type: TypeHello, Hello: &Hello{Version: Version, AgentID: "a", Seq: 1}})
		if r := ReasonOf(waitEnd(t, done)); r != ReasonWrite {
			t.Fatalf("reason %q, want write", r)
		}
	})
}

func TestSessionReplacedAndClosed(t *testing.T) {
	h := newHarness(t, Config{})
	a1, done1 := h.serve(t)
	a1.hello(tcpCheck("c", false))
	a2, done2 := h.serve(t)
	if r := ReasonOf(waitEnd(t, done1)); r != ReasonReplaced {
		t.Fatalf("first session: %q, want replaced", r)
	}
	a2.hello(tcpCheck("c", false))
	if !h.m.Status().Connected {
		t.Error("not connected after the second hello")
	}
	// A context ending closes the session.
	ctx, cancel := context.WithCancel(context.Background())
	host, guest := net.Pipe()
	defer guest.Close()
	done3 := make(chan error, 1)
	go func() { done3 <- h.m.Serve(ctx, host) }()
	if r := ReasonOf(waitEnd(t, done2)); r != ReasonReplaced {
		t.Fatalf("second session: %q, want replaced", r)
	}
	cancel()
	if r := ReasonOf(waitEnd(t, done3)); r != ReasonClosed {
		t.Fatalf("third session: %q, want closed", r)
	}
	h.m.Close()
	h.m.Close()
	_, done4 := h.serve(t)
	if r := ReasonOf(waitEnd(t, done4)); r != ReasonClosed {
		t.Fatalf("after Close: %q, want closed", r)
	}
}

// TestSessionMemoryBounded connects hundreds of times over unix socket
// pairs with full hellos, each declaring new check names, reports with the
// longest details, and frames announcing a gigabyte: the Monitor keeps at
// most MaxChecks applications and series, and the heap does not grow with
// the number of sessions. (net.Pipe would not do here: its deadline timers
// keep closed pipes alive until they fire.)
func TestSessionMemoryBounded(t *testing.T) {
	h := newHarness(t, Config{Limits: Limits{MaxChecks: 8, ConnectBurst: 1e6}})
	detail := strings.Repeat("x", MaxDetail)
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	var before uint64
	start := time.Now()
	for round := 0; round < 300; round++ {
		if round == 20 {
			before = heap()
		}
		host, guest := socketPair(t)
		a, done := h.serveOn(t, host, guest)
		var checks []CheckInfo
		for i := 0; i < 8; i++ {
			checks = append(checks, tcpCheck(fmt.Sprintf("r%d-c%d", round, i), false))
		}
		a.hello(checks...)
		for _, c := range checks {
			a.report(c.Name, false, detail)
		}
		// Then a frame header announcing a gigabyte.
		a.conn.Write(binary.BigEndian.AppendUint32(nil, 1<<30))
		if r := ReasonOf(waitEnd(t, done)); r != ReasonTooLarge {
			t.Fatalf("round %d: %q, want too-large", round, r)
		}
		a.conn.Close()
		h.m.mu.Lock()
		h.m.refuseTil = time.Time{} // skip the penalty to keep going
		h.m.mu.Unlock()
		if n := len(h.m.checkNames()); n > 8 {
			t.Fatalf("round %d: %d applications kept", round, n)
		}
		if n := h.seriesCount(t, "ax_app_health"); n > 8 {
			t.Fatalf("round %d: %d ax_app_health series", round, n)
		}
	}
	after := heap()
	growth := int64(after) - int64(before)
	t.Logf("heap before %d KiB, after 280 more sessions %d KiB", before>>10, after>>10)
	if growth > 512<<10 {
		t.Errorf("heap grew by %d KiB over 280 sessions", growth>>10)
	}
	// 300 sessions made some 1500 events; the budget lets EventBurst and
	// one a second through (plus one summary each time some were dropped).
	if n, limit := len(h.eventsMatching("")), EventBurst+2*(int(time.Since(start).Seconds())+1); n > limit {
		t.Errorf("%d events delivered in %v, the budget allows %d", n, time.Since(start), limit)
	}
}

// TestMonitorSilenceAndStale drives the clock by hand.
func TestMonitorSilenceAndStale(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(10000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	h := newHarness(t, Config{Now: clock, SilentAfter: 15 * time.Second, ExpectAgent: true,
		Policy: Policy{OnFailed: Failover, OnSilent: RestartVM, Cooldown: time.Minute}})
	other := newHarness(t, Config{VM: "no-agent", Now: clock, SilentAfter: 15 * time.Second})
	h.m.tick()
	advance(20 * time.Second)
	h.m.tick()
	if !h.m.Status().Silent {
		t.Fatal("an expected agent never heard is not silent after SilentAfter")
	}
	if len(h.actionKinds()) != 0 {
		t.Fatalf("actions for an agent that never connected: %v", h.actionKinds())
	}
	other.m.tick()
	if other.m.Status().Silent || other.metric(t, "ax_agent_silent", "vm", "no-agent") != 0 {
		t.Fatal("a VM without an expected agent is silent")
	}

	a, done := h.serve(t)
	a.hello(tcpCheck("app", false), CheckInfo{Name: "slow", Kind: KindCommand, IntervalMS: 10000, Threshold: 1})
	if h.m.Status().Silent || h.metric(t, "ax_agent_silent", "vm", "vm1") != 0 {
		t.Fatal("still silent after hello")
	}
	a.report("app", true, "")
	a.report("slow", true, "")
	a.mustSend(&Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Time: 1}})
	a.expect(TypeAck)

	// "app" reports every second; 3.5 s without its report makes it stale
	// while "slow" (10 s interval) is still fresh.
	advance(3500 * time.Millisecond)
	h.m.tick()
	st := h.m.Status()
	if st.Apps[0].Health != Unknown || st.Apps[1].Health != Healthy {
		t.Fatalf("after 3.5 s: %+v", st.Apps)
	}

	// Failover on failure.
	a.report("app", false, "down")
	a.report("app", false, "down")
	a.mustSend(&Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Time: 1}})
	a.expect(TypeAck)
	if k := h.actionKinds(); len(k) != 1 || k[0] != Failover {
		t.Fatalf("actions %v, want [failover]", k)
	}

	// Silence: everything unknown, OnSilent in the cooldown waits for it.
	advance(16 * time.Second)
	h.m.tick()
	st = h.m.Status()
	if !st.Silent || st.Apps[0].Health != Unknown || st.Apps[1].Health != Unknown {
		t.Fatalf("after 16 s of silence: %+v", st)
	}
	if got := h.metric(t, "ax_app_health", "vm", "vm1", "check", "slow"); got != float64(Unknown) {
		t.Errorf("ax_app_health{slow} = %v, want 0", got)
	}
	if k := h.actionKinds(); len(k) != 1 {
		t.Fatalf("restart-vm within the cooldown of the failover: %v", k)
	}
	advance(time.Minute)
	h.m.tick()
	if k := h.actionKinds(); len(k) != 2 || k[1] != RestartVM {
		t.Fatalf("actions %v, want [failover restart-vm]", k)
	}
	advance(time.Minute)
	h.m.tick()
	if k := h.actionKinds(); len(k) != 2 {
		t.Fatalf("OnSilent repeated in one silence: %v", k)
	}
	if len(h.eventsMatching(EventSilent)) != 2 {
		t.Errorf("silent events: %q", h.eventsMatching(EventSilent))
	}
	a.conn.Close()
	waitEnd(t, done)
}

func TestMonitorPolicyChange(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(10000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	h := newHarness(t, Config{Now: clock})
	a, done := h.serve(t)
	defer func() { a.conn.Close(); waitEnd(t, done) }()
	a.hello(tcpCheck("app", false))
	a.report("app", false, "down")
	a.report("app", false, "down")
	a.mustSend(&Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Time: 1}})
	a.expect(TypeAck)
	if k := h.actionKinds(); len(k) != 1 || k[0] != Notify {
		t.Fatalf("actions %v, want [notify]", k)
	}
	if err := h.m.SetPolicy(Policy{OnFailed: "bogus"}); err == nil {
		t.Fatal("SetPolicy accepted a bogus kind")
	}
	if err := h.m.SetPolicy(Policy{OnFailed: RestartVM}); err != nil {
		t.Fatal(err)
	}
	// The failure was already acted on (notified); a new policy applies to
	// the next failure.
	a.report("app", true, "")
	a.report("app", true, "")
	a.report("app", false, "down")
	a.report("app", false, "down")
	a.mustSend(&Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Time: 1}})
	a.expect(TypeAck)
	if k := h.actionKinds(); len(k) != 2 || k[1] != RestartVM {
		t.Fatalf("actions %v, want [notify restart-vm]", k)
	}
}

func TestMonitorConfig(t *testing.T) {
	if _, err := NewMonitor(Config{}); err == nil {
		t.Error("NewMonitor accepted an empty VM name")
	}
	if _, err := NewMonitor(Config{VM: "x", Policy: Policy{OnFailed: "reboot"}}); err == nil {
		t.Error("NewMonitor accepted a bogus policy")
	}
	err := &SessionError{VM: "x", Reason: ReasonFlood, Err: errors.New("boom")}
	if ReasonOf(fmt.Errorf("wrapped: %w", err)) != ReasonFlood || ReasonOf(errors.New("x")) != "" {
		t.Error("ReasonOf")
	}
}

// TestCallbacksMayCallMonitor: callbacks run without the Monitor's lock, so
// they can ask it for its status while other goroutines report and tick.
func TestCallbacksMayCallMonitor(t *testing.T) {
	var m *Monitor
	var calls sync.WaitGroup
	cfg := Config{VM: "vm1", Log: slog.New(slog.DiscardHandler), Hysteresis: Hysteresis{HealAfter: 1}, Limits: Limits{Burst: 1000},
		Policy: Policy{OnFailed: RestartVM, Cooldown: time.Nanosecond},
		Events: func(kind, text string) { m.Status() },
		Actuator: ActuatorFunc(func(Action) {
			m.Status()
			m.SetPolicy(Policy{OnFailed: RestartVM, Cooldown: time.Nanosecond})
		})}
	m, err := NewMonitor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	h := &harness{m: m}
	a, done := h.serve(t)
	a.hello(tcpCheck("app", false))
	stop := make(chan struct{})
	calls.Add(1)
	go func() {
		defer calls.Done()
		for {
			select {
			case <-stop:
				return
			default:
				m.tick()
			}
		}
	}()
	for i := 0; i < 200; i++ {
		a.report("app", i%4 < 2, "flap")
	}
	a.mustSend(&Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Time: 1}})
	a.expect(TypeAck)
	close(stop)
	calls.Wait()
	a.conn.Close()
	waitEnd(t, done)
}
