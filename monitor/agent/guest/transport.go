package guest

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
)

// Conn is a connection to the host's axd.
type Conn interface {
	io.ReadWriteCloser
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// Dialer opens a connection to the host over one transport.
type Dialer interface {
	Dial(ctx context.Context) (Conn, error)
	String() string
}

// VsockDialer connects over AF_VSOCK.
type VsockDialer struct {
	CID, Port uint32
}

// Dial connects to CID:Port.
func (d VsockDialer) Dial(ctx context.Context) (Conn, error) {
	c, err := vsock.DialContext(ctx, d.CID, d.Port, nil)
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (d VsockDialer) String() string { return fmt.Sprintf("vsock %d:%d", d.CID, d.Port) }

// SerialDialer opens a virtio-serial port. The port has no connection of its
// own: reads return EOF while no host process holds the other end (QEMU's
// chardev socket) and writes wait, so the agent's reconnect loop and write
// deadlines carry it across axd restarts. A path that is a unix socket is
// dialed instead, which lets the agent run against a host-side socket
// directly (tests, debugging).
type SerialDialer struct {
	Path string
}

// Dial opens the port.
func (d SerialDialer) Dial(ctx context.Context) (Conn, error) {
	fi, err := os.Stat(d.Path)
	if err != nil {
		return nil, err
	}
	if fi.Mode()&os.ModeSocket != 0 {
		var nd net.Dialer
		c, err := nd.DialContext(ctx, "unix", d.Path)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	if fi.Mode()&os.ModeCharDevice == 0 {
		return nil, fmt.Errorf("%s is neither a character device nor a unix socket", d.Path)
	}
	// os.OpenFile puts a pollable device in non-blocking mode under Go's
	// poller, so deadlines work on it.
	f, err := os.OpenFile(d.Path, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, err
	}
	return f, nil
}

func (d SerialDialer) String() string { return "serial " + d.Path }

// dialers builds the transports of cfg in order.
func dialers(cfg *Config) []Dialer {
	var ds []Dialer
	for _, t := range cfg.Transports {
		switch t {
		case TransportVsock:
			ds = append(ds, VsockDialer{CID: cfg.VsockCID, Port: cfg.VsockPort})
		case TransportSerial:
			ds = append(ds, SerialDialer{Path: cfg.SerialPath})
		}
	}
	return ds
}
