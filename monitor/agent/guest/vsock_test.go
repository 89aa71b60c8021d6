package guest

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/axproject/ax/test/testenv"
	"github.com/mdlayher/vsock"
)

// vsockLoopback reports whether AF_VSOCK connections to the local CID work
// here (the vsock_loopback module of the lab guest's kernel; this
// development host's kernel lacks it).
func vsockLoopback() bool {
	l, err := vsock.ListenContextID(vsock.Local, 0, nil)
	if err != nil {
		return false
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := vsock.DialContext(ctx, vsock.Local, l.Addr().(*vsock.Addr).Port, nil)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// TestIntegrationVsockEndToEnd runs the end-to-end scenario over AF_VSOCK:
// the agent dials CID 1 (local) where the host side listens, as it dials CID
// 2 from a guest. CI runs it inside the lab guest (make test-guest-kernel).
func TestIntegrationVsockEndToEnd(t *testing.T) {
	testenv.RequireFeature(t, "vsock-loopback", vsockLoopback(),
		"needs vsock_loopback (CI runs it in the lab guest kernel: make test-guest-kernel; elsewhere try: modprobe vsock_loopback)")
	var port uint32
	endToEnd(t, transport{
		name: "vsock",
		listen: func(t *testing.T) net.Listener {
			var ln *vsock.Listener
			var err error
			for i := 0; i < 50; i++ { // the same port again after a "restart"
				if ln, err = vsock.ListenContextID(vsock.Local, port, nil); err == nil {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil {
				t.Fatal(err)
			}
			port = ln.Addr().(*vsock.Addr).Port
			return ln
		},
		config: func(c *Config) {
			c.Transports = []string{TransportVsock}
			c.VsockCID, c.VsockPort = vsock.Local, port
		},
	})
}
