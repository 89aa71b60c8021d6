package witness

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/identity/identitytest"
)

// testCA makes a CA and, for each name, an identity of the role given.
func testCA(t testing.TB, roles map[string]identity.Role) map[string]*identity.Identity {
	_, ids := identitytest.PKIRoles(t, roles)
	return ids
}

// tlsPKI is the test's CA: witness w, hosts a, b and the observer o, and a
// second witness certificate w2.
func tlsPKI(t *testing.T) map[string]*identity.Identity {
	return testCA(t, map[string]identity.Role{"w": identity.RoleWitness, "w2": identity.RoleWitness,
		"a": identity.RoleHost, "b": identity.RoleHost, "o": identity.RoleHost})
}

// startTLSWitness serves witness w past its grace; w.query asks as host o.
func startTLSWitness(t *testing.T, ids map[string]*identity.Identity) *testWitness {
	t.Helper()
	w := startWitnessWith(t, newFakeClock(), ServerConfig{Identity: ids["w"]}, "127.0.0.1:0")
	w.clock.Advance(testTTL)
	w.observer = w.tlsClient(ids["o"], "w")
	return w
}

func (w *testWitness) tlsClient(id *identity.Identity, witness string) *Client {
	w.t.Helper()
	return newTestClient(w.t, ClientConfig{Addr: w.addr, Identity: id, Witness: witness}, w.clock)
}

func TestTLSLeases(t *testing.T) {
	ids := tlsPKI(t)
	w := startTLSWitness(t, ids)
	ctx := context.Background()
	a, b := w.tlsClient(ids["a"], "w"), w.tlsClient(ids["b"], "w")

	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	_, err := b.Renew(ctx, "web")
	wantHeld(t, err, "a")
	wantHeld(t, b.Takeover(ctx, "web"), "a")
	for range 5 {
		w.clock.Advance(testTTL / 4)
		if _, err := a.Renew(ctx, "web"); err != nil {
			t.Fatal(err)
		}
	}
	if info, err := b.Query(ctx, "web"); err != nil || info.Holder != "a" || info.Expired {
		t.Fatalf("query: %+v, %v", info, err)
	}
	if a.dials != 1 {
		t.Fatalf("a dialled %d times for 6 renewals, want one connection", a.dials)
	}
	w.clock.Advance(testTTL)
	if err := b.Takeover(ctx, "web"); err != nil {
		t.Fatalf("takeover of the expired lease: %v", err)
	}
	if info, err := a.Query(ctx, "web"); err != nil || info.Holder != "b" {
		t.Fatalf("after takeover: %+v, %v", info, err)
	}
}

// tlsConn is a raw TLS connection to the witness, for sending what a
// Client would not.
type tlsConn struct {
	t   *testing.T
	c   *tls.Conn
	r   *bufio.Reader
	key []byte
}

func dialTLS(t *testing.T, addr string, id *identity.Identity) *tlsConn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, id.ClientConfig(identity.Want("w", identity.RoleWitness)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	key, err := tlsLineKey(c.ConnectionState())
	if err != nil {
		t.Fatal(err)
	}
	return &tlsConn{t: t, c: c, r: bufio.NewReader(c), key: key}
}

// exchange sends line and returns the answer, or nil if the witness closed
// the connection without one.
func (c *tlsConn) exchange(line []byte) *response {
	c.t.Helper()
	if _, err := c.c.Write(line); err != nil {
		c.t.Fatal(err)
	}
	out, err := c.r.ReadBytes('\n')
	if err != nil {
		return nil
	}
	var resp response
	if err := json.Unmarshal(out, &resp); err != nil {
		c.t.Fatalf("response %q: %v", out, err)
	}
	return &resp
}

func (c *tlsConn) request(op, holder, vm string, ts time.Time) []byte {
	c.t.Helper()
	req := request{op: op, holder: holder, vm: vm, ts: ts.UnixMilli()}
	rand.Read(req.nonce[:])
	req.sign(c.key)
	line, err := req.encode()
	if err != nil {
		c.t.Fatal(err)
	}
	return line
}

func TestTLSHolderIsTheCertificate(t *testing.T) {
	ids := tlsPKI(t)
	w := startTLSWitness(t, ids)
	ctx := context.Background()
	if _, err := w.tlsClient(ids["b"], "w").Renew(ctx, "db"); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name, op, holder, vm string
	}{
		{"renew as another host", opRenew, "b", "web"},
		{"takeover as another host", opTakeover, "b", "web"},
		{"renew another host's lease as it", opRenew, "b", "db"},
		{"query naming another host", opQuery, "b", "web"},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn := dialTLS(t, w.addr, ids["a"])
			resp := conn.exchange(conn.request(c.op, c.holder, c.vm, w.clock.Now()))
			if resp == nil || resp.OK || resp.Code != codeHolder || !resp.verify(conn.key) {
				t.Fatalf("a naming %q: %+v, want a signed holder refusal", c.holder, resp)
			}
			if again := conn.exchange(conn.request(opQuery, "a", "web", w.clock.Now().Add(time.Millisecond))); again != nil {
				t.Fatalf("the connection stayed open after the refusal: %+v", again)
			}
		})
	}
	if info := w.query("web"); info.Holder != "" {
		t.Fatalf("web after the impersonation attempts: %+v", info)
	}
	w.clock.Advance(time.Second)
	if _, err := w.tlsClient(ids["b"], "w").Renew(ctx, "db"); err != nil {
		t.Fatalf("b's own renewal: %v", err)
	}
}

