package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/axproject/ax/ax/ratelog"
)

// MaxSpecSize bounds the VM spec a primary sends after the handshake.
const MaxSpecSize = 64 << 10

// Marker carries facts about checkpoint Epoch that are not guest state: the
// size of the VM's console log at the pause (-1 when unknown), which lets
// tests and operators see which guest output the checkpoint covers.
type Marker struct {
	Epoch         uint64
	ConsoleOffset int64
}

// Frame encodes m.
func (m Marker) Frame() Frame {
	p := le.AppendUint64(make([]byte, 0, 8), uint64(m.ConsoleOffset))
	return Frame{Type: TypeMarker, Epoch: m.Epoch, Payload: p}
}

// DecodeMarker decodes a Marker frame.
func DecodeMarker(f Frame) (Marker, error) {
	if err := expect(f, TypeMarker, 8); err != nil {
		return Marker{}, err
	}
	return Marker{Epoch: f.Epoch, ConsoleOffset: int64(le.Uint64(f.Payload))}, nil
}

// HeartbeatInterval is how often an idle stream proves it is alive.
const HeartbeatInterval = 200 * time.Millisecond

// streamIdleTimeout ends a stream from which nothing, not even a heartbeat,
// has come for this long.
const streamIdleTimeout = 25 * HeartbeatInterval

// Sender is the primary's end of a VM's replication stream.
type Sender struct {
	conn    net.Conn // protected: TLS or sealed records
	raw     net.Conn // the TCP connection under conn
	ramSize int64

	wmu   sync.Mutex // serialises writers: the epoch loop and the heartbeat
	w     *Writer
	last  time.Time // last write
	sent  uint64    // bytes handed to the writer
	pages uint64    // initial-sync pages sent
	base  []uint64  // the replica's page hashes when the stream opened
	// diskBase is the hashes of the replica's disk ranges when the stream
	// opened (TakeDiskBase), checked against diskSizes, the VM's disks.
	diskBase  [][]uint64
	diskSizes []int64

	ordered   uint64 // ordered frames (disk writes, levels) sent
	diskBytes uint64 // disk write bytes sent

	ackMu  sync.Mutex
	ackedN uint64        // ordered frames the secondary acknowledged
	ackCh  chan struct{} // closed and replaced when ackedN grows

	r    *Reader
	acks chan uint64
	done chan struct{}
	// heard is when the secondary's last frame arrived: an ack, a write
	// ack, or its answer to the idle stream's heartbeat.
	heard heardAt
	// restartEcho is closed when the secondary echoed a Restart.
	restartEcho chan struct{}
	restartSent atomic.Bool
	errMu       sync.Mutex
	err         error
	once        sync.Once
	wg          sync.WaitGroup
}

// acceptTimeout bounds how long a secondary may take to open a replica.
const acceptTimeout = 10 * time.Second

// specTimeout bounds how long an authenticated primary may take to send the
// VM's spec: it sends it right after the handshake.
const specTimeout = 10 * time.Second

// Dial connects to a secondary's replication address, secures and
// authenticates the connection as sec says (in TLS mode the secondary's
// certificate must name peer), asks for vm, sends the VM's spec and waits
// for the secondary to accept it. A refusal is a *RefusedError with the
// secondary's reason. Ctx bounds the whole of it.
//
// DiskSizes are the sizes of the VM's protected disks, in order: the base
// of the replica's disks the secondary sends is checked against them.
func Dial(ctx context.Context, addr string, sec Security, peer, vm string, spec []byte, ramSize int64, diskSizes ...int64) (*Sender, error) {
	if len(spec) > MaxSpecSize {
		return nil, fmt.Errorf("replication: spec of %d bytes exceeds %d", len(spec), MaxSpecSize)
	}
	if err := sec.Check(); err != nil {
		return nil, err
	}
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("replication: dial %s: %w", addr, err)
	}
	// Ctx ending wakes whatever waits on the connection; the stream
	// itself outlives ctx.
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	s, err := dial(raw, sec, peer, vm, spec, ramSize, diskSizes)
	if !stop() && err == nil {
		err = ctx.Err()
		s.Close()
	}
	if err != nil {
		raw.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("replication: dial %s: %w (%w)", addr, ctx.Err(), err)
		}
		return nil, err
	}
	s.wg.Add(2)
	go s.readAcks()
	go s.heartbeat()
	return s, nil
}

