package lab

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/axproject/ax/ax/api"
)

// BenchWitness measures failover time — host of the FT primary killed →
// guest running on the partner — with each witness, in one run: the single
// axd --witness on w, then the 3-member etcd cluster on w1–w3, runs trials
// each (alternating a→b, b→a). Both use axd's default lease TTL of 1 s,
// which etcd rounds to its own minimum (2 s with the lab's raft timing): the
// ratio shows what the etcd witness costs a failover on this lab.
func BenchWitness(ctx context.Context, l *Lab, f labFlags, runs int, out io.Writer, log *slog.Logger) error {
	bin, err := f.binary("ax-workload")
	if err != nil {
		return err
	}
	medians := map[string]float64{}
	for _, kind := range []string{WitnessAxd, WitnessEtcd} {
		f.witness = kind
		times, err := benchWitnessFailovers(ctx, l, f, runs, bin, log)
		if err != nil {
			return fmt.Errorf("bench-witness (%s): %w", kind, err)
		}
		medians[kind] = medianSeconds(times)
		fmt.Fprintf(out, "witness %-4s failover (kill → first tick on the partner): %s s (median %.2f s)\n", kind, durations(times), medians[kind])
	}
	fmt.Fprintf(out, "bench_witness failover_s_axd=%.2f failover_s_etcd=%.2f etcd_over_axd=%.2f runs=%d\n",
		medians[WitnessAxd], medians[WitnessEtcd], medians[WitnessEtcd]/medians[WitnessAxd], runs)
	return nil
}

// benchWitnessFailovers brings a lab up with f's witness and returns the
// failover times of runs trials.
func benchWitnessFailovers(ctx context.Context, l *Lab, f labFlags, runs int, bin string, log *slog.Logger) (times []time.Duration, err error) {
	vm, down, err := benchLab(ctx, l, f, log)
	if err != nil {
		return nil, err
	}
	defer down(&err)
	cfg, err := f.daemonConfig()
	if err != nil {
		return nil, err
	}
	from, to := HostA, HostB
	for i := 1; i <= runs; i++ {
		tr, err := l.FailoverTrial(ctx, vm.Name, from, to, 3*time.Second, bin, filepath.Join(l.StateDir, fmt.Sprintf("bench%d.rec", i)))
		if err != nil {
			return nil, err
		}
		if tr.Lost > 0 {
			return nil, fmt.Errorf("run %d: %d of %d acknowledged records lost", i, tr.Lost, tr.Acked)
		}
		times = append(times, tr.Failover)
		if i == runs {
			break
		}
		if err := l.RecoverHost(ctx, from, cfg); err != nil {
			return nil, err
		}
		if err := l.waitProtected(ctx, vm.Name, to, from, 120*time.Second); err != nil {
			return nil, err
		}
		from, to = to, from
	}
	return times, nil
}

// waitProtected waits until vm runs on primary at FT, protected towards peer.
func (l *Lab) waitProtected(ctx context.Context, vm, primary, peer string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		s, err := l.vmStatus(ctx, l.Client(primary), vm)
		if err == nil && s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == peer && s.State == "protected" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s on %s not protected towards %s within %s: %+v (%v)", vm, primary, peer, timeout, s, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
