package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/axproject/ax/replication/bufpool"
)

// ErrUnknownExport is wrapped by the error of a connection that asked for an
// export the server does not have with NBD_OPT_EXPORT_NAME, which, unlike
// NBD_OPT_GO, cannot be answered with an error.
var ErrUnknownExport = errors.New("unknown export")

var be = binary.BigEndian

// conn is one client connection.
type conn struct {
	srv *Server
	nc  net.Conn
	log *slog.Logger
	r   *bufio.Reader

	// The client: root's (or not on a unix socket), else process pid's.
	root bool
	pid  int

	// stopped is set when the server closes the connection (ctx ended or
	// RemoveExport); queued requests are then dropped, not carried out.
	stopped atomic.Bool

	noZeroes bool    // client set NBD_FLAG_C_NO_ZEROES
	exp      *export // bound by NBD_OPT_GO or NBD_OPT_EXPORT_NAME
	size     int64   // export size, fixed for the connection

	backendErrors int
}

func (c *conn) serve(ctx context.Context) error {
	c.r = bufio.NewReaderSize(c.nc, 64<<10)
	// A conn that cannot take deadlines serves without the handshake bound.
	_ = c.nc.SetDeadline(time.Now().Add(handshakeTimeout))
	err := c.handshake()
	if c.exp != nil {
		defer c.srv.unbind(c, c.exp)
	}
	if err != nil {
		if ctx.Err() == nil && !c.stopped.Load() {
			c.srv.stats.rejected.Add(1)
		}
		return err
	}
	if c.exp == nil {
		return nil // NBD_OPT_ABORT, or the client left
	}
	_ = c.nc.SetDeadline(time.Time{})
	c.srv.stats.connections.Add(1)
	c.log = c.log.With("export", c.exp.name)
	c.log.Info("nbd client connected", "size", c.size)
	err = c.transmit(c.exp.backend)
	if c.backendErrors > 1 {
		c.log.Warn("nbd backend errors on connection", "count", c.backendErrors)
	}
	return err
}

// stop closes the connection on the server's behalf.
func (c *conn) stop() {
	c.stopped.Store(true)
	c.nc.Close()
}

// protoErr returns an error wrapping ErrProtocol, in phase, saying what the
// client did wrong.
func protoErr(phase, format string, args ...any) error {
	return fmt.Errorf("nbd %s: %w: %s", phase, ErrProtocol, fmt.Sprintf(format, args...))
}

// readFull reads len(p) bytes; a read cut short reports io.ErrUnexpectedEOF
// and, with eofOK, a clean end before the first byte reports io.EOF.
func (c *conn) readFull(p []byte, eofOK bool) error {
	_, err := io.ReadFull(c.r, p)
	if err == io.EOF && !eofOK {
		return io.ErrUnexpectedEOF
	}
	return err
}

// write sends bufs in one writev where the conn supports it.
func (c *conn) write(bufs ...[]byte) error {
	nb := make(net.Buffers, 0, len(bufs))
	for _, b := range bufs {
		// An empty write is not free: on a net.Pipe it waits for a reader.
		if len(b) > 0 {
			nb = append(nb, b)
		}
	}
	_, err := nb.WriteTo(c.nc)
	return err
}