// dial runs the handshake on raw and offers the spec.
func dial(raw net.Conn, sec Security, peer, vm string, spec []byte, ramSize int64, diskSizes []int64) (*Sender, error) {
	addr := raw.RemoteAddr()
	conn, err := ClientHandshake(raw, sec, peer, vm, DefaultHandshakeTimeout)
	if err != nil {
		return nil, err
	}
	s := &Sender{conn: conn, raw: raw, ramSize: ramSize, diskSizes: slices.Clone(diskSizes), w: NewWriter(conn, 0), r: NewReader(conn, 0), acks: make(chan uint64, 64),
		done: make(chan struct{}), last: time.Now(), ackCh: make(chan struct{}), restartEcho: make(chan struct{})}
	if err := s.write(func() error { return s.w.WriteFrame(Frame{Type: TypeSpec, Payload: spec}) }, true); err != nil {
		return nil, err
	}
	conn.SetReadDeadline(time.Now().Add(acceptTimeout))
	f, err := s.r.ReadFrame()
	conn.SetReadDeadline(time.Time{})
	if err == nil {
		switch f.Type {
		case TypeAccept:
			err = s.readBase(f, conn)
		case TypeRefuse:
			var refused *RefusedError
			if refused, err = decodeRefuse(f); err == nil {
				err = refused
			}
		default:
			err = fmt.Errorf("replication: %s where the secondary's answer to the spec was expected", f.Type)
		}
	}
	if err != nil {
		if _, ok := err.(*RefusedError); !ok {
			err = fmt.Errorf("replication: %s did not accept the VM: %w", addr, err)
		}
		return nil, err
	}
	return s, nil
}

// readBase reads the hashes of the replica's pages and disk ranges that
// follow accept.
func (s *Sender) readBase(accept Frame, conn net.Conn) error {
	pages, ranges, err := decodeAccept(accept, s.ramSize, s.diskSizes)
	if err != nil {
		return err
	}
	// Every count is the primary's own (RAM and disk sizes) by now.
	n := pages
	for _, r := range ranges {
		n += r
	}
	if n == 0 {
		return nil
	}
	base := make([]uint64, 0, n)
	for uint64(len(base)) < n {
		conn.SetReadDeadline(time.Now().Add(acceptTimeout))
		f, err := s.r.ReadFrame()
		if err != nil {
			return err
		}
		if base, err = decodeBase(f, base, n); err != nil {
			return err
		}
	}
	conn.SetReadDeadline(time.Time{})
	if pages > 0 {
		s.base = base[:pages:pages]
	}
	base = base[pages:]
	for _, r := range ranges {
		s.diskBase = append(s.diskBase, base[:r:r])
		base = base[r:]
	}
	return nil
}

// TakeBase returns the hash (dirty.PageHash) of every page the secondary's
// replica held when the stream opened: the stream's first initial sync
// need send only the pages of the guest's RAM that hash otherwise (the
// replica keeps the others). Only the first sync of a stream starts from
// it — leaving FT zeroes the replica, and a later FT phase sends every
// data page — so it returns nil after the first call.
func (s *Sender) TakeBase() []uint64 {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	b := s.base
	s.base = nil
	return b
}

// TakeDiskBase returns, for each of the VM's disks, the hash
// (dirty.PageHash) of every DiskBaseRange bytes the secondary's replica
// disk held when the stream opened, or nil when the secondary did not hash
// its disks. Until the stream's first disk sync has written a range, the
// replica holds what its hash says. Only that sync may start from it, so
// it returns nil after the first call.
func (s *Sender) TakeDiskBase() [][]uint64 {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	b := s.diskBase
	s.diskBase = nil
	return b
}

func (s *Sender) fail(err error) {
	s.errMu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.errMu.Unlock()
	s.once.Do(func() {
		close(s.done)
		// The TCP connection, not TLS's: closing TLS would first try to
		// send a close alert, and block while TCP pushes back.
		s.raw.Close()
	})
}

// Err says why the stream ended (nil while it runs).
func (s *Sender) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

