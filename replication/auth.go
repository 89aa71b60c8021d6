package replication

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/names"
)

// A stream opens with a mutual challenge–response handshake under a
// handshake key. Each side proves it holds the key by MACing both fresh
// nonces, the version range offered, the version chosen and the VM name
// under its own label, so a recorded proof is useless in another session, a
// proof cannot be reflected back at its sender and a relay that edits the
// offer is caught:
//
//	client → Hello{min, max version, client nonce, vm}
//	server → Challenge{version, server nonce, HMAC(key, "ax-server v2"‖min‖max‖version‖cn‖sn‖vm)}
//	client → Response{HMAC(key, "ax-client v2"‖min‖max‖version‖sn‖cn‖vm)}
//	server → Welcome{version}
//
// What protects the stream depends on the Security:
//
//   - TLS mode: the connection is TLS 1.3 first, both ends presenting
//     certificates from the operator's CA (the client checks the server is
//     the partner it dialled, the server that the client is on its
//     allow-list); the handshake above runs inside TLS with a key exported
//     from the TLS session, which binds the VM name and version to it.
//   - PSK mode: the handshake key is derived from the pre-shared key; after
//     the handshake both ends derive one key per direction from it and what
//     the handshake agreed on, and the stream runs in sealed records
//     (secure.go). Every holder of the pre-shared key can pose as any other
//     one: PSK mode authenticates "a host of this installation", not which.
//
// The replication network is not trusted: nothing after the handshake is
// ever sent or accepted without the protection of its mode.

// Protocol versions this package speaks. Version 2 binds the offered
// versions into the proofs and protects the stream; version 1 did neither.
// Version 3 sends the replica's page hashes after Accept (the base of the
// memory sync); version 4 adds the hashes of its disks' ranges (the base
// of the disk sync) and a longer Accept. Both hosts of a pair are
// upgraded together: a host speaks only the newest version.
const (
	MinProtocolVersion uint8 = 4
	ProtocolVersion    uint8 = 4
)

const (
	// DefaultHandshakeTimeout bounds a handshake (TLS included) when the
	// caller passes no timeout.
	DefaultHandshakeTimeout = 5 * time.Second
	// MinKeySize is the shortest pre-shared key accepted.
	MinKeySize = identity.MinKeySize
	// MaxVMNameLen bounds the VM name in a Hello.
	MaxVMNameLen = names.MaxLen

	nonceSize = 32
	macSize   = sha256.Size
	// maxHandshakePayload keeps an unauthenticated peer from making us
	// allocate more than a Hello can need.
	maxHandshakePayload = 512
	// exporterLabel names the handshake key exported from a TLS session.
	exporterLabel = "ax stream v2"

	labelServerProof = "ax-server v2"
	labelClientProof = "ax-client v2"
)

var (
	// ErrAuth is wrapped by every handshake failure after the security
	// settings were accepted as usable: a wrong key or certificate, a
	// malformed or unexpected frame, a version mismatch, a timeout or a
	// closed connection.
	ErrAuth = errors.New("replication: authentication failed")
	// ErrWeakKey reports a pre-shared key shorter than MinKeySize.
	ErrWeakKey = errors.New("replication: pre-shared key too short")
	// ErrSecurity reports security settings that cannot work: none, both
	// modes at once, or a TLS server without partners.
	ErrSecurity = errors.New("replication: bad security settings")
)

// Security says how streams are protected: exactly one of Identity (TLS
// mode) or PSK.
type Security struct {
	// Identity is this host's certificate and key (TLS mode).
	Identity *identity.Identity
	// PSK is the installation's master pre-shared key (PSK mode); the
	// stream's key is derived from it.
	PSK []byte

	// plain leaves the stream unprotected after a PSK handshake: the wire
	// of protocol version 1, for tests and benchmarks that measure what
	// protection costs or show what it stops. Nothing outside the package
	// can set it.
	plain bool
}

// Check says whether s can work.
func (s Security) Check() error {
	switch {
	case s.Identity != nil && s.PSK != nil:
		return fmt.Errorf("%w: both a certificate and a pre-shared key; configure one", ErrSecurity)
	case s.Identity != nil:
		if s.Identity.Role() != identity.RoleHost {
			return fmt.Errorf("%w: this identity %q is a %s certificate; replication needs a %s one", ErrSecurity, s.Identity.Name(), s.Identity.Role(), identity.RoleHost)
		}
		return nil
	case s.PSK == nil:
		return fmt.Errorf("%w: neither a certificate nor a pre-shared key; configure one", ErrSecurity)
	}
	return checkKey(s.PSK)
}

