package witness

import (
	"context"
	"testing"

	"github.com/axproject/ax/ax/identity"
)

// benchWitness serves a witness on the real clock until the benchmark ends.
func benchWitness(b *testing.B, cfg ServerConfig) string {
	b.Helper()
	cfg.LeaseTTL = testTTL
	srv, err := NewServer(cfg)
	if err != nil {
		b.Fatal(err)
	}
	srv.graceEnd = srv.started
	addr, _ := serve(b, srv)
	return addr
}

// BenchmarkRenew measures one renewal on the client's kept connection, and
// on a new connection per call (what the client did before), in both
// modes, with and without a state file (its fsyncs come once per
// floorLead, so a few per run). Run it with the default -benchtime: much
// past 60,000 requests in 30 s fills the replay cache (maxNonces) and the
// witness answers busy.
func BenchmarkRenew(b *testing.B) {
	dir := b.TempDir()
	pki := testCA(b, map[string]identity.Role{"w": identity.RoleWitness, "a": identity.RoleHost})
	for _, c := range []struct {
		name    string
		server  ServerConfig
		client  func(addr string) ClientConfig
		perCall bool
	}{
		{"psk/kept", ServerConfig{PSK: testKey}, func(a string) ClientConfig { return ClientConfig{Addr: a, PSK: testKey, Holder: "a"} }, false},
		{"psk/per-call", ServerConfig{PSK: testKey}, func(a string) ClientConfig { return ClientConfig{Addr: a, PSK: testKey, Holder: "a"} }, true},
		{"psk/kept/state-file", ServerConfig{PSK: testKey, StateFile: dir + "/psk.state"}, func(a string) ClientConfig { return ClientConfig{Addr: a, PSK: testKey, Holder: "a"} }, false},
		{"tls/kept", ServerConfig{Identity: pki["w"]}, func(a string) ClientConfig { return ClientConfig{Addr: a, Identity: pki["a"], Witness: "w"} }, false},
		{"tls/per-call", ServerConfig{Identity: pki["w"]}, func(a string) ClientConfig { return ClientConfig{Addr: a, Identity: pki["a"], Witness: "w"} }, true},
		{"tls/kept/state-file", ServerConfig{Identity: pki["w"], StateFile: dir + "/tls.state"}, func(a string) ClientConfig { return ClientConfig{Addr: a, Identity: pki["a"], Witness: "w"} }, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			addr := benchWitness(b, c.server)
			ctx := context.Background()
			cl, err := NewClient(c.client(addr))
			if err != nil {
				b.Fatal(err)
			}
			defer func() { cl.Close() }()
			for b.Loop() {
				if c.perCall {
					cl.Close()
					if cl, err = NewClient(c.client(addr)); err != nil {
						b.Fatal(err)
					}
				}
				if _, err := cl.Renew(ctx, "web"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
