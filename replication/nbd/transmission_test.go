package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/replication/bufpool"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestRoundTrips(t *testing.T) {
	tests := []struct {
		name      string
		run       func(t *testing.T, c *testClient, mem *MemBackend)
		wantCalls []call
	}{
		{
			name: "write then read",
			run: func(t *testing.T, c *testClient, mem *MemBackend) {
				data := pattern(8192, 1)
				if e, _ := c.do(cmdWrite, 0, 4096, 8192, data); e != 0 {
					t.Fatalf("write: error %d", e)
				}
				e, got := c.do(cmdRead, 0, 4096, 8192, nil)
				if e != 0 || !bytes.Equal(got, data) {
					t.Fatalf("read back: error %d, equal %v", e, bytes.Equal(got, data))
				}
				if !bytes.Equal(mem.Bytes()[4096:4096+8192], data) {
					t.Error("backend content differs")
				}
			},
			wantCalls: []call{{"write", 4096, 8192, false}, {"read", 4096, 8192, false}},
		},
		{
			name: "unaligned write at the last byte",
			run: func(t *testing.T, c *testClient, mem *MemBackend) {
				if e, _ := c.do(cmdWrite, 0, testSize-1, 1, []byte{0x5a}); e != 0 {
					t.Fatalf("write: error %d", e)
				}
				if mem.Bytes()[testSize-1] != 0x5a {
					t.Error("last byte not written")
				}
			},
			wantCalls: []call{{"write", testSize - 1, 1, false}},
		},
		{
			name: "FUA reaches the backend",
			run: func(t *testing.T, c *testClient, _ *MemBackend) {
				c.do(cmdWrite, cmdFlagFUA, 0, 512, pattern(512, 2))
				c.do(cmdWriteZeroes, cmdFlagFUA, 512, 512, nil)
				c.do(cmdWriteZeroes, cmdFlagFUA|cmdFlagNoHole, 1024, 512, nil)
				c.do(cmdRead, cmdFlagFUA, 0, 512, nil) // FUA is valid, and meaningless, on a read
			},
			wantCalls: []call{{"write", 0, 512, true}, {"zeroes", 512, 512, true}, {"zeroes", 1024, 512, true}, {"read", 0, 512, false}},
		},
		{
			name: "flush",
			run: func(t *testing.T, c *testClient, _ *MemBackend) {
				c.do(cmdWrite, 0, 0, 512, pattern(512, 3))
				if e, _ := c.do(cmdFlush, 0, 0, 0, nil); e != 0 {
					t.Fatalf("flush: error %d", e)
				}
			},
			wantCalls: []call{{"write", 0, 512, false}, {op: "flush"}},
		},
		{
			name: "trim and write zeroes clear",
			run: func(t *testing.T, c *testClient, mem *MemBackend) {
				c.do(cmdWrite, 0, 0, 16384, pattern(16384, 4))
				c.do(cmdTrim, 0, 0, 4096, nil)
				c.do(cmdWriteZeroes, 0, 8192, 4096, nil)
				got := mem.Bytes()[:16384]
				want := pattern(16384, 4)
				clear(want[:4096])
				clear(want[8192:12288])
				if !bytes.Equal(got, want) {
					t.Error("content after trim and write zeroes differs")
				}
			},
			wantCalls: []call{{"write", 0, 16384, false}, {"trim", 0, 4096, false}, {"zeroes", 8192, 4096, false}},
		},
		{
			name: "trim with FUA flushes",
			run: func(t *testing.T, c *testClient, _ *MemBackend) {
				c.do(cmdTrim, cmdFlagFUA, 0, 4096, nil)
			},
			wantCalls: []call{{"trim", 0, 4096, false}, {op: "flush"}},
		},
		{
			name: "whole export in one request",
			run: func(t *testing.T, c *testClient, mem *MemBackend) {
				c.do(cmdWriteZeroes, 0, 0, testSize, nil)
				c.do(cmdTrim, 0, 0, testSize, nil)
			},
			wantCalls: []call{{"zeroes", 0, testSize, false}, {"trim", 0, testSize, false}},
		},
		{
			name: "zero-length requests do not reach the backend",
			run: func(t *testing.T, c *testClient, _ *MemBackend) {
				for _, typ := range []uint16{cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes} {
					if e, _ := c.do(typ, 0, testSize, 0, nil); e != 0 {
						t.Errorf("%s: error %d", commandName(typ), e)
					}
				}
			},
		},
		{
			name: "pipelined requests are answered in order",
			run: func(t *testing.T, c *testClient, mem *MemBackend) {
				const n = 16
				// Send everything first, as QEMU's mirror does, from another
				// goroutine: a net.Pipe has no buffer.
				sent := make(chan struct{})
				go func() {
					defer close(sent)
					for i := range n {
						if err := c.write(requestMsg(cmdWrite, 0, uint64(100+i), uint64(i)*4096, 4096, pattern(4096, byte(i)))); err != nil {
							t.Error(err)
							return
						}
					}
					c.write(requestMsg(cmdRead, 0, 999, 0, n*4096, nil))
				}()
				for i := range n {
					if e, cookie, _ := c.reply(0); e != 0 || cookie != uint64(100+i) {
						t.Fatalf("reply %d: error %d cookie %d", i, e, cookie)
					}
				}
				_, cookie, data := c.reply(n * 4096)
				<-sent
				for i := range n {
					if cookie != 999 || !bytes.Equal(data[i*4096:(i+1)*4096], pattern(4096, byte(i))) {
						t.Fatalf("block %d read back wrong", i)
					}
				}
			},
			wantCalls: func() []call {
				var cs []call
				for i := range 16 {
					cs = append(cs, call{"write", int64(i) * 4096, 4096, false})
				}
				return append(cs, call{"read", 0, 16 * 4096, false})
			}(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, rec := newTestServer(t, testSize)
			c, done := pipe(t, srv)
			c.connect("disk")
			tt.run(t, c, rec.mem)
			c.disconnect()
			if err := result(t, done); err != nil {
				t.Fatalf("ServeConn: %v", err)
			}
			if got := rec.Calls(); !slices.Equal(got, tt.wantCalls) {
				t.Errorf("backend calls\n got %v\nwant %v", got, tt.wantCalls)
			}
		})
	}
}

