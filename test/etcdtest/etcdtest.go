// Package etcdtest runs etcd members as subprocesses on loopback, each in a
// data directory of the test's, for tests of code that talks to etcd.
//
// Start skips the test when etcd is missing or does not come up, and fails it
// instead under AX_REQUIRE_PRIVILEGED=1 (CI), as test/testenv does.
package etcdtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/test/testenv"
)

const (
	// Raft timing fast enough for tests that kill members, slow enough
	// that a busy 2-core machine does not hold elections for nothing. Its
	// minimum lease TTL (1.5 election timeouts) stays under 1 s.
	heartbeatMS = 50
	electionMS  = 500
	// startTimeout bounds a cluster's start, a leader elected included.
	startTimeout = 30 * time.Second
	// startTries is how often Start tries a cluster on fresh ports: a port
	// found free can be taken by another process before etcd binds it.
	startTries = 3
)

// Cluster is a running etcd cluster. Its members are killed by the test's
// cleanup.
type Cluster struct {
	Members []*Member
}

// Member is one etcd process.
type Member struct {
	Name      string
	Endpoint  string // the client address, host:port
	ClientURL string // http://Endpoint
	PeerURL   string
	Dir       string // data directory; etcd.log beside it holds its log

	cmd    *exec.Cmd
	exited chan struct{} // closed once the process has been waited for
	err    error         // its exit, valid once exited is closed
	kill   sync.Once
}

// Start runs an n-member cluster and returns once every member is healthy
// (a leader elected). Members listen on loopback only.
func Start(tb testing.TB, n int) *Cluster {
	tb.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		unavailable(tb, "etcd not found (try: apt-get install etcd-server)")
	}
	var errs []error
	for range startTries {
		c, err := start(tb, n)
		if err == nil {
			return c
		}
		errs = append(errs, err)
	}
	unavailable(tb, fmt.Sprintf("etcd did not start: %v", errors.Join(errs...)))
	return nil
}

// unavailable skips the test, or fails it when CI demanded every test run.
func unavailable(tb testing.TB, why string) {
	tb.Helper()
	if testenv.Privileged() {
		tb.Fatalf("required but unavailable: %s", why)
	}
	tb.Skip(why)
}

// start tries once; the members it started are killed by the test's cleanup
// whatever happens.
func start(tb testing.TB, n int) (*Cluster, error) {
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, err
	}
	c := &Cluster{}
	var initial []string
	for i := range n {
		m := &Member{
			Name:     fmt.Sprintf("m%d", i),
			Endpoint: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[2*i])),
			PeerURL:  "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[2*i+1])),
			Dir:      tb.TempDir(),
			exited:   make(chan struct{}),
		}
		m.ClientURL = "http://" + m.Endpoint
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	token := fmt.Sprintf("etcdtest-%d-%d", os.Getpid(), time.Now().UnixNano())
	for _, m := range c.Members {
		if err := m.start(tb, strings.Join(initial, ","), token); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for _, m := range c.Members {
		if err := m.waitHealthy(ctx); err != nil {
			c.killAll()
			return nil, err
		}
	}
	return c, nil
}

func (m *Member) start(tb testing.TB, initial, token string) error {
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(m.Dir, m.Name+".log"))
	if err != nil {
		return err
	}
	defer logf.Close() // the child has its own descriptor
	m.cmd = exec.Command("etcd",
		"--name", m.Name,
		"--data-dir", filepath.Join(m.Dir, m.Name+".etcd"),
		"--listen-client-urls", m.ClientURL,
		"--advertise-client-urls", m.ClientURL,
		"--listen-peer-urls", m.PeerURL,
		"--initial-advertise-peer-urls", m.PeerURL,
		"--initial-cluster", initial,
		"--initial-cluster-state", "new",
		"--initial-cluster-token", token,
		"--heartbeat-interval", strconv.Itoa(heartbeatMS),
		"--election-timeout", strconv.Itoa(electionMS),
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
	)
	m.cmd.Stdout, m.cmd.Stderr = logf, logf
	m.cmd.Env = environ()
	// Gone with the test binary, should it die before its cleanup.
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := m.cmd.Start(); err != nil {
		return fmt.Errorf("etcd %s: %w", m.Name, err)
	}
	go func() {
		m.err = m.cmd.Wait()
		close(m.exited)
	}()
	tb.Cleanup(func() {
		m.Kill()
		if tb.Failed() {
			tb.Logf("etcd %s log (%s):\n%s", m.Name, logf.Name(), tail(logf.Name(), 4096))
		}
	})
	return nil
}