// handshake runs option haggling. It binds c.exp when the client chose an
// export and leaves it nil after NBD_OPT_ABORT.
func (c *conn) handshake() error {
	var hello [18]byte
	be.PutUint64(hello[0:], magicNBD)
	be.PutUint64(hello[8:], magicOpt)
	be.PutUint16(hello[16:], serverHandshakeFlag)
	if err := c.write(hello[:]); err != nil {
		return fmt.Errorf("nbd handshake: send greeting: %w", err)
	}
	var cf [4]byte
	if err := c.readFull(cf[:], false); err != nil {
		return fmt.Errorf("nbd handshake: read client flags: %w", err)
	}
	flags := be.Uint32(cf[:])
	if flags&^knownClientFlags != 0 {
		return protoErr("handshake", "unknown client flags %#x", flags&^knownClientFlags)
	}
	if flags&flagCFixedNewstyle == 0 {
		return protoErr("handshake", "client does not speak fixed newstyle negotiation")
	}
	c.noZeroes = flags&flagCNoZeroes != 0

	for n := 0; ; n++ {
		var h [optionHeaderSize]byte
		if err := c.readFull(h[:], true); err != nil {
			if err == io.EOF {
				c.log.Debug("nbd client left during option haggling")
				return nil
			}
			return fmt.Errorf("nbd handshake: read option header: %w", err)
		}
		if m := be.Uint64(h[0:]); m != magicOpt {
			return protoErr("handshake", "bad option magic %#x", m)
		}
		opt, length := be.Uint32(h[8:]), be.Uint32(h[12:])
		if n == maxOptions {
			return protoErr("handshake", "more than %d options before transmission", maxOptions)
		}
		if length > maxOptionLen {
			return protoErr("handshake", "%s carries %d bytes, over the %d-byte limit", optionName(opt), length, maxOptionLen)
		}
		data := make([]byte, length)
		if err := c.readFull(data, false); err != nil {
			return fmt.Errorf("nbd handshake: read %s data (%d bytes): %w", optionName(opt), length, err)
		}
		done, err := c.option(opt, data)
		if err != nil || done {
			return err
		}
	}
}

// option answers one option; done means haggling is over.
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	switch opt {
	case optExportName:
		name := string(data)
		if c.exp = c.srv.bind(c, name); c.exp == nil {
			return true, fmt.Errorf("nbd handshake: NBD_OPT_EXPORT_NAME: %w %q", ErrUnknownExport, name)
		}
		size, tflags := c.describe(c.exp)
		c.size = int64(size)
		reply := make([]byte, 10, 10+exportNameZero)
		be.PutUint64(reply[0:], size)
		be.PutUint16(reply[8:], tflags)
		if !c.noZeroes {
			reply = reply[:10+exportNameZero]
		}
		if err := c.write(reply); err != nil {
			return true, fmt.Errorf("nbd handshake: NBD_OPT_EXPORT_NAME reply: %w", err)
		}
		return true, nil

	case optInfo, optGo:
		name, ok := parseInfoRequest(data)
		if !ok {
			return false, c.optReply(opt, repErrInvalid, []byte("malformed "+optionName(opt)+" request"))
		}
		var e *export
		if opt == optGo {
			e = c.srv.bind(c, name)
			c.exp = e
		} else {
			e = c.srv.lookup(c, name)
		}
		if e == nil {
			c.log.Info("nbd client asked for an unknown export", "option", optionName(opt), "export", name)
			return false, c.optReply(opt, repErrUnknown, []byte(fmt.Sprintf("no export named %q", name)))
		}
		size, tflags := c.describe(e)
		var exp [12]byte
		be.PutUint16(exp[0:], infoExport)
		be.PutUint64(exp[2:], size)
		be.PutUint16(exp[10:], tflags)
		var bs [14]byte
		be.PutUint16(bs[0:], infoBlockSize)
		be.PutUint32(bs[2:], 1)
		be.PutUint32(bs[6:], PreferredBlockSize)
		be.PutUint32(bs[10:], MaxPayload)
		if err := c.optReplies(opt, []optionReply{{repInfo, exp[:]}, {repInfo, bs[:]}, {repAck, nil}}); err != nil {
			return true, err
		}
		if opt == optGo {
			c.size = int64(size)
			return true, nil
		}
		return false, nil

	case optList:
		if len(data) != 0 {
			return false, c.optReply(opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		}
		var replies []optionReply
		for _, n := range c.srv.exportNames(c) {
			d := make([]byte, 4+len(n))
			be.PutUint32(d, uint32(len(n)))
			copy(d[4:], n)
			replies = append(replies, optionReply{repServer, d})
		}
		return false, c.optReplies(opt, append(replies, optionReply{repAck, nil}))

	case optAbort:
		// The client may hang up without reading the ack (QEMU does).
		_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		if err := c.optReply(opt, repAck, nil); err != nil {
			c.log.Debug("nbd NBD_OPT_ABORT ack not delivered", "err", err)
		}
		return true, nil

	default:
		return false, c.optReply(opt, repErrUnsup, []byte(optionName(opt)+" not supported"))
	}
}

