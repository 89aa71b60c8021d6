package heartbeat

import (
	"bytes"
	"github.com/axproject/ax/ax/identity/identitytest"
	"testing"
	"time"
)

// BenchmarkVerify is the receiver's CPU per datagram: what a flood costs.
// "forged signature" (a partner's real certificate, a wrong signature) and
// "foreign CA" are the dearest an attacker without a key can make each
// datagram; "replay" and "unknown peer" stop at the cheap checks.
func BenchmarkVerify(b *testing.B) {
	_, ids := identitytest.PKI(b, "a", "b")
	_, other := identitytest.PKI(b, "a")
	now := time.Now()
	p := packet{path: PathRepl, from: "a", to: "b", seq: 1 << 62, sent: now.UnixNano()}
	signed := mustSign(b, ids["a"], p)
	forged := bytes.Clone(signed)
	forged[len(forged)-5] ^= 1
	unknown := p
	unknown.from = "x"
	for _, bc := range []struct {
		name  string
		sec   Security
		b     []byte
		reset bool // forget the last sequence number, so the same datagram is accepted again
		ok    bool
	}{
		{"identity/valid", Security{Identity: ids["b"]}, signed, true, true},
		{"identity/forged signature", Security{Identity: ids["b"]}, forged, false, false},
		{"identity/foreign CA", Security{Identity: ids["b"]}, mustSign(b, other["a"], p), false, false},
		{"identity/replay", Security{Identity: ids["b"]}, signed, false, false},
		{"identity/unknown peer", Security{Identity: ids["b"]}, mustSign(b, ids["a"], unknown), false, false},
		{"psk/valid", Security{PSK: testPSK}, sealPSK(pskKey(), p), true, true},
		{"psk/forged MAC", Security{PSK: testPSK}, sealPSK(bytes.Repeat([]byte("x"), 32), p), false, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			d := mustNew(b, "b", bc.sec, "a")
			if bc.name == "identity/replay" {
				if err := d.handle(PathRepl, bc.b, now); err != nil {
					b.Fatal(err)
				}
			}
			ph := d.heard["a"]
			for b.Loop() {
				if bc.reset {
					d.mu.Lock()
					ph.lastSeq[PathRepl] = 0
					d.mu.Unlock()
				}
				if err := d.handle(PathRepl, bc.b, now); (err == nil) != bc.ok {
					b.Fatalf("handle: %v, want accepted=%v", err, bc.ok)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/1e3/float64(b.N), "µs/datagram")
		})
	}
}
