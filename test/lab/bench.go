package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"time"
)

// Bench measures the lab's own costs over runs cycles: hosts and networks up,
// guest boot to its first ledger ACK seen from the client host, teardown.
func Bench(ctx context.Context, l *Lab, f labFlags, runs int, out io.Writer, log *slog.Logger) error {
	icfg, err := f.imageConfig(log)
	if err != nil {
		return err
	}
	var up, boot, down, total []float64
	for i := 0; i < runs; i++ {
		t0 := time.Now()
		if err := l.Up(ctx); err != nil {
			return err
		}
		tUp := time.Since(t0)
		t1 := time.Now()
		vm, err := bootGuest(ctx, l, f, icfg, io.Discard)
		if err == nil {
			err = l.firstAck(ctx, vm)
		}
		tBoot := time.Since(t1)
		t2 := time.Now()
		if derr := l.Down(context.Background()); derr != nil && err == nil {
			err = derr
		}
		if err != nil {
			return err
		}
		up = append(up, tUp.Seconds())
		boot = append(boot, tBoot.Seconds())
		down = append(down, time.Since(t2).Seconds())
		total = append(total, (tUp + tBoot).Seconds())
		if i == 0 {
			fmt.Fprintf(out, "lab bench: %d runs, guest %s, %d MiB\n", runs, vm.Accel, vm.RAMMiB)
		}
	}
	fmt.Fprintf(out, "%-34s %8s %8s %8s\n", "lab", "min", "median", "max")
	row := func(name string, v []float64) {
		s := append([]float64(nil), v...)
		sort.Float64s(s)
		fmt.Fprintf(out, "%-34s %7.2fs %7.2fs %7.2fs\n", name, s[0], s[len(s)/2], s[len(s)-1])
	}
	row("hosts and networks up", up)
	row("guest boot to first ledger ack", boot)
	row("teardown", down)
	row("lab up + guest serving", total)
	s := append([]float64(nil), total...)
	sort.Float64s(s)
	fmt.Fprintf(out, "bench_lab lab_up_s=%.2f boot_s=%.2f teardown_s=%.2f serving_s=%.2f target_s=60 ratio_to_target=%.3f\n",
		median(up), median(boot), median(down), s[len(s)/2], s[len(s)/2]/60)
	return nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// firstAck appends one record from the client host and waits for its ACK.
func (l *Lab) firstAck(ctx context.Context, vm *VM) error {
	conn, err := l.DialFrom(ctx, HostC, fmt.Sprintf("%s:%d", vm.IP, LedgerPort))
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("APPEND bench\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "ACK ") {
		return fmt.Errorf("ledger answered %q", line)
	}
	return nil
}
