package nbd

import (
	"net"

	"golang.org/x/sys/unix"
)

// peer says who is at the other end of nc: root (a process of uid 0, or a
// client the kernel cannot name — a listener that is not a unix socket is
// its owner's choice), or process pid of another user.
func peer(nc net.Conn) (root bool, pid int) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return true, 0
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false, 0
	}
	var cred *unix.Ucred
	cerr := raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cerr != nil || err != nil {
		return false, 0 // admitted nowhere
	}
	return cred.Uid == 0, int(cred.Pid)
}

// admitted: c may use e.
func (c *conn) admitted(e *export) bool {
	return c.root || (e.pid > 0 && c.pid == e.pid)
}
