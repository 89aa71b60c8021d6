package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// ErrProtocol is wrapped by every error that says the client broke the NBD
// protocol; the connection was closed without acting on the bad message.
var ErrProtocol = errors.New("protocol violation")

// handshakeTimeout bounds option haggling, so a client that connects and
// goes quiet does not hold a connection forever.
const handshakeTimeout = 30 * time.Second

// Server serves named exports over NBD. Its methods are safe for concurrent
// use.
type Server struct {
	log *slog.Logger

	mu      sync.Mutex
	exports map[string]*export

	stats struct {
		connections, rejected, protocolErrors atomic.Uint64
		writeRequests, bytesWritten           atomic.Uint64
		backendErrors                         atomic.Uint64
	}
}

// export is one named Backend and the connections in transmission on it.
type export struct {
	name    string
	pid     int // the one process besides root's that may use it (0: none)
	backend Backend
	conns   map[*conn]struct{}
}

// Stats are cumulative counters of a Server.
type Stats struct {
	Connections    uint64 // connections that reached transmission
	Rejected       uint64 // connections closed during the handshake for a bad or unknown request
	ProtocolErrors uint64 // connections closed in transmission for a malformed request
	WriteRequests  uint64 // NBD_CMD_WRITE requests handed to a backend
	BytesWritten   uint64 // bytes of NBD_CMD_WRITE requests the backend accepted
	BackendErrors  uint64 // requests the backend failed (answered with an NBD error)
}

// NewServer returns a Server with no exports. A nil log discards.
func NewServer(log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{log: log, exports: make(map[string]*export)}
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	return Stats{
		Connections:    s.stats.connections.Load(),
		Rejected:       s.stats.rejected.Load(),
		ProtocolErrors: s.stats.protocolErrors.Load(),
		WriteRequests:  s.stats.writeRequests.Load(),
		BytesWritten:   s.stats.bytesWritten.Load(),
		BackendErrors:  s.stats.backendErrors.Load(),
	}
}

// AddExport makes b available under name to root's processes (and to
// every client of a listener that is not a unix socket). Names follow the
// protocol's string rules: at most 4096 bytes, no NUL.
func (s *Server) AddExport(name string, b Backend) error { return s.AddExportFor(name, b, 0) }

// AddExportFor is AddExport, and process pid may use the export too,
// whatever user it runs as (a QEMU that libvirt runs as libvirt-qemu):
// the client's process is the one its unix socket names (SO_PEERCRED).
// To any other client of another user the export does not exist, in
// NBD_OPT_LIST too.
func (s *Server) AddExportFor(name string, b Backend, pid int) error {
	if b == nil {
		return fmt.Errorf("nbd: add export %q: nil backend", name)
	}
	if len(name) > 4096 {
		return fmt.Errorf("nbd: add export %q: name longer than 4096 bytes", name[:32]+"…")
	}
	for i := 0; i < len(name); i++ {
		if name[i] == 0 {
			return fmt.Errorf("nbd: add export %q: name contains NUL", name)
		}
	}
	if b.Size() < 0 {
		return fmt.Errorf("nbd: add export %q: negative size %d", name, b.Size())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[name]; ok {
		return fmt.Errorf("nbd: add export %q: already exported", name)
	}
	s.exports[name] = &export{name: name, pid: max(pid, 0), backend: b, conns: make(map[*conn]struct{})}
	return nil
}

// RemoveExport withdraws name and closes the connections using it. Their
// queued requests are dropped unanswered; a backend call already under way
// is not waited for. Removing an unknown name does nothing.
func (s *Server) RemoveExport(name string) {
	s.mu.Lock()
	e := s.exports[name]
	delete(s.exports, name)
	var conns []*conn
	if e != nil {
		for c := range e.conns {
			c.stopped.Store(true) // before the close, so ServeConn sees why
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	if e == nil {
		return
	}
	for _, c := range conns {
		c.stop()
	}
	s.log.Info("nbd export removed", "export", name, "connections_closed", len(conns))
}

// lookup returns the export called name that c may use, or nil.
func (s *Server) lookup(c *conn, name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.exports[name]; e != nil && c.admitted(e) {
		return e
	}
	return nil
}

// bind attaches c to the export called name so that RemoveExport closes it;
// it returns nil if there is no such export that c may use.
func (s *Server) bind(c *conn, name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.exports[name]
	if e == nil || !c.admitted(e) {
		return nil
	}
	e.conns[c] = struct{}{}
	return e
}

func (s *Server) unbind(c *conn, e *export) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(e.conns, c)
}

// exportNames are the names of the exports c may use.
func (s *Server) exportNames(c *conn) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.exports))
	for n, e := range s.exports {
		if c.admitted(e) {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names
}

// Serve accepts connections on ln until ctx ends, serving each in its own
// goroutine. It closes ln, and before returning closes every connection it
// accepted and waits for their goroutines. It returns nil when ctx ended and
// an error if ln failed.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()

	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: closes the connections

	backoff := 5 * time.Millisecond
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd: serve %s: %w", ln.Addr(), err)
			}
			// Transient (EMFILE, ECONNABORTED, …): wait and retry, as
			// net/http does.
			s.log.Warn("nbd accept failed; retrying", "addr", ln.Addr().String(), "err", err, "backoff", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		wg.Go(func() {
			if err := s.ServeConn(ctx, nc); err != nil {
				s.log.Warn("nbd connection ended with an error", "err", err)
			}
		})
	}
}

// ServeConn runs the NBD protocol on nc until the client disconnects, the
// client breaks the protocol, the export is removed or ctx ends, and closes
// nc. It returns nil for an orderly end (NBD_OPT_ABORT, NBD_CMD_DISC, the
// client closing between requests, ctx, RemoveExport) and otherwise an error
// saying what went wrong.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	c := &conn{srv: s, nc: nc, log: s.log.With("remote", remoteName(nc))}
	c.root, c.pid = peer(nc)
	stop := context.AfterFunc(ctx, c.stop)
	defer stop()
	defer nc.Close()
	err := c.serve(ctx)
	if err != nil && (ctx.Err() != nil || c.stopped.Load()) {
		// Closed deliberately; the read or write it interrupted failed.
		c.log.Debug("nbd connection closed by server", "err", err)
		return nil
	}
	return err
}

// remoteName names the peer for logs; a Unix socket's client is unnamed,
// so the socket's own path stands in.
func remoteName(nc net.Conn) string {
	for _, a := range []net.Addr{nc.RemoteAddr(), nc.LocalAddr()} {
		if a != nil && a.String() != "" && a.String() != "@" {
			return a.String()
		}
	}
	return "?"
}
