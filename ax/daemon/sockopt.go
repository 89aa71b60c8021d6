package daemon

import (
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// setTCPUserTimeout makes the kernel fail a connection whose sent data stays
// unacknowledged for d, instead of retrying for minutes.
func setTCPUserTimeout(c *net.TCPConn, d time.Duration) {
	raw, err := c.SyscallConn()
	if err != nil {
		return
	}
	raw.Control(func(fd uintptr) {
		unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	})
}