func (s Security) tls() bool { return s.Identity != nil }

func checkKey(psk []byte) error {
	if len(psk) < MinKeySize {
		return fmt.Errorf("%w: %d bytes, need at least %d (make one with: axctl pki psk KEYFILE)", ErrWeakKey, len(psk), MinKeySize)
	}
	return nil
}

// checkVMName accepts the names AX uses for VMs: they become file names and
// QEMU arguments on the partner.
func checkVMName(vm string) error { return names.Check("vm", vm) }

type hello struct {
	MinVersion, MaxVersion uint8
	Nonce                  [nonceSize]byte
	VM                     string
}

func (h hello) frame() Frame {
	p := make([]byte, 0, 2+nonceSize+2+len(h.VM))
	p = append(p, h.MinVersion, h.MaxVersion)
	p = append(p, h.Nonce[:]...)
	p = le.AppendUint16(p, uint16(len(h.VM)))
	return Frame{Type: TypeHello, Payload: append(p, h.VM...)}
}

func decodeHello(f Frame) (hello, error) {
	if f.Type != TypeHello {
		return hello{}, frameErr(ErrUnexpectedType, "%s frame where %s was expected", f.Type, TypeHello)
	}
	p := f.Payload
	const fixed = 2 + nonceSize + 2
	if len(p) < fixed || len(p) != fixed+int(le.Uint16(p[fixed-2:])) {
		return hello{}, frameErr(ErrMalformed, "%s payload of %d bytes", f.Type, len(p))
	}
	h := hello{MinVersion: p[0], MaxVersion: p[1], VM: string(p[fixed:])}
	copy(h.Nonce[:], p[2:])
	if h.MinVersion == 0 || h.MinVersion > h.MaxVersion {
		return hello{}, frameErr(ErrMalformed, "%s version range %d..%d", f.Type, h.MinVersion, h.MaxVersion)
	}
	if err := checkVMName(h.VM); err != nil {
		return hello{}, frameErr(ErrMalformed, "%s: %v", f.Type, err)
	}
	return h, nil
}

type challenge struct {
	Version uint8
	Nonce   [nonceSize]byte
	MAC     [macSize]byte
}

func (c challenge) frame() Frame {
	p := make([]byte, 0, 1+nonceSize+macSize)
	p = append(p, c.Version)
	return Frame{Type: TypeChallenge, Payload: append(append(p, c.Nonce[:]...), c.MAC[:]...)}
}

func decodeChallenge(f Frame) (challenge, error) {
	var c challenge
	if err := expect(f, TypeChallenge, 1+nonceSize+macSize); err != nil {
		return c, err
	}
	c.Version = f.Payload[0]
	copy(c.Nonce[:], f.Payload[1:])
	copy(c.MAC[:], f.Payload[1+nonceSize:])
	return c, nil
}

type response struct{ MAC [macSize]byte }

func (r response) frame() Frame {
	return Frame{Type: TypeResponse, Payload: append([]byte(nil), r.MAC[:]...)}
}

func decodeResponse(f Frame) (response, error) {
	var r response
	if err := expect(f, TypeResponse, macSize); err != nil {
		return r, err
	}
	copy(r.MAC[:], f.Payload)
	return r, nil
}

type welcome struct{ Version uint8 }

func (w welcome) frame() Frame { return Frame{Type: TypeWelcome, Payload: []byte{w.Version}} }

func decodeWelcome(f Frame) (welcome, error) {
	if err := expect(f, TypeWelcome, 1); err != nil {
		return welcome{}, err
	}
	return welcome{Version: f.Payload[0]}, nil
}

func rejectFrame() Frame { return Frame{Type: TypeReject} }

func decodeReject(f Frame) error { return expect(f, TypeReject, 0) }

