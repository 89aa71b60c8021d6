// Package identity is who an AX host or witness is on the wire: an x509
// certificate from a small CA the operator controls, the TLS 1.3
// configurations that check a peer's name and role against it, signatures
// for datagrams, and the pre-shared key of the lab's PSK mode with one key
// derived per purpose.
package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/axproject/ax/ax/names"
)

// Role is what a certificate may act as. It is the certificate's
// organizational unit, so the CA decides it, not the peer.
type Role string

// The roles.
const (
	RoleHost    Role = "ax-host"    // runs axd: replicates, sends heartbeats, holds leases
	RoleWitness Role = "ax-witness" // grants leases
)

func (r Role) valid() bool { return r == RoleHost || r == RoleWitness }

// Peer is a verified certificate's identity.
type Peer struct {
	Name string
	Role Role
}

// ErrPeer is wrapped by every refusal of a peer's certificate.
var ErrPeer = errors.New("identity: peer refused")

// Identity is this host's (or witness's) certificate and key, and the CA
// its peers must chain to.
type Identity struct {
	name  string
	role  Role
	cert  tls.Certificate
	leaf  *x509.Certificate
	roots *x509.CertPool
}

// Files are where an identity lives on disk.
type Files struct {
	CA   string // the CA's certificate (PEM)
	Cert string // this host's certificate (PEM)
	Key  string // this host's private key (PEM); must not be readable by group or others
}

// Load reads an identity and checks it: the key file is private, the
// certificate chains to the CA, carries a valid role and a safe name.
func Load(f Files) (*Identity, error) {
	if err := CheckPrivate(f.Key); err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("identity: CA certificate: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("identity: %s holds no PEM certificate", f.CA)
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("identity: %s: %w", f.Cert, err)
	}
	cert.Leaf = leaf
	id := &Identity{cert: cert, leaf: leaf, roots: roots}
	p, err := id.verify(cert.Certificate)
	if err != nil {
		return nil, fmt.Errorf("identity: this host's own certificate %s: %w", f.Cert, err)
	}
	id.name, id.role = p.Name, p.Role
	return id, nil
}

// Name is the certificate's name (the host name partners know).
func (id *Identity) Name() string { return id.name }

// Role is the certificate's role.
func (id *Identity) Role() Role { return id.role }

// CertDER is the certificate, for datagrams that carry it.
func (id *Identity) CertDER() []byte { return id.cert.Certificate[0] }

// Sign signs SHA-256(msg) with the identity's key (ASN.1 ECDSA).
func (id *Identity) Sign(msg []byte) ([]byte, error) {
	s, ok := id.cert.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("identity: private key cannot sign")
	}
	h := sha256.Sum256(msg)
	return s.Sign(rand.Reader, h[:], crypto.SHA256)
}

// verify checks a presented chain against the CA and reads name and role.
func (id *Identity) verify(rawCerts [][]byte) (Peer, error) {
	if len(rawCerts) == 0 {
		return Peer{}, fmt.Errorf("%w: no certificate", ErrPeer)
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return Peer{}, fmt.Errorf("%w: %v", ErrPeer, err)
	}
	inter := x509.NewCertPool()
	for _, raw := range rawCerts[1:] {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return Peer{}, fmt.Errorf("%w: %v", ErrPeer, err)
		}
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: id.roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return Peer{}, fmt.Errorf("%w: %v", ErrPeer, err)
	}
	return peerOf(leaf)
}

func peerOf(leaf *x509.Certificate) (Peer, error) {
	if len(leaf.Subject.OrganizationalUnit) != 1 || !Role(leaf.Subject.OrganizationalUnit[0]).valid() {
		return Peer{}, fmt.Errorf("%w: certificate %q has no AX role (OU %v)", ErrPeer, leaf.Subject.CommonName, leaf.Subject.OrganizationalUnit)
	}
	if err := names.Check("host", leaf.Subject.CommonName); err != nil {
		return Peer{}, fmt.Errorf("%w: %v", ErrPeer, err)
	}
	return Peer{Name: leaf.Subject.CommonName, Role: Role(leaf.Subject.OrganizationalUnit[0])}, nil
}

// Accept decides on a verified peer; nil accepts.
type Accept func(Peer) error

// AllowHosts accepts hosts of the given names (an allow-list of partners).
func AllowHosts(hosts ...string) Accept {
	ok := map[string]bool{}
	for _, h := range hosts {
		ok[h] = true
	}
	return func(p Peer) error {
		if p.Role != RoleHost {
			return fmt.Errorf("%w: %q is a %s, not a host", ErrPeer, p.Name, p.Role)
		}
		if !ok[p.Name] {
			return fmt.Errorf("%w: host %q is not one of this host's partners", ErrPeer, p.Name)
		}
		return nil
	}
}

// Want accepts exactly one peer name in one role: the one a client dialled.
func Want(name string, role Role) Accept {
	return func(p Peer) error {
		if p.Role != role || p.Name != name {
			return fmt.Errorf("%w: expected %s %q, the certificate says %s %q", ErrPeer, role, name, p.Role, p.Name)
		}
		return nil
	}
}

