package replication

import (
	"bytes"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

var (
	testKey  = []byte("0123456789abcdef0123456789abcdef")
	otherKey = []byte("fedcba9876543210fedcba9876543210")
)

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

// startServer runs ServerHandshake on one end of a pipe and returns a peer on
// the other end and the handshake's result.
func startServer(t *testing.T, psk []byte, timeout time.Duration) (*peer, <-chan serverResult) {
	c, s := net.Pipe()
	t.Cleanup(func() { s.Close() })
	done := make(chan serverResult, 1)
	go func() {
		vm, err := ServerHandshake(s, psk, timeout)
		done <- serverResult{vm, err}
	}()
	return newPeer(t, c), done
}

func TestHandshake(t *testing.T) {
	c, s := net.Pipe()
	defer c.Close()
	defer s.Close()
	const timeout = 50 * time.Millisecond
	done := make(chan serverResult, 1)
	go func() {
		vm, err := ServerHandshake(s, testKey, timeout)
		done <- serverResult{vm, err}
	}()
	if err := ClientHandshake(c, testKey, "vm-1", timeout); err != nil {
		t.Fatalf("client: %v", err)
	}
	res := <-done
	if res.err != nil || res.vm != "vm-1" {
		t.Fatalf("server: vm %q, %v", res.vm, res.err)
	}

	// The handshake deadline is gone and no byte after it was consumed:
	// frames sent right after the Welcome reach the stream's own Reader.
	time.Sleep(2 * timeout)
	go func() {
		w := NewWriter(s, 0)
		w.WriteFrame(Heartbeat{SentUnixNano: 1, LastCommitted: 2}.Frame())
		w.Flush()
	}()
	f, err := NewReader(c, 0).ReadFrame()
	if err != nil {
		t.Fatalf("first frame after the handshake: %v", err)
	}
	if hb, err := DecodeHeartbeat(f); err != nil || hb.LastCommitted != 2 {
		t.Fatalf("first frame after the handshake: %+v, %v", hb, err)
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
			h := p.hello("vm-1", 1, 1)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: proof(otherKey, "ax-client", &c.Nonce, &h.Nonce, "vm-1")}.frame())
		}, nil},
		{"proof for another vm", 0, func(p *peer) {
			h := p.hello("vm-1", 1, 1)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: proof(testKey, "ax-client", &c.Nonce, &h.Nonce, "vm-2")}.frame())
		}, nil},
		{"server's proof reflected", 0, func(p *peer) {
			p.hello("vm-1", 1, 1)
			f, _ := p.recv()
			c, _ := decodeChallenge(f)
			p.send(response{MAC: c.MAC}.frame())
		}, nil},
		{"truncated response", 0, func(p *peer) {
			p.hello("vm-1", 1, 1)
			p.recv()
			wire := encode(p.t, response{}.frame())
			p.sendRaw(wire[:HeaderSize+5])
			p.conn.Close()
		}, nil},
		{"closed before hello", 0, func(p *peer) { p.conn.Close() }, nil},
		{"truncated hello", 0, func(p *peer) {
			wire := encode(p.t, hello{MinVersion: 1, MaxVersion: 1, VM: "vm-1"}.frame())
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
			p.hello(strings.Repeat("v", 300), 1, 1)
		}, ErrMalformed},
		{"hello with a bad checksum", 0, func(p *peer) {
			wire := encode(p.t, hello{MinVersion: 1, MaxVersion: 1, VM: "vm-1"}.frame())
			wire[len(wire)-1] ^= 1
			p.sendRaw(wire)
		}, ErrChecksum},
		{"response instead of hello", 0, func(p *peer) {
			p.send(response{}.frame())
		}, ErrUnexpectedType},
		{"welcome instead of response", 0, func(p *peer) {
			p.hello("vm-1", 1, 1)
			p.recv()
			p.send(welcome{Version: 1}.frame())
		}, ErrUnexpectedType},
		{"no common version", 0, func(p *peer) {
			p.hello("vm-1", 2, 9)
		}, nil},
		{"silent client", 100 * time.Millisecond, func(p *peer) {}, os.ErrDeadlineExceeded},
		{"client stalls after hello", 100 * time.Millisecond, func(p *peer) {
			p.hello("vm-1", 1, 1)
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
	h := p.hello("vm-1", 1, 1)
	f, _ := p.recv()
	c, _ := decodeChallenge(f)
	recorded := response{MAC: proof(testKey, "ax-client", &c.Nonce, &h.Nonce, "vm-1")}
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

func TestServerHandshakeFuncUnknownVM(t *testing.T) {
	c, s := net.Pipe()
	done := make(chan serverResult, 1)
	go func() {
		vm, err := ServerHandshakeFunc(s, func(vm string) []byte {
			if vm == "known" {
				return testKey
			}
			return nil
		}, 0)
		done <- serverResult{vm, err}
	}()
	p := newPeer(t, c)
	p.hello("stranger", 1, 1)
	if res := <-done; !errors.Is(res.err, ErrAuth) {
		t.Fatalf("unknown vm: %v, want ErrAuth", res.err)
	}
	if ts := types(p.rest()); len(ts) != 1 || ts[0] != TypeReject {
		t.Fatalf("server sent %v, want only a Reject", ts)
	}
}

// startClient runs ClientHandshake on one end of a pipe and returns a peer on
// the other end and the handshake's error.
func startClient(t *testing.T, psk []byte, timeout time.Duration) (*peer, <-chan error) {
	c, s := net.Pipe()
	t.Cleanup(func() { c.Close() })
	done := make(chan error, 1)
	go func() { done <- ClientHandshake(c, psk, "vm-1", timeout) }()
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
		old.MAC = proof(testKey, "ax-server", &h.Nonce, &old.Nonce, "vm-1")
		p.send(old.frame())
		p.recv()
		p.send(welcome{Version: 1}.frame())
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
			c := challenge{}
			rand.Read(c.Nonce[:])
			c.MAC = proof(otherKey, "ax-server", &h.Nonce, &c.Nonce, h.VM)
			p.send(c.frame())
		}, nil},
		{"server replays an old challenge", 0, func(p *peer, h hello) { p.send(old.frame()) }, nil},
		{"server reflects the client's nonce", 0, func(p *peer, h hello) {
			c := challenge{Nonce: h.Nonce}
			c.MAC = proof(otherKey, "ax-server", &h.Nonce, &c.Nonce, h.VM)
			p.send(c.frame())
		}, nil},
		{"server rejects", 0, func(p *peer, h hello) { p.send(rejectFrame()) }, nil},
		{"server sends garbage", 0, func(p *peer, h hello) { p.sendRaw(bytes.Repeat([]byte{0xff}, 64)) }, ErrBadMagic},
		{"server hangs up", 0, func(p *peer, h hello) { p.conn.Close() }, nil},
		{"server never answers", 100 * time.Millisecond, func(p *peer, h hello) {}, os.ErrDeadlineExceeded},
		{"server welcomes an unknown version", 0, func(p *peer, h hello) {
			c := challenge{}
			rand.Read(c.Nonce[:])
			c.MAC = proof(testKey, "ax-server", &h.Nonce, &c.Nonce, h.VM)
			p.send(c.frame())
			p.recv()
			p.send(welcome{Version: 7}.frame())
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
			if strings.HasPrefix(tc.name, "server without") || strings.Contains(tc.name, "replays") || strings.Contains(tc.name, "reflects") {
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
		vm, err := ServerHandshake(s, otherKey, 0)
		done <- serverResult{vm, err}
	}()
	if err := ClientHandshake(c, testKey, "vm-1", 0); !errors.Is(err, ErrAuth) {
		t.Fatalf("client: %v, want ErrAuth", err)
	}
	if res := <-done; !errors.Is(res.err, ErrAuth) {
		t.Fatalf("server: %v, want ErrAuth", res.err)
	}
}

func TestHandshakeWeakKey(t *testing.T) {
	for _, key := range [][]byte{nil, {}, []byte("fifteen bytes!!")} {
		c, s := net.Pipe()
		err := ClientHandshake(c, key, "vm-1", 0)
		if !errors.Is(err, ErrWeakKey) || !strings.Contains(err.Error(), "at least 16") {
			t.Errorf("client with a %d-byte key: %v", len(key), err)
		}
		_, err = ServerHandshake(s, key, 0)
		if !errors.Is(err, ErrWeakKey) {
			t.Errorf("server with a %d-byte key: %v", len(key), err)
		}
		// Both ends closed their connection without writing.
		if _, err := c.Write([]byte{0}); err == nil {
			t.Error("connection still open after a refused key")
		}
	}
}

func TestClientHandshakeBadVMName(t *testing.T) {
	for _, vm := range []string{"", strings.Repeat("x", MaxVMNameLen+1), "a\nb", "\xff"} {
		c, _ := net.Pipe()
		if err := ClientHandshake(c, testKey, vm, 0); err == nil {
			t.Errorf("vm name %q accepted", vm)
		}
	}
}