// write runs fn under the writer lock, then flushes if asked.
func (s *Sender) write(fn func() error, flush bool) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.Err(); err != nil {
		return err
	}
	err := fn()
	if err == nil && flush {
		err = s.w.Flush()
	}
	if err != nil {
		s.fail(err)
		return err
	}
	s.last = time.Now()
	return nil
}

// readAcks delivers the secondary's acks; anything malformed ends the stream.
func (s *Sender) readAcks() {
	defer s.wg.Done()
	defer close(s.acks)
	for {
		f, err := s.r.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("secondary closed the stream")
			}
			s.fail(fmt.Errorf("replication: %w", err))
			return
		}
		s.heard.note()
		switch f.Type {
		case TypeAck:
			a, err := DecodeAck(f)
			if err != nil {
				s.fail(err)
				return
			}
			select {
			case s.acks <- a.Epoch:
			case <-s.done:
				return
			}
		case TypeHeartbeat:
			if _, err := DecodeHeartbeat(f); err != nil {
				s.fail(err)
				return
			}
		case TypeWriteAck:
			a, err := DecodeWriteAck(f)
			if err == nil {
				err = s.noteWriteAck(a)
			}
			if err != nil {
				s.fail(err)
				return
			}
		case TypeRestart:
			grace, err := decodeRestart(f)
			if err != nil {
				s.fail(err)
				return
			}
			if s.restartSent.Load() {
				// The secondary understood: nothing more comes on this stream.
				close(s.restartEcho)
				s.fail(errors.New("replication: stream ended for axd's restart"))
				return
			}
			// The secondary's axd restarts: it keeps the replica.
			s.fail(&RestartingError{For: grace, Secondary: true})
			return
		default:
			s.fail(fmt.Errorf("replication: unexpected %s from the secondary", f.Type))
			return
		}
	}
}

func (s *Sender) heartbeat() {
	defer s.wg.Done()
	t := time.NewTicker(HeartbeatInterval / 2)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		s.wmu.Lock()
		idle := time.Since(s.last) >= HeartbeatInterval
		s.wmu.Unlock()
		if idle {
			hb := Heartbeat{SentUnixNano: time.Now().UnixNano()}
			s.write(func() error { return s.w.WriteFrame(hb.Frame()) }, true)
		}
	}
}

// SendSync sends initial-sync pages (page i of pages is pfns[i]).
func (s *Sender) SendSync(pfns []uint64, pages []byte) error {
	ps := make([]Page, len(pfns))
	for i, pfn := range pfns {
		ps[i] = Page{PFN: pfn, Data: pages[i*PageSize : (i+1)*PageSize]}
	}
	return s.write(func() error {
		s.pages += uint64(len(ps))
		s.sent += uint64(len(pages))
		return s.w.WritePages(TypeSyncPages, 0, ps)
	}, true)
}

// BeginSync starts an initial sync: onBase, over what the replica held
// when the stream opened (TakeBase: only pages that differ are sent), or
// from zeros. A sync on the base is refused by the secondary once its
// replica changed since the stream opened.
func (s *Sender) BeginSync(onBase bool) error {
	var p byte
	if onBase {
		p = 1
	}
	return s.write(func() error {
		s.pages = 0
		return s.w.WriteFrame(Frame{Type: TypeSyncBegin, Payload: []byte{p}})
	}, true)
}

// SyncDone ends the initial sync.
func (s *Sender) SyncDone() error {
	return s.write(func() error {
		return s.w.WriteFrame(SyncDone{RAMSize: uint64(s.ramSize), Pages: s.pages}.Frame())
	}, true)
}

// SendCheckpoint sends checkpoint epoch whole: marker, pages, device state,
// end with digest. It blocks while TCP pushes back.
func (s *Sender) SendCheckpoint(epoch uint64, pfns []uint64, pages, deviceState []byte, consoleOffset int64) error {
	ps := make([]Page, len(pfns))
	for i, pfn := range pfns {
		ps[i] = Page{PFN: pfn, Data: pages[i*PageSize : (i+1)*PageSize]}
	}
	return s.write(func() error {
		if err := s.w.WriteFrame(Marker{Epoch: epoch, ConsoleOffset: consoleOffset}.Frame()); err != nil {
			return err
		}
		s.sent += uint64(len(pages) + len(deviceState))
		return s.w.WriteCheckpoint(epoch, ps, deviceState)
	}, true)
}