// environ is this process's environment without ETCD_ variables, which etcd
// would take for flags.
func environ() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD_") && !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	return env
}

// waitHealthy polls the member's /health until it reports a leader, or the
// member exits, or ctx ends.
func (m *Member) waitHealthy(ctx context.Context) error {
	var last error
	for {
		if last = m.health(ctx); last == nil {
			return nil
		}
		select {
		case <-m.exited:
			return fmt.Errorf("etcd %s exited (%v): %s", m.Name, m.err, tail(filepath.Join(m.Dir, m.Name+".log"), 1024))
		case <-ctx.Done():
			return fmt.Errorf("etcd %s not healthy: %v", m.Name, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (m *Member) health(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.ClientURL+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var h struct{ Health string }
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		return err
	}
	if h.Health != "true" {
		return fmt.Errorf("health %q", h.Health)
	}
	return nil
}

// IsLeader reports whether the member leads its cluster now, by its own
// account.
func (m *Member) IsLeader(ctx context.Context) (bool, error) {
	st, err := m.status(ctx)
	return err == nil && st.leader == st.member, err
}

// HasLeader reports whether the member knows a leader now: it does not
// once it has heard from no majority for an election timeout.
func (m *Member) HasLeader(ctx context.Context) (bool, error) {
	st, err := m.status(ctx)
	return err == nil && st.leader != "" && st.leader != "0", err
}

type status struct{ member, leader string }

func (m *Member) status(ctx context.Context) (status, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, m.ClientURL+"/v3/maintenance/status", strings.NewReader("{}"))
	if err != nil {
		return status{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return status{}, err
	}
	defer resp.Body.Close()
	// IDs are uint64s, which the JSON gateway writes as strings.
	var st struct {
		Header struct {
			MemberID string `json:"member_id"`
		}
		Leader string
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return status{}, err
	}
	if st.Header.MemberID == "" {
		return status{}, errors.New("status without a member ID")
	}
	return status{member: st.Header.MemberID, leader: st.Leader}, nil
}

// Leader returns the member that leads now, asking each running member.
func (c *Cluster) Leader(ctx context.Context) (*Member, error) {
	for _, m := range c.Members {
		if !m.Running() {
			continue
		}
		if ok, err := m.IsLeader(ctx); err == nil && ok {
			return m, nil
		}
	}
	return nil, errors.New("no member leads")
}

// Endpoints returns every member's client address.
func (c *Cluster) Endpoints() []string {
	eps := make([]string, len(c.Members))
	for i, m := range c.Members {
		eps[i] = m.Endpoint
	}
	return eps
}

// Running reports whether the member's process has not exited.
func (m *Member) Running() bool {
	select {
	case <-m.exited:
		return false
	default:
		return true
	}
}

// Kill sends SIGKILL to the member's process and waits for it to exit. It
// is safe to call twice.
func (m *Member) Kill() {
	m.kill.Do(func() {
		if m.Running() {
			m.cmd.Process.Kill()
		}
		<-m.exited
	})
}

func (c *Cluster) killAll() {
	for _, m := range c.Members {
		m.Kill()
	}
}

// freePorts returns n loopback TCP ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close() // held until all n are chosen: no port twice
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// tail returns up to the last n bytes of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(bytes.TrimSpace(b))
}
