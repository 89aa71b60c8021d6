package workload

import (
	"context"
	"fmt"
	"io"
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
