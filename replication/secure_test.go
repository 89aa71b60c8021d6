package replication

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/identity/identitytest"
)

// tcpPair returns both ends of a loopback TCP connection: TLS needs the
// kernel's buffering, which net.Pipe lacks.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// bufConn is a net.Conn that reads from r and records what is written.
type bufConn struct {
	r      io.Reader
	w      bytes.Buffer
	closed bool
}

func (c *bufConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *bufConn) Write(p []byte) (int, error)      { return c.w.Write(p) }
func (c *bufConn) Close() error                     { c.closed = true; return nil }
func (c *bufConn) LocalAddr() net.Addr              { return nil }
func (c *bufConn) RemoteAddr() net.Addr             { return nil }
func (c *bufConn) SetDeadline(time.Time) error      { return nil }
func (c *bufConn) SetReadDeadline(time.Time) error  { return nil }
func (c *bufConn) SetWriteDeadline(time.Time) error { return nil }

var (
	testAuth = authenticated{vm: "vm1", version: ProtocolVersion, clientNonce: [nonceSize]byte{1}, serverNonce: [nonceSize]byte{2}}
	testC2S  = deriveSealKey(testStreamKey, labelClientToServer, testAuth)
	testS2C  = deriveSealKey(testStreamKey, labelServerToClient, testAuth)
)

// sealRecords seals each chunk (at most maxRecord bytes) as one record
// under k and returns the records' wire bytes.
func sealRecords(t testing.TB, k sealKey, chunks ...[]byte) [][]byte {
	t.Helper()
	out := &bufConn{r: bytes.NewReader(nil)}
	c, err := newSealedConn(out, k, k)
	if err != nil {
		t.Fatal(err)
	}
	var recs [][]byte
	for _, ch := range chunks {
		out.w.Reset()
		if _, err := c.Write(ch); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, bytes.Clone(out.w.Bytes()))
	}
	return recs
}

// openAll reads the sealed stream wire under k until it ends.
func openAll(t testing.TB, k sealKey, wire []byte) (plain []byte, err error, closed bool) {
	t.Helper()
	in := &bufConn{r: bytes.NewReader(wire)}
	c, err := newSealedConn(in, k, k)
	if err != nil {
		t.Fatal(err)
	}
	plain, err = io.ReadAll(c)
	return plain, err, in.closed
}