func TestMalformedRequests(t *testing.T) {
	const size = testSize
	tests := []struct {
		name    string
		msg     []byte
		close   bool // client hangs up after msg
		wantErr string
		wantIs  error
	}{
		{"bad magic", append([]byte{0xde, 0xad, 0xbe, 0xef}, requestMsg(cmdFlush, 0, 1, 0, 0, nil)[4:]...), false,
			"bad request magic 0xdeadbeef", ErrProtocol},
		{"read over max", requestMsg(cmdRead, 0, 1, 0, MaxPayload+1, nil), false,
			"NBD_CMD_READ of 33554433 bytes exceeds the 33554432-byte maximum", ErrProtocol},
		{"write over max", requestMsg(cmdWrite, 0, 1, 0, 1<<31, nil), false,
			"NBD_CMD_WRITE of 2147483648 bytes exceeds the 33554432-byte maximum", ErrProtocol},
		{"cache", requestMsg(5, 0, 1, 0, 512, nil), false, "unsupported request type NBD_CMD_CACHE", ErrProtocol},
		{"block status", requestMsg(7, 0, 1, 0, 512, nil), false, "unsupported request type NBD_CMD_BLOCK_STATUS", ErrProtocol},
		{"unknown type", requestMsg(0x4242, 0, 1, 0, 512, nil), false, "unsupported request type command 16962", ErrProtocol},
		{"DF flag on read", requestMsg(cmdRead, 1<<2, 1, 0, 512, nil), false,
			"NBD_CMD_READ with unsupported command flags 0x4", ErrProtocol},
		{"NO_HOLE on write", requestMsg(cmdWrite, cmdFlagNoHole, 1, 0, 512, make([]byte, 512)), false,
			"NBD_CMD_WRITE with unsupported command flags 0x2", ErrProtocol},
		{"FAST_ZERO on write zeroes", requestMsg(cmdWriteZeroes, 1<<4, 1, 0, 512, nil), false,
			"NBD_CMD_WRITE_ZEROES with unsupported command flags 0x10", ErrProtocol},
		{"unknown flag on flush", requestMsg(cmdFlush, 1<<15, 1, 0, 0, nil), false,
			"NBD_CMD_FLUSH with unsupported command flags 0x8000", ErrProtocol},
		{"write past end", requestMsg(cmdWrite, 0, 1, size-512, 1024, make([]byte, 1024)), false,
			"NBD_CMD_WRITE of 1024 bytes at offset 1048064 is past the end of the 1048576-byte export", ErrProtocol},
		{"read past end", requestMsg(cmdRead, 0, 1, size, 1, nil), false,
			"NBD_CMD_READ of 1 bytes at offset 1048576 is past the end", ErrProtocol},
		{"offset wraps", requestMsg(cmdWrite, 0, 1, 1<<64-1, 2, []byte{1, 2}), false,
			"NBD_CMD_WRITE of 2 bytes at offset 18446744073709551615 is past the end", ErrProtocol},
		{"zero length past end", requestMsg(cmdWriteZeroes, 0, 1, size+1, 0, nil), false,
			"NBD_CMD_WRITE_ZEROES of 0 bytes at offset 1048577 is past the end", ErrProtocol},
		{"trim past end", requestMsg(cmdTrim, 0, 1, 4096, size, nil), false,
			"NBD_CMD_TRIM of 1048576 bytes at offset 4096 is past the end", ErrProtocol},
		{"truncated header", requestMsg(cmdWrite, 0, 1, 0, 512, nil)[:20], true,
			"read request header: unexpected EOF", io.ErrUnexpectedEOF},
		{"truncated payload", requestMsg(cmdWrite, 0, 1, 0, 4096, make([]byte, 100)), true,
			"NBD_CMD_WRITE of 4096 bytes at 0: read payload: unexpected EOF", io.ErrUnexpectedEOF},
		{"missing payload", requestMsg(cmdWrite, 0, 1, 0, 4096, nil), true,
			"read payload: unexpected EOF", io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, rec := newTestServer(t, size)
			c, done := pipe(t, srv)
			c.connect("disk")
			// Write from a goroutine: the server may stop reading mid-message.
			go func() {
				c.write(tt.msg)
				if tt.close {
					c.nc.Close()
				}
			}()
			err := result(t, done)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, tt.wantIs) {
				t.Fatalf("ServeConn error %v, want one containing %q wrapping %v", err, tt.wantErr, tt.wantIs)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error spans lines: %q", err)
			}
			if !tt.close && !c.closed() {
				t.Error("connection left open")
			}
			if calls := rec.Calls(); len(calls) > 0 {
				t.Errorf("backend called for a malformed request: %v", calls)
			}
			if got := srv.Stats().ProtocolErrors; tt.wantIs == ErrProtocol && got != 1 {
				t.Errorf("ProtocolErrors = %d, want 1", got)
			}
		})
	}
}

