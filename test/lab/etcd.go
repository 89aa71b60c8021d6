package lab

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The etcd witness: one etcd member in each of w1, w2 and w3, on the
// management network, clients and peers on TLS with certificates of the
// lab's own etcd CA (client certificates required).
const (
	EtcdClientPort = 2379
	EtcdPeerPort   = 2380
	// Raft timing for a machine whose two cores also run TCG guests: an
	// election after 1 s without a leader. etcd grants leases of at least
	// 1.5 election timeouts, so axd's 1 s TTL becomes 2 s on this witness.
	etcdHeartbeatMS = 100
	etcdElectionMS  = 1000
)

// EtcdHosts are the witness namespaces that each run one etcd member.
var EtcdHosts = []string{HostW1, HostW2, HostW3}

// Witness kinds of DaemonConfig.Witness.
const (
	WitnessAxd  = "axd"  // axd --witness on w (the default)
	WitnessEtcd = "etcd" // a 3-member etcd cluster on w1, w2, w3
)

// EtcdDir holds the etcd CA, the members' and the hosts' certificates and
// the members' data directories.
func (l *Lab) EtcdDir() string { return filepath.Join(l.StateDir, "etcd") }

func etcdEndpoint(h string) string {
	return net.JoinHostPort(HostAddrs[h].Mgmt, strconv.Itoa(EtcdClientPort))
}

// EtcdWitnessAddr is axd's --witness-addr for the lab's etcd cluster.
func EtcdWitnessAddr() string {
	var eps []string
	for _, h := range EtcdHosts {
		eps = append(eps, etcdEndpoint(h))
	}
	return "etcd://" + strings.Join(eps, ",")
}

// etcdArgs are the flags giving host h's axd the etcd witness.
func (l *Lab) etcdArgs(h string) []string {
	dir := l.EtcdDir()
	return []string{"--witness-addr", EtcdWitnessAddr(),
		"--etcd-ca", filepath.Join(dir, "ca.crt"),
		"--etcd-cert", filepath.Join(dir, h+".crt"),
		"--etcd-key", filepath.Join(dir, h+".key")}
}

// StartEtcd starts the 3-member cluster (certificates made once per lab)
// and returns once every member reports itself healthy.
func (l *Lab) StartEtcd(ctx context.Context) error {
	if err := l.loadState(); err != nil {
		return err
	}
	if err := l.ensureEtcdPKI(); err != nil {
		return fmt.Errorf("lab etcd certificates: %w", err)
	}
	for _, h := range EtcdHosts {
		if err := l.StartEtcdMember(ctx, h, EtcdInitialCluster()); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for _, h := range EtcdHosts {
		for {
			err := l.EtcdHealthy(ctx, h)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("etcd on %s not healthy: %v; see %s", h, err, filepath.Join(l.StateDir, "etcd-"+h+".log"))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

// StartEtcdMember starts (or restarts, on its data directory) the member
// on witness host h. initial is the cluster's member list, used only when
// the data directory is new.
func (l *Lab) StartEtcdMember(ctx context.Context, h, initial string) error {
	if err := l.loadState(); err != nil {
		return err
	}
	dir := l.EtcdDir()
	client := "https://" + etcdEndpoint(h)
	peer := "https://" + net.JoinHostPort(HostAddrs[h].Mgmt, strconv.Itoa(EtcdPeerPort))
	cert, key, ca := filepath.Join(dir, h+".crt"), filepath.Join(dir, h+".key"), filepath.Join(dir, "ca.crt")
	return l.startProc(ctx, h, "etcd-"+h, "etcd",
		"--name", h,
		"--data-dir", filepath.Join(dir, h+".etcd"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", initial, "--initial-cluster-state", "new",
		"--initial-cluster-token", "ax-lab-"+l.Prefix,
		"--heartbeat-interval", strconv.Itoa(etcdHeartbeatMS),
		"--election-timeout", strconv.Itoa(etcdElectionMS),
		"--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
		"--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca, "--peer-client-cert-auth",
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn")
}

// EtcdInitialCluster is the cluster's member list (etcd's --initial-cluster).
func EtcdInitialCluster() string {
	var members []string
	for _, h := range EtcdHosts {
		members = append(members, fmt.Sprintf("%s=https://%s", h, net.JoinHostPort(HostAddrs[h].Mgmt, strconv.Itoa(EtcdPeerPort))))
	}
	return strings.Join(members, ",")
}

// KillEtcdMember kills the member on witness host h (SIGKILL); its data
// stays, so StartEtcdMember brings it back into the cluster.
func (l *Lab) KillEtcdMember(h string) error {
	if err := l.loadState(); err != nil {
		return err
	}
	for _, p := range l.state.Procs {
		if p.Name == "etcd-"+h && p.alive() {
			if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil {
				return err
			}
			for p.alive() && !isZombie(p.PID) {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	return nil
}

// EtcdHealthy asks the member on h for /health over TLS, from host a as an
// AX host would: nil once it is serving with a leader.
func (l *Lab) EtcdHealthy(ctx context.Context, h string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	dir := l.EtcdDir()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, HostA+".crt"), filepath.Join(dir, HostA+".key"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return err
	}
	pool.AppendCertsFromPEM(caPEM)
	tr := &http.Transport{
		DialContext:     func(ctx context.Context, _, addr string) (net.Conn, error) { return l.DialFrom(ctx, HostA, addr) },
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+etcdEndpoint(h)+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var health struct{ Health string }
	if err := json.NewDecoder(resp.Body).Decode(&health); err != nil {
		return err
	}
	if health.Health != "true" {
		return fmt.Errorf("health %q", health.Health)
	}
	return nil
}

// ensureEtcdPKI makes the etcd CA, a server-and-peer certificate per member
// (its management address as SAN) and a client certificate for a and b,
// once per lab.
func (l *Lab) ensureEtcdPKI() error {
	dir := l.EtcdDir()
	if _, err := os.Stat(filepath.Join(dir, "ca.crt")); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ax-lab-etcd-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(30 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	if err := writePEM(filepath.Join(dir, "ca.crt"), "CERTIFICATE", caDER, 0o644); err != nil {
		return err
	}
	names := append(append([]string{}, EtcdHosts...), HostA, HostB)
	for i, name := range names {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(30 * 24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		if addr := net.ParseIP(HostAddrs[name].Mgmt); addr != nil {
			tmpl.IPAddresses = []net.IP{addr}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, name+".key"), "PRIVATE KEY", kder, 0o600); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, name+".crt"), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}