func TestSealedConnRoundTrip(t *testing.T) {
	c, s := tcpPair(t)
	sc, err := newSealedConn(c, testC2S, testS2C)
	if err != nil {
		t.Fatal(err)
	}
	ss, err := newSealedConn(s, testS2C, testC2S)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{1, 100, maxRecord - 1, maxRecord, maxRecord + 1, recordBatch*maxRecord + 3, 3 << 20} {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(i*7 + n)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := sc.Write(data)
			errc <- err
		}()
		got := make([]byte, n)
		// A small reader buffer takes a record in several reads.
		if _, err := io.ReadFull(io.LimitReader(ss, int64(n)), got); err != nil {
			t.Fatalf("%d bytes: read: %v", n, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("%d bytes: write: %v", n, err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%d bytes: came out different", n)
		}
		// The other direction, with its own key.
		go func() {
			_, err := ss.Write(data[:min(n, 1000)])
			errc <- err
		}()
		back := make([]byte, min(n, 1000))
		if _, err := io.ReadFull(sc, back); err != nil || !bytes.Equal(back, data[:len(back)]) {
			t.Fatalf("%d bytes back: %v", n, err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	// On the wire: no plaintext, and the overhead is the records' headers
	// and tags.
	if err := sc.Close(); err != nil {
		t.Fatal(err)
	}
	if err := sc.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := ss.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after the peer closed: %v, want EOF", err)
	}
}

func TestSealedConnWire(t *testing.T) {
	secret := bytes.Repeat([]byte("guest page secret "), 10000)
	out := &bufConn{r: bytes.NewReader(nil)}
	c, _ := newSealedConn(out, testC2S, testC2S)
	if _, err := c.Write(secret); err != nil {
		t.Fatal(err)
	}
	wire := out.w.Bytes()
	if bytes.Contains(wire, []byte("guest page")) {
		t.Fatal("plaintext on the wire")
	}
	records := (len(secret) + maxRecord - 1) / maxRecord
	if want := len(secret) + records*(recordHeader+recordTag); len(wire) != want {
		t.Fatalf("%d bytes on the wire for %d of data, want %d", len(wire), len(secret), want)
	}
	plain, err, _ := openAll(t, testC2S, wire)
	if err != nil || !bytes.Equal(plain, secret) {
		t.Fatalf("reopened: %d bytes, %v", len(plain), err)
	}
}

// Whatever happens to the records in transit, the reader returns only
// what was sealed, in order, up to the first record that does not open,
// and then fails for good and closes the connection.
func TestSealedConnRefuses(t *testing.T) {
	a, b, c := []byte("first record"), []byte("second record"), []byte("third record")
	recs := sealRecords(t, testC2S, a, b, c)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	flip := func(rec []byte, i int) []byte {
		r := bytes.Clone(rec)
		r[i] ^= 0x01
		return r
	}
	withLen := func(n uint32) []byte {
		r := bytes.Clone(recs[1])
		le.PutUint32(r, n)
		return r
	}
	for _, tc := range []struct {
		name  string
		wire  []byte
		key   sealKey
		plain []byte // what comes out before the error
		err   error
	}{
		{"intact", cat(recs...), testC2S, cat(a, b, c), nil},
		{"bit flipped in the ciphertext", cat(recs[0], flip(recs[1], recordHeader+2), recs[2]), testC2S, a, ErrRecord},
		{"bit flipped in the tag", cat(recs[0], flip(recs[1], len(recs[1])-1), recs[2]), testC2S, a, ErrRecord},
		{"length shortened", cat(recs[0], withLen(uint32(len(recs[1])-recordHeader-1)), recs[2]), testC2S, a, ErrRecord},
		{"record replayed", cat(recs[0], recs[1], recs[1], recs[2]), testC2S, cat(a, b), ErrRecord},
		{"first record replayed later", cat(recs[0], recs[1], recs[0]), testC2S, cat(a, b), ErrRecord},
		{"records swapped", cat(recs[0], recs[2], recs[1]), testC2S, a, ErrRecord},
		{"record dropped", cat(recs[0], recs[2]), testC2S, a, ErrRecord},
		{"record injected in plaintext", cat(recs[0], encode(t, Frame{Type: TypeBye}), recs[1]), testC2S, a, ErrRecord},
		{"reflected: sealed for the other direction", cat(recs...), testS2C, nil, ErrRecord},
		{"declared length zero", cat(recs[0], withLen(0)), testC2S, a, ErrRecord},
		{"declared length only a tag", cat(recs[0], withLen(recordTag)), testC2S, a, ErrRecord},
		{"declared length over the limit", cat(recs[0], withLen(maxSealed+1)), testC2S, a, ErrRecord},
		{"cut inside a record", cat(recs[0], recs[1][:len(recs[1])-3]), testC2S, a, io.ErrUnexpectedEOF},
		{"cut inside a header", cat(recs[0], recs[1][:2]), testC2S, a, io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plain, err, closed := openAll(t, tc.key, tc.wire)
			if !bytes.Equal(plain, tc.plain) {
				t.Errorf("read %q, want %q", plain, tc.plain)
			}
			if tc.err == nil && err != nil || tc.err != nil && !errors.Is(err, tc.err) {
				t.Fatalf("error %v, want %v", err, tc.err)
			}
			if errors.Is(tc.err, ErrRecord) != closed {
				t.Errorf("connection closed: %v", closed)
			}
			t.Logf("%v", err)
		})
	}
}

// A read deadline that expires inside a record loses nothing: the record
// completes on the next read.
func TestSealedConnDeadlineInsideRecord(t *testing.T) {
	c, s := tcpPair(t)
	ss, _ := newSealedConn(s, testS2C, testC2S)
	rec := sealRecords(t, testC2S, []byte("a whole record"))[0]
	if _, err := c.Write(rec[:7]); err != nil {
		t.Fatal(err)
	}
	ss.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := ss.Read(make([]byte, 64)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read of half a record: %v, want a timeout", err)
	}
	ss.SetReadDeadline(time.Time{})
	if _, err := c.Write(rec[7:]); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := ss.Read(buf)
	if err != nil || string(buf[:n]) != "a whole record" {
		t.Fatalf("after the timeout: %q, %v", buf[:n], err)
	}
}

// Each direction, and each session, has its own key.
func TestSealKeysDiffer(t *testing.T) {
	other := func(f func(*authenticated)) sealKey {
		a := testAuth
		f(&a)
		return deriveSealKey(testStreamKey, labelClientToServer, a)
	}
	keys := map[string]sealKey{
		"base":               testC2S,
		"other direction":    testS2C,
		"other client nonce": other(func(a *authenticated) { a.clientNonce[5] ^= 1 }),
		"other server nonce": other(func(a *authenticated) { a.serverNonce[5] ^= 1 }),
		"other vm":           other(func(a *authenticated) { a.vm = "vm2" }),
		"other version":      other(func(a *authenticated) { a.version = ProtocolVersion + 1 }),
		"other key":          deriveSealKey(otherStreamKey, labelClientToServer, testAuth),
	}
	seen := map[[sealKeySize]byte]string{}
	for name, k := range keys {
		if prev, dup := seen[k.key]; dup {
			t.Errorf("%s and %s have the same key", name, prev)
		}
		seen[k.key] = name
	}
}

func TestTLSHandshake(t *testing.T) {
	_, ids := identitytest.PKI(t, "a", "b", "c", "x", "w")
	_, foreign := identitytest.PKI(t, "a")
	// rawTLS is a client that skips ClientHandshake's own checks, as a
	// hostile one would.
	rawTLS := func(id *identity.Identity, server string) func(net.Conn) error {
		return func(conn net.Conn) error {
			tc := tls.Client(conn, id.ClientConfig(identity.Want(server, identity.RoleHost)))
			if err := tc.Handshake(); err != nil {
				return err
			}
			cs := tc.ConnectionState()
			key, _ := cs.ExportKeyingMaterial(exporterLabel, nil, 32)
			_, err := clientAuth(tc, key, "vm1", time.Now().Add(5*time.Second))
			return err
		}
	}
	dial := func(sec Security, peer string) func(net.Conn) error {
		return func(conn net.Conn) error {
			_, err := ClientHandshake(conn, sec, peer, "vm1", 0)
			return err
		}
	}
	for _, tc := range []struct {
		name      string
		server    Security
		allow     []string
		client    func(net.Conn) error
		ok        bool
		clientErr error // the client's error wraps it, when set
	}{
		{"partner", Security{Identity: ids["b"]}, []string{"a"}, dial(Security{Identity: ids["a"]}, "b"), true, nil},
		{"client not on the allow-list", Security{Identity: ids["b"]}, []string{"a"}, dial(Security{Identity: ids["c"]}, "b"), false, ErrAuth},
		{"witness certificate", Security{Identity: ids["b"]}, []string{"a", "w"}, rawTLS(ids["w"], "b"), false, nil},
		{"another CA's certificate with a partner's name", Security{Identity: ids["b"]}, []string{"a"}, dial(Security{Identity: foreign["a"]}, "b"), false, ErrAuth},
		{"server answers with another host's certificate", Security{Identity: ids["x"]}, []string{"a"}, dial(Security{Identity: ids["a"]}, "b"), false, identity.ErrPeer},
		{"psk client to a tls server", Security{Identity: ids["b"]}, []string{"a"}, dial(Security{PSK: testKey}, "b"), false, ErrAuth},
		{"tls client to a psk server", Security{PSK: testKey}, nil, dial(Security{Identity: ids["a"]}, "b"), false, ErrAuth},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := tcpPair(t)
			type result struct {
				a   Authenticated
				err error
			}
			done := make(chan result, 1)
			go func() {
				a, err := ServerHandshake(s, tc.server, tc.allow, 5*time.Second)
				done <- result{a, err}
			}()
			cerr := tc.client(c)
			if !tc.ok {
				// TLS 1.3: the client may finish before the server
				// refuses its certificate; closing ends the wait.
				c.Close()
			}
			res := <-done
			if tc.ok {
				if cerr != nil || res.err != nil {
					t.Fatalf("client %v, server %v", cerr, res.err)
				}
				if res.a.Peer != "a" || res.a.VM != "vm1" {
					t.Fatalf("server authenticated %+v", res.a)
				}
				if _, isTLS := res.a.Conn.(*tls.Conn); !isTLS {
					t.Fatalf("server stream is a %T, want TLS", res.a.Conn)
				}
				return
			}
			if cerr == nil {
				t.Error("client handshake succeeded")
			}
			if tc.clientErr != nil && !errors.Is(cerr, tc.clientErr) {
				t.Errorf("client error %v, want %v", cerr, tc.clientErr)
			}
			if !errors.Is(res.err, ErrAuth) || res.a.Conn != nil || res.a.VM != "" {
				t.Fatalf("server: %+v, %v; want a refusal", res.a, res.err)
			}
			t.Logf("client: %v\nserver: %v", cerr, res.err)
		})
	}
}

