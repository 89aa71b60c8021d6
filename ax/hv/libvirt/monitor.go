package libvirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-qemu/qmp"
)

// monitor is go-qemu's qmp.Monitor over libvirt's QEMU monitor
// pass-through (virDomainQemuMonitorCommand), so that qemu.New gives a
// libvirt domain the same qemu.QMP, block operations included, that a
// QEMU axd started has. It shares the driver's connection: Disconnect
// ends this monitor, not the connection.
type monitor struct {
	conn Conn
	dom  golibvirt.Domain
	// ctx ends with Disconnect.
	ctx    context.Context
	cancel context.CancelFunc
}

var _ qmp.Monitor = (*monitor)(nil)

func newMonitor(conn Conn, dom golibvirt.Domain) *monitor {
	ctx, cancel := context.WithCancel(context.Background())
	return &monitor{conn: conn, dom: dom, ctx: ctx, cancel: cancel}
}

// errMonitorClosed is what a command gets once its monitor is closed.
var errMonitorClosed = errors.New("libvirt monitor closed")

// Connect does nothing: libvirt owns QEMU's monitor and has done the
// QMP greeting and capabilities negotiation.
func (m *monitor) Connect() error { return nil }

// Disconnect ends the monitor: a command waiting for libvirt returns at
// once (qemu.QMP closes its monitor when a command outlives its deadline).
func (m *monitor) Disconnect() error {
	m.cancel()
	return nil
}

// Run passes one QMP command to the domain's QEMU through libvirt. A QMP
// error reply is returned as an error, as go-qemu's socket monitor does.
func (m *monitor) Run(cmd []byte) ([]byte, error) {
	if m.ctx.Err() != nil {
		return nil, errMonitorClosed
	}
	out, err := call(m.ctx, func() (string, error) { return m.conn.QEMUDomainMonitorCommand(m.dom, string(cmd), 0) })
	if err != nil {
		if m.ctx.Err() != nil {
			return nil, errMonitorClosed
		}
		return nil, fmt.Errorf("libvirt domain %s: %w", m.dom.Name, err)
	}
	var r struct {
		Error *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("libvirt domain %s: QMP reply %.80q: %w", m.dom.Name, out, err)
	}
	if r.Error != nil {
		return nil, fmt.Errorf("%s: %s", r.Error.Class, r.Error.Desc)
	}
	return []byte(out), nil
}

// Events is not offered: AX's control needs no QMP events, and libvirt's
// own lifecycle events come from Driver.Events.
func (m *monitor) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, qmp.ErrEventsNotSupported
}
