package replication

import (
	"bytes"
	"crypto/rand"
	"errors"
	"github.com/axproject/ax/ax/identity/identitytest"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/identity"
)

var (
	testKey  = []byte("0123456789abcdef0123456789abcdef")
	otherKey = []byte("fedcba9876543210fedcba9876543210")
	// testStreamKey is the handshake key PSK mode derives from testKey:
	// what a scripted peer holding testKey proves with.
	testStreamKey  = identity.DeriveKey(testKey, identity.PurposeStream)
	otherStreamKey = identity.DeriveKey(otherKey, identity.PurposeStream)
)

func pskOf(key []byte) Security { return Security{PSK: key} }

// peer is a scripted end of a handshake: it sends what a test tells it and
// records every frame the other end sends until that end closes.
type peer struct {
	t      *testing.T
	conn   net.Conn
	w      *Writer
	frames chan Frame
	seen   []Frame
}

func newPeer(t *testing.T, conn net.Conn) *peer {
	p := &peer{t: t, conn: conn, w: NewWriter(conn, 1<<20), frames: make(chan Frame, 16)}
	go func() {
		defer close(p.frames)
		r := newExactReader(conn, 1<<20)
		for {
			f, err := r.ReadFrame()
			if err != nil {
				return
			}
			f.Payload = bytes.Clone(f.Payload)
			p.frames <- f
		}
	}()
	t.Cleanup(func() { conn.Close() })
	return p
}

// send writes f; errors are ignored because the other end may rightly have
// hung up already.
func (p *peer) send(f Frame) {
	p.w.WriteFrame(f)
	p.w.Flush()
}

func (p *peer) sendRaw(b []byte) { p.conn.Write(b) }

// recv returns the next frame from the other end, or false once it closed.
func (p *peer) recv() (Frame, bool) {
	select {
	case f, ok := <-p.frames:
		if ok {
			p.seen = append(p.seen, f)
		}
		return f, ok
	case <-time.After(10 * time.Second):
		p.t.Fatal("no frame and no close from the other end within 10s")
		return Frame{}, false
	}
}

// rest returns every frame the other end sent, waiting for it to close.
func (p *peer) rest() []Frame {
	for {
		if _, ok := p.recv(); !ok {
			return p.seen
		}
	}
}

func (p *peer) hello(vm string, minV, maxV uint8) hello {
	h := hello{MinVersion: minV, MaxVersion: maxV, VM: vm}
	rand.Read(h.Nonce[:])
	p.send(h.frame())
	return h
}

func types(frames []Frame) []FrameType {
	var ts []FrameType
	for _, f := range frames {
		ts = append(ts, f.Type)
	}
	return ts
}

type serverResult struct {
	vm  string
	err error
}

// startServer runs ServerHandshake in PSK mode on one end of a pipe and
// returns a peer on the other end and the handshake's result.
func startServer(t *testing.T, psk []byte, timeout time.Duration) (*peer, <-chan serverResult) {
	c, s := net.Pipe()
	t.Cleanup(func() { s.Close() })
	done := make(chan serverResult, 1)
	go func() {
		a, err := ServerHandshake(s, pskOf(psk), nil, timeout)
		done <- serverResult{a.VM, err}
	}()
	return newPeer(t, c), done
}

func TestHandshake(t *testing.T) {
	c, s := net.Pipe()
	defer c.Close()
	defer s.Close()
	const timeout = 50 * time.Millisecond
	done := make(chan Authenticated, 1)
	go func() {
		a, err := ServerHandshake(s, pskOf(testKey), nil, timeout)
		if err != nil {
			t.Errorf("server: %v", err)
		}
		done <- a
	}()
	cc, err := ClientHandshake(c, pskOf(testKey), "", "vm-1", timeout)
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	a := <-done
	if a.VM != "vm-1" || a.Peer != "" || a.Conn == nil {
		t.Fatalf("server: %+v", a)
	}

	// The handshake deadline is gone and no byte after it was consumed:
	// frames sent right after the Welcome reach the stream's own Reader,
	// through the record layer both ends put on the connection.
	time.Sleep(2 * timeout)
	go func() {
		w := NewWriter(a.Conn, 0)
		w.WriteFrame(Heartbeat{SentUnixNano: 1, LastCommitted: 2}.Frame())
		w.Flush()
	}()
	f, err := NewReader(cc, 0).ReadFrame()
	if err != nil {
		t.Fatalf("first frame after the handshake: %v", err)
	}
	if hb, err := DecodeHeartbeat(f); err != nil || hb.LastCommitted != 2 {
		t.Fatalf("first frame after the handshake: %+v, %v", hb, err)
	}
	if _, ok := cc.(*sealedConn); !ok {
		t.Fatalf("client's stream is a %T, want sealed records", cc)
	}
}