// describe returns the export size and transmission flags a client sees.
func (c *conn) describe(e *export) (size uint64, tflags uint16) {
	tflags = tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes
	if m, ok := e.backend.(MultiConnBackend); ok && m.MultiConn() {
		tflags |= tflagCanMultiConn
	}
	return uint64(e.backend.Size()), tflags
}

// parseInfoRequest decodes NBD_OPT_INFO/NBD_OPT_GO data: a 32-bit name
// length, the name, a 16-bit count of info requests and the requests. The
// requested info types are not needed: the reply always carries
// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE, and clients ignore the rest.
func parseInfoRequest(d []byte) (name string, ok bool) {
	if len(d) < 6 {
		return "", false
	}
	n := uint64(be.Uint32(d))
	if n > uint64(len(d))-6 {
		return "", false
	}
	name = string(d[4 : 4+n])
	count := uint64(be.Uint16(d[4+n:]))
	if uint64(len(d)) != 6+n+2*count {
		return "", false
	}
	return name, true
}

type optionReply struct {
	typ  uint32
	data []byte
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	return c.optReplies(opt, []optionReply{{typ, data}})
}

// optReplies sends the replies to one option in one write.
func (c *conn) optReplies(opt uint32, rs []optionReply) error {
	var b []byte
	for _, r := range rs {
		b = be.AppendUint64(b, magicOptReply)
		b = be.AppendUint32(b, opt)
		b = be.AppendUint32(b, r.typ)
		b = be.AppendUint32(b, uint32(len(r.data)))
		b = append(b, r.data...)
	}
	if err := c.write(b); err != nil {
		return fmt.Errorf("nbd handshake: reply to %s: %w", optionName(opt), err)
	}
	return nil
}

// request is one parsed transmission request.
type request struct {
	typ, flags  uint16
	cookie, off uint64
	length      uint32
	payload     *[]byte // NBD_CMD_WRITE data, from bufpool
}

// transmit serves requests until NBD_CMD_DISC, a protocol error or the end
// of the connection. This goroutine reads and checks requests; a second one
// calls the backend in order and replies, so the next request arrives while
// the backend works on the previous one (an AsyncBackend: transmitAsync).
func (c *conn) transmit(b Backend) error {
	if ab, ok := b.(AsyncBackend); ok {
		return c.transmitAsync(ab)
	}
	queue := make(chan request, queueDepth)
	werr := make(chan error, 1)
	go func() { werr <- c.process(b, queue) }()
	rerr := c.readRequests(func(r request) error { queue <- r; return nil })
	close(queue)
	return transmitErr(rerr, <-werr)
}

// transmitErr picks the error a connection ended with. Requests read before
// a bad one are still answered. A failed reply closed the connection under
// the reader, so it is the cause, unless the reader had already found the
// client at fault.
func transmitErr(readErr, replyErr error) error {
	if replyErr != nil && !errors.Is(readErr, ErrProtocol) {
		return replyErr
	}
	return readErr
}

