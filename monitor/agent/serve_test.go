package agent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// qemuChardev stands in for QEMU's chardev socket: the host's axd dials it.
func qemuChardev(t *testing.T) (string, chan net.Conn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return path, conns
}

func dialed(t *testing.T, conns chan net.Conn) (*fakeAgent, time.Time) {
	t.Helper()
	select {
	case c := <-conns:
		a := &fakeAgent{t: t, conn: c, in: make(chan *Message, 16)}
		go func() {
			defer close(a.in)
			fr := NewFrameReader(c, 0)
			for {
				m, err := fr.Next()
				if err != nil {
					return
				}
				a.in <- m
			}
		}()
		t.Cleanup(func() { c.Close() })
		return a, time.Now()
	case <-time.After(10 * time.Second):
		t.Fatal("axd did not dial the chardev")
	}
	return nil, time.Time{}
}

func TestServeChardev(t *testing.T) {
	h := newHarness(t, Config{Limits: Limits{Penalty: 1500 * time.Millisecond}})
	path, conns := qemuChardev(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.m.ServeChardev(ctx, path) }()

	a, _ := dialed(t, conns)
	a.hello(tcpCheck("app", false))
	a.conn.Close() // the guest's side went away
	a, _ = dialed(t, conns)
	a.hello(tcpCheck("app", false))
	// Misbehaviour: the next dial waits for the penalty.
	a.conn.Write([]byte("\x00\x00\x00\x02{]"))
	dropped := time.Now()
	_, at := dialed(t, conns)
	if wait := at.Sub(dropped); wait < 1400*time.Millisecond {
		t.Errorf("redialed %v after a malformed frame; the penalty is 1.5 s", wait)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeChardev: %v", err)
	}
}

func TestServeListener(t *testing.T) {
	h := newHarness(t, Config{})
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "l.sock"))
	if err != nil {
		t.Fatal(err)
	}
	known := true
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- ServeListener(ctx, ln, func(net.Addr) *Monitor {
			if known {
				return h.m
			}
			return nil
		})
	}()
	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := &fakeAgent{t: t, conn: c, in: make(chan *Message, 16)}
	go func() {
		fr := NewFrameReader(c, 0)
		for {
			m, err := fr.Next()
			if err != nil {
				close(a.in)
				return
			}
			a.in <- m
		}
	}()
	a.hello(tcpCheck("app", false))
	cancel() // ends the listener and the session
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeListener: %v", err)
	}
	if _, open := <-a.in; open {
		t.Error("session still open after ServeListener returned")
	}
	if _, ok := VsockContextID(c.LocalAddr()); ok {
		t.Error("a unix address has a vsock context ID")
	}
}

func TestReconnectFlood(t *testing.T) {
	h := newHarness(t, Config{Limits: Limits{ConnectRate: 0.001, ConnectBurst: 3, Penalty: time.Hour, MaxPenalty: 2 * time.Hour}})
	for i := 0; i < 3; i++ {
		a, done := h.serve(t)
		a.hello(tcpCheck("app", false))
		a.conn.Close()
		waitEnd(t, done)
	}
	_, done := h.serve(t)
	err := waitEnd(t, done)
	var se *SessionError
	if !errors.As(err, &se) || se.Reason != ReasonFlood || se.RetryAfter != time.Hour {
		t.Fatalf("4th connection: %v, want a flood refusal for 1h", err)
	}
	_, done = h.serve(t)
	if r := ReasonOf(waitEnd(t, done)); r != ReasonPenalty {
		t.Fatalf("5th connection: %q, want penalty", r)
	}
}
