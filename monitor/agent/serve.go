package agent

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
)

// ChardevRetry is the least wait between two connections to a VM's
// virtio-serial chardev socket.
const ChardevRetry = time.Second

// ServeChardev follows a VM's agent over the virtio-serial port whose host
// end is QEMU's chardev unix socket at path (server=on,wait=off): it dials
// the socket, serves the connection, and dials again after ChardevRetry or
// the VM's penalty, until ctx ends. QEMU's socket outlives axd, so a new axd
// simply dials it again; the agent's next hello restarts the session.
func (m *Monitor) ServeChardev(ctx context.Context, path string) error {
	var d net.Dialer
	for {
		wait := ChardevRetry
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			err = m.Serve(ctx, conn)
			var se *SessionError
			if errors.As(err, &se) {
				wait = max(wait, se.RetryAfter)
				if se.Reason == ReasonClosed && ctx.Err() == nil {
					return err // the Monitor was closed
				}
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// ServeListener accepts agent connections on ln (a vsock listener on the
// host, typically) and serves each on the Monitor route returns for its
// remote address (see VsockContextID); connections route does not know are
// closed at once. It returns when ctx ends or ln fails, after every session
// it started has ended.
func ServeListener(ctx context.Context, ln net.Listener, route func(net.Addr) *Monitor) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		m := route(conn.RemoteAddr())
		if m == nil {
			conn.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.Serve(ctx, conn)
		}()
	}
}

// VsockContextID returns the guest's context ID of a vsock connection's
// remote address, which identifies the VM that connected.
func VsockContextID(a net.Addr) (uint32, bool) {
	va, ok := a.(*vsock.Addr)
	if !ok {
		return 0, false
	}
	return va.ContextID, true
}