func TestTLSLineBoundToItsSession(t *testing.T) {
	ids := tlsPKI(t)
	w := startTLSWitness(t, ids)
	first := dialTLS(t, w.addr, ids["a"])
	line := first.request(opRenew, "a", "web", w.clock.Now())
	if resp := first.exchange(line); resp == nil || !resp.OK {
		t.Fatalf("renewal in its own session: %+v", resp)
	}
	second := dialTLS(t, w.addr, ids["a"])
	if resp := second.exchange(line); resp == nil || resp.Code != codeAuth || resp.MAC != "" {
		t.Fatalf("the same line in another session: %+v, want an unsigned auth refusal", resp)
	}
	pskSigned := rawRequest(t, opRenew, "a", "web", w.clock.Now(), testKey)
	third := dialTLS(t, w.addr, ids["a"])
	if resp := third.exchange(pskSigned); resp == nil || resp.Code != codeAuth {
		t.Fatalf("a PSK-signed line over TLS: %+v, want an auth refusal", resp)
	}
}

// fakeTLSWitness serves TLS with cfg and answers nothing; it reports
// whether any request line arrived.
func fakeTLSWitness(t *testing.T, cfg *tls.Config) (addr string, gotLine func() bool) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := false
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := bufio.NewReader(conn).ReadBytes('\n'); err == nil {
				mu.Lock()
				got = true
				mu.Unlock()
			}
			conn.Close()
		}
	})
	return ln.Addr().String(), func() bool { mu.Lock(); defer mu.Unlock(); return got }
}

func TestTLSClientChecksTheWitness(t *testing.T) {
	ids := tlsPKI(t)
	other := testCA(t, map[string]identity.Role{"w": identity.RoleWitness})
	hostW := testCA(t, map[string]identity.Role{"w": identity.RoleHost, "a": identity.RoleHost})
	for _, c := range []struct {
		name   string
		server *identity.Identity
		client *identity.Identity
	}{
		{"host certificate posing as the witness", hostW["w"], hostW["a"]},
		{"witness certificate of another name", ids["w2"], ids["a"]},
		{"witness of another CA", other["w"], ids["a"]},
	} {
		t.Run(c.name, func(t *testing.T) {
			addr, gotLine := fakeTLSWitness(t, c.server.ServerConfig(nil))
			cl := newTestClient(t, ClientConfig{Addr: addr, Identity: c.client, Witness: "w"}, newFakeClock())
			_, err := cl.Renew(context.Background(), "web")
			if !errors.Is(err, identity.ErrPeer) {
				t.Fatalf("Renew: %v, want the witness refused (identity.ErrPeer)", err)
			}
			if gotLine() {
				t.Fatal("the client sent a request to a server it had not verified")
			}
		})
	}
}

func TestTLSWitnessChecksTheHost(t *testing.T) {
	ids := tlsPKI(t)
	other := testCA(t, map[string]identity.Role{"a": identity.RoleHost})
	w := startTLSWitness(t, ids)
	for _, c := range []struct {
		name string
		conf *tls.Config
	}{
		{"host of another CA", other["a"].ClientConfig(identity.Want("w", identity.RoleWitness))},
		{"witness certificate as a host", ids["w2"].ClientConfig(identity.Want("w", identity.RoleWitness))},
		{"no certificate", &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, err := tls.Dial("tcp", w.addr, c.conf)
			if err != nil {
				if !strings.Contains(err.Error(), "certificate") {
					t.Fatalf("handshake: %v, want a refusal of the certificate", err)
				}
				return
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			req := request{op: opTakeover, holder: "a", vm: "web", ts: w.clock.Now().UnixMilli()}
			key, _ := tlsLineKey(conn.ConnectionState())
			req.sign(key)
			line, _ := req.encode()
			conn.Write(line)
			out, err := bufio.NewReader(conn).ReadBytes('\n')
			if err == nil {
				t.Fatalf("the witness answered %q", out)
			}
			if !strings.Contains(err.Error(), "certificate") {
				t.Fatalf("read: %v, want a TLS alert about the certificate", err)
			}
		})
	}
	if info := w.query("web"); info.Holder != "" {
		t.Fatalf("refused peers changed the lease: %+v", info)
	}
}

func TestTLSConfigChecks(t *testing.T) {
	ids := tlsPKI(t)
	for _, c := range []struct {
		name string
		err  func() error
	}{
		{"witness with a host certificate", func() error {
			_, err := NewServer(ServerConfig{Identity: ids["a"], LeaseTTL: testTTL})
			return err
		}},
		{"witness with both modes", func() error {
			_, err := NewServer(ServerConfig{Identity: ids["w"], PSK: testKey, LeaseTTL: testTTL})
			return err
		}},
		{"client with a witness certificate", func() error {
			_, err := NewClient(ClientConfig{Addr: "x:1", Identity: ids["w2"], Witness: "w"})
			return err
		}},
		{"client without the witness's name", func() error {
			_, err := NewClient(ClientConfig{Addr: "x:1", Identity: ids["a"]})
			return err
		}},
		{"client declaring another holder", func() error {
			_, err := NewClient(ClientConfig{Addr: "x:1", Identity: ids["a"], Witness: "w", Holder: "b"})
			return err
		}},
		{"client with both modes", func() error {
			_, err := NewClient(ClientConfig{Addr: "x:1", Identity: ids["a"], Witness: "w", PSK: testKey})
			return err
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.err(); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}
