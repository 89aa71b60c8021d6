package heartbeat

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/identity/identitytest"
)

var testPSK = bytes.Repeat([]byte("k"), identity.MinKeySize)

func pskKey() []byte { return identity.DeriveKey(testPSK, identity.PurposeHeartbeat) }

func mustSign(t testing.TB, id *identity.Identity, p packet) []byte {
	t.Helper()
	b, err := sealSigned(id, p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCodecRoundTrip(t *testing.T) {
	_, ids := identitytest.PKI(t, "a")
	now := time.Now().UnixNano()
	long := strings.Repeat("h", 128)
	for _, tc := range []struct {
		name string
		pkt  packet
		mode mode
	}{
		{"psk repl", packet{path: PathRepl, from: "a", to: "b", seq: 7, sent: now}, modePSK},
		{"psk mgmt heard", packet{path: PathMgmt, heardYou: true, from: "a", to: "b", seq: 1 << 63, sent: -1}, modePSK},
		{"psk longest names", packet{path: PathRepl, from: long, to: long, seq: 1, sent: now}, modePSK},
		{"identity repl", packet{path: PathRepl, from: "a", to: "b", seq: 9, sent: now}, modeIdentity},
		{"identity mgmt heard", packet{path: PathMgmt, heardYou: true, from: "a", to: "host-b.example", seq: 10, sent: now}, modeIdentity},
		{"identity longest names", packet{path: PathMgmt, from: long, to: long, seq: 1, sent: now}, modeIdentity},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b []byte
			if tc.mode == modePSK {
				b = sealPSK(pskKey(), tc.pkt)
			} else {
				b = mustSign(t, ids["a"], tc.pkt)
			}
			if len(b) > maxDatagram {
				t.Fatalf("datagram of %d bytes, limit %d", len(b), maxDatagram)
			}
			p, signed, err := decode(b)
			if err != nil {
				t.Fatal(err)
			}
			if p.mode != tc.mode || p.path != tc.pkt.path || p.heardYou != tc.pkt.heardYou || p.from != tc.pkt.from ||
				p.to != tc.pkt.to || p.seq != tc.pkt.seq || p.sent != tc.pkt.sent {
				t.Fatalf("decoded %+v, sent %+v", p, tc.pkt)
			}
			if !bytes.Equal(signed, b[:len(b)-len(p.auth)]) {
				t.Fatal("signed part is not everything before the MAC or signature")
			}
			if tc.mode == modeIdentity && !bytes.Equal(p.cert, ids["a"].CertDER()) {
				t.Fatal("certificate not carried")
			}
			if !bytes.Equal(p.marshal(), b) {
				t.Fatal("re-encoding differs")
			}
		})
	}
}

func TestDecodeRejects(t *testing.T) {
	_, ids := identitytest.PKI(t, "a")
	base := packet{path: PathRepl, from: "a", to: "b", seq: 7, sent: 1}
	psk := sealPSK(pskKey(), base)
	signed := mustSign(t, ids["a"], base)
	edit := func(b []byte, f func([]byte) []byte) []byte { return f(bytes.Clone(b)) }
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"garbage", []byte("GET / HTTP/1.1\r\n\r\n")},
		{"psk truncated by one", psk[:len(psk)-1]},
		{"psk one byte more", append(bytes.Clone(psk), 0)},
		{"psk header only", psk[:headerSize]},
		{"identity truncated in the certificate", signed[:headerSize+2+trailSize+100]},
		{"identity without signature", signed[:headerSize+2+trailSize+2+len(ids["a"].CertDER())]},
		{"oversized", append(bytes.Clone(signed), make([]byte, maxDatagram)...)},
		{"bad magic", edit(psk, func(b []byte) []byte { b[0] = 'X'; return b })},
		{"version 1", edit(psk, func(b []byte) []byte { b[4] = 1; return b })},
		{"mode 0", edit(psk, func(b []byte) []byte { b[5] = 0; return b })},
		{"mode 3", edit(psk, func(b []byte) []byte { b[5] = 3; return b })},
		{"path 0", edit(psk, func(b []byte) []byte { b[6] = 0; return b })},
		{"path 3", edit(psk, func(b []byte) []byte { b[6] = 3; return b })},
		{"unknown flag", edit(psk, func(b []byte) []byte { b[7] |= 2; return b })},
		{"empty sender", sealPSK(pskKey(), packet{path: PathRepl, to: "b", seq: 1})},
		{"sender with a slash", sealPSK(pskKey(), packet{path: PathRepl, from: "../a", to: "b", seq: 1})},
		{"recipient too long", sealPSK(pskKey(), packet{path: PathRepl, from: "a", to: strings.Repeat("b", 129), seq: 1})},
		{"name length past the end", edit(psk, func(b []byte) []byte { b[8] = 200; return b })},
		{"certificate length zero", edit(signed, func(b []byte) []byte {
			off := headerSize + 2 + trailSize
			b[off], b[off+1] = 0, 0
			return b
		})},
		{"certificate length past the end", edit(signed, func(b []byte) []byte {
			off := headerSize + 2 + trailSize
			b[off], b[off+1] = 0xff, 0xff
			return b
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if p, _, err := decode(tc.b); !errors.Is(err, errMalformed) {
				t.Fatalf("decoded %+v, err %v; want %v", p, err, errMalformed)
			}
		})
	}
}

// TestNewRefusesFatCertificate: a certificate that would push a heartbeat
// past one datagram is refused when the detector is made, not on the wire.
func TestNewRefusesFatCertificate(t *testing.T) {
	dir, _ := identitytest.PKI(t)
	ca, err := tls.LoadX509KeyPair(identity.CAPath(dir), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(ca.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var dns []string
	for i := range 40 {
		dns = append(dns, fmt.Sprintf("alias-%02d.fat.example", i))
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "fat", OrganizationalUnit: []string{string(identity.RoleHost)}},
		DNSNames:     dns,
		NotBefore:    time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature,
	}, caCert, &key.PublicKey, ca.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	files := identity.Files{CA: identity.CAPath(dir), Cert: filepath.Join(dir, "fat.crt"), Key: filepath.Join(dir, "fat.key")}
	if err := os.WriteFile(files.Cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files.Key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	id, err := identity.Load(files)
	if err != nil {
		t.Fatal(err)
	}
	if len(id.CertDER()) < maxDatagram-300 {
		t.Fatalf("test certificate of %d bytes is not fat enough", len(id.CertDER()))
	}
	if _, err := New("fat", Security{Identity: id}, time.Second, nil); err == nil || !strings.Contains(err.Error(), "too big") {
		t.Fatalf("New with a %d-byte certificate: %v, want a refusal", len(id.CertDER()), err)
	}
}