// relay is a TCP proxy between a primary and a secondary that sees whole
// units of the primary's bytes — frames, sealed records or TLS records —
// and can alter, drop, replay or inject them: the untrusted replication
// network.
type relay struct {
	t      *testing.T
	ln     net.Listener
	target string
	units  func(i int, head []byte) (headLen, n int) // cuts the primary's bytes

	mu       sync.Mutex
	hook     func(i int, unit []byte) [][]byte
	fired    int
	captured []byte   // every byte the primary sent
	seen     [][]byte // every unit the primary sent, in order
	toServer net.Conn
	wmu      sync.Mutex // one unit or injection at a time to the server
	wg       sync.WaitGroup
}

// unitsOf cuts a stream in mode: frames (plain), two handshake frames then
// sealed records (psk), TLS records (tls).
func unitsOf(mode string) func(i int, head []byte) (int, int) {
	frame := func(head []byte) (int, int) {
		if len(head) < HeaderSize {
			return HeaderSize, 0
		}
		return HeaderSize, HeaderSize + int(le.Uint32(head[6:])) + TrailerSize
	}
	switch mode {
	case "plain":
		return func(_ int, head []byte) (int, int) { return frame(head) }
	case "psk":
		return func(i int, head []byte) (int, int) {
			if i < 2 {
				return frame(head)
			}
			if len(head) < recordHeader {
				return recordHeader, 0
			}
			return recordHeader, recordHeader + int(le.Uint32(head))
		}
	}
	return func(_ int, head []byte) (int, int) {
		if len(head) < 5 {
			return 5, 0
		}
		return 5, 5 + (int(head[3])<<8 | int(head[4]))
	}
}

