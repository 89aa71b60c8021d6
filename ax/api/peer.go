package api

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/axproject/ax/ax/names"
)

// Peer is a partner host as axd's --peer names it.
type Peer struct {
	Name string `json:"name"`
	Repl string `json:"repl"` // HOST:PORT on the replication link (TCP streams, UDP heartbeats)
	Mgmt string `json:"mgmt"` // HOST:PORT on the management network (UDP heartbeats)
}

// ParsePeer reads NAME=REPL_HOST:PORT,MGMT_HOST:PORT (axd --peer,
// axctl doctor --peer).
func ParsePeer(s string) (Peer, error) {
	name, addrs, ok := strings.Cut(s, "=")
	repl, mgmt, ok2 := strings.Cut(addrs, ",")
	if !ok || !ok2 || name == "" || repl == "" || mgmt == "" {
		return Peer{}, fmt.Errorf("peer %q: want NAME=REPL_HOST:PORT,MGMT_HOST:PORT", s)
	}
	if err := names.Check("host", name); err != nil {
		return Peer{}, fmt.Errorf("peer %q: %w", s, err)
	}
	for _, a := range []string{repl, mgmt} {
		if err := CheckAddr(a); err != nil {
			return Peer{}, fmt.Errorf("peer %q: %w", s, err)
		}
	}
	return Peer{Name: name, Repl: repl, Mgmt: mgmt}, nil
}

// CheckAddr checks that addr is HOST:PORT with a port from 1 to 65535.
func CheckAddr(addr string) error {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: want HOST:PORT: %w", addr, err)
	}
	if port, err := strconv.Atoi(p); err != nil || port <= 0 || port > 65535 {
		return fmt.Errorf("address %q: port %q is not a number from 1 to 65535", addr, p)
	}
	return nil
}
