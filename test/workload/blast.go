package workload

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// Bounds of BLAST, so a request cannot keep the guest busy for long.
const (
	MaxBlastFrames = 1_000_000
	MaxBlastSize   = 1400 // payload bytes: one frame below the lab's MTU
)

// Blast parses "ip:port n size" and sends n UDP datagrams of size bytes to
// ip:port as fast as it can, each starting with its 8-byte sequence number.
// It returns how many it sent and how long that took.
func Blast(arg string) (int, time.Duration, error) {
	f := strings.Fields(arg)
	if len(f) != 3 {
		return 0, 0, fmt.Errorf("BLAST needs <ip:port> <count> <size>")
	}
	n, err1 := strconv.Atoi(f[1])
	size, err2 := strconv.Atoi(f[2])
	if err1 != nil || err2 != nil || n < 1 || n > MaxBlastFrames || size < 8 || size > MaxBlastSize {
		return 0, 0, fmt.Errorf("BLAST: count 1-%d and size 8-%d", MaxBlastFrames, MaxBlastSize)
	}
	conn, err := net.Dial("udp", f[0])
	if err != nil {
		return 0, 0, fmt.Errorf("BLAST: %w", err)
	}
	defer conn.Close()
	buf := make([]byte, size)
	t0 := time.Now()
	sent := 0
	for i := range n {
		putUint64(buf, uint64(i))
		if _, err := conn.Write(buf); err != nil {
			// ENOBUFS and the like: the frame is lost, as on a wire.
			continue
		}
		sent++
	}
	return sent, time.Since(t0), nil
}

func putUint64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}