func newRelay(t *testing.T, target, mode string) *relay {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{t: t, ln: ln, target: target, units: unitsOf(mode)}
	r.wg.Add(1)
	go r.accept()
	t.Cleanup(func() {
		ln.Close()
		r.mu.Lock()
		if r.toServer != nil {
			r.toServer.Close()
		}
		r.mu.Unlock()
		r.wg.Wait()
	})
	return r
}

func (r *relay) addr() string { return r.ln.Addr().String() }

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.toServer = s
		r.mu.Unlock()
		r.wg.Add(2)
		go func() { // secondary → primary, untouched
			defer r.wg.Done()
			io.Copy(c, s)
			c.Close()
			s.Close()
		}()
		go func() {
			defer r.wg.Done()
			r.forward(c, s)
			c.Close()
			s.Close()
		}()
	}
}

func (r *relay) forward(c, s net.Conn) {
	for i := 0; ; i++ {
		hl, _ := r.units(i, nil)
		head := make([]byte, hl)
		if _, err := io.ReadFull(c, head); err != nil {
			return
		}
		_, n := r.units(i, head)
		unit := make([]byte, n)
		copy(unit, head)
		if _, err := io.ReadFull(c, unit[hl:]); err != nil {
			return
		}
		r.mu.Lock()
		r.captured = append(r.captured, unit...)
		r.seen = append(r.seen, unit)
		out := [][]byte{unit}
		if r.hook != nil {
			if alt := r.hook(i, bytes.Clone(unit)); alt != nil {
				out = alt
				r.fired++
			}
		}
		r.mu.Unlock()
		r.wmu.Lock()
		for _, u := range out {
			s.Write(u)
		}
		r.wmu.Unlock()
	}
}