// A good request before a bad one is carried out and answered; the bad one
// is not.
func TestMalformedAfterGood(t *testing.T) {
	srv, rec := newTestServer(t, testSize)
	c, done := pipe(t, srv)
	c.connect("disk")
	go c.write(slices.Concat(
		requestMsg(cmdWrite, 0, 1, 0, 512, pattern(512, 9)),
		requestMsg(cmdWrite, 0, 2, testSize, 512, pattern(512, 9)),
	))
	if e, cookie, _ := c.reply(0); e != 0 || cookie != 1 {
		t.Fatalf("first reply: error %d cookie %d", e, cookie)
	}
	if err := result(t, done); !errors.Is(err, ErrProtocol) {
		t.Fatalf("ServeConn: %v", err)
	}
	if got, want := rec.Calls(), []call{{"write", 0, 512, false}}; !slices.Equal(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
}

func TestBackendErrors(t *testing.T) {
	tests := []struct {
		op        string
		err       error
		typ       uint16
		wantErrno uint32
	}{
		{"write", errors.New("disk on fire"), cmdWrite, errnoEIO},
		{"write", fmt.Errorf("stream full: %w", ErrNoSpace), cmdWrite, errnoENOSPC},
		{"read", fmt.Errorf("secondary cannot read: %w", ErrNotSupported), cmdRead, errnoENOTSUP},
		{"read", errors.New("eio"), cmdRead, errnoEIO},
		{"zeroes", fmt.Errorf("bad: %w", ErrInvalid), cmdWriteZeroes, errnoEINVAL},
		{"trim", ErrNotSupported, cmdTrim, errnoENOTSUP},
		{"flush", errors.New("replica gone"), cmdFlush, errnoEIO},
	}
	for _, tt := range tests {
		t.Run(commandName(tt.typ)+"/"+tt.err.Error(), func(t *testing.T) {
			srv, rec := newTestServer(t, testSize)
			c, done := pipe(t, srv)
			c.connect("disk")
			rec.failWith(tt.op, tt.err)
			var payload []byte
			if tt.typ == cmdWrite {
				payload = pattern(4096, 5)
			}
			if e, data := c.do(tt.typ, 0, 0, 4096, payload); e != tt.wantErrno || data != nil {
				t.Errorf("reply error %d with %d bytes, want %d and none", e, len(data), tt.wantErrno)
			}
			// The connection carries on.
			rec.failWith(tt.op, nil)
			if e, _ := c.do(tt.typ, 0, 0, 4096, payload); e != 0 {
				t.Errorf("next request: error %d", e)
			}
			c.disconnect()
			if err := result(t, done); err != nil {
				t.Fatalf("ServeConn: %v", err)
			}
			if got := srv.Stats().BackendErrors; got != 1 {
				t.Errorf("BackendErrors = %d", got)
			}
		})
	}
}

func TestStats(t *testing.T) {
	srv, _ := newTestServer(t, testSize)
	c, done := pipe(t, srv)
	c.connect("disk")
	c.do(cmdWrite, 0, 0, 4096, pattern(4096, 1))
	c.do(cmdWrite, cmdFlagFUA, 8192, 100, pattern(100, 1))
	c.do(cmdRead, 0, 0, 4096, nil)
	c.disconnect()
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
	want := Stats{Connections: 1, WriteRequests: 2, BytesWritten: 4196}
	if got := srv.Stats(); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

// gatedBackend holds each WriteAt until the test lets it go.
type gatedBackend struct {
	*MemBackend
	entered chan int64
	release chan struct{}
}

func (g *gatedBackend) WriteAt(p []byte, off int64, fua bool) error {
	g.entered <- off
	<-g.release
	return g.MemBackend.WriteAt(p, off, fua)
}

// A WRITE is answered only once the backend returned, and the next request
// is read meanwhile.
func TestWriteReplyWaitsForBackend(t *testing.T) {
	g := &gatedBackend{MemBackend: NewMemBackend(testSize), entered: make(chan int64), release: make(chan struct{})}
	srv := NewServer(nil)
	if err := srv.AddExport("disk", g); err != nil {
		t.Fatal(err)
	}
	c, done := pipe(t, srv)
	c.connect("disk")
	c.request(cmdWrite, 0, 1, 0, 512, pattern(512, 1))
	if off := <-g.entered; off != 0 {
		t.Fatalf("backend write at %d", off)
	}
	// The second request is taken off the wire while the first is in the
	// backend (net.Pipe has no buffer: this write returns only once read).
	c.request(cmdWrite, 0, 2, 512, 512, pattern(512, 2))

	_ = c.nc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.nc.Read(make([]byte, 1)); err == nil {
		t.Fatal("reply sent before the backend returned")
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	g.release <- struct{}{}
	if e, cookie, _ := c.reply(0); e != 0 || cookie != 1 {
		t.Fatalf("first reply: error %d cookie %d", e, cookie)
	}
	<-g.entered
	g.release <- struct{}{}
	if e, cookie, _ := c.reply(0); e != 0 || cookie != 2 {
		t.Fatalf("second reply: error %d cookie %d", e, cookie)
	}
	c.disconnect()
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
}

// asyncBackend starts writes at once and finishes each when the test says,
// except writes at an offset in done, which are done when started.
type asyncBackend struct {
	*MemBackend
	started chan int64
	finish  chan error
	done    map[int64]bool
}

func (a *asyncBackend) WriteAtAsync(p []byte, off int64, fua bool) (func() error, error) {
	if err := a.MemBackend.WriteAt(p, off, fua); err != nil {
		return nil, err
	}
	a.started <- off
	if a.done[off] {
		return nil, nil
	}
	return func() error { return <-a.finish }, nil
}

// A write the backend has done when it starts is still answered after the
// earlier ones that wait, in request order; with nothing before it waiting
// it is answered at once.
func TestAsyncDoneWritesKeepReplyOrder(t *testing.T) {
	a := &asyncBackend{MemBackend: NewMemBackend(testSize), started: make(chan int64, 8), finish: make(chan error),
		done: map[int64]bool{512: true, 1024: true}}
	srv := NewServer(nil)
	if err := srv.AddExport("disk", a); err != nil {
		t.Fatal(err)
	}
	c, done := pipe(t, srv)
	c.connect("disk")
	for i := range 2 { // the first waits, the second is done at once
		c.request(cmdWrite, 0, uint64(i+1), uint64(i)*512, 512, pattern(512, byte(i)))
		<-a.started
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.nc.Read(make([]byte, 1)); err == nil {
		t.Fatal("a reply came while the first write was unfinished")
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	a.finish <- nil
	for i := range 2 {
		if e, cookie, _ := c.reply(0); e != 0 || cookie != uint64(i+1) {
			t.Fatalf("reply %d: cookie %d error %d", i, cookie, e)
		}
	}
	c.request(cmdWrite, 0, 3, 1024, 512, pattern(512, 2)) // nothing waits before it
	<-a.started
	if e, cookie, _ := c.reply(0); e != 0 || cookie != 3 {
		t.Fatalf("third reply: cookie %d error %d", cookie, e)
	}
	c.request(cmdFlush, 0, 4, 0, 0, nil)
	if e, cookie, _ := c.reply(0); e != 0 || cookie != 4 {
		t.Fatalf("flush reply: cookie %d error %d", cookie, e)
	}
	c.disconnect()
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
}

// With an AsyncBackend, later writes start while earlier ones still wait to
// finish; replies come in request order, each only once its write finished,
// and a write that finishes with an error is answered with that error.
func TestAsyncWritesOverlapAndReplyInOrder(t *testing.T) {
	a := &asyncBackend{MemBackend: NewMemBackend(testSize), started: make(chan int64, 8), finish: make(chan error)}
	srv := NewServer(nil)
	if err := srv.AddExport("disk", a); err != nil {
		t.Fatal(err)
	}
	c, done := pipe(t, srv)
	c.connect("disk")
	for i := range 3 {
		c.request(cmdWrite, 0, uint64(i+1), uint64(i)*512, 512, pattern(512, byte(i)))
	}
	for i := range 3 {
		select {
		case off := <-a.started:
			if off != int64(i)*512 {
				t.Fatalf("write %d started at %d", i, off)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("write %d did not start while the earlier ones wait", i)
		}
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.nc.Read(make([]byte, 1)); err == nil {
		t.Fatal("reply sent before the write finished")
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i, ferr := range []error{nil, errors.New("partner gone"), nil} {
		a.finish <- ferr
		e, cookie, _ := c.reply(0)
		want := uint32(0)
		if ferr != nil {
			want = errnoEIO
		}
		if cookie != uint64(i+1) || e != want {
			t.Fatalf("reply %d: cookie %d error %d, want cookie %d error %d", i, cookie, e, i+1, want)
		}
	}
	c.disconnect()
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
	if st := srv.Stats(); st.WriteRequests != 3 || st.BackendErrors != 1 || st.BytesWritten != 1024 {
		t.Fatalf("stats %+v", st)
	}
}

// takingBackend keeps the buffers of the writes it is handed.
type takingBackend struct {
	*MemBackend
	mu    sync.Mutex
	taken []*[]byte
}

func (b *takingBackend) WriteAtAsync(p []byte, off int64, fua bool) (func() error, error) {
	return nil, b.MemBackend.WriteAt(p, off, fua)
}

func (b *takingBackend) TakeWrite(p *[]byte, off int64, fua bool) (func() error, error) {
	b.mu.Lock()
	b.taken = append(b.taken, p)
	b.mu.Unlock()
	return nil, b.MemBackend.WriteAt(*p, off, fua)
}

// A BufferTaker is handed each write's buffer, and the server does not use
// it again until the backend gives it back.
func TestBufferTakerKeepsPayloads(t *testing.T) {
	b := &takingBackend{MemBackend: NewMemBackend(testSize)}
	srv := NewServer(nil)
	if err := srv.AddExport("disk", b); err != nil {
		t.Fatal(err)
	}
	c, done := pipe(t, srv)
	c.connect("disk")
	for i := range 4 {
		c.request(cmdWrite, 0, uint64(i+1), uint64(i)*4096, 4096, pattern(4096, byte(i)))
		if e, cookie, _ := c.reply(0); e != 0 || cookie != uint64(i+1) {
			t.Fatalf("reply %d: cookie %d error %d", i, cookie, e)
		}
	}
	c.disconnect()
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
	if len(b.taken) != 4 {
		t.Fatalf("%d buffers taken, want 4", len(b.taken))
	}
	for i, p := range b.taken {
		if !bytes.Equal(*p, pattern(4096, byte(i))) {
			t.Errorf("taken buffer %d was overwritten while the backend held it", i)
		}
		bufpool.Put(p)
	}
}
