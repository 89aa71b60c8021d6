package replication

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
	"unicode/utf8"
)

// Mutual authentication with a pre-shared key. Each side proves it holds the
// key by MACing both fresh nonces and the VM name under its own label, so a
// recorded proof is useless in another session and a proof cannot be
// reflected back at its sender:
//
//	client → Hello{min, max version, client nonce, vm}
//	server → Challenge{server nonce, HMAC(psk, "ax-server"‖cn‖sn‖vm)}
//	client → Response{HMAC(psk, "ax-client"‖sn‖cn‖vm)}
//	server → Welcome{version}
//
// The handshake authenticates the peer, not each later frame: the replication
// link is a dedicated, private link.

// Protocol versions this package speaks.
const (
	MinProtocolVersion uint8 = 1
	ProtocolVersion    uint8 = 1
)

const (
	// DefaultHandshakeTimeout bounds a handshake when the caller passes no timeout.
	DefaultHandshakeTimeout = 5 * time.Second
	// MinKeySize is the shortest pre-shared key accepted.
	MinKeySize = 16
	// MaxVMNameLen bounds the VM name in a Hello.
	MaxVMNameLen = 255

	nonceSize = 32
	macSize   = sha256.Size
	// maxHandshakePayload keeps an unauthenticated peer from making us
	// allocate more than a Hello can need.
	maxHandshakePayload = 512
)

var (
	// ErrAuth is wrapped by every handshake failure after the key was
	// accepted as usable: a wrong key, a malformed or unexpected frame, a
	// version mismatch, a timeout or a closed connection.
	ErrAuth = errors.New("replication: authentication failed")
	// ErrWeakKey reports a pre-shared key shorter than MinKeySize.
	ErrWeakKey = errors.New("replication: pre-shared key too short")
)

func checkKey(psk []byte) error {
	if len(psk) < MinKeySize {
		return fmt.Errorf("%w: %d bytes, need at least %d (generate one with: head -c 32 /dev/urandom > KEYFILE)", ErrWeakKey, len(psk), MinKeySize)
	}
	return nil
}

func checkVMName(vm string) error {
	if len(vm) == 0 || len(vm) > MaxVMNameLen {
		return fmt.Errorf("vm name of %d bytes, want 1..%d", len(vm), MaxVMNameLen)
	}
	if !utf8.ValidString(vm) {
		return fmt.Errorf("vm name %q is not valid UTF-8", vm)
	}
	for _, r := range vm {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("vm name %q contains a control character", vm)
		}
	}
	return nil
}

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
	Nonce [nonceSize]byte
	MAC   [macSize]byte
}

func (c challenge) frame() Frame {
	p := make([]byte, 0, nonceSize+macSize)
	return Frame{Type: TypeChallenge, Payload: append(append(p, c.Nonce[:]...), c.MAC[:]...)}
}