// setHook has hook see every later unit of the primary's; a non-nil result
// replaces the unit.
func (r *relay) setHook(hook func(i int, unit []byte) [][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hook = hook
}

// inject sends b to the secondary between two units.
func (r *relay) inject(b []byte) {
	r.mu.Lock()
	s := r.toServer
	r.fired++
	r.mu.Unlock()
	r.wmu.Lock()
	defer r.wmu.Unlock()
	s.Write(b)
}

func (r *relay) stats() (fired int, captured []byte, seen int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fired, bytes.Clone(r.captured), len(r.seen)
}

func (r *relay) unit(i int) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.seen[i])
}

// fixCRC recomputes a frame's trailer after an edit, as an attacker on an
// unprotected wire would.
func fixCRC(frame []byte) {
	n := len(frame) - TrailerSize
	f := Frame{Type: FrameType(frame[3]), Epoch: le.Uint64(frame[10:]), Payload: frame[HeaderSize:n]}
	var buf bytes.Buffer
	w := NewWriter(&buf, 0)
	w.WriteFrame(f)
	w.Flush()
	copy(frame[n:], buf.Bytes()[n:])
}

// securityModes are the three ways to run a stream: the unprotected wire
// as a control, PSK and TLS.
type securityMode struct {
	name           string
	client, server Security
	peer           string   // the secondary's name, for the primary
	allow          []string // the primaries the secondary accepts
	authPeer       string   // the name the secondary's Open sees
}

func securityModes(t *testing.T) []securityMode {
	_, ids := identitytest.PKI(t, "pa", "sb")
	return []securityMode{
		{name: "plain", client: Security{PSK: testKey, plain: true}, server: Security{PSK: testKey, plain: true}},
		{name: "psk", client: Security{PSK: testKey}, server: Security{PSK: testKey}},
		{name: "tls", client: Security{Identity: ids["pa"]}, server: Security{Identity: ids["sb"]},
			peer: "sb", allow: []string{"pa"}, authPeer: "pa"},
	}
}