func TestServerHandshakeRefuses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		script  func(p *peer)
		cause   error // also wrapped, besides ErrAuth, when set
	}{
		{"wrong key", 0, func(p *peer) {
			h := p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: proof(otherStreamKey, labelClientProof, h, c.Version, &c.Nonce, &h.Nonce)}.frame())
		}, nil},
		{"the master key instead of the stream key", 0, func(p *peer) {
			h := p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: proof(testKey, labelClientProof, h, c.Version, &c.Nonce, &h.Nonce)}.frame())
		}, nil},
		{"proof for another vm", 0, func(p *peer) {
			h := p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			h.VM = "vm-2"
			p.send(response{MAC: proof(testStreamKey, labelClientProof, h, c.Version, &c.Nonce, &h.Nonce)}.frame())
		}, nil},
		{"proof over another version range", 0, func(p *peer) {
			h := p.hello("vm-1", 2, 3)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			h.MaxVersion = 2 // what a relay that edited the hello would have the client prove
			p.send(response{MAC: proof(testStreamKey, labelClientProof, h, c.Version, &c.Nonce, &h.Nonce)}.frame())
		}, nil},
		{"proof over another version", 0, func(p *peer) {
			h := p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: proof(testStreamKey, labelClientProof, h, 1, &c.Nonce, &h.Nonce)}.frame())
		}, nil},
		{"server's proof reflected", 0, func(p *peer) {
			p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: c.MAC}.frame())
		}, nil},
		{"truncated response", 0, func(p *peer) {
			p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			p.recv()
			wire := encode(p.t, response{}.frame())
			p.sendRaw(wire[:HeaderSize+5])
			p.conn.Close()
		}, nil},
		{"closed before hello", 0, func(p *peer) { p.conn.Close() }, nil},
		{"truncated hello", 0, func(p *peer) {
			wire := encode(p.t, hello{MinVersion: ProtocolVersion, MaxVersion: ProtocolVersion, VM: "vm-1"}.frame())
			p.sendRaw(wire[:len(wire)-3])
			p.conn.Close()
		}, nil},
		{"garbage instead of hello", 0, func(p *peer) {
			p.sendRaw([]byte("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"))
		}, ErrBadMagic},
		{"oversize hello", 0, func(p *peer) {
			hdr := encode(p.t, Frame{Type: TypeHello})[:HeaderSize]
			le.PutUint32(hdr[6:], 1<<20)
			p.sendRaw(hdr) // and never the megabyte: refused on the header alone
		}, ErrTooLarge},
		{"hello with a 300-byte vm name", 0, func(p *peer) {
			p.hello(strings.Repeat("v", 300), ProtocolVersion, ProtocolVersion)
		}, ErrMalformed},
		{"hello with a 129-byte vm name", 0, func(p *peer) {
			p.hello(strings.Repeat("v", 129), ProtocolVersion, ProtocolVersion)
		}, ErrMalformed},
		{"hello with a slash in the vm name", 0, func(p *peer) { p.hello("../etc/vm", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with vm name ..", 0, func(p *peer) { p.hello("..", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with a semicolon in the vm name", 0, func(p *peer) { p.hello("vm;reboot", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with a space in the vm name", 0, func(p *peer) { p.hello("vm 1", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with a leading dot", 0, func(p *peer) { p.hello(".vm", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with a leading dash", 0, func(p *peer) { p.hello("-vm", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with a comma (a QEMU option separator)", 0, func(p *peer) { p.hello("vm,file=x", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with an empty vm name", 0, func(p *peer) { p.hello("", ProtocolVersion, ProtocolVersion) }, ErrMalformed},
		{"hello with a bad checksum", 0, func(p *peer) {
			wire := encode(p.t, hello{MinVersion: ProtocolVersion, MaxVersion: ProtocolVersion, VM: "vm-1"}.frame())
			wire[len(wire)-1] ^= 1
			p.sendRaw(wire)
		}, ErrChecksum},
		{"response instead of hello", 0, func(p *peer) {
			p.send(response{}.frame())
		}, ErrUnexpectedType},
		{"welcome instead of response", 0, func(p *peer) {
			p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			p.recv()
			p.send(welcome{Version: ProtocolVersion}.frame())
		}, ErrUnexpectedType},
		{"no common version (newer)", 0, func(p *peer) {
			p.hello("vm-1", 3, 9)
		}, nil},
		{"no common version (version 1, unprotected)", 0, func(p *peer) {
			p.hello("vm-1", 1, 1)
		}, nil},
		{"silent client", 100 * time.Millisecond, func(p *peer) {}, os.ErrDeadlineExceeded},
		{"client stalls after hello", 100 * time.Millisecond, func(p *peer) {
			p.hello("vm-1", ProtocolVersion, ProtocolVersion)
			p.recv()
		}, os.ErrDeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			timeout := tc.timeout
			if timeout == 0 {
				timeout = 5 * time.Second
			}
			p, done := startServer(t, testKey, timeout)
			start := time.Now()
			tc.script(p)
			var res serverResult
			select {
			case res = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("server handshake did not return")
			}
			if !errors.Is(res.err, ErrAuth) {
				t.Fatalf("server error = %v, want ErrAuth", res.err)
			}
			if tc.cause != nil && !errors.Is(res.err, tc.cause) {
				t.Errorf("server error = %v, want it to wrap %v", res.err, tc.cause)
			}
			if res.vm != "" {
				t.Errorf("server returned vm %q on failure", res.vm)
			}
			if tc.timeout > 0 && time.Since(start) > 3*time.Second {
				t.Errorf("timed out after %v, deadline was %v", time.Since(start), tc.timeout)
			}
			// rest returns only once the server closed the connection.
			for _, f := range p.rest() {
				if f.Type != TypeChallenge && f.Type != TypeReject {
					t.Errorf("server sent %s on a failed handshake (all: %v)", f.Type, types(p.seen))
				}
				if f.Type == TypeReject && len(f.Payload) != 0 {
					t.Errorf("reject carries %d bytes of detail", len(f.Payload))
				}
			}
			t.Logf("server: %v", res.err)
		})
	}
}

func TestServerHandshakeRefusesReplayedResponse(t *testing.T) {
	// A client that knows the key; an eavesdropper records its messages.
	p, done := startServer(t, testKey, 0)
	h := p.hello("vm-1", ProtocolVersion, ProtocolVersion)
	f, _ := p.recv()
	c, _ := decodeChallenge(f)
	recorded := response{MAC: proof(testStreamKey, labelClientProof, h, c.Version, &c.Nonce, &h.Nonce)}
	p.send(recorded.frame())
	if res := <-done; res.err != nil {
		t.Fatalf("genuine client refused: %v", res.err)
	}
	if f, _ := p.recv(); f.Type != TypeWelcome {
		t.Fatalf("genuine client got %s", f.Type)
	}

	// The eavesdropper replays the same Hello and Response on a new connection.
	p, done = startServer(t, testKey, 0)
	p.send(h.frame())
	if f, _ := p.recv(); f.Type != TypeChallenge {
		t.Fatalf("got %s, want a challenge", f.Type)
	}
	p.send(recorded.frame())
	if res := <-done; !errors.Is(res.err, ErrAuth) {
		t.Fatalf("replayed response: %v, want ErrAuth", res.err)
	}
	for _, f := range p.rest() {
		if f.Type == TypeWelcome {
			t.Fatal("server welcomed a replayed response")
		}
	}
}

// startClient runs ClientHandshake on one end of a pipe and returns a peer on
// the other end and the handshake's error.
func startClient(t *testing.T, psk []byte, timeout time.Duration) (*peer, <-chan error) {
	c, s := net.Pipe()
	t.Cleanup(func() { c.Close() })
	done := make(chan error, 1)
	go func() {
		_, err := ClientHandshake(c, pskOf(psk), "", "vm-1", timeout)
		done <- err
	}()
	return newPeer(t, s), done
}

func TestClientHandshakeRefuses(t *testing.T) {
	// A challenge recorded from an earlier session, for the replay case.
	var old challenge
	{
		p, done := startClient(t, testKey, 0)
		f, _ := p.recv()
		h, _ := decodeHello(f)
		rand.Read(old.Nonce[:])
		old.Version = ProtocolVersion
		old.MAC = proof(testStreamKey, labelServerProof, h, ProtocolVersion, &h.Nonce, &old.Nonce)
		p.send(old.frame())
		p.recv()
		p.send(welcome{Version: ProtocolVersion}.frame())
		if err := <-done; err != nil {
			t.Fatalf("genuine server refused: %v", err)
		}
	}
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		script  func(p *peer, h hello)
		cause   error
	}{
		{"server without the key", 0, func(p *peer, h hello) {
			c := challenge{Version: ProtocolVersion}
			rand.Read(c.Nonce[:])
			c.MAC = proof(otherStreamKey, labelServerProof, h, ProtocolVersion, &h.Nonce, &c.Nonce)
			p.send(c.frame())
		}, nil},
		{"server replays an old challenge", 0, func(p *peer, h hello) { p.send(old.frame()) }, nil},
		{"server reflects the client's nonce", 0, func(p *peer, h hello) {
			c := challenge{Version: ProtocolVersion, Nonce: h.Nonce}
			c.MAC = proof(otherStreamKey, labelServerProof, h, ProtocolVersion, &h.Nonce, &c.Nonce)
			p.send(c.frame())
		}, nil},
		{"server proves over another version range", 0, func(p *peer, h hello) {
			c := challenge{Version: ProtocolVersion}
			rand.Read(c.Nonce[:])
			h.MinVersion = 1 // the hello as a relay edited it
			c.MAC = proof(testStreamKey, labelServerProof, h, ProtocolVersion, &h.Nonce, &c.Nonce)
			p.send(c.frame())
		}, nil},
		{"challenge's version edited", 0, func(p *peer, h hello) {
			c := challenge{Version: ProtocolVersion}
			rand.Read(c.Nonce[:])
			c.MAC = proof(testStreamKey, labelServerProof, h, ProtocolVersion, &h.Nonce, &c.Nonce)
			c.Version = 1
			p.send(c.frame())
		}, nil},
		{"server proves a version outside our range", 0, func(p *peer, h hello) {
			c := challenge{Version: 7}
			rand.Read(c.Nonce[:])
			c.MAC = proof(testStreamKey, labelServerProof, h, 7, &h.Nonce, &c.Nonce)
			p.send(c.frame())
		}, nil},
		{"server rejects", 0, func(p *peer, h hello) { p.send(rejectFrame()) }, nil},
		{"server sends garbage", 0, func(p *peer, h hello) { p.sendRaw(bytes.Repeat([]byte{0xff}, 64)) }, ErrBadMagic},
		{"server hangs up", 0, func(p *peer, h hello) { p.conn.Close() }, nil},
		{"server never answers", 100 * time.Millisecond, func(p *peer, h hello) {}, os.ErrDeadlineExceeded},
		{"server welcomes another version than it proved", 0, func(p *peer, h hello) {
			c := challenge{Version: ProtocolVersion}
			rand.Read(c.Nonce[:])
			c.MAC = proof(testStreamKey, labelServerProof, h, ProtocolVersion, &h.Nonce, &c.Nonce)
			p.send(c.frame())
			p.recv()
			p.send(welcome{Version: 1}.frame())
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, done := startClient(t, testKey, tc.timeout)
			f, ok := p.recv()
			if !ok || f.Type != TypeHello {
				t.Fatalf("client opened with %s", f.Type)
			}
			h, err := decodeHello(f)
			if err != nil {
				t.Fatal(err)
			}
			tc.script(p, h)
			var err2 error
			select {
			case err2 = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("client handshake did not return")
			}
			if !errors.Is(err2, ErrAuth) {
				t.Fatalf("client error = %v, want ErrAuth", err2)
			}
			if tc.cause != nil && !errors.Is(err2, tc.cause) {
				t.Errorf("client error = %v, want it to wrap %v", err2, tc.cause)
			}
			seen := p.rest()
			if strings.HasPrefix(tc.name, "server without") || strings.Contains(tc.name, "replays") || strings.Contains(tc.name, "reflects") ||
				strings.Contains(tc.name, "another version range") || strings.Contains(tc.name, "edited") {
				for _, f := range seen {
					if f.Type == TypeResponse {
						t.Error("client proved its key to a server that did not prove its own")
					}
				}
			}
			t.Logf("client: %v", err2)
		})
	}
}

func TestHandshakeWrongKeyBothEnds(t *testing.T) {
	c, s := net.Pipe()
	done := make(chan serverResult, 1)
	go func() {
		a, err := ServerHandshake(s, pskOf(otherKey), nil, 0)
		done <- serverResult{a.VM, err}
	}()
	if _, err := ClientHandshake(c, pskOf(testKey), "", "vm-1", 0); !errors.Is(err, ErrAuth) {
		t.Fatalf("client: %v, want ErrAuth", err)
	}
	if res := <-done; !errors.Is(res.err, ErrAuth) {
		t.Fatalf("server: %v, want ErrAuth", res.err)
	}
}

func TestHandshakeWeakKey(t *testing.T) {
	for _, key := range [][]byte{{}, []byte("fifteen bytes!!"), testKey[:31]} {
		c, s := net.Pipe()
		_, err := ClientHandshake(c, pskOf(key), "", "vm-1", 0)
		if !errors.Is(err, ErrWeakKey) || !strings.Contains(err.Error(), "at least 32") {
			t.Errorf("client with a %d-byte key: %v", len(key), err)
		}
		_, err = ServerHandshake(s, pskOf(key), nil, 0)
		if !errors.Is(err, ErrWeakKey) {
			t.Errorf("server with a %d-byte key: %v", len(key), err)
		}
		// Both ends closed their connection without writing.
		if _, err := c.Write([]byte{0}); err == nil {
			t.Error("connection still open after a refused key")
		}
	}
}

// A name that is not a safe file name and QEMU word is refused before a
// byte goes out.
func TestClientHandshakeBadVMName(t *testing.T) {
	for _, vm := range []string{"", strings.Repeat("x", MaxVMNameLen+1), "a\nb", "\xff", "a/b", "../../etc", "..", ".",
		".hidden", "-rf", "vm;reboot", "vm 1", "vm,file=/etc/passwd", "vm$(id)", "vm\x00"} {
		c, s := net.Pipe()
		got := make(chan int, 1)
		go func() {
			n, _ := io.Copy(io.Discard, s)
			got <- int(n)
		}()
		if _, err := ClientHandshake(c, pskOf(testKey), "", vm, 0); err == nil {
			t.Errorf("vm name %q accepted", vm)
		}
		if n := <-got; n != 0 {
			t.Errorf("vm name %q: %d bytes sent", vm, n)
		}
	}
}

func TestSecurityCheck(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "w")
	for _, tc := range []struct {
		name string
		sec  Security
		want error // nil: accepted
	}{
		{"psk", Security{PSK: testKey}, nil},
		{"tls", Security{Identity: ids["a"]}, nil},
		{"nothing", Security{}, ErrSecurity},
		{"both", Security{Identity: ids["a"], PSK: testKey}, ErrSecurity},
		{"short psk", Security{PSK: testKey[:16]}, ErrWeakKey},
		{"witness certificate", Security{Identity: ids["w"]}, ErrSecurity},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.sec.Check()
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("Check() = %v, want %v", err, tc.want)
			}
		})
	}
}