// readRequests reads and checks requests and hands each to handle, in order,
// until NBD_CMD_DISC, a protocol error, the end of the connection, or an
// error from handle.
func (c *conn) readRequests(handle func(request) error) error {
	var h [requestHeaderSize]byte
	for {
		if err := c.readFull(h[:], true); err != nil {
			if err == io.EOF {
				c.log.Info("nbd client closed the connection without NBD_CMD_DISC")
				return nil
			}
			return fmt.Errorf("nbd transmission: read request header: %w", err)
		}
		if m := be.Uint32(h[0:]); m != magicRequest {
			c.srv.stats.protocolErrors.Add(1)
			return protoErr("transmission", "bad request magic %#08x", m)
		}
		r := request{
			flags:  be.Uint16(h[4:]),
			typ:    be.Uint16(h[6:]),
			cookie: be.Uint64(h[8:]),
			off:    be.Uint64(h[16:]),
			length: be.Uint32(h[24:]),
		}
		if err := checkRequest(r, uint64(c.size)); err != nil {
			c.srv.stats.protocolErrors.Add(1)
			return err
		}
		if r.typ == cmdDisc {
			c.log.Info("nbd client disconnected")
			return nil
		}
		if r.typ == cmdWrite && r.length > 0 {
			r.payload = bufpool.Get(int(r.length))
			if err := c.readFull(*r.payload, false); err != nil {
				bufpool.Put(r.payload)
				return fmt.Errorf("nbd transmission: NBD_CMD_WRITE of %d bytes at %d: read payload: %w", r.length, r.off, err)
			}
		}
		if err := handle(r); err != nil {
			return err
		}
	}
}

// checkRequest reports how r breaks the protocol for an export of size
// bytes, or nil.
func checkRequest(r request, size uint64) error {
	var allowed uint16 = cmdFlagFUA // valid on every command once SEND_FUA is advertised
	ranged := true
	switch r.typ {
	case cmdRead, cmdWrite:
		if r.length > MaxPayload {
			return protoErr("transmission", "%s of %d bytes exceeds the %d-byte maximum", commandName(r.typ), r.length, MaxPayload)
		}
	case cmdWriteZeroes:
		// NO_HOLE asks for allocated zeroes; WriteZeroes has no holes to
		// avoid, so the flag needs nothing further.
		allowed |= cmdFlagNoHole
	case cmdTrim:
		// TRIM and WRITE_ZEROES carry no payload: only the export bounds
		// them (QEMU sends discards of up to 2 GiB).
	case cmdFlush, cmdDisc:
		ranged = false // offset and length are reserved; ignored
	default:
		return protoErr("transmission", "unsupported request type %s", commandName(r.typ))
	}
	if f := r.flags &^ allowed; f != 0 {
		return protoErr("transmission", "%s with unsupported command flags %#x", commandName(r.typ), f)
	}
	if ranged && (r.off > size || uint64(r.length) > size-r.off) {
		return protoErr("transmission", "%s of %d bytes at offset %d is past the end of the %d-byte export", commandName(r.typ), r.length, r.off, size)
	}
	return nil
}

// process calls the backend for each request in order and replies. After a
// failed reply it closes the connection, so the reader stops, and drains the
// queue; so it does once the server stopped the connection.
func (c *conn) process(b Backend, queue <-chan request) error {
	var failed error
	for r := range queue {
		if failed == nil && !c.stopped.Load() {
			res := c.run(b, r)
			if failed = c.finish(r, res); failed != nil {
				c.nc.Close()
			}
			bufpool.Put(res.data)
		}
		bufpool.Put(r.payload)
	}
	return failed
}

// outcome is what a request came to, or (wait set) a write still finishing.
type outcome struct {
	err  error
	data *[]byte // a read's data, from bufpool
	wait func() error
}