// The network between primary and secondary is hostile. Each attack is
// tried in each mode; on the unprotected wire it works (so each check can
// fail), with PSK or TLS it is detected, the connection dropped and nothing
// applied.
func TestRelayTampering(t *testing.T) {
	const ramSize = 16 * PageSize
	spec := []byte(`{"name":"vm1","memory":"1G"}`)
	secret := bytes.Repeat([]byte("AX-SECRET-GUEST-PAGE-"), PageSize)[:PageSize]
	page := func(b byte) []byte { return bytes.Repeat([]byte{b}, PageSize) }
	specAt := bytes.Index(spec, []byte("1G"))

	for _, mode := range securityModes(t) {
		for _, attack := range []string{"none", "flip a bit", "inject a bye", "rewrite the spec", "replay a record"} {
			if mode.name == "plain" && attack == "replay a record" {
				continue // the plain wire has no records to replay; shown for frames by the others
			}
			t.Run(mode.name+"/"+attack, func(t *testing.T) {
				rep, err := OpenReplica(t.TempDir(), ramSize)
				if err != nil {
					t.Fatal(err)
				}
				defer rep.Close()
				var mu sync.Mutex
				var opened []string
				ends := make(chan streamEnd, 4)
				acks := make(chan uint64, 4)
				addr := serveHandler(t, mode.server, mode.allow, Handler{
					Open: func(vm, peer string, spec []byte, _ net.Addr) (*Replica, error) {
						mu.Lock()
						defer mu.Unlock()
						opened = append(opened, string(spec))
						if peer != mode.authPeer {
							t.Errorf("open by peer %q, want %q", peer, mode.authPeer)
						}
						return rep, nil
					},
					Committed: func(vm string, epoch uint64, m Marker) { acks <- epoch },
					Ended:     func(vm string, bye, handover bool, err error) { ends <- streamEnd{bye, handover, err} },
				})
				rl := newRelay(t, addr, mode.name)
				end := func() streamEnd {
					t.Helper()
					select {
					case e := <-ends:
						return e
					case <-time.After(10 * time.Second):
						t.Fatal("the secondary did not end the stream")
						return streamEnd{}
					}
				}

				if attack == "rewrite the spec" {
					rl.setHook(func(i int, u []byte) [][]byte {
						frameLen := HeaderSize + len(spec) + TrailerSize
						switch {
						case mode.name == "plain" && len(u) == frameLen && FrameType(u[3]) == TypeSpec:
							u[HeaderSize+specAt] = '9'
							fixCRC(u)
						case mode.name == "psk" && len(u) == recordHeader+frameLen+recordTag:
							// AES-GCM is a stream cipher underneath:
							// flipping ciphertext bits flips the same
							// plaintext bits, unless the tag is checked.
							u[recordHeader+HeaderSize+specAt] ^= '1' ^ '9'
						case mode.name == "tls" && len(u) == 5+frameLen+1+16:
							u[5+HeaderSize+specAt] ^= '1' ^ '9'
						default:
							return nil
						}
						return [][]byte{u}
					})
				}
				s, err := Dial(t.Context(), rl.addr(), mode.client, mode.peer, "vm1", spec, ramSize)
				if attack == "rewrite the spec" {
					if fired, _, _ := rl.stats(); fired != 1 {
						t.Fatalf("the relay found no spec to rewrite (%d edits)", fired)
					}
					mu.Lock()
					got := opened
					mu.Unlock()
					if mode.name == "plain" {
						if err != nil || len(got) != 1 || !strings.Contains(got[0], "9G") {
							t.Fatalf("control: the rewrite did not get through on the plain wire: %v, %q", err, got)
						}
						s.Close()
						return
					}
					if err == nil {
						s.Close()
						t.Fatal("dial succeeded through a relay that rewrote the spec")
					}
					if len(got) != 0 {
						t.Fatalf("opened with %q", got)
					}
					if e := end(); e.bye || e.err == nil {
						t.Fatalf("end %+v", e)
					}
					t.Logf("dial: %v", err)
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				defer s.Close()

				if err := s.SendSync([]uint64{0, 1}, append(bytes.Clone(secret), secret...)); err != nil {
					t.Fatal(err)
				}
				if err := s.SyncDone(); err != nil {
					t.Fatal(err)
				}
				if err := s.SendCheckpoint(1, []uint64{2}, page(1), []byte("dev1"), -1); err != nil {
					t.Fatal(err)
				}
				if got := <-acks; got != 1 {
					t.Fatalf("committed %d", got)
				}
				_, _, after := rl.stats()

				detected := mode.name != "plain"
				switch attack {
				case "none":
					if err := s.Bye(); err != nil {
						t.Fatal(err)
					}
					if e := end(); !e.bye {
						t.Fatalf("end %+v, want bye", e)
					}
					detected = false
				case "flip a bit":
					rl.setHook(func(i int, u []byte) [][]byte {
						if len(u) < 512 {
							return nil // a heartbeat perhaps: aim at pages
						}
						rl.hook = nil
						u[len(u)/2] ^= 0x10
						return [][]byte{u}
					})
					s.SendCheckpoint(2, []uint64{2, 3}, append(page(9), page(9)...), []byte("dev2"), -1)
					detected = true // on the plain wire the CRC catches a bit flip too
					if e := end(); e.bye || e.err == nil {
						t.Fatalf("end %+v, want an error", e)
					} else {
						t.Logf("end: %v", e.err)
					}
				case "inject a bye":
					rl.inject(encode(t, Frame{Type: TypeBye}))
					e := end()
					if mode.name == "plain" {
						if !e.bye {
							t.Fatalf("control: the injected bye did not get through on the plain wire: %+v", e)
						}
						break
					}
					if e.bye || e.err == nil {
						t.Fatalf("end %+v, want an error", e)
					}
					t.Logf("end: %v", e.err)
				case "replay a record":
					// A unit that carried pages (TLS sends the first ones
					// in small records), sent again after checkpoint 1.
					var old []byte
					for i := after - 1; i >= 0 && old == nil; i-- {
						if u := rl.unit(i); len(u) > 1000 {
							old = u
						}
					}
					if old == nil {
						t.Fatal("no record of pages recorded")
					}
					rl.inject(old)
					if e := end(); e.bye || e.err == nil {
						t.Fatalf("end %+v, want an error", e)
					} else {
						t.Logf("end: %v", e.err)
					}
				}
				if fired, _, _ := rl.stats(); attack != "none" && fired == 0 {
					t.Fatal("the relay did not attack")
				}
				// Nothing applied past checkpoint 1.
				if epoch, _ := rep.Committed(); epoch != 1 {
					t.Errorf("replica committed %d, want 1", epoch)
				}
				ram, _ := os.ReadFile(rep.RAMPath())
				if !bytes.Equal(ram[2*PageSize:3*PageSize], page(1)) || !bytes.Equal(ram[3*PageSize:4*PageSize], page(0)) {
					t.Error("replica pages changed after the stream was tampered with")
				}
				if !detected {
					mu.Lock()
					defer mu.Unlock()
					if len(opened) != 1 || opened[0] != string(spec) {
						t.Errorf("opened %q", opened)
					}
				}

				// Confidentiality: the guest's pages never cross in clear,
				// except on the unprotected control.
				_, captured, _ := rl.stats()
				if leaked := bytes.Contains(captured, secret[:64]); leaked != (mode.name == "plain") {
					t.Errorf("guest page visible to the relay: %v", leaked)
				}
			})
		}
	}
}

// A relay that edits the version range a primary offers is caught by the
// proofs, which cover it: no downgrade, no stream.
func TestRelayEditsVersionRange(t *testing.T) {
	for _, tc := range []struct {
		name     string
		min, max uint8
	}{
		{"older minimum", 1, ProtocolVersion},
		{"newer maximum", MinProtocolVersion, ProtocolVersion + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opened int
			var mu sync.Mutex
			addr := serveHandler(t, Security{PSK: testKey}, nil, Handler{
				Open: func(string, string, []byte, net.Addr) (*Replica, error) {
					mu.Lock()
					opened++
					mu.Unlock()
					return nil, errors.New("no")
				},
			})
			rl := newRelay(t, addr, "psk")
			rl.setHook(func(i int, u []byte) [][]byte {
				if i != 0 || FrameType(u[3]) != TypeHello {
					return nil
				}
				u[HeaderSize], u[HeaderSize+1] = tc.min, tc.max
				fixCRC(u)
				return [][]byte{u}
			})
			_, err := Dial(t.Context(), rl.addr(), Security{PSK: testKey}, "", "vm1", []byte(`{}`), PageSize)
			if !errors.Is(err, ErrAuth) {
				t.Fatalf("dial: %v, want ErrAuth", err)
			}
			if fired, _, _ := rl.stats(); fired != 1 {
				t.Fatalf("the relay edited %d hellos", fired)
			}
			mu.Lock()
			defer mu.Unlock()
			if opened != 0 {
				t.Fatal("the secondary opened a replica")
			}
			t.Logf("dial: %v", err)
		})
	}
}