// proof is HMAC-SHA256(key, label‖min‖max‖version‖first‖second‖vm). Every
// field but the name has a fixed size and the name comes last, so the
// concatenation is unambiguous.
func proof(key []byte, label string, hi hello, version uint8, first, second *[nonceSize]byte) [macSize]byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label))
	m.Write([]byte{hi.MinVersion, hi.MaxVersion, version})
	m.Write(first[:])
	m.Write(second[:])
	m.Write([]byte(hi.VM))
	var out [macSize]byte
	m.Sum(out[:0])
	return out
}

// authenticated is what a handshake agreed on.
type authenticated struct {
	vm                       string
	version                  uint8
	clientNonce, serverNonce [nonceSize]byte
}

// handshake carries one side's frame I/O. Its reader never reads ahead, so
// after success the caller wraps conn in its own Reader and Writer.
type handshake struct {
	conn net.Conn
	r    *Reader
	w    *Writer
}

func newHandshake(conn net.Conn, deadline time.Time) (*handshake, error) {
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("set handshake deadline: %w", err)
	}
	return &handshake{
		conn: conn,
		r:    newExactReader(conn, maxHandshakePayload),
		w:    newWriterSize(conn, maxHandshakePayload, 1024),
	}, nil
}

func (h *handshake) send(f Frame) error {
	if err := h.w.WriteFrame(f); err != nil {
		return err
	}
	return h.w.Flush()
}

func (h *handshake) read(what string) (Frame, error) {
	f, err := h.r.ReadFrame()
	if err == io.EOF {
		return f, fmt.Errorf("read %s: connection closed by peer: %w", what, io.ErrUnexpectedEOF)
	}
	if err != nil {
		return f, fmt.Errorf("read %s: %w", what, err)
	}
	return f, nil
}

// reject tells the peer no, without saying why, best effort.
func (h *handshake) reject() { _ = h.send(rejectFrame()) }

func deadlineAfter(timeout time.Duration) time.Time {
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	return time.Now().Add(timeout)
}

// serverAuth runs the server's side of the challenge–response on conn with
// key, until deadline. It neither closes conn nor clears the deadline.
func serverAuth(conn net.Conn, key []byte, deadline time.Time) (a authenticated, err error) {
	h, err := newHandshake(conn, deadline)
	if err != nil {
		return a, fmt.Errorf("%w: %w", ErrAuth, err)
	}
	fail := func(err error) error {
		if a.vm != "" {
			return fmt.Errorf("%w: vm %q from %s: %w", ErrAuth, a.vm, conn.RemoteAddr(), err)
		}
		return fmt.Errorf("%w: client %s: %w", ErrAuth, conn.RemoteAddr(), err)
	}

	f, err := h.read("hello")
	if err != nil {
		return a, fail(err)
	}
	hi, err := decodeHello(f)
	if err != nil {
		return a, fail(err)
	}
	a.vm, a.clientNonce = hi.VM, hi.Nonce
	if hi.MinVersion > ProtocolVersion || hi.MaxVersion < MinProtocolVersion {
		h.reject()
		return a, fail(fmt.Errorf("client speaks versions %d..%d, this host %d..%d: upgrade the older host", hi.MinVersion, hi.MaxVersion, MinProtocolVersion, ProtocolVersion))
	}
	a.version = min(hi.MaxVersion, ProtocolVersion)

	c := challenge{Version: a.version}
	if _, err := rand.Read(c.Nonce[:]); err != nil {
		return a, fail(fmt.Errorf("server nonce: %w", err))
	}
	a.serverNonce = c.Nonce
	c.MAC = proof(key, labelServerProof, hi, a.version, &hi.Nonce, &c.Nonce)
	if err := h.send(c.frame()); err != nil {
		return a, fail(fmt.Errorf("send challenge: %w", err))
	}

	if f, err = h.read("response"); err != nil {
		return a, fail(err)
	}
	if f.Type == TypeReject {
		return a, fail(errors.New("client could not verify the server's proof (keys differ, or the hello was altered in transit)"))
	}
	resp, err := decodeResponse(f)
	if err != nil {
		return a, fail(err)
	}
	want := proof(key, labelClientProof, hi, a.version, &c.Nonce, &hi.Nonce)
	if !hmac.Equal(resp.MAC[:], want[:]) {
		h.reject()
		return a, fail(errors.New("client's proof is wrong (keys differ?)"))
	}
	if err := h.send(welcome{Version: a.version}.frame()); err != nil {
		return a, fail(fmt.Errorf("send welcome: %w", err))
	}
	return a, nil
}