// Conn is the stream's TCP connection, for socket options only: the
// stream's bytes go through its protection, never directly.
func (s *Sender) Conn() net.Conn { return s.raw }

// Bye tells the secondary protection ended: it drops the replica.
func (s *Sender) Bye() error {
	return s.write(func() error { return s.w.WriteFrame(Frame{Type: TypeBye}) }, true)
}

// Handover tells the secondary to take the VM over after epoch (planned switch).
func (s *Sender) Handover(epoch uint64) error {
	return s.write(func() error { return s.w.WriteFrame(Frame{Type: TypeHandover, Epoch: epoch}) }, true)
}

// Acks delivers committed epochs; closed when the stream ends.
func (s *Sender) Acks() <-chan uint64 { return s.acks }

// Heard returns when the secondary's last frame arrived (zero before the
// first). A stream the secondary answers on shows it alive and the
// replication path working, whatever the heartbeats say.
func (s *Sender) Heard() time.Time { return s.heard.at() }

// heardAt is when a stream's last frame arrived, read by other goroutines
// than the one reading the stream.
type heardAt struct{ ns atomic.Int64 }

func (h *heardAt) note()  { h.ns.Store(time.Now().UnixNano()) }
func (h *heardAt) clear() { h.ns.Store(0) }

// at is the time noted; zero when none is.
func (h *heardAt) at() time.Time {
	if ns := h.ns.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// BytesSent counts page and device-state bytes handed to the stream.
func (s *Sender) BytesSent() uint64 {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.sent
}

// Close ends the stream and waits for its goroutines; safe to call twice.
func (s *Sender) Close() error {
	s.fail(errors.New("replication: stream closed"))
	s.wg.Wait()
	return nil
}

// Handler is what a secondary does with the streams it receives.
type Handler struct {
	// Open is called after authentication with the VM's spec and the
	// authenticated peer: the client certificate's host name in TLS mode,
	// "" in PSK mode. It returns the replica the stream fills; an error
	// drops the connection. The spec is the peer's word: check it.
	Open func(vm, peer string, spec []byte, remote net.Addr) (*Replica, error)
	// Synced is called when the initial sync has arrived.
	Synced func(vm string)
	// Disks returns where vm's disk writes go (called after Open); nil
	// when the VM has no protected disk — a disk write is then an error.
	// A DiskHasher's disks are the base of the primary's disk sync.
	Disks func(vm string) DiskSink
	// Committed is called after checkpoint epoch is applied, before the ack.
	Committed func(vm string, epoch uint64, m Marker)
	// Level is called when the primary changes the VM's level on the stream.
	Level func(vm, level string)
	// Ended is called when the stream ends: bye (protection ended on
	// purpose), handover (planned switch) or neither (connection lost;
	// err is a *RestartingError when the primary's axd restarts).
	Ended func(vm string, bye, handover bool, err error)
}

const (
	// maxPreAuth bounds the connections a server holds before they
	// authenticate; beyond it new ones are closed at once, so a flood
	// costs a bounded number of goroutines and handshakes.
	maxPreAuth = 16
	// refusedLogEvery spaces out the warnings about refused peers, which
	// anyone who can reach the port can trigger.
	refusedLogEvery = 10 * time.Second
)

// Server is a secondary's end: it accepts authenticated replication streams
// and applies them to replicas.
type Server struct {
	sec     Security
	allow   []string
	handler Handler
	log     *slog.Logger

	// Tests shorten these.
	handshakeTimeout, specTimeout time.Duration
	diskBaseTimeout               time.Duration
	preAuth                       chan struct{} // a slot per connection not yet authenticated
	refusedLog, floodLog          *ratelog.Limiter

	mu       sync.Mutex
	sessions map[string]*stream // vm → current stream
}

type stream struct {
	conn net.Conn      // the TCP connection, closed to end the stream
	done chan struct{} // closed when the stream's handling ended
	// send writes a frame to the primary (set once the session can).
	send func(Frame) error
	// heard is when the last frame arrived: the primary's Sender writes
	// one at least every HeartbeatInterval.
	heard heardAt
}

// NewServer returns a server that protects and authenticates streams as
// sec says; in TLS mode only the partner hosts in allow may connect. Serve
// refuses settings that cannot work.
func NewServer(sec Security, allow []string, h Handler, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{sec: sec, allow: append([]string(nil), allow...), handler: h, log: log,
		handshakeTimeout: DefaultHandshakeTimeout, specTimeout: specTimeout, diskBaseTimeout: diskBaseTimeout,
		preAuth:    make(chan struct{}, maxPreAuth),
		refusedLog: ratelog.New(refusedLogEvery), floodLog: ratelog.New(refusedLogEvery),
		sessions: map[string]*stream{}}
}

// Serve accepts streams on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if err := s.sec.Check(); err != nil {
		ln.Close()
		return err
	}
	if s.sec.tls() && len(s.allow) == 0 {
		ln.Close()
		return fmt.Errorf("%w: no partner host is allowed to connect; list the partners", ErrSecurity)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		s.mu.Lock()
		for _, ss := range s.sessions {
			ss.conn.Close()
		}
		s.mu.Unlock()
	})
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("replication: accept: %w", err)
		}
		select {
		case s.preAuth <- struct{}{}:
		default:
			conn.Close()
			if ok, suppressed := s.floodLog.Allow(); ok {
				s.log.Warn("replication: too many unauthenticated connections, closing new ones at once",
					"remote", conn.RemoteAddr(), "limit", cap(s.preAuth), "suppressed", suppressed)
			}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, conn)
		}()
	}
}