// Dial refuses a secondary that is not the partner asked for, and a
// secondary refuses a primary not on its list, before any Open.
func TestStreamTLSRefusals(t *testing.T) {
	_, ids := identitytest.PKI(t, "pa", "sb", "pc", "sx")
	for _, tc := range []struct {
		name   string
		server Security
		client Security
		want   error
	}{
		{"primary not a partner", Security{Identity: ids["sb"]}, Security{Identity: ids["pc"]}, ErrAuth},
		{"secondary with another host's certificate", Security{Identity: ids["sx"]}, Security{Identity: ids["pa"]}, identity.ErrPeer},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			opened := 0
			addr := serveHandler(t, tc.server, []string{"pa"}, Handler{
				Open: func(string, string, []byte, net.Addr) (*Replica, error) {
					mu.Lock()
					opened++
					mu.Unlock()
					return nil, errors.New("no")
				},
			})
			_, err := Dial(t.Context(), addr, tc.client, "sb", "vm1", []byte(`{}`), PageSize)
			if !errors.Is(err, ErrAuth) || !errors.Is(err, tc.want) {
				t.Fatalf("dial: %v, want %v", err, tc.want)
			}
			mu.Lock()
			defer mu.Unlock()
			if opened != 0 {
				t.Fatal("the secondary opened a replica")
			}
			t.Logf("dial: %v", err)
		})
	}
}
