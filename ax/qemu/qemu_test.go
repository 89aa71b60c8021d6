package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// slowMonitor is a qmp.Monitor whose commands each wait for gate and are
// recorded, one at a time (go-qemu's socket monitor holds a lock per
// command, libvirt serialises them per domain); Disconnect makes every
// command after it fail, as go-qemu's socket monitor and the libvirt
// pass-through do.
type slowMonitor struct {
	runMu  sync.Mutex
	mu     sync.Mutex
	ran    []string
	closed bool
	gate   chan struct{} // a command waits for it (or Disconnect)
	gone   chan struct{} // closed by Disconnect
	once   sync.Once
}

func (m *slowMonitor) Connect() error { m.gone = make(chan struct{}); return nil }
func (m *slowMonitor) Disconnect() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.once.Do(func() { close(m.gone) })
	return nil
}
func (m *slowMonitor) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, qmp.ErrEventsNotSupported
}
func (m *slowMonitor) Run(cmd []byte) ([]byte, error) {
	var c qmp.Command
	if err := json.Unmarshal(cmd, &c); err != nil {
		return nil, err
	}
	m.runMu.Lock()
	defer m.runMu.Unlock()
	select {
	case <-m.gate:
	case <-m.gone:
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errors.New("monitor closed")
	}
	m.ran = append(m.ran, c.Execute)
	return []byte(`{"return":{}}`), nil
}

func (m *slowMonitor) commands() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.ran...)
}

// TestRunCancelledKeepsMonitor: a command whose caller gives up (its
// context cancelled, as when protection ends mid-checkpoint) still reaches
// QEMU, and the monitor stays usable for what comes next — resuming the
// guest, ending a disk mirror. Only a command that outlives its deadline
// (QEMU hung) closes the monitor.
func TestRunCancelledKeepsMonitor(t *testing.T) {
	m := &slowMonitor{gate: make(chan struct{})}
	q, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- q.Stop(ctx) }()
	time.Sleep(10 * time.Millisecond) // Stop is in flight
	cancel()
	err = <-errc
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout) {
		t.Errorf("cancelled stop: %v, want context.Canceled and not ErrTimeout", err)
	}
	close(m.gate) // QEMU answers the abandoned stop
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer ccancel()
	if err := q.Cont(cctx); err != nil {
		t.Fatalf("cont after a cancelled stop: %v (the monitor was closed)", err)
	}
	if got := m.commands(); len(got) != 2 || got[0] != "stop" || got[1] != "cont" {
		t.Errorf("QEMU ran %v, want [stop cont]", got)
	}

	hung := &slowMonitor{gate: make(chan struct{})}
	defer close(hung.gate)
	q, err = New(hung)
	if err != nil {
		t.Fatal(err)
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer dcancel()
	if err := q.Stop(dctx); !errors.Is(err, ErrTimeout) {
		t.Errorf("stop past its deadline: %v, want ErrTimeout", err)
	}
	hung.mu.Lock()
	closed := hung.closed
	hung.mu.Unlock()
	if !closed {
		t.Error("a command past its deadline left the monitor open")
	}
}