func (s *Server) serveConn(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	// Serve's stop closes the streams it knows; this one it does not know
	// until the handshake is done.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	a, err := serverHandshake(conn, s.sec, s.allow, s.handshakeTimeout)
	stop()
	<-s.preAuth
	if err != nil {
		if ok, suppressed := s.refusedLog.Allow(); ok {
			s.log.Warn("replication peer refused", "remote", conn.RemoteAddr(), "err", err, "suppressed", suppressed)
		}
		return
	}
	vm := a.VM
	// One stream per VM: a new one replaces the old (the primary
	// reconnected) once the old one's handling has ended.
	s.Drop(vm)
	me := &stream{conn: conn, done: make(chan struct{})}
	s.mu.Lock()
	if ctx.Err() != nil {
		// Serve's stop has run, or runs after this and would miss us.
		s.mu.Unlock()
		return
	}
	s.sessions[vm] = me
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.sessions[vm] == me {
			delete(s.sessions, vm)
		}
		s.mu.Unlock()
		close(me.done)
	}()
	bye, handover, err := s.session(a, me)
	me.heard.clear() // ended: Heard says so from now on, Ended included
	if s.handler.Ended != nil {
		s.handler.Ended(vm, bye, handover, err)
	}
}

// Heard returns when a frame of vm's current stream last arrived; zero
// when vm has no stream. A stream that delivers frames shows the primary
// alive and the replication path working, whatever the heartbeats say.
func (s *Server) Heard(vm string) time.Time {
	s.mu.Lock()
	ss := s.sessions[vm]
	s.mu.Unlock()
	if ss == nil {
		return time.Time{}
	}
	return ss.heard.at()
}

// Drop ends vm's stream, if any, and returns once its handling has ended:
// after Drop nothing more is applied to the replica by that stream.
func (s *Server) Drop(vm string) {
	s.mu.Lock()
	ss := s.sessions[vm]
	s.mu.Unlock()
	if ss == nil {
		return
	}
	ss.conn.Close()
	<-ss.done
}

// diskBaseTimeout bounds the hashing of a replica's disks when a stream
// opens: the primary waits acceptTimeout for the Accept, and its dial is
// bounded too. Disks that take longer are resynchronised in full.
const diskBaseTimeout = 5 * time.Second

// diskBase hashes the replica's disks for the primary's disk sync: nil
// when the sink cannot, or when hashing took longer than diskBaseTimeout
// (the disks are then copied in full, as without a base).
func (s *Server) diskBase(vm string, disks DiskSink) ([][]uint64, error) {
	h, ok := disks.(DiskHasher)
	if !ok {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.diskBaseTimeout)
	defer cancel()
	start := time.Now()
	base, err := h.RangeHashes(ctx)
	if err != nil && ctx.Err() != nil {
		s.log.Warn("replication: hashing the replica's disks took too long: they are copied in full",
			"vm", vm, "limit", s.diskBaseTimeout, "took", time.Since(start).Round(time.Millisecond))
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("replication: %s: hash the replica's disks: %w", vm, err)
	}
	return base, nil
}

