package replication

import (
	"errors"
	"fmt"
	"time"
)

// A planned restart of the primary's axd (systemctl restart): the primary
// tells the secondary, in a Restart frame, for how long it will be away; the
// secondary keeps the replica, does not take the VM over for that long, and
// echoes the frame to say so before the stream ends. The restarted axd opens
// a new stream and resynchronises on the replica as the base. The duration,
// not a moment, travels: each side counts it on its own clock from its own
// end of the frame, so the secondary's wait ends after the primary's.

// MaxRestartGrace bounds how long a primary may ask its partner not to take
// the VM over while its axd restarts.
const MaxRestartGrace = 10 * time.Minute

// restartEchoWait bounds how long the primary waits for the echo.
const restartEchoWait = 2 * time.Second

// RestartingError ends a stream whose primary's axd restarts (the replica is
// kept and must not be promoted for For) or, Secondary, whose secondary's
// axd restarts (it keeps the replica and will be back within For: the
// primary may hold its output and reconnect rather than give up on it).
type RestartingError struct {
	For       time.Duration
	Secondary bool
}

func (e *RestartingError) Error() string {
	if e.Secondary {
		return fmt.Sprintf("the secondary's axd restarts, back within %s", e.For)
	}
	return fmt.Sprintf("the primary's axd restarts: no takeover for %s", e.For)
}

// Leave tells the primary of every stream that this host's axd restarts and
// will be back within grace, keeping its replicas (Sender.Err is then a
// *RestartingError with Secondary set). The streams end as the primaries
// hear it.
func (s *Server) Leave(grace time.Duration) {
	if grace <= 0 || grace > MaxRestartGrace {
		return
	}
	s.mu.Lock()
	var sends []func(Frame) error
	for _, st := range s.sessions {
		if st.send != nil {
			sends = append(sends, st.send)
		}
	}
	s.mu.Unlock()
	for _, send := range sends {
		send(restartFrame(grace))
	}
}

func restartFrame(d time.Duration) Frame {
	return Frame{Type: TypeRestart, Payload: le.AppendUint64(nil, uint64(d))}
}

// decodeRestart returns the grace a Restart frame asks for.
func decodeRestart(f Frame) (time.Duration, error) {
	if err := expect(f, TypeRestart, 8); err != nil {
		return 0, err
	}
	d := time.Duration(le.Uint64(f.Payload))
	if d <= 0 || d > MaxRestartGrace {
		return 0, frameErr(ErrMalformed, "restart grace of %s (at most %s)", d, MaxRestartGrace)
	}
	return d, nil
}

// ErrRestartNotConfirmed: the secondary did not echo a Restart in time; it
// may take the VM over as after any silence.
var ErrRestartNotConfirmed = errors.New("replication: the secondary did not confirm the restart")

// Restarting tells the secondary that this host's axd restarts and will be
// back within grace: the secondary keeps the replica and does not take the
// VM over before grace has passed (from when it got the frame). It returns
// nil once the secondary confirmed; the stream is closed afterwards.
func (s *Sender) Restarting(grace time.Duration) error {
	if grace <= 0 || grace > MaxRestartGrace {
		return fmt.Errorf("replication: restart grace %s out of range (0, %s]", grace, MaxRestartGrace)
	}
	select {
	case <-s.restartEcho:
		// Confirmed once: the stream ended with that echo (the reader
		// closes it just before it fails the stream).
		return fmt.Errorf("%w: the stream ended with an earlier restart", ErrRestartNotConfirmed)
	default:
	}
	s.restartSent.Store(true)
	if err := s.write(func() error { return s.w.WriteFrame(restartFrame(grace)) }, true); err != nil {
		return err
	}
	select {
	case <-s.restartEcho:
		return nil
	case <-s.done:
		// The echo may have come just before the stream ended.
		select {
		case <-s.restartEcho:
			return nil
		default:
		}
		return fmt.Errorf("%w: %w", ErrRestartNotConfirmed, s.Err())
	case <-time.After(restartEchoWait):
		return ErrRestartNotConfirmed
	}
}
