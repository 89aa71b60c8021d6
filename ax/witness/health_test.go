package witness

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/test/etcdtest"
)

// healthTimeout is the call timeout of the Leases the health tests probe
// with: Health takes about two of them (the member list, then the probes).
const healthTimeout = 500 * time.Millisecond

// wantHealth is what a test expects of a Health.
type wantHealth struct {
	members, reachable int
	quorum             bool
}

func checkHealth(l Leases, want wantHealth) (Health, error) {
	start := time.Now()
	h, err := l.Health(context.Background())
	if err != nil {
		return h, err
	}
	if took := time.Since(start); took > 4*healthTimeout {
		return h, errors.New("took " + took.String())
	}
	got := wantHealth{len(h.Members), h.Reachable(), h.Quorum}
	if got != want {
		return h, errors.New("got " + describe(h))
	}
	if !h.Quorum && (h.QuorumErr == nil || h.QuorumErr.Error() == "") {
		return h, errors.New("no quorum, and no word why: " + describe(h))
	}
	return h, nil
}

func describe(h Health) string {
	var b strings.Builder
	b.WriteString(h.Kind)
	for _, m := range h.Members {
		b.WriteString(" " + m.Name + "@" + m.Endpoint)
		if !m.Reachable {
			b.WriteString("(unreachable: " + errText(m.Err) + ")")
		}
	}
	b.WriteString(", quorum ")
	if h.Quorum {
		b.WriteString("yes")
	} else {
		b.WriteString("no: " + errText(h.QuorumErr))
	}
	return b.String()
}

func errText(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// TestEtcdHealth: a 3-member cluster probed as members go: 3 of 3 with
// quorum, 2 of 3 with quorum, 1 of 3 without (the survivor still lists
// all three), none (the configured endpoints stand in for the list).
func TestEtcdHealth(t *testing.T) {
	c := etcdtest.Start(t, 3)
	e, err := NewEtcd(EtcdConfig{Endpoints: c.Endpoints(), Host: "a", TTL: 1500 * time.Millisecond, Timeout: healthTimeout, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()

	h, err := checkHealth(e, wantHealth{members: 3, reachable: 3, quorum: true})
	if err != nil {
		t.Fatalf("3 members up: %v", err)
	}
	if h.Kind != KindEtcd || h.TTL != 2*time.Second {
		t.Errorf("kind %q, TTL %v; want etcd, 2s (whole seconds)", h.Kind, h.TTL)
	}
	var names, eps []string
	for _, m := range h.Members {
		names, eps = append(names, m.Name), append(eps, m.Endpoint)
	}
	slices.Sort(names)
	slices.Sort(eps)
	want := c.Endpoints()
	slices.Sort(want)
	if !slices.Equal(names, []string{"m0", "m1", "m2"}) || !slices.Equal(eps, want) {
		t.Errorf("members %q at %q, want m0-m2 at %q", names, eps, want)
	}

	// The member list is the cluster's, not the configuration's.
	one, err := NewEtcd(EtcdConfig{Endpoints: c.Endpoints()[:1], Host: "a", TTL: time.Second, Timeout: healthTimeout})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	if _, err := checkHealth(one, wantHealth{members: 3, reachable: 3, quorum: true}); err != nil {
		t.Errorf("configured with one endpoint: %v", err)
	}

	ctx := context.Background()
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	leader.Kill()
	t.Logf("killed the leader, %s", leader.Name)
	for _, step := range []struct {
		what string
		want wantHealth
	}{
		{"one member killed", wantHealth{members: 3, reachable: 2, quorum: true}},
		{"two members killed", wantHealth{members: 3, reachable: 1, quorum: false}},
		{"every member killed", wantHealth{members: 3, reachable: 0, quorum: false}},
	} {
		eventually(t, 10*time.Second, func() error {
			h, err = checkHealth(e, step.want)
			return err
		})
		t.Logf("%s: %s", step.what, describe(h))
		for _, m := range c.Members {
			if m.Running() {
				m.Kill()
				break
			}
		}
	}
	if h.Members[0].Name != "" || !strings.Contains(h.QuorumErr.Error(), "majority") {
		t.Errorf("with no member up: %s; want the configured endpoints, unnamed, and a hint at the majority", describe(h))
	}

	e.Close()
	if _, err := e.Health(ctx); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Health after Close: %v, want net.ErrClosed", err)
	}
}

// TestClientHealth: an axd --witness is one member, with quorum while it
// answers; the TTL is the configured one.
func TestClientHealth(t *testing.T) {
	srv, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: leaseTTL, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	addr, stop := serve(t, srv)
	c, err := NewClient(ClientConfig{Addr: addr, PSK: testKey, Holder: "a", Timeout: healthTimeout, LeaseTTL: leaseTTL})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	h, err := checkHealth(c, wantHealth{members: 1, reachable: 1, quorum: true})
	if err != nil {
		t.Fatalf("witness up: %v", err)
	}
	if h.Kind != KindAxd || h.TTL != leaseTTL || h.Members[0].Endpoint != addr {
		t.Errorf("witness up: %s, TTL %v; want axd at %s, TTL %v", describe(h), h.TTL, addr, leaseTTL)
	}

	stop()
	if h, err = checkHealth(c, wantHealth{members: 1, reachable: 0, quorum: false}); err != nil {
		t.Fatalf("witness stopped: %v", err)
	}
	t.Logf("witness stopped: %s", describe(h))

	c.Close()
	if _, err := c.Health(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Health after Close: %v, want net.ErrClosed", err)
	}
}