// clientAuth runs the client's side of the challenge–response on conn with
// key for vm, until deadline: it checks the server's proof before giving
// its own. It neither closes conn nor clears the deadline.
func clientAuth(conn net.Conn, key []byte, vm string, deadline time.Time) (a authenticated, err error) {
	h, err := newHandshake(conn, deadline)
	if err != nil {
		return a, fmt.Errorf("%w: %w", ErrAuth, err)
	}
	fail := func(err error) error {
		return fmt.Errorf("%w: vm %q to server %s: %w", ErrAuth, vm, conn.RemoteAddr(), err)
	}

	hi := hello{MinVersion: MinProtocolVersion, MaxVersion: ProtocolVersion, VM: vm}
	if _, err := rand.Read(hi.Nonce[:]); err != nil {
		return a, fail(fmt.Errorf("client nonce: %w", err))
	}
	a.vm, a.clientNonce = vm, hi.Nonce
	if err := h.send(hi.frame()); err != nil {
		return a, fail(fmt.Errorf("send hello: %w", err))
	}

	f, err := h.read("challenge")
	if err != nil {
		return a, fail(err)
	}
	if f.Type == TypeReject {
		return a, fail(errors.New("server refused: no common version"))
	}
	c, err := decodeChallenge(f)
	if err != nil {
		return a, fail(err)
	}
	// The version is checked only with the proof over it: a version that
	// is no proof's is an edit in transit.
	want := proof(key, labelServerProof, hi, c.Version, &hi.Nonce, &c.Nonce)
	if !hmac.Equal(c.MAC[:], want[:]) {
		h.reject()
		return a, fail(errors.New("server's proof is wrong (keys differ, not our server, or the hello was altered in transit)"))
	}
	if c.Version < hi.MinVersion || c.Version > hi.MaxVersion {
		h.reject()
		return a, fail(fmt.Errorf("server chose version %d, we speak %d..%d", c.Version, hi.MinVersion, hi.MaxVersion))
	}
	a.version, a.serverNonce = c.Version, c.Nonce

	if err := h.send(response{MAC: proof(key, labelClientProof, hi, c.Version, &c.Nonce, &hi.Nonce)}.frame()); err != nil {
		return a, fail(fmt.Errorf("send response: %w", err))
	}
	if f, err = h.read("welcome"); err != nil {
		return a, fail(err)
	}
	if f.Type == TypeReject {
		if err := decodeReject(f); err != nil {
			return a, fail(err)
		}
		return a, fail(errors.New("server refused our proof (keys differ?)"))
	}
	w, err := decodeWelcome(f)
	if err != nil {
		return a, fail(err)
	}
	if w.Version != c.Version {
		return a, fail(fmt.Errorf("server welcomed version %d after proving %d", w.Version, c.Version))
	}
	return a, nil
}

// Authenticated is a client that passed the server's handshake.
type Authenticated struct {
	// Conn is the protected connection (TLS, or sealed records in PSK
	// mode): read and write the stream through it only.
	Conn net.Conn
	// VM is the VM the client asked for; it passed names.Check.
	VM string
	// Peer is the client's host name from its certificate in TLS mode;
	// "" in PSK mode, where the key does not say which host holds it.
	Peer string
}

// ServerHandshake authenticates the client on conn as sec says and returns
// the protected connection, the VM asked for and, in TLS mode, the client's
// certificate name, which must be one of allow. The caller decides whether
// it serves that VM for that peer. Timeout bounds the whole handshake, TLS
// included (DefaultHandshakeTimeout when <= 0). On failure conn is closed
// and no Welcome was sent.
func ServerHandshake(conn net.Conn, sec Security, allow []string, timeout time.Duration) (Authenticated, error) {
	a, err := serverHandshake(conn, sec, allow, timeout)
	if err != nil {
		conn.Close()
	}
	return a, err
}

