package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Reason is why a session ended or something an agent sent was refused. It
// is the reason label of ax_agent_rejected_total and
// ax_agent_disconnects_total.
type Reason string

// Reasons.
const (
	ReasonEOF       Reason = "eof"       // the agent (or the transport) closed the connection
	ReasonMalformed Reason = "malformed" // a frame that does not decode strictly
	ReasonTooLarge  Reason = "too-large" // a frame header beyond Limits.MaxFrame
	ReasonProtocol  Reason = "protocol"  // a valid message out of place: no hello first, a second hello, seq not increasing, an undeclared check, too many checks, a host-bound type
	ReasonFlood     Reason = "flood"     // more messages or bytes than the token buckets allow
	ReasonIdle      Reason = "idle"      // no hello in time, silent past IdleTimeout, or a frame trickling in too slowly
	ReasonWrite     Reason = "write"     // the agent does not read what the host sends
	ReasonReplaced  Reason = "replaced"  // a newer connection of the same VM took over
	ReasonClosed    Reason = "closed"    // the host ended it (context, Monitor.Close)
	ReasonPenalty   Reason = "penalty"   // refused: the VM's agent misbehaved recently
)

// misbehaviour reports whether the reason earns the VM a penalty.
func (r Reason) misbehaviour() bool {
	switch r {
	case ReasonMalformed, ReasonTooLarge, ReasonProtocol, ReasonFlood:
		return true
	}
	return false
}

// SessionError says why Monitor.Serve returned.
type SessionError struct {
	VM     string
	Reason Reason
	Err    error // the underlying error, if any
	// RetryAfter is how long the VM's agent is refused from now on; a
	// caller that dials the agent (virtio-serial) waits at least this long.
	RetryAfter time.Duration
}

func (e *SessionError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("agent session of %s ended: %s", e.VM, e.Reason)
	}
	return fmt.Sprintf("agent session of %s ended: %s: %v", e.VM, e.Reason, e.Err)
}

func (e *SessionError) Unwrap() error { return e.Err }

// ReasonOf returns the Reason of a Serve error ("" when it is not one).
func ReasonOf(err error) Reason {
	var se *SessionError
	if errors.As(err, &se) {
		return se.Reason
	}
	return ""
}

// Limits bound what one VM's agent can cost axd. Zero fields take the
// defaults in DefaultLimits.
type Limits struct {
	MaxChecks int // checks accepted in a hello (at most MaxChecks)
	MaxFrame  int // bytes per frame (at most MaxFrame)
	// Rate and Burst: messages per second and the bucket size. Bytes:
	// ByteRate per second and ByteBurst. An agent beyond either is
	// disconnected.
	Rate, Burst         float64
	ByteRate, ByteBurst float64
	// Connects per second and their burst: a guest that reconnects faster
	// is refused as a flood.
	ConnectRate, ConnectBurst float64
	HelloTimeout              time.Duration // from connect to hello
	IdleTimeout               time.Duration // longest silence before the connection is dropped
	FrameTimeout              time.Duration // from a frame's header to its last byte
	WriteTimeout              time.Duration // one frame to the agent
	SendQueue                 int           // frames waiting for the agent; more are dropped
	// Penalty is how long a VM whose agent misbehaved is refused; it
	// doubles with each repeat up to MaxPenalty and is forgiven after a
	// session that ends well.
	Penalty, MaxPenalty time.Duration
}

// DefaultLimits allow 32 checks at a 1 s interval with room to spare.
var DefaultLimits = Limits{
	MaxChecks: 32, MaxFrame: MaxFrame,
	Rate: 40, Burst: 100,
	ByteRate: 64 << 10, ByteBurst: 256 << 10,
	ConnectRate: 0.5, ConnectBurst: 10,
	HelloTimeout: 10 * time.Second, IdleTimeout: time.Minute,
	FrameTimeout: 10 * time.Second, WriteTimeout: 5 * time.Second,
	SendQueue: 16,
	Penalty:   2 * time.Second, MaxPenalty: 5 * time.Minute,
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	pick := func(v *int, def int, ceil int) {
		if *v <= 0 || *v > ceil {
			*v = min(def, ceil)
		}
	}
	pick(&l.MaxChecks, d.MaxChecks, MaxChecks)
	pick(&l.MaxFrame, d.MaxFrame, MaxFrame)
	pick(&l.SendQueue, d.SendQueue, 1024)
	for _, f := range []struct{ v, def *float64 }{{&l.Rate, &d.Rate}, {&l.Burst, &d.Burst},
		{&l.ByteRate, &d.ByteRate}, {&l.ByteBurst, &d.ByteBurst},
		{&l.ConnectRate, &d.ConnectRate}, {&l.ConnectBurst, &d.ConnectBurst}} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	for _, f := range []struct{ v, def *time.Duration }{{&l.HelloTimeout, &d.HelloTimeout},
		{&l.IdleTimeout, &d.IdleTimeout}, {&l.FrameTimeout, &d.FrameTimeout},
		{&l.WriteTimeout, &d.WriteTimeout}, {&l.Penalty, &d.Penalty}, {&l.MaxPenalty, &d.MaxPenalty}} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	return l
}

