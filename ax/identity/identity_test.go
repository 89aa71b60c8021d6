package identity

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testPKI makes a CA and identities for the names given ("w" is a witness).
func testPKI(t *testing.T, hosts ...string) (dir string, ids map[string]*Identity) {
	t.Helper()
	dir = t.TempDir()
	if err := NewCA(dir, "test-ca", time.Hour); err != nil {
		t.Fatal(err)
	}
	ids = map[string]*Identity{}
	for _, h := range hosts {
		role := RoleHost
		if h == "w" {
			role = RoleWitness
		}
		if err := Issue(dir, dir, h, role, time.Hour); err != nil {
			t.Fatal(err)
		}
		id, err := Load(Files{CA: CAPath(dir), Cert: CertPath(dir, h), Key: KeyPath(dir, h)})
		if err != nil {
			t.Fatal(err)
		}
		ids[h] = id
	}
	return dir, ids
}

func handshake(t *testing.T, server, client *tls.Config) (serverErr, clientErr error, peer Peer) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	b, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	done := make(chan error, 1)
	var sp Peer
	go func() {
		s := tls.Server(a, server)
		err := s.Handshake()
		if err == nil {
			sp, err = PeerOf(s.ConnectionState())
		}
		a.Close()
		done <- err
	}()
	c := tls.Client(b, client)
	clientErr = c.Handshake()
	if clientErr == nil {
		// TLS 1.3: a client certificate refused by the server shows on
		// the client's first read.
		_, clientErr = c.Read(make([]byte, 1))
		if errors.Is(clientErr, io.EOF) {
			clientErr = nil
		}
	}
	b.Close()
	return <-done, clientErr, sp
}

func TestMutualTLS(t *testing.T) {
	_, ids := testPKI(t, "a", "b", "c", "w")
	// b accepts a, a wanted b: both sides succeed and b learns "a".
	serr, cerr, p := handshake(t, ids["b"].ServerConfig(AllowHosts("a")), ids["a"].ClientConfig(Want("b", RoleHost)))
	if serr != nil || cerr != nil || p != (Peer{"a", RoleHost}) {
		t.Fatalf("a→b: server %v, client %v, peer %+v", serr, cerr, p)
	}
	// c is a valid host of the same CA but not b's partner.
	if serr, _, _ := handshake(t, ids["b"].ServerConfig(AllowHosts("a")), ids["c"].ClientConfig(Want("b", RoleHost))); serr == nil {
		t.Error("b accepted c, which is not on its allow-list")
	}
	// a dials "b" but c answers: refused by the client.
	if _, cerr, _ := handshake(t, ids["c"].ServerConfig(AllowHosts("a")), ids["a"].ClientConfig(Want("b", RoleHost))); cerr == nil {
		t.Error("a accepted c answering for b")
	}
	// The witness's certificate cannot act as a host.
	if serr, _, _ := handshake(t, ids["b"].ServerConfig(AllowHosts("w")), ids["w"].ClientConfig(Want("b", RoleHost))); serr == nil {
		t.Error("b accepted a witness certificate as a host")
	}
	// A certificate from another CA is refused.
	_, other := testPKI(t, "a")
	if serr, _, _ := handshake(t, ids["b"].ServerConfig(AllowHosts("a")), other["a"].ClientConfig(Want("b", RoleHost))); serr == nil {
		t.Error("b accepted a certificate of another CA")
	}
}

func TestSignVerify(t *testing.T) {
	_, ids := testPKI(t, "a", "b")
	_, other := testPKI(t, "a")
	v := ids["b"].Verifier()
	msg := []byte("heartbeat")
	sig, err := ids["a"].Sign(msg)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // the second goes through the cache
		p, err := v.Verify(ids["a"].CertDER(), msg, sig)
		if err != nil || p.Name != "a" {
			t.Fatalf("verify: %+v, %v", p, err)
		}
	}
	if _, err := v.Verify(ids["a"].CertDER(), []byte("heartbeaT"), sig); !errors.Is(err, ErrPeer) {
		t.Errorf("changed message verified: %v", err)
	}
	osig, _ := other["a"].Sign(msg)
	if _, err := v.Verify(other["a"].CertDER(), msg, osig); !errors.Is(err, ErrPeer) {
		t.Errorf("other CA's certificate verified: %v", err)
	}
	// a's certificate with another key's signature.
	if _, err := v.Verify(ids["a"].CertDER(), msg, osig); !errors.Is(err, ErrPeer) {
		t.Errorf("signature of another key verified: %v", err)
	}
}

func TestKeyFiles(t *testing.T) {
	dir, _ := testPKI(t, "a")
	if err := os.Chmod(KeyPath(dir, "a"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(Files{CA: CAPath(dir), Cert: CertPath(dir, "a"), Key: KeyPath(dir, "a")}); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a 0644 key loaded: %v", err)
	}
	if err := NewCA(dir, "again", time.Hour); err == nil {
		t.Error("NewCA overwrote a CA")
	}
	if err := Issue(dir, dir, "../evil", RoleHost, time.Hour); err == nil {
		t.Error("Issue accepted a name with a path")
	}

	write := func(name, text string, mode os.FileMode) string {
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, []byte(text), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hex64 := strings.Repeat("ab", 32)
	if k, err := ReadKeyFile(write("psk", hex64+"\n", 0o600)); err != nil || len(k) != 32 || k[0] != 0xab {
		t.Errorf("hex key: %x, %v", k, err)
	}
	if _, err := ReadKeyFile(write("psk", hex64, 0o644)); err == nil {
		t.Error("a 0644 key file was accepted")
	}
	if _, err := ReadKeyFile(write("psk", "0123456789abcdef", 0o600)); err == nil {
		t.Error("16 hex characters (8 bytes) were accepted as a key")
	}
	if _, err := ReadKeyFile(write("psk", strings.Repeat("x", 40), 0o600)); err != nil {
		t.Errorf("a 40-byte raw key: %v", err)
	}
	a, b := DeriveKey([]byte(hex64), PurposeStream), DeriveKey([]byte(hex64), PurposeHeartbeat)
	if len(a) != 32 || string(a) == string(b) {
		t.Errorf("derived keys %x %x", a, b)
	}
}
