package replication

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// A primary whose axd restarts says for how long; the secondary hears it
// (Ended with a RestartingError carrying that grace) and echoes it, which
// is what Restarting waits for.
func TestRestartingConfirmed(t *testing.T) {
	const ramSize = 4 * PageSize
	addr, _, _, ends := startStreamServer(t, pskMode, ramSize)
	s, err := Dial(context.Background(), addr, pskMode.client, pskMode.peer, "vm1", []byte(`{"name":"vm1"}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Restarting(7 * time.Second); err != nil {
		t.Fatalf("Restarting: %v", err)
	}
	select {
	case e := <-ends:
		var r *RestartingError
		if e.bye || e.handover || !errors.As(e.err, &r) || r.For != 7*time.Second {
			t.Fatalf("the secondary saw the stream end with bye=%v handover=%v err=%v", e.bye, e.handover, e.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end")
	}
	if err := s.Restarting(time.Second); err == nil {
		t.Error("a second Restarting on an ended stream was confirmed")
	}
}

// Without an echo (the secondary is gone) a restart is not confirmed: the
// caller must act as if the partner may take over after any silence.
func TestRestartingUnconfirmed(t *testing.T) {
	const ramSize = 4 * PageSize
	addr, _, _, ends := startStreamServer(t, pskMode, ramSize)
	s, err := Dial(context.Background(), addr, pskMode.client, pskMode.peer, "vm1", []byte(`{"name":"vm1"}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	<-ends
	if err := s.Restarting(time.Second); err == nil {
		t.Fatal("Restarting on a closed stream was confirmed")
	}
	if err := s.Restarting(0); err == nil {
		t.Error("a grace of 0 was accepted")
	}
}

func TestDecodeRestartRefusesBadGrace(t *testing.T) {
	for _, d := range []time.Duration{0, -time.Second, MaxRestartGrace + 1} {
		if _, err := decodeRestart(restartFrame(d)); !errors.Is(err, ErrMalformed) {
			t.Errorf("grace %s: %v, want ErrMalformed", d, err)
		}
	}
	if _, err := decodeRestart(Frame{Type: TypeRestart, Payload: []byte{1}}); !errors.Is(err, ErrMalformed) {
		t.Errorf("short payload: %v", err)
	}
	if d, err := decodeRestart(restartFrame(MaxRestartGrace)); err != nil || d != MaxRestartGrace {
		t.Errorf("the largest grace: %s, %v", d, err)
	}
}

// A secondary whose axd restarts tells its primaries (Server.Leave): the
// stream ends with a RestartingError saying so and for how long.
func TestServerLeave(t *testing.T) {
	const ramSize = 4 * PageSize
	rep, err := OpenReplica(t.TempDir(), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	opened := make(chan struct{}, 1)
	srv := NewServer(pskMode.server, pskMode.allow, Handler{Open: func(string, string, []byte, net.Addr) (*Replica, error) {
		opened <- struct{}{}
		return rep, nil
	}}, nil)
	addr := serve(t, srv)
	s, err := Dial(context.Background(), addr, pskMode.client, pskMode.peer, "vm1", []byte(`{"name":"vm1"}`), ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	<-opened
	srv.Leave(9 * time.Second)
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end when its secondary left")
	}
	var r *RestartingError
	if !errors.As(s.Err(), &r) || !r.Secondary || r.For != 9*time.Second {
		t.Fatalf("the primary's stream ended with %v, want the secondary's restart for 9s", s.Err())
	}
}