// Session is one connection of a VM's agent. It reads, validates and
// rate-limits what the agent sends and hands accepted messages to its
// Monitor; a writer goroutine sends acks and recover requests with a
// deadline. It is created and run by Monitor.Serve.
type Session struct {
	m    *Monitor
	conn net.Conn
	lim  Limits
	out  chan *Message

	greeted bool // hello accepted; guarded by the Monitor's mu

	// Read-goroutine state.
	helloed bool
	lastSeq uint64
	msgs    *bucket
	bytes   *bucket

	endOnce sync.Once
	done    chan struct{}
	reason  Reason
	err     error
}

func newSession(m *Monitor, conn net.Conn) *Session {
	now := m.cfg.Now()
	l := m.cfg.Limits
	return &Session{
		m: m, conn: conn, lim: l,
		out:   make(chan *Message, l.SendQueue),
		msgs:  newBucket(l.Rate, l.Burst, now),
		bytes: newBucket(l.ByteRate, l.ByteBurst, now),
		done:  make(chan struct{}),
	}
}

// end records why the session ends (the first reason wins) and closes the
// connection, which unblocks the reader and the writer.
func (s *Session) end(r Reason, err error) {
	s.endOnce.Do(func() {
		s.reason, s.err = r, err
		close(s.done)
		s.conn.Close()
	})
}

// send queues m for the agent without blocking; a full queue drops it (the
// agent is not reading; the write deadline will end the session).
func (s *Session) send(m *Message) bool {
	select {
	case s.out <- m:
		return true
	default:
		return false
	}
}

// run serves the connection until it ends and returns why.
func (s *Session) run(ctx context.Context) (Reason, error) {
	stop := context.AfterFunc(ctx, func() { s.end(ReasonClosed, ctx.Err()) })
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.write()
	}()
	r, err := s.read()
	s.end(r, err)
	wg.Wait()
	return s.reason, s.err
}

func (s *Session) write() {
	for {
		select {
		case <-s.done:
			return
		case m := <-s.out:
			frame, err := Encode(m)
			if err != nil { // a host bug; never put an invalid frame on the wire
				s.end(ReasonWrite, err)
				return
			}
			s.conn.SetWriteDeadline(time.Now().Add(s.lim.WriteTimeout))
			if _, err := s.conn.Write(frame); err != nil {
				s.end(ReasonWrite, err)
				return
			}
		}
	}
}

func (s *Session) read() (Reason, error) {
	fr := NewFrameReader(s.conn, s.lim.MaxFrame)
	start := time.Now()
	for {
		deadline := time.Now().Add(s.lim.IdleTimeout)
		if !s.helloed {
			deadline = start.Add(s.lim.HelloTimeout)
		}
		s.conn.SetReadDeadline(deadline)
		n, err := fr.ReadHeader()
		if err != nil {
			return readReason(err), err
		}
		now := s.m.cfg.Now()
		// Charge before reading the body, so a flood costs little.
		if !s.msgs.take(1, now) || !s.bytes.take(float64(n+headerLen), now) {
			return ReasonFlood, fmt.Errorf("agent exceeded %g messages/s or %g bytes/s", s.lim.Rate, s.lim.ByteRate)
		}
		s.conn.SetReadDeadline(time.Now().Add(s.lim.FrameTimeout))
		p, err := fr.ReadPayload(n)
		if err != nil {
			return readReason(err), err
		}
		msg, err := Decode(p)
		if err != nil {
			return ReasonMalformed, err
		}
		if err := s.accept(msg); err != nil {
			return ReasonProtocol, err
		}
	}
}

func readReason(err error) Reason {
	switch {
	case errors.Is(err, ErrFrameTooLarge):
		return ReasonTooLarge
	case errors.Is(err, ErrInvalid):
		return ReasonMalformed
	case errors.Is(err, os.ErrDeadlineExceeded):
		return ReasonIdle
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return ReasonEOF
	}
	return ReasonEOF // reset, closed by end(): end keeps the first reason
}

// accept checks the message's place in the conversation and hands it on.
func (s *Session) accept(msg *Message) error {
	if !msg.FromAgent() {
		return fmt.Errorf("agent sent a host message (%s)", msg.Type)
	}
	seq := msg.Seq()
	if seq <= s.lastSeq {
		return fmt.Errorf("%s with sequence %d after %d", msg.Type, seq, s.lastSeq)
	}
	s.lastSeq = seq
	if !s.helloed {
		if msg.Type != TypeHello {
			return fmt.Errorf("%s before hello", msg.Type)
		}
		if len(msg.Hello.Checks) > s.lim.MaxChecks {
			return fmt.Errorf("hello declares %d checks, this host accepts %d", len(msg.Hello.Checks), s.lim.MaxChecks)
		}
		s.helloed = true
	} else if msg.Type == TypeHello {
		return errors.New("second hello")
	}
	return s.m.handle(s, msg)
}
