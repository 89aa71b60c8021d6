package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/monitor/agent"
	"github.com/prometheus/client_golang/prometheus"
)

// hostSide is a stand-in for axd: a listener whose connections are served by
// one VM's Monitor, as axd serves a virtio-serial chardev socket or a vsock
// listener.
type hostSide struct {
	t      *testing.T
	m      *agent.Monitor
	ln     net.Listener
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	events  []string
	actions []agent.Action
}

func startHost(t *testing.T, ln net.Listener, policy agent.Policy) *hostSide {
	t.Helper()
	h := &hostSide{t: t, ln: ln}
	m, err := agent.NewMonitor(agent.Config{
		VM: "vm1", Policy: policy, Tick: 50 * time.Millisecond, SilentAfter: 2 * time.Second,
		Hysteresis: agent.Hysteresis{HealAfter: 2},
		Metrics:    agent.NewMetrics(prometheus.NewRegistry()),
		Log:        slog.New(slog.DiscardHandler),
		Events: func(kind, text string) {
			h.mu.Lock()
			h.events = append(h.events, kind+": "+text)
			h.mu.Unlock()
			t.Logf("host event %s: %s", kind, text)
		},
		Actuator: agent.ActuatorFunc(func(a agent.Action) {
			h.mu.Lock()
			h.actions = append(h.actions, a)
			h.mu.Unlock()
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	h.m = m
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.wg.Add(2)
	go func() {
		defer h.wg.Done()
		m.Run(ctx)
	}()
	go func() {
		defer h.wg.Done()
		agent.ServeListener(ctx, ln, func(net.Addr) *agent.Monitor { return m })
	}()
	t.Cleanup(h.stop)
	return h
}

// stop is axd going away: listener and sessions closed. Safe to repeat.
func (h *hostSide) stop() {
	h.ln.Close()
	h.cancel()
	h.m.Close()
	h.wg.Wait()
}

func (h *hostSide) hasEvent(sub string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.events {
		if strings.Contains(e, sub) {
			return true
		}
	}
	return false
}

func (h *hostSide) restartApps() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, a := range h.actions {
		if a.Kind == agent.RestartApp {
			n++
		}
	}
	return n
}

// waitHealth waits until the check has the health wanted.
func (h *hostSide) waitHealth(check string, want agent.Health, within time.Duration) {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for {
		st := h.m.Status()
		for _, a := range st.Apps {
			if a.Check == check && a.Health == want && st.Connected {
				return
			}
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s not %s within %v: %+v", check, want, within, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// appListener is the application the check watches: a TCP listener that
// accepts and closes, which the test stops and the recovery restarts.
type appListener struct {
	addr string
	ln   net.Listener
}

func (a *appListener) start(t *testing.T) {
	t.Helper()
	var err error
	for i := 0; i < 50; i++ { // the port may linger briefly after a close
		if a.ln, err = net.Listen("tcp", a.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	a.addr = a.ln.Addr().String()
	go func(ln net.Listener) {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}(a.ln)
}

func (a *appListener) stop() { a.ln.Close() }

// transport says how the agent reaches the host and how the host listens.
type transport struct {
	name   string
	listen func(t *testing.T) net.Listener // a new listener at the same address each call
	config func(c *Config)
}

// endToEnd runs a real agent against a real Monitor over tr: the watched
// application fails, the policy asks for recovery, the agent runs its own
// configured action (which here leaves a marker file the test answers by
// restarting the application), the application is healthy again; then axd
// "restarts" (listener and Monitor replaced) and the agent reconnects to the
// new one by itself.
func endToEnd(t *testing.T, tr transport) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "recovered")
	app := &appListener{addr: "127.0.0.1:0"}
	app.start(t)
	defer app.stop()

	cfgJSON, _ := json.Marshal(map[string]any{
		"agent_id": "e2e", "heartbeat": "200ms", "max_backoff": "200ms",
		"checks": []map[string]any{{
			"name": "app", "kind": "tcp", "address": app.addr,
			"interval": "150ms", "timeout": "100ms", "threshold": 2,
			"recover": map[string]any{
				"command":      []string{"/bin/sh", "-c", "echo restarted; touch " + marker},
				"timeout":      "5s",
				"min_interval": "100ms",
			},
		}},
	})
	cfg, err := ParseConfig(cfgJSON)
	if err != nil {
		t.Fatal(err)
	}
	ln := tr.listen(t) // first: the vsock port is known once listening
	tr.config(cfg)
	policy := agent.Policy{OnFailed: agent.RestartApp, Recoveries: 5, RecoverEvery: time.Second}
	host := startHost(t, ln, policy)

	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	agentDone := make(chan error, 1)
	go func() { agentDone <- a.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-agentDone:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop")
		}
	}()

	start := time.Now()
	host.waitHealth("app", agent.Healthy, 30*time.Second)
	t.Logf("%s: healthy %v after the agent started", tr.name, time.Since(start).Round(time.Millisecond))

	app.stop()
	failedAt := time.Now()
	host.waitHealth("app", agent.Failed, 30*time.Second)
	t.Logf("%s: failed %v after the application stopped", tr.name, time.Since(failedAt).Round(time.Millisecond))

	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent never ran its recovery action; host actions: %d restart-app", host.restartApps())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if host.restartApps() == 0 {
		t.Fatal("recovery ran without the host asking")
	}
	recoveredAt := time.Now()
	app.start(t)
	host.waitHealth("app", agent.Healthy, 30*time.Second)
	t.Logf("%s: healthy %v after the recovery action ran; %v from failure to healthy", tr.name,
		time.Since(recoveredAt).Round(time.Millisecond), time.Since(failedAt).Round(time.Millisecond))
	waitFor(t, 10*time.Second, "recovery event", func() bool { return host.hasEvent("recovery action ran in the guest: exit 0: restarted") })

	// axd restarts: everything on the host side goes away and comes back.
	host.stop()
	restartAt := time.Now()
	host2 := startHost(t, tr.listen(t), policy)
	host2.waitHealth("app", agent.Healthy, 30*time.Second)
	t.Logf("%s: reconnected and healthy %v after the host side came back", tr.name, time.Since(restartAt).Round(time.Millisecond))
	if st := host2.m.Status(); st.AgentID != "e2e" || !st.Connected {
		t.Errorf("status after the host restart: %+v", st)
	}
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestEndToEndSerialSocket runs the virtio-serial fallback path: the agent's
// serial transport, pointed at a unix socket like the one QEMU's chardev
// gives axd.
func TestEndToEndSerialSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	endToEnd(t, transport{
		name: "serial",
		listen: func(t *testing.T) net.Listener {
			os.Remove(sock)
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			return ln
		},
		config: func(c *Config) {
			c.Transports = []string{TransportVsock, TransportSerial}
			c.VsockCID, c.VsockPort = 2, 1 // nothing there: the agent falls back
			c.SerialPath = sock
		},
	})
}

// fakeHost accepts agent connections and lets the test speak for the host.
type fakeHost struct {
	ln    net.Listener
	conns chan net.Conn
}

func newFakeHost(t *testing.T) (*fakeHost, string) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fh := &fakeHost{ln: ln, conns: make(chan net.Conn, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(fh.conns)
				return
			}
			fh.conns <- c
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return fh, sock
}

func (fh *fakeHost) accept(t *testing.T) (net.Conn, *agent.FrameReader, *agent.Hello) {
	t.Helper()
	select {
	case c := <-fh.conns:
		t.Cleanup(func() { c.Close() })
		fr := agent.NewFrameReader(c, 0)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, err := fr.Next()
		if err != nil || m.Type != agent.TypeHello {
			t.Fatalf("first message %+v, %v; want hello", m, err)
		}
		return c, fr, m.Hello
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not connect")
	}
	return nil, nil, nil
}

// next reads until a message of type typ (skipping others) and returns it.
func next(t *testing.T, c net.Conn, fr *agent.FrameReader, typ string, check string) *agent.Message {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		m, err := fr.Next()
		if err != nil {
			t.Fatalf("waiting for %s: %v", typ, err)
		}
		if m.Type == agent.TypeHeartbeat {
			agent.WriteMessage(c, &agent.Message{Type: agent.TypeAck, Ack: &agent.Ack{Seq: m.Heartbeat.Seq}})
		}
		if m.Type != typ {
			continue
		}
		if check != "" && ((m.Report != nil && m.Report.Check != check) || (m.Recovery != nil && m.Recovery.Check != check)) {
			continue
		}
		return m
	}
}

func runAgent(t *testing.T, cfgJSON string) {
	t.Helper()
	cfg, err := ParseConfig([]byte(cfgJSON))
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// TestAgentRecoveryRules: the host names a check, the guest decides. The
// passing check has time to pass on a loaded machine (a 50 ms timeout once
// failed /bin/true there, and its recovery ran).
func TestAgentRecoveryRules(t *testing.T) {
	fh, sock := newFakeHost(t)
	marker := filepath.Join(t.TempDir(), "ran")
	// Heartbeats are acked only while the test reads (next): at 1 s the
	// agent keeps the connection through 3 s of a loaded machine's delays.
	runAgent(t, fmt.Sprintf(`{"transports":["serial"],"serial_path":%q,"heartbeat":"1s","checks":[
		{"name":"up","kind":"command","command":["/bin/true"],"interval":"2s","timeout":"1500ms",
		 "recover":{"command":["/bin/sh","-c","echo x >> %s"],"min_interval":"1h"}},
		{"name":"down","kind":"command","command":["/bin/false"],"interval":"100ms","timeout":"50ms",
		 "recover":{"command":["/bin/sh","-c","echo y >> %s"],"min_interval":"1h"}},
		{"name":"bare","kind":"command","command":["/bin/false"],"interval":"100ms","timeout":"50ms"}]}`,
		sock, marker, marker))
	c, fr, hello := fh.accept(t)
	if len(hello.Checks) != 3 || !hello.Checks[0].Recover || hello.Checks[2].Recover {
		t.Fatalf("hello %+v", hello)
	}
	agent.WriteMessage(c, &agent.Message{Type: agent.TypeAck, Ack: &agent.Ack{Seq: hello.Seq}})
	next(t, c, fr, agent.TypeReport, "up")
	next(t, c, fr, agent.TypeReport, "down")
	next(t, c, fr, agent.TypeReport, "bare")

	tests := []struct {
		check, want string
		ok          bool
	}{
		{"up", "not run: the check passes here", false},
		{"bare", "not run: no recovery action configured", false},
		{"down", "exit 0", true},
		{"down", "not run: ran 0s ago, next allowed in 1h0m0s", false},
	}
	for _, tt := range tests {
		agent.WriteMessage(c, &agent.Message{Type: agent.TypeRecover, Recover: &agent.Recover{Check: tt.check}})
		m := next(t, c, fr, agent.TypeRecovery, tt.check)
		if m.Recovery.OK != tt.ok || !strings.HasPrefix(m.Recovery.Detail, tt.want) {
			t.Errorf("recover %s: %+v, want ok=%v detail %q", tt.check, m.Recovery, tt.ok, tt.want)
		}
	}
	// An unknown check is ignored, not answered.
	agent.WriteMessage(c, &agent.Message{Type: agent.TypeRecover, Recover: &agent.Recover{Check: "nope"}})
	if b, _ := os.ReadFile(marker); string(b) != "y\n" {
		t.Errorf("recovery actions ran %q, want exactly the one of down", b)
	}
}

// TestAgentReconnectsWhenHostStopsAcking covers a connection that stays
// open but leads nowhere, as a vsock connection may after a failover.
func TestAgentReconnectsWhenHostStopsAcking(t *testing.T) {
	fh, sock := newFakeHost(t)
	runAgent(t, fmt.Sprintf(`{"transports":["serial"],"serial_path":%q,"heartbeat":"100ms","max_backoff":"100ms","checks":[]}`, sock))
	start := time.Now()
	fh.accept(t) // never acked
	_, _, hello := fh.accept(t)
	if el := time.Since(start); el < 300*time.Millisecond {
		t.Errorf("reconnected after %v, before three heartbeats went unacknowledged", el)
	}
	if hello.Seq != 1 {
		t.Errorf("new connection's hello has seq %d, want 1", hello.Seq)
	}
}

// TestAgentSurvivesGarbageFromHost: a host that sends nonsense gets a new
// connection, not a crashed agent.
func TestAgentSurvivesGarbageFromHost(t *testing.T) {
	fh, sock := newFakeHost(t)
	runAgent(t, fmt.Sprintf(`{"transports":["serial"],"serial_path":%q,"heartbeat":"100ms","max_backoff":"50ms","checks":[]}`, sock))
	for _, junk := range [][]byte{
		[]byte("\x00\x00\x00\x05hello"),
		[]byte("\xff\xff\xff\xff"),
		[]byte("\x00\x00\x00\x29{\"type\":\"hello\",\"hello\":{\"version\":1}}  "),
	} {
		c, _, _ := fh.accept(t)
		c.Write(junk)
	}
	fh.accept(t)
}

func TestAgentNoTransport(t *testing.T) {
	cfg, err := ParseConfig([]byte(`{"transports":["serial"],"serial_path":"/nonexistent/port","max_backoff":"50ms","checks":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := a.Run(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run: %v", err)
	}
	// A character device opens as a port (this is the virtio-serial path).
	c, err := (SerialDialer{Path: os.DevNull}).Dial(context.Background())
	if err != nil {
		t.Fatalf("character device: %v", err)
	}
	c.Close()
	if _, err := (SerialDialer{Path: t.TempDir()}).Dial(context.Background()); err == nil {
		t.Error("a directory was accepted as a serial port")
	}
}