// session applies one authenticated stream. Any malformed or unexpected
// frame ends it; a checkpoint is applied only when it arrived whole and
// verified.
func (s *Server) session(a Authenticated, me *stream) (bye, handover bool, err error) {
	conn, vm := a.Conn, a.VM
	r := NewReader(conn, 0)
	conn.SetReadDeadline(time.Now().Add(s.specTimeout))
	f, err := r.ReadFrame()
	if err != nil {
		return false, false, fmt.Errorf("replication: %s: read the VM's spec: %w", vm, err)
	}
	if f.Type != TypeSpec || len(f.Payload) == 0 || len(f.Payload) > MaxSpecSize {
		return false, false, fmt.Errorf("replication: %s: expected the VM's spec, got %s", vm, f.Type)
	}
	spec := append([]byte(nil), f.Payload...)
	w := NewWriter(conn, 0)
	var wmu sync.Mutex
	send := func(f Frame) error {
		wmu.Lock()
		defer wmu.Unlock()
		if err := w.WriteFrame(f); err != nil {
			return err
		}
		return w.Flush()
	}
	s.mu.Lock()
	if st := s.sessions[vm]; st != nil {
		st.send = send // this one (one stream per VM): Leave may speak on it from now on
	}
	s.mu.Unlock()
	rep, err := s.handler.Open(vm, a.Peer, spec, conn.RemoteAddr())
	if err != nil {
		// The primary learns why; a refusal is not the stream's fault.
		send(refuseFrame(err.Error()))
		return false, false, err
	}
	var disks DiskSink
	if s.handler.Disks != nil {
		disks = s.handler.Disks(vm)
	}
	// The base: the primary's initial sync sends only the pages whose
	// hashes differ from what the replica holds now.
	base, err := rep.PageHashes()
	if err != nil {
		send(refuseFrame(err.Error()))
		return false, false, err
	}
	diskBase, err := s.diskBase(vm, disks)
	if err != nil {
		send(refuseFrame(err.Error()))
		return false, false, err
	}
	if err := send(acceptFrame(uint64(len(base)), diskBase)); err != nil {
		return false, false, err
	}
	for _, f := range baseFrames(base, diskBase) {
		if err := send(f); err != nil {
			return false, false, err
		}
	}
	// Ordered frames done, and how many of them the primary was told of.
	var ordered, acked uint64
	ackOrdered := func() error {
		if ordered == acked || r.Buffered() > 0 {
			return nil // more is queued: one ack for the batch
		}
		acked = ordered
		return send(WriteAck{N: ordered}.Frame())
	}
	var asm *CheckpointAssembler
	var marker Marker
	syncing := false
	// The replica holds what was hashed for the primary: a sync may start
	// on it until anything changed it.
	onBase := true
	for {
		if err := ackOrdered(); err != nil {
			return false, false, err
		}
		conn.SetReadDeadline(time.Now().Add(streamIdleTimeout))
		f, err := r.ReadFrame()
		if err != nil {
			return false, false, err
		}
		me.heard.note()
		switch {
		case f.Type == TypeSyncBegin:
			if asm != nil || len(f.Payload) != 1 || f.Payload[0] > 1 {
				return false, false, fmt.Errorf("replication: %s: malformed or late SyncBegin", vm)
			}
			if f.Payload[0] == 1 {
				if !onBase {
					return false, false, fmt.Errorf("replication: %s: a sync on the base after the replica changed", vm)
				}
				err = rep.BeginSyncOnBase()
			} else {
				err = rep.BeginSync()
			}
			if err != nil {
				return false, false, err
			}
			syncing, onBase = true, false
		case f.Type == TypeSyncPages:
			if asm != nil {
				return false, false, fmt.Errorf("replication: %s: sync pages after the sync ended", vm)
			}
			if !syncing {
				if err := rep.BeginSync(); err != nil {
					return false, false, err
				}
				syncing, onBase = true, false
			}
			pages, err := DecodePages(f)
			if err != nil {
				return false, false, err
			}
			if err := rep.WriteSyncPages(pages); err != nil {
				return false, false, err
			}
		case f.Type == TypeSyncDone:
			d, err := DecodeSyncDone(f)
			if err != nil {
				return false, false, err
			}
			if !syncing {
				if err := rep.BeginSync(); err != nil {
					return false, false, err
				}
				onBase = false
			}
			if err := rep.FinishSync(d); err != nil {
				return false, false, err
			}
			asm = rep.NewAssembler(0)
			if s.handler.Synced != nil {
				s.handler.Synced(vm)
			}
		case f.Type == TypeMarker:
			if marker, err = DecodeMarker(f); err != nil {
				return false, false, err
			}
		case f.Type == TypeDiskWrite:
			d, err := DecodeDiskWrite(f)
			if err != nil {
				return false, false, err
			}
			if disks == nil {
				return false, false, fmt.Errorf("replication: %s: a disk write but the VM has no protected disk", vm)
			}
			if err := disks.Write(f.Epoch, d); err != nil {
				return false, false, fmt.Errorf("replication: %s: %w", vm, err)
			}
			ordered++
		case f.Type == TypeDiskZero:
			z, err := DecodeDiskZero(f)
			if err != nil {
				return false, false, err
			}
			if disks == nil {
				return false, false, fmt.Errorf("replication: %s: a disk zero range but the VM has no protected disk", vm)
			}
			if err := disks.Zero(f.Epoch, z); err != nil {
				return false, false, fmt.Errorf("replication: %s: %w", vm, err)
			}
			ordered++
		case f.Type == TypeLevel:
			lc, err := DecodeLevelChange(f)
			if err != nil {
				return false, false, err
			}
			if disks != nil {
				if err := disks.SetLevel(lc.Level); err != nil {
					return false, false, fmt.Errorf("replication: %s: %w", vm, err)
				}
			}
			if lc.Level == StreamLevelHA && (asm != nil || syncing) {
				// Leaving FT: the guest runs on past the last checkpoint,
				// so the memory replica must never be resumed; a later FT
				// phase synchronises it again from scratch.
				if err := rep.BeginSync(); err != nil {
					return false, false, err
				}
				asm, syncing, onBase = nil, true, false
			}
			if s.handler.Level != nil {
				s.handler.Level(vm, lc.Level)
			}
			ordered++
		case f.Type.IsCheckpoint():
			if asm == nil {
				return false, false, fmt.Errorf("replication: %s: checkpoint before the initial sync ended", vm)
			}
			cp, err := asm.Add(f)
			if err != nil {
				return false, false, err
			}
			if cp == nil {
				continue
			}
			if err := rep.Apply(cp); err != nil {
				return false, false, err
			}
			if disks != nil {
				if err := disks.Commit(cp.Epoch()); err != nil {
					return false, false, fmt.Errorf("replication: %s: disk writes of epoch %d: %w", vm, cp.Epoch(), err)
				}
			}
			m := marker
			if m.Epoch != cp.Epoch() {
				m = Marker{Epoch: cp.Epoch(), ConsoleOffset: -1}
			}
			if s.handler.Committed != nil {
				s.handler.Committed(vm, cp.Epoch(), m)
			}
			asm = rep.NewAssembler(0)
			if err := send(Ack{Epoch: cp.Epoch()}.Frame()); err != nil {
				return false, false, err
			}
		case f.Type == TypeHeartbeat:
			if _, err := DecodeHeartbeat(f); err != nil {
				return false, false, err
			}
			c, _ := rep.Committed()
			if err := send(Heartbeat{SentUnixNano: time.Now().UnixNano(), LastCommitted: c}.Frame()); err != nil {
				return false, false, err
			}
		case f.Type == TypeBye:
			return true, false, nil
		case f.Type == TypeRestart:
			grace, err := decodeRestart(f)
			if err != nil {
				return false, false, err
			}
			// A new stream of the VM (the restarted primary) waits for
			// this one's Ended, which hears of the restart.
			send(f)
			return false, false, &RestartingError{For: grace}
		case f.Type == TypeHandover:
			if c, _ := rep.Committed(); c != f.Epoch {
				return false, false, fmt.Errorf("replication: %s: handover after epoch %d but %d is committed", vm, f.Epoch, c)
			}
			return false, true, nil
		default:
			return false, false, fmt.Errorf("replication: %s: unexpected %s", vm, f.Type)
		}
	}
}
