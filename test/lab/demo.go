package lab

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// DemoConfig steers the demo.
type DemoConfig struct {
	flags   labFlags
	Records int           // ledger records the client appends
	Rate    float64       // appends per second
	Keep    bool          // leave the lab up at the end
	RunFor  time.Duration // protected running time before host a is killed
}

// Demo brings the lab up, boots a guest on host a, runs the ledger client
// from host c through the public segment and verifies its records; then
// protects the guest at level FT towards b, kills host a while the client
// runs, checks the guest resumed on b from its last committed checkpoint,
// tears the lab down and prints one key=value summary line.
func Demo(ctx context.Context, l *Lab, cfg DemoConfig, out io.Writer, log *slog.Logger) (err error) {
	icfg, err := cfg.flags.imageConfig(log)
	if err != nil {
		return err
	}
	summary := []string{}
	kv := func(k string, v any) { summary = append(summary, fmt.Sprintf("%s=%v", k, v)) }
	defer func() {
		status := "ok"
		if err != nil {
			status = "failed"
		}
		fmt.Fprintf(out, "demo=%s %s\n", status, strings.Join(summary, " "))
	}()

	t0 := time.Now()
	if err := l.Up(ctx); err != nil {
		return err
	}
	kv("lab_up_s", secs(time.Since(t0)))
	fmt.Fprintf(out, "lab %s: hosts a, b, w, c and switch up\n", l.Prefix)
	if !cfg.Keep {
		defer func() {
			t := time.Now()
			if derr := l.Down(context.Background()); derr != nil && err == nil {
				err = derr
			}
			kv("teardown_s", secs(time.Since(t)))
		}()
	}

	t1 := time.Now()
	vm, err := bootGuest(ctx, l, cfg.flags, icfg, out)
	if err != nil {
		return err
	}
	kv("boot_s", secs(time.Since(t1)))
	kv("accel", vm.Accel)
	bin := icfg.Binaries[0] // ax-workload
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)

	// The foundation's check: records appended from host c and read back.
	record := filepath.Join(l.StateDir, "client.rec")
	fmt.Fprintf(out, "client on host c appends %d records at %g/s to %s\n", cfg.Records, cfg.Rate, addr)
	res, err := l.runWorkload(ctx, HostC, bin, "client", "--addr", addr, "--rate", fmt.Sprint(cfg.Rate),
		"--count", fmt.Sprint(cfg.Records), "--for", "120s", "--record", record)
	if err != nil {
		return err
	}
	vres, err := l.runWorkload(ctx, HostC, bin, "verify", "--addr", addr, "--record", record)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "ledger: %s, %s\n", strings.TrimSpace(res), strings.TrimSpace(vres))

	// FT: protect the guest towards b, run the client, kill host a.
	if err := startDaemons(ctx, l, cfg.flags, vm); err != nil {
		return err
	}
	fmt.Fprintf(out, "axd on a and b, witness on w; protecting %s at level ft towards b\n", vm.Name)
	ftRecord := filepath.Join(l.StateDir, "client-ft.rec")
	tr, err := l.FailoverTrial(ctx, vm.Name, HostA, HostB, cfg.RunFor, bin, ftRecord)
	if tr != nil {
		kv("acked", tr.Acked)
		kv("verified", tr.Acked-tr.Lost)
		kv("lost", tr.Lost)
		kv("failover_s", secs(tr.Failover))
		kv("last_epoch", tr.LastEpoch)
		kv("tick_at_commit", tr.TickAtCommit)
		kv("first_tick_after", tr.FirstTick)
		kv("pause_ms_p50", fmt.Sprintf("%.1f", tr.PauseP50MS))
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "host a killed after %s; %s resumed on b in %.2f s from epoch %d: tick %d at the checkpoint, %d first on b\n",
		cfg.RunFor, vm.Name, tr.Failover.Seconds(), tr.LastEpoch, tr.TickAtCommit, tr.FirstTick)
	fmt.Fprintf(out, "ledger on b: %d of the %d records acknowledged before the kill are there (output held until its checkpoint commits)\n", tr.Acked-tr.Lost, tr.Acked)
	if tr.Lost > 0 {
		return fmt.Errorf("demo: %d acknowledged records lost in the failover", tr.Lost)
	}
	if cfg.Keep {
		fmt.Fprintf(out, "lab %s stays up; explore with: axctl lab status --prefix %s; remove with: axctl lab down --prefix %s\n",
			l.Prefix, l.Prefix, l.Prefix)
	}
	return nil
}

// runWorkload runs ax-workload in host h's namespace and returns its output.
func (l *Lab) runWorkload(ctx context.Context, h, bin string, args ...string) (string, error) {
	cmd := l.Exec(ctx, h, bin, args...)
	cmd.Stderr = os.Stderr
	outb, err := cmd.Output()
	if err != nil {
		return string(outb), fmt.Errorf("ax-workload %s on host %s: %w (output: %s)", args[0], h, err, strings.TrimSpace(string(outb)))
	}
	return string(outb), nil
}

// field picks key's value from "k=v k=v" output.
func field(out, key string) string {
	for _, f := range strings.Fields(out) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return "?"
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f", d.Seconds()) }
