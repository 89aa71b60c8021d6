// Package qemu is AX's control of a VM's QEMU over QMP: pause and resume,
// save CPU and device state for a checkpoint, and resume a replica.
package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// Monitor is what AX asks of a VM's QEMU. The epoch loop and failover are
// written against it; QMP implements it for real and tests use a fake.
type Monitor interface {
	// Stop pauses the vCPUs and drains block I/O.
	Stop(ctx context.Context) error
	// Cont resumes the vCPUs.
	Cont(ctx context.Context) error
	// SaveDeviceState writes CPU and device state, no RAM, to path
	// (xen-save-devices-state with live=false).
	SaveDeviceState(ctx context.Context, path string) error
	// Status returns QEMU's run state ("running", "paused", "inmigrate", …).
	Status(ctx context.Context) (string, error)
	// LoadIncoming loads device state from uri into a QEMU started with
	// -incoming defer whose RAM is already the replica (x-ignore-shared).
	LoadIncoming(ctx context.Context, uri string) error
	// Announce makes the guest's NICs announce their MACs (RARP/GARP).
	Announce(ctx context.Context) error
	// Reset resets the guest (a hard reboot, QMP system_reset).
	Reset(ctx context.Context) error
	// Quit ends QEMU.
	Quit(ctx context.Context) error
	Close() error
}

// QMP is a Monitor over a QEMU QMP socket, using go-qemu's qmp.Monitor.
type QMP struct {
	mon    qmp.Monitor
	closed sync.Once
}

var _ Monitor = (*QMP)(nil)

// Dial connects to the QMP unix socket at path.
func Dial(path string, timeout time.Duration) (*QMP, error) {
	mon, err := qmp.NewSocketMonitor("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", path, err)
	}
	return New(mon)
}

// New wraps a connected-or-not qmp.Monitor (go-qemu's qmptest for tests).
func New(mon qmp.Monitor) (*QMP, error) {
	if err := mon.Connect(); err != nil {
		return nil, fmt.Errorf("qmp handshake: %w", err)
	}
	return &QMP{mon: mon}, nil
}

// ErrTimeout means QEMU did not answer in time; the connection is closed.
var ErrTimeout = errors.New("qmp: no answer from QEMU")

// run sends one command and waits for its answer or ctx. go-qemu's Run has
// no deadline, so a hung QEMU would block forever: when ctx's deadline
// passes the connection is closed, which ends Run. A caller that merely
// gives up (ctx cancelled: protection ending, a level change) leaves the
// connection open — the command finishes in QEMU, its answer is dropped,
// and the next command follows it: the cleanup that comes next (resuming
// the guest, ending a disk mirror) needs the monitor. Closing it there left
// a guest paused and a mirror's NBD client behind under libvirt, whose
// pass-through makes each command slow enough to be caught mid-way.
func (q *QMP) run(ctx context.Context, cmd string, args any) ([]byte, error) {
	raw, err := json.Marshal(qmp.Command{Execute: cmd, Args: args})
	if err != nil {
		return nil, err
	}
	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := q.mon.Run(raw)
		done <- result{out, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, r.err)
		}
		return r.out, nil
	case <-ctx.Done():
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
		}
		q.Close()
		<-done
		return nil, fmt.Errorf("qmp %s: %w (%v)", cmd, ErrTimeout, ctx.Err())
	}
}

func (q *QMP) Stop(ctx context.Context) error {
	_, err := q.run(ctx, "stop", nil)
	return err
}

func (q *QMP) Cont(ctx context.Context) error {
	_, err := q.run(ctx, "cont", nil)
	return err
}

func (q *QMP) SaveDeviceState(ctx context.Context, path string) error {
	_, err := q.run(ctx, "xen-save-devices-state", map[string]any{"filename": path, "live": false})
	return err
}

func (q *QMP) Status(ctx context.Context) (string, error) {
	out, err := q.run(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var r struct {
		Return struct {
			Status string `json:"status"`
		} `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return "", fmt.Errorf("qmp query-status: %w", err)
	}
	return r.Return.Status, nil
}

func (q *QMP) LoadIncoming(ctx context.Context, uri string) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
	if _, err := q.run(ctx, "migrate-set-capabilities", caps); err != nil {
		return err
	}
	if _, err := q.run(ctx, "migrate-incoming", map[string]any{"uri": uri}); err != nil {
		return err
	}
	// migrate-incoming returns at once; the load runs in QEMU's main loop.
	for {
		st, err := q.Status(ctx)
		if err != nil {
			return err
		}
		switch st {
		case "paused", "postmigrate", "prelaunch", "running":
			return nil
		case "inmigrate":
		default:
			return fmt.Errorf("qmp: loading device state ended in state %q", st)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("qmp: loading device state: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (q *QMP) Announce(ctx context.Context) error {
	_, err := q.run(ctx, "announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 5, "step": 100})
	return err
}

func (q *QMP) Reset(ctx context.Context) error {
	_, err := q.run(ctx, "system_reset", nil)
	return err
}

func (q *QMP) Quit(ctx context.Context) error {
	_, err := q.run(ctx, "quit", nil)
	return err
}

// Close disconnects; safe to call twice.
func (q *QMP) Close() error {
	var err error
	q.closed.Do(func() { err = q.mon.Disconnect() })
	return err
}

// LoadDeviceStateFile feeds the committed device state in file dev to a
// QEMU waiting with -incoming defer, over a unix socket: migrate-incoming
// with a unix: URI makes QEMU listen on sock, and AX connects and writes the
// file (no exec: URI, so no shell ever sees a path). sock must be a path in
// a directory of the caller's own; a stale socket there is removed first.
func LoadDeviceStateFile(ctx context.Context, mon Monitor, dev, sock string) error {
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	os.Remove(sock)
	defer os.Remove(sock)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fed := make(chan error, 1)
	go func() { fed <- feedSocket(ctx, sock, f) }()
	loadErr := mon.LoadIncoming(ctx, "unix:"+sock)
	cancel() // a feeder still waiting for QEMU's socket gives up
	feedErr := <-fed
	if loadErr != nil {
		return loadErr
	}
	if feedErr != nil {
		return fmt.Errorf("feeding device state to QEMU: %w", feedErr)
	}
	return nil
}

// feedSocket connects to the unix socket QEMU listens on once it has taken
// migrate-incoming, then writes r to it and closes.
func feedSocket(ctx context.Context, sock string, r io.Reader) error {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", sock)
		if err == nil {
			defer c.Close()
			stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
			defer stop()
			_, err = io.Copy(c, r)
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("QEMU never listened on %s: %w", sock, err)
		case <-time.After(2 * time.Millisecond):
		}
	}
}
