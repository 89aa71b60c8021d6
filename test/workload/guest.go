package workload

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"
)

// Tick writes "AXTICK <n>" every interval, n counting up from 1. On the
// console it shows that the guest runs and, after a failover, from which
// value it continued: the counter lives in guest memory only.
func Tick(ctx context.Context, w io.Writer, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for n := uint64(1); ; n++ {
		if _, err := fmt.Fprintf(w, "AXTICK %d\n", n); err != nil {
			return fmt.Errorf("tick: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// pageSize is the guest's page size: the dirtier writes one byte per page,
// which dirties the whole page for any tracker.
const pageSize = 4096

// Dirty writes to a buffer of sizeMiB at rateMiB MiB/s, one byte per 4 KiB
// page, cycling through the buffer, in 10 ms steps. It returns the number of
// page writes made when ctx ends.
func Dirty(ctx context.Context, sizeMiB int, rateMiB float64) (uint64, error) {
	if sizeMiB <= 0 || rateMiB <= 0 {
		return 0, fmt.Errorf("dirty: size (%d MiB) and rate (%g MiB/s) must be positive", sizeMiB, rateMiB)
	}
	buf := make([]byte, sizeMiB<<20)
	pages := len(buf) / pageSize
	const step = 10 * time.Millisecond
	perStep := rateMiB * (1 << 20) / pageSize * step.Seconds()
	t := time.NewTicker(step)
	defer t.Stop()
	var written uint64
	var owed float64
	next := 0
	for {
		select {
		case <-ctx.Done():
			return written, nil
		case <-t.C:
		}
		owed += perStep
		for ; owed >= 1; owed-- {
			buf[next*pageSize]++
			next = (next + 1) % pages
			written++
		}
	}
}

// App is the lab's monitored application: a TCP service that answers PING
// with PONG and ends the whole process on EXIT, so tests can make it fail
// from outside and watch the agent and axd bring it back.
func App(ctx context.Context, ln net.Listener, exit func()) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("app: %w", err)
		}
		go func() {
			defer conn.Close()
			r := bufio.NewReader(conn)
			for {
				line, err := readLine(r)
				if err != nil {
					return
				}
				switch strings.TrimSpace(line) {
				case "PING":
					conn.Write([]byte("PONG\n"))
				case "EXIT":
					conn.Write([]byte("BYE\n"))
					exit()
				default:
					conn.Write([]byte("ERR use PING or EXIT\n"))
				}
			}
		}()
	}
}

// Flood writes garbage to path as fast as it can: a hostile agent, for
// tests that the host side of agent monitoring withstands one.
func Flood(ctx context.Context, path string) error {
	garbage := make([]byte, 4096)
	for i := range garbage {
		garbage[i] = byte(i*7 + 3)
	}
	for ctx.Err() == nil {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		for ctx.Err() == nil {
			if _, err := f.Write(garbage); err != nil {
				break
			}
		}
		f.Close()
	}
	return nil
}