// serverHandshake is ServerHandshake leaving conn open on failure, so the
// caller can log before the peer sees the close.
func serverHandshake(conn net.Conn, sec Security, allow []string, timeout time.Duration) (Authenticated, error) {
	if err := sec.Check(); err != nil {
		return Authenticated{}, err
	}
	deadline := deadlineAfter(timeout)
	if err := conn.SetDeadline(deadline); err != nil {
		return Authenticated{}, fmt.Errorf("%w: set handshake deadline: %w", ErrAuth, err)
	}
	var out Authenticated
	inner, key := conn, []byte(nil)
	if sec.tls() {
		if len(allow) == 0 {
			return out, fmt.Errorf("%w: no partner host is allowed to connect; list the partners", ErrSecurity)
		}
		tc := tls.Server(conn, sec.Identity.ServerConfig(identity.AllowHosts(allow...)))
		if err := tc.Handshake(); err != nil {
			return out, fmt.Errorf("%w: tls with client %s: %w", ErrAuth, conn.RemoteAddr(), err)
		}
		cs := tc.ConnectionState()
		p, err := identity.PeerOf(cs)
		if err != nil {
			return out, fmt.Errorf("%w: client %s: %w", ErrAuth, conn.RemoteAddr(), err)
		}
		if key, err = cs.ExportKeyingMaterial(exporterLabel, nil, 32); err != nil {
			return out, fmt.Errorf("%w: client %s: export handshake key: %w", ErrAuth, conn.RemoteAddr(), err)
		}
		inner, out.Peer = tc, p.Name
	} else {
		key = identity.DeriveKey(sec.PSK, identity.PurposeStream)
	}
	a, err := serverAuth(inner, key, deadline)
	if err != nil {
		return Authenticated{}, err
	}
	out.VM, out.Conn = a.vm, inner
	if !sec.tls() && !sec.plain {
		c, err := newSealedConn(conn, deriveSealKey(key, labelServerToClient, a), deriveSealKey(key, labelClientToServer, a))
		if err != nil {
			return Authenticated{}, err
		}
		out.Conn = c
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return Authenticated{}, fmt.Errorf("%w: clear handshake deadline: %w", ErrAuth, err)
	}
	return out, nil
}

// ClientHandshake authenticates to the server on conn as sec says, asking
// for VM vm, and returns the protected connection to use from then on. In
// TLS mode the server's certificate must name peer, a host; in PSK mode
// peer is not checked (the key does not say which host holds it). Timeout
// bounds the whole handshake, TLS included (DefaultHandshakeTimeout when
// <= 0). On failure conn is closed.
func ClientHandshake(conn net.Conn, sec Security, peer, vm string, timeout time.Duration) (_ net.Conn, err error) {
	defer func() {
		if err != nil {
			conn.Close()
		}
	}()
	if err := sec.Check(); err != nil {
		return nil, err
	}
	if err := checkVMName(vm); err != nil {
		return nil, fmt.Errorf("replication: client handshake: %w", err)
	}
	if sec.tls() {
		if err := names.Check("host", peer); err != nil {
			return nil, fmt.Errorf("replication: client handshake: partner: %w", err)
		}
	}
	deadline := deadlineAfter(timeout)
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("%w: set handshake deadline: %w", ErrAuth, err)
	}
	inner, key := conn, []byte(nil)
	if sec.tls() {
		tc := tls.Client(conn, sec.Identity.ClientConfig(identity.Want(peer, identity.RoleHost)))
		if err := tc.Handshake(); err != nil {
			return nil, fmt.Errorf("%w: tls with partner %q at %s: %w", ErrAuth, peer, conn.RemoteAddr(), err)
		}
		cs := tc.ConnectionState()
		if key, err = cs.ExportKeyingMaterial(exporterLabel, nil, 32); err != nil {
			return nil, fmt.Errorf("%w: partner %q: export handshake key: %w", ErrAuth, peer, err)
		}
		inner = tc
	} else {
		key = identity.DeriveKey(sec.PSK, identity.PurposeStream)
	}
	a, err := clientAuth(inner, key, vm, deadline)
	if err != nil {
		return nil, err
	}
	out := inner
	if !sec.tls() && !sec.plain {
		c, err := newSealedConn(conn, deriveSealKey(key, labelClientToServer, a), deriveSealKey(key, labelServerToClient, a))
		if err != nil {
			return nil, err
		}
		out = c
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("%w: clear handshake deadline: %w", ErrAuth, err)
	}
	return out, nil
}