// transmitAsync serves an AsyncBackend. The reading goroutine starts each
// request itself and, while no earlier request awaits its reply, replies to
// one already done at once; the others go to a replier that waits for each
// write to finish and replies in request order. A client whose writes the
// backend finishes at once (a queued replicated write) so gets its reply
// without a hand-off between goroutines.
func (c *conn) transmitAsync(b AsyncBackend) error {
	type started struct {
		r   request
		res outcome
	}
	replies := make(chan started, asyncDepth)
	var pending atomic.Int64 // requests handed to the replier and not yet answered
	replied := make(chan error, 1)
	go func() {
		var failed error
		for s := range replies {
			if failed == nil && !c.stopped.Load() {
				if failed = c.finish(s.r, s.res); failed != nil {
					c.nc.Close()
				}
			} else if s.res.wait != nil {
				s.res.wait() // started writes still finish before the connection is done
			}
			bufpool.Put(s.res.data)
			pending.Add(-1)
		}
		replied <- failed
	}()
	taker, _ := b.(BufferTaker)
	rerr := c.readRequests(func(r request) error {
		defer func() { bufpool.Put(r.payload) }()
		if c.stopped.Load() {
			return nil
		}
		var res outcome
		if r.typ == cmdWrite && r.length > 0 {
			c.srv.stats.writeRequests.Add(1)
			fua := r.flags&cmdFlagFUA != 0
			if taker != nil {
				p := r.payload
				r.payload = nil // the backend's now
				res.wait, res.err = taker.TakeWrite(p, int64(r.off), fua)
			} else {
				res.wait, res.err = b.WriteAtAsync(*r.payload, int64(r.off), fua)
			}
		} else {
			res = c.run(b, r)
		}
		if res.wait == nil && pending.Load() == 0 {
			// Nothing earlier is unanswered and the replier is idle: this
			// goroutine may write the reply.
			defer bufpool.Put(res.data)
			return c.finish(r, res)
		}
		pending.Add(1)
		replies <- started{r, res}
		return nil
	})
	close(replies)
	return transmitErr(rerr, <-replied)
}

// run carries out one request (a write synchronously) and returns its outcome.
func (c *conn) run(b Backend, r request) outcome {
	fua := r.flags&cmdFlagFUA != 0
	off, n := int64(r.off), int64(r.length)
	var res outcome
	switch r.typ {
	case cmdRead:
		if n == 0 {
			break
		}
		buf := bufpool.Get(int(n))
		if res.err = b.ReadAt(*buf, off); res.err == nil {
			res.data = buf
		} else {
			bufpool.Put(buf)
		}
	case cmdWrite:
		if n == 0 {
			break
		}
		c.srv.stats.writeRequests.Add(1)
		res.err = b.WriteAt(*r.payload, off, fua)
	case cmdWriteZeroes:
		if n > 0 {
			res.err = b.WriteZeroes(off, n, fua)
		}
	case cmdTrim:
		if n > 0 {
			res.err = b.Trim(off, n)
			// Trim has no FUA of its own; a flush makes it durable.
			if res.err == nil && fua {
				res.err = b.Flush()
			}
		}
	case cmdFlush:
		res.err = b.Flush()
	}
	return res
}

// finish waits for a started write, then replies; its error means the reply
// could not be sent. The caller puts res.data back.
func (c *conn) finish(r request, res outcome) error {
	if res.err == nil && res.wait != nil {
		res.err = res.wait()
	}
	if res.err != nil {
		c.srv.stats.backendErrors.Add(1)
		c.backendErrors++
		if c.backendErrors == 1 { // later ones are counted, not logged
			c.log.Warn("nbd backend failed a request", "request", commandName(r.typ), "offset", r.off, "length", r.length, "err", res.err)
		}
		return c.reply(r, errno(res.err), nil)
	}
	if r.typ == cmdWrite {
		c.srv.stats.bytesWritten.Add(uint64(r.length))
	}
	var data []byte
	if res.data != nil {
		data = *res.data
	}
	return c.reply(r, 0, data)
}

func (c *conn) reply(r request, errno uint32, data []byte) error {
	var h [replyHeaderSize]byte
	be.PutUint32(h[0:], magicReply)
	be.PutUint32(h[4:], errno)
	be.PutUint64(h[8:], r.cookie)
	if err := c.write(h[:], data); err != nil {
		return fmt.Errorf("nbd transmission: reply to %s: %w", commandName(r.typ), err)
	}
	return nil
}