func (id *Identity) base(accept Accept) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		// Names are AX names, not DNS names: the chain and the name are
		// checked in VerifyConnection instead of by crypto/tls.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			raw := make([][]byte, len(cs.PeerCertificates))
			for i, c := range cs.PeerCertificates {
				raw[i] = c.Raw
			}
			p, err := id.verify(raw)
			if err != nil {
				return err
			}
			if accept != nil {
				return accept(p)
			}
			return nil
		},
	}
}

// ServerConfig is a TLS 1.3 server configuration that requires a client
// certificate from the CA and passes its identity to accept.
func (id *Identity) ServerConfig(accept Accept) *tls.Config {
	c := id.base(accept)
	c.ClientAuth = tls.RequireAnyClientCert
	return c
}

// ClientConfig is a TLS 1.3 client configuration that presents this
// identity and checks the server with accept (typically Want).
func (id *Identity) ClientConfig(accept Accept) *tls.Config {
	return id.base(accept)
}

// PeerOf returns the identity of a completed TLS connection's peer (already
// verified by VerifyConnection).
func PeerOf(cs tls.ConnectionState) (Peer, error) {
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return Peer{}, fmt.Errorf("%w: no verified peer certificate", ErrPeer)
	}
	return peerOf(cs.PeerCertificates[0])
}

// Verifier checks signatures made by Sign with certificates from the CA,
// caching verified certificates (at most maxCached) so a datagram costs one
// signature check.
type Verifier struct {
	id *Identity

	mu    sync.Mutex
	cache map[[32]byte]verified
}

type verified struct {
	peer Peer
	pub  *ecdsa.PublicKey
}

const maxCached = 256

// Verifier returns a signature verifier trusting this identity's CA.
func (id *Identity) Verifier() *Verifier {
	return &Verifier{id: id, cache: map[[32]byte]verified{}}
}

// Verify checks that sig is certDER's key's signature of msg and returns
// the certificate's identity.
func (v *Verifier) Verify(certDER, msg, sig []byte) (Peer, error) {
	k := sha256.Sum256(certDER)
	v.mu.Lock()
	c, ok := v.cache[k]
	v.mu.Unlock()
	if !ok {
		p, err := v.id.verify([][]byte{certDER})
		if err != nil {
			return Peer{}, err
		}
		leaf, _ := x509.ParseCertificate(certDER)
		pub, isEC := leaf.PublicKey.(*ecdsa.PublicKey)
		if !isEC {
			return Peer{}, fmt.Errorf("%w: %q's key is not ECDSA", ErrPeer, p.Name)
		}
		c = verified{peer: p, pub: pub}
		v.mu.Lock()
		if len(v.cache) >= maxCached {
			clear(v.cache)
		}
		v.cache[k] = c
		v.mu.Unlock()
	}
	h := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(c.pub, h[:], sig) {
		return Peer{}, fmt.Errorf("%w: bad signature from %q", ErrPeer, c.peer.Name)
	}
	return c.peer, nil
}

// CheckPrivate refuses a secret file that group or others can read or
// write, or that is not a regular file.
func CheckPrivate(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("identity: %s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("identity: %s has mode %04o: a secret must be readable by its owner only (fix: chmod 600 %s)", path, st.Mode().Perm(), path)
	}
	return nil
}

// The CA's files in its directory, and a host's.
const (
	caCertFile = "ca.crt"
	caKeyFile  = "ca.key"
)

// CertPath and KeyPath are where Issue writes name's certificate and key.
func CertPath(dir, name string) string { return filepath.Join(dir, name+".crt") }
func KeyPath(dir, name string) string  { return filepath.Join(dir, name+".key") }

// CAPath is the CA certificate in dir.
func CAPath(dir string) string { return filepath.Join(dir, caCertFile) }

// NewCA makes a CA in dir (ca.crt, ca.key 0600). It refuses to overwrite one.
func NewCA(dir, name string, validFor time.Duration) error {
	if err := names.Check("CA", name); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, caKeyFile)); err == nil {
		return fmt.Errorf("identity: %s already holds a CA; remove it first to make a new one", dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"AX"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(validFor),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	return writePair(dir, caCertFile, caKeyFile, der, key)
}

// Issue signs a certificate for name in role with the CA in caDir and
// writes NAME.crt and NAME.key (0600) to outDir.
func Issue(caDir, outDir, name string, role Role, validFor time.Duration) error {
	if err := names.Check("host", name); err != nil {
		return err
	}
	if !role.valid() {
		return fmt.Errorf("identity: role %q, want %s or %s", role, RoleHost, RoleWitness)
	}
	if err := CheckPrivate(filepath.Join(caDir, caKeyFile)); err != nil {
		return err
	}
	ca, err := tls.LoadX509KeyPair(filepath.Join(caDir, caCertFile), filepath.Join(caDir, caKeyFile))
	if err != nil {
		return fmt.Errorf("identity: CA in %s: %w", caDir, err)
	}
	caCert, err := x509.ParseCertificate(ca.Certificate[0])
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, OrganizationalUnit: []string{string(role)}, Organization: []string{"AX"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(validFor),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, ca.PrivateKey)
	if err != nil {
		return err
	}
	return writePair(outDir, name+".crt", name+".key", der, key)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func writePair(dir, certName, keyName string, der []byte, key *ecdsa.PrivateKey) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, keyName), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, certName), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}