func decodeChallenge(f Frame) (challenge, error) {
	var c challenge
	if err := expect(f, TypeChallenge, nonceSize+macSize); err != nil {
		return c, err
	}
	copy(c.Nonce[:], f.Payload)
	copy(c.MAC[:], f.Payload[nonceSize:])
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

// proof is HMAC-SHA256(psk, label‖first‖second‖vm). The nonces have a fixed
// size and the name comes last, so the concatenation is unambiguous.
func proof(psk []byte, label string, first, second *[nonceSize]byte, vm string) [macSize]byte {
	m := hmac.New(sha256.New, psk)
	m.Write([]byte(label))
	m.Write(first[:])
	m.Write(second[:])
	m.Write([]byte(vm))
	var out [macSize]byte
	m.Sum(out[:0])
	return out
}

// handshake carries one side's frame I/O. Its reader never reads ahead, so
// after success the caller wraps conn in its own Reader and Writer.
type handshake struct {
	conn net.Conn
	r    *Reader
	w    *Writer
}

func newHandshake(conn net.Conn, timeout time.Duration) (*handshake, error) {
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
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

func (h *handshake) done() error {
	if err := h.conn.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("clear handshake deadline: %w", err)
	}
	return nil
}

// ServerHandshake authenticates the client on conn with psk and returns the
// VM name it asked for; the caller decides whether it serves that VM. Timeout
// bounds the whole handshake (DefaultHandshakeTimeout when <= 0). On failure
// conn is closed and no Welcome was sent.
func ServerHandshake(conn net.Conn, psk []byte, timeout time.Duration) (vm string, err error) {
	if err := checkKey(psk); err != nil {
		conn.Close()
		return "", err
	}
	return ServerHandshakeFunc(conn, func(string) []byte { return psk }, timeout)
}

// ServerHandshakeFunc is ServerHandshake with a key per VM: keyFor returns the
// VM's pre-shared key, or nil for a VM this server does not replicate.
func ServerHandshakeFunc(conn net.Conn, keyFor func(vm string) []byte, timeout time.Duration) (vm string, err error) {
	defer func() {
		if err != nil {
			conn.Close()
			vm = ""
		}
	}()
	h, err := newHandshake(conn, timeout)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrAuth, err)
	}
	fail := func(err error) error {
		if vm != "" {
			return fmt.Errorf("%w: vm %q from %s: %w", ErrAuth, vm, conn.RemoteAddr(), err)
		}
		return fmt.Errorf("%w: client %s: %w", ErrAuth, conn.RemoteAddr(), err)
	}

	f, err := h.read("hello")
	if err != nil {
		return "", fail(err)
	}
	hi, err := decodeHello(f)
	if err != nil {
		return "", fail(err)
	}
	vm = hi.VM
	if hi.MinVersion > ProtocolVersion || hi.MaxVersion < MinProtocolVersion {
		h.reject()
		return "", fail(fmt.Errorf("client speaks versions %d..%d, server %d..%d", hi.MinVersion, hi.MaxVersion, MinProtocolVersion, ProtocolVersion))
	}
	version := min(hi.MaxVersion, ProtocolVersion)
	psk := keyFor(vm)
	if psk == nil {
		h.reject()
		return "", fail(errors.New("no key for this vm"))
	}
	if err := checkKey(psk); err != nil {
		h.reject()
		return "", err
	}

	var c challenge
	if _, err := rand.Read(c.Nonce[:]); err != nil {
		return "", fail(fmt.Errorf("server nonce: %w", err))
	}
	c.MAC = proof(psk, "ax-server", &hi.Nonce, &c.Nonce, vm)
	if err := h.send(c.frame()); err != nil {
		return "", fail(fmt.Errorf("send challenge: %w", err))
	}

	if f, err = h.read("response"); err != nil {
		return "", fail(err)
	}
	if f.Type == TypeReject {
		return "", fail(errors.New("client could not verify the server's key proof (keys differ?)"))
	}
	resp, err := decodeResponse(f)
	if err != nil {
		return "", fail(err)
	}
	want := proof(psk, "ax-client", &c.Nonce, &hi.Nonce, vm)
	if !hmac.Equal(resp.MAC[:], want[:]) {
		h.reject()
		return "", fail(errors.New("client's key proof is wrong (keys differ?)"))
	}

	if err := h.send(welcome{Version: version}.frame()); err != nil {
		return "", fail(fmt.Errorf("send welcome: %w", err))
	}
	if err := h.done(); err != nil {
		return "", fail(err)
	}
	return vm, nil
}

// ClientHandshake authenticates to the server on conn with psk for VM vm, and
// checks that the server holds the key too before proving it itself. Timeout
// bounds the whole handshake (DefaultHandshakeTimeout when <= 0). On failure
// conn is closed.
func ClientHandshake(conn net.Conn, psk []byte, vm string, timeout time.Duration) (err error) {
	defer func() {
		if err != nil {
			conn.Close()
		}
	}()
	if err := checkKey(psk); err != nil {
		return err
	}
	if err := checkVMName(vm); err != nil {
		return fmt.Errorf("replication: client handshake: %w", err)
	}
	h, err := newHandshake(conn, timeout)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrAuth, err)
	}
	fail := func(err error) error {
		return fmt.Errorf("%w: vm %q to server %s: %w", ErrAuth, vm, conn.RemoteAddr(), err)
	}

	hi := hello{MinVersion: MinProtocolVersion, MaxVersion: ProtocolVersion, VM: vm}
	if _, err := rand.Read(hi.Nonce[:]); err != nil {
		return fail(fmt.Errorf("client nonce: %w", err))
	}
	if err := h.send(hi.frame()); err != nil {
		return fail(fmt.Errorf("send hello: %w", err))
	}

	f, err := h.read("challenge")
	if err != nil {
		return fail(err)
	}
	if f.Type == TypeReject {
		return fail(errors.New("server refused: unknown vm, no common version or no key"))
	}
	c, err := decodeChallenge(f)
	if err != nil {
		return fail(err)
	}
	want := proof(psk, "ax-server", &hi.Nonce, &c.Nonce, vm)
	if !hmac.Equal(c.MAC[:], want[:]) {
		h.reject()
		return fail(errors.New("server's key proof is wrong (keys differ, or not our server)"))
	}

	if err := h.send(response{MAC: proof(psk, "ax-client", &c.Nonce, &hi.Nonce, vm)}.frame()); err != nil {
		return fail(fmt.Errorf("send response: %w", err))
	}

	if f, err = h.read("welcome"); err != nil {
		return fail(err)
	}
	if f.Type == TypeReject {
		if err := decodeReject(f); err != nil {
			return fail(err)
		}
		return fail(errors.New("server refused our key proof (keys differ?)"))
	}
	w, err := decodeWelcome(f)
	if err != nil {
		return fail(err)
	}
	if w.Version < MinProtocolVersion || w.Version > ProtocolVersion {
		return fail(fmt.Errorf("server chose version %d, we speak %d..%d", w.Version, MinProtocolVersion, ProtocolVersion))
	}
	if err := h.done(); err != nil {
		return fail(err)
	}
	return nil
}
