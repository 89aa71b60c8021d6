package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// testClient speaks the client side of NBD by hand, to drive the server
// with both valid and broken messages.
type testClient struct {
	t  testing.TB
	nc net.Conn
}

// pipe starts srv.ServeConn on one end of a net.Pipe and returns a client
// on the other and the channel ServeConn's result arrives on.
func pipe(t testing.TB, srv *Server) (*testClient, <-chan error) {
	t.Helper()
	cs, ss := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(t.Context(), ss) }()
	t.Cleanup(func() { cs.Close() })
	_ = cs.SetDeadline(time.Now().Add(10 * time.Second))
	return &testClient{t: t, nc: cs}, done
}

// result waits for ServeConn to return.
func result(t testing.TB, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not return")
		return nil
	}
}

func (c *testClient) write(b []byte) error {
	_, err := c.nc.Write(b)
	return err
}

func (c *testClient) mustWrite(b []byte) {
	c.t.Helper()
	if err := c.write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *testClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("client read %d bytes: %v", n, err)
	}
	return b
}

// closed reports whether the server closed the connection.
func (c *testClient) closed() bool {
	var b [1]byte
	_, err := c.nc.Read(b[:])
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe)
}

// greet reads the server greeting and sends client flags.
func (c *testClient) greet(flags uint32) {
	c.t.Helper()
	g := c.read(18)
	if string(g[:8]) != "NBDMAGIC" || string(g[8:16]) != "IHAVEOPT" {
		c.t.Fatalf("greeting %q", g)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.mustWrite(binary.BigEndian.AppendUint32(nil, flags))
}

func optionMsg(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (c *testClient) option(opt uint32, data []byte) { c.t.Helper(); c.mustWrite(optionMsg(opt, data)) }

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *testClient) optReply() optReply {
	c.t.Helper()
	h := c.read(20)
	if m := binary.BigEndian.Uint64(h); m != magicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = c.read(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// infoData is NBD_OPT_INFO/NBD_OPT_GO data asking for the given info types.
func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// exportInfo is what NBD_OPT_INFO/GO told about an export.
type exportInfo struct {
	size                 uint64
	tflags               uint16
	minBS, prefBS, maxBS uint32
}

// readInfo reads NBD_REP_INFO replies up to NBD_REP_ACK.
func (c *testClient) readInfo(opt uint32) exportInfo {
	c.t.Helper()
	var info exportInfo
	for {
		r := c.optReply()
		if r.opt != opt {
			c.t.Fatalf("reply to option %d, want %d", r.opt, opt)
		}
		switch r.typ {
		case repAck:
			return info
		case repInfo:
			switch binary.BigEndian.Uint16(r.data) {
			case infoExport:
				if len(r.data) != 12 {
					c.t.Fatalf("NBD_INFO_EXPORT length %d", len(r.data))
				}
				info.size = binary.BigEndian.Uint64(r.data[2:])
				info.tflags = binary.BigEndian.Uint16(r.data[10:])
			case infoBlockSize:
				if len(r.data) != 14 {
					c.t.Fatalf("NBD_INFO_BLOCK_SIZE length %d", len(r.data))
				}
				info.minBS = binary.BigEndian.Uint32(r.data[2:])
				info.prefBS = binary.BigEndian.Uint32(r.data[6:])
				info.maxBS = binary.BigEndian.Uint32(r.data[10:])
			}
		default:
			c.t.Fatalf("reply type %#x (%q) to option %d", r.typ, r.data, opt)
		}
	}
}

// connect handshakes with NBD_OPT_GO onto export name.
func (c *testClient) connect(name string) exportInfo {
	c.t.Helper()
	c.greet(flagCFixedNewstyle | flagCNoZeroes)
	c.option(optGo, infoData(name, infoBlockSize))
	return c.readInfo(optGo)
}

func requestMsg(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func (c *testClient) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	c.mustWrite(requestMsg(typ, flags, cookie, off, length, payload))
}

// reply reads a simple reply; readLen bytes of data follow a successful one.
func (c *testClient) reply(readLen int) (errno uint32, cookie uint64, data []byte) {
	c.t.Helper()
	h := c.read(16)
	if m := binary.BigEndian.Uint32(h); m != magicReply {
		c.t.Fatalf("reply magic %#x", m)
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && readLen > 0 {
		data = c.read(readLen)
	}
	return errno, cookie, data
}

// do sends one request and returns its reply's error value and data.
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	c.request(typ, flags, 7, off, length, payload)
	readLen := 0
	if typ == cmdRead {
		readLen = int(length)
	}
	errno, cookie, data := c.reply(readLen)
	if cookie != 7 {
		c.t.Fatalf("reply cookie %d, want 7", cookie)
	}
	return errno, data
}

func (c *testClient) disconnect() { c.t.Helper(); c.request(cmdDisc, 0, 0, 0, 0, nil) }

// call is one Backend call a recorder saw.
type call struct {
	op       string
	off, len int64
	fua      bool
}

func (c call) String() string { return fmt.Sprintf("%s(%d+%d fua=%v)", c.op, c.off, c.len, c.fua) }

// recorder is a Backend over a MemBackend that records calls and fails
// them with fail when it is set. It does not offer multi-conn.
type recorder struct {
	mem *MemBackend

	mu    sync.Mutex
	calls []call
	fail  map[string]error // by op
}

func newRecorder(size int) *recorder { return &recorder{mem: NewMemBackend(size)} }

func (r *recorder) record(c call) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, c)
	return r.fail[c.op]
}

func (r *recorder) failWith(op string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail == nil {
		r.fail = make(map[string]error)
	}
	r.fail[op] = err
}

func (r *recorder) Calls() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]call(nil), r.calls...)
}

func (r *recorder) Size() int64 { return r.mem.Size() }

func (r *recorder) ReadAt(p []byte, off int64) error {
	if err := r.record(call{"read", off, int64(len(p)), false}); err != nil {
		return err
	}
	return r.mem.ReadAt(p, off)
}

func (r *recorder) WriteAt(p []byte, off int64, fua bool) error {
	if err := r.record(call{"write", off, int64(len(p)), fua}); err != nil {
		return err
	}
	return r.mem.WriteAt(p, off, fua)
}

func (r *recorder) WriteZeroes(off, length int64, fua bool) error {
	if err := r.record(call{"zeroes", off, length, fua}); err != nil {
		return err
	}
	return r.mem.WriteZeroes(off, length, fua)
}

func (r *recorder) Trim(off, length int64) error {
	if err := r.record(call{"trim", off, length, false}); err != nil {
		return err
	}
	return r.mem.Trim(off, length)
}

func (r *recorder) Flush() error { return r.record(call{op: "flush"}) }

// newTestServer returns a server exporting a recorder of size bytes as
// "disk".
func newTestServer(t testing.TB, size int) (*Server, *recorder) {
	t.Helper()
	srv := NewServer(nil)
	rec := newRecorder(size)
	if err := srv.AddExport("disk", rec); err != nil {
		t.Fatal(err)
	}
	return srv, rec
}
