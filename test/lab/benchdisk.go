package lab

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/replication/nbd"
	"github.com/axproject/ax/test/workload"
)

// diskLevelResult is the disk-backed ledger measured at one level.
type diskLevelResult struct {
	level          string
	fillMBs        float64 // sequential 256 KiB O_DIRECT writes, one writer, as the guest measures them
	fill4MBs       float64 // the same with four writers (queue depth 4)
	opsPerSec      float64 // pipelined appends/s (one 4 KiB block write + flush each)
	p50, p99       time.Duration
	replBytesPerS  float64 // replication bandwidth used while measuring
	pipelinedTotal time.Duration
	// CPU seconds per GB written, during the fills: the guest's QEMU and
	// both axd; and how many of the machine's cores they kept busy.
	cpuPerGB map[string]float64
	cores    float64
	pauseP50 float64 // FT: the guest's pause, median of the recent ones, after the fills (ms)
	maxLag   uint64  // most writes the partner had not acknowledged, sampled during the fills
	diskMode string  // how the disks reached the partner (quorum, mirror), sampled after the fills
}

// cpuOf reads the CPU time of the guest's QEMU and of both axd.
func (l *Lab) cpuOf(vm *VM) map[string]time.Duration {
	out := map[string]time.Duration{}
	pids := map[string]int{"qemu": vm.PID}
	for _, p := range l.state.Procs {
		if p.Name == "axd-"+HostA || p.Name == "axd-"+HostB {
			pids[p.Name] = p.PID
		}
	}
	for name, pid := range pids {
		if d, err := procCPU(pid); err == nil {
			out[name] = d
		}
	}
	return out
}

// BenchDisk reports the guest's disk write throughput and latency at levels
// none, HA and FT, measured side by side in one run on the lab guest's
// disk-backed ledger (each append writes its record's 4 KiB block with
// O_DIRECT and flushes before the ACK): throughput with appends pipelined,
// latency one append at a time, and the replication bandwidth used.
func BenchDisk(ctx context.Context, l *Lab, f labFlags, out io.Writer, log *slog.Logger) (err error) {
	f.diskMiB, f.libvirt = 160, false // the AX-started guest first; the libvirt domain after it
	vm, down, err := benchLab(ctx, l, f, log)
	if err != nil {
		return err
	}
	defer down(&err)
	ca := l.Client(HostA)
	ceil, err := newCeilings(ctx, vm, l.StateDir, int64(f.diskMiB)<<20)
	if err != nil {
		return err
	}
	defer ceil.Close()
	measure := func(level string) (diskLevelResult, error) {
		return measureDiskLevel(ctx, l, vm, vm.Name, ceil, level)
	}
	// none is measured first and again last, and the ratios use the mean
	// of the two: the machine's speed drifts during a run.
	res := map[string]diskLevelResult{}
	for _, level := range []string{api.LevelNone, ceilingNull, ceilingNBD, api.LevelHA, api.LevelFT, api.LevelNone} {
		r, err := measure(level)
		if err != nil {
			return err
		}
		if first, ok := res[level]; ok {
			fmt.Fprintf(out, "  none measured first and last: 1 writer %.1f and %.1f MB/s, 4 writers %.1f and %.1f MB/s, appends %.0f and %.0f/s\n",
				first.fillMBs, r.fillMBs, first.fill4MBs, r.fill4MBs, first.opsPerSec, r.opsPerSec)
			r = meanResult(first, r)
		}
		res[level] = r
	}
	if err := ca.Level(ctx, vm.Name, api.ProtectRequest{Level: api.LevelNone}); err != nil {
		return err
	}
	lv, lvErr := benchDiskLibvirt(ctx, l, f, log)
	none := res[api.LevelNone]
	fmt.Fprintf(out, "disk bench: guest %d MiB, %s, %d MiB raw virtio-blk disk; the ledger writes each record's 4 KiB block (O_DIRECT) and flushes before its ACK\n", vm.RAMMiB, vm.Accel, f.diskMiB)
	for _, level := range []string{api.LevelNone, ceilingNull, ceilingNBD, api.LevelHA, api.LevelFT} {
		r := res[level]
		if level == ceilingNull {
			fmt.Fprintf(out, "  what QEMU's side alone costs, nothing replicated (the guest at level none, its disk's quorum node given a second child):\n")
			fmt.Fprintf(out, "    %s: a null-co child that discards; %s: an NBD child on a unix socket to a server that discards\n", ceilingNull, ceilingNBD)
		}
		fmt.Fprintf(out, "  %-4s CPU per GB written: QEMU %.2f s, axd a %.2f s, axd b %.2f s; %.2f of %d cores busy while writing\n",
			level, r.cpuPerGB["qemu"], r.cpuPerGB["axd-"+HostA], r.cpuPerGB["axd-"+HostB], r.cores, runtime.NumCPU())
		fmt.Fprintf(out, "  %-4s write throughput (%d MiB of 256 KiB O_DIRECT writes + flush, median of %d): 1 writer %6.1f MB/s, ratio %.2f; 4 writers %6.1f MB/s, ratio %.2f | flushed 4 KiB appends %5.0f/s, ratio %.2f | append latency p50 %5.1f ms p99 %5.1f ms | replication %.2f MB/s, at most %d writes unacknowledged\n",
			level, diskFillMiB, diskFills, r.fillMBs, r.fillMBs/none.fillMBs, r.fill4MBs, r.fill4MBs/none.fill4MBs, r.opsPerSec, r.opsPerSec/none.opsPerSec, ms(r.p50), ms(r.p99), r.replBytesPerS/1e6, r.maxLag)
	}
	fmt.Fprintf(out, "  ft   pause while writing: median %.1f ms (the queue of writes drains to the stream after the guest resumes)\n", res[api.LevelFT].pauseP50)
	fmt.Fprintf(out, "  targets: HA ≥ 0.8 × none write throughput, FT ≥ 0.5 × none (FT's append latency includes output commit: the ACK waits for its checkpoint)\n")
	ha, ftr := res[api.LevelHA], res[api.LevelFT]
	if lvErr != nil {
		fmt.Fprintf(out, "  libvirt domain: not measured: %v\n", lvErr)
	} else {
		ln := lv[api.LevelNone]
		fmt.Fprintf(out, "  libvirt domain (Nova-shaped, libvirt's own raw format node, no quorum: replicated by the write-blocking blockdev-mirror to axd's NBD export, set up through libvirt's QMP pass-through), measured after the AX-started guest in this run:\n")
		for _, level := range []string{api.LevelNone, api.LevelHA, api.LevelFT} {
			r := lv[level]
			fmt.Fprintf(out, "  lv %-4s write throughput: 1 writer %6.1f MB/s, ratio %.2f; 4 writers %6.1f MB/s, ratio %.2f | flushed 4 KiB appends %5.0f/s, ratio %.2f | append latency p50 %5.1f ms p99 %5.1f ms | replication %.2f MB/s (%s)\n",
				level, r.fillMBs, r.fillMBs/ln.fillMBs, r.fill4MBs, r.fill4MBs/ln.fill4MBs, r.opsPerSec, r.opsPerSec/ln.opsPerSec, ms(r.p50), ms(r.p99), r.replBytesPerS/1e6, cmp.Or(r.diskMode, "-"))
		}
		lha, lft := lv[api.LevelHA], lv[api.LevelFT]
		vs := func(lvr, lvn, axr, axn float64) float64 { return (lvr / lvn) / (axr / axn) }
		fmt.Fprintf(out, "  libvirt ÷ AX-started, each's ratio to its own none: HA 1 writer %.2f, 4 writers %.2f, appends %.2f; FT 1 writer %.2f, 4 writers %.2f, appends %.2f\n",
			vs(lha.fillMBs, ln.fillMBs, ha.fillMBs, none.fillMBs), vs(lha.fill4MBs, ln.fill4MBs, ha.fill4MBs, none.fill4MBs), vs(lha.opsPerSec, ln.opsPerSec, ha.opsPerSec, none.opsPerSec),
			vs(lft.fillMBs, ln.fillMBs, ftr.fillMBs, none.fillMBs), vs(lft.fill4MBs, ln.fill4MBs, ftr.fill4MBs, none.fill4MBs), vs(lft.opsPerSec, ln.opsPerSec, ftr.opsPerSec, none.opsPerSec))
		fmt.Fprintf(out, "bench_disk_libvirt none_mb_s=%.1f ha_ratio=%.3f ft_ratio=%.3f ha_ratio_4w=%.3f ft_ratio_4w=%.3f ha_appends_ratio=%.3f ft_appends_ratio=%.3f ha_vs_ax=%.2f ft_vs_ax=%.2f ha_vs_ax_4w=%.2f ft_vs_ax_4w=%.2f\n",
			ln.fillMBs, lha.fillMBs/ln.fillMBs, lft.fillMBs/ln.fillMBs, lha.fill4MBs/ln.fill4MBs, lft.fill4MBs/ln.fill4MBs, lha.opsPerSec/ln.opsPerSec, lft.opsPerSec/ln.opsPerSec,
			vs(lha.fillMBs, ln.fillMBs, ha.fillMBs, none.fillMBs), vs(lft.fillMBs, ln.fillMBs, ftr.fillMBs, none.fillMBs), vs(lha.fill4MBs, ln.fill4MBs, ha.fill4MBs, none.fill4MBs), vs(lft.fill4MBs, ln.fill4MBs, ftr.fill4MBs, none.fill4MBs))
	}
	nul, nb := res[ceilingNull], res[ceilingNBD]
	fmt.Fprintf(out, "bench_disk none_mb_s=%.1f null_child_ratio=%.3f nbd_child_ratio=%.3f ha_ratio=%.3f ft_ratio=%.3f none_mb_s_4w=%.1f ha_ratio_4w=%.3f ft_ratio_4w=%.3f none_appends_s=%.0f ha_appends_ratio=%.3f ft_appends_ratio=%.3f none_p50_ms=%.1f ha_p50_ms=%.1f ft_p50_ms=%.1f ha_repl_mb_s=%.2f ft_repl_mb_s=%.2f\n",
		none.fillMBs, nul.fillMBs/none.fillMBs, nb.fillMBs/none.fillMBs, ha.fillMBs/none.fillMBs, ftr.fillMBs/none.fillMBs, none.fill4MBs, ha.fill4MBs/none.fill4MBs, ftr.fill4MBs/none.fill4MBs, none.opsPerSec, ha.opsPerSec/none.opsPerSec, ftr.opsPerSec/none.opsPerSec,
		ms(none.p50), ms(ha.p50), ms(ftr.p50), ha.replBytesPerS/1e6, ftr.replBytesPerS/1e6)
	return nil
}

// benchDiskLibvirt takes the lab down and up again with a libvirtd on a
// and b, the guest a Nova-shaped libvirt domain with a disk, and axd
// --libvirt, and measures the domain's disk at none, HA, FT and none again
// (the ratios use the mean of the two nones). libvirt's disk has no quorum
// node, so there are no ceiling rows and replication stays on the mirror.
// It leaves the lab up (BenchDisk's down ends it).
func benchDiskLibvirt(ctx context.Context, l *Lab, f labFlags, log *slog.Logger) (map[string]diskLevelResult, error) {
	vm, err := benchLibvirtLab(ctx, l, f, log)
	if err != nil {
		return nil, err
	}
	res := map[string]diskLevelResult{}
	for _, level := range []string{api.LevelNone, api.LevelHA, api.LevelFT, api.LevelNone} {
		r, err := measureDiskLevel(ctx, l, vm, vm.Domain, nil, level)
		if err != nil {
			return nil, fmt.Errorf("libvirt domain: %w", err)
		}
		if first, ok := res[level]; ok {
			r = meanResult(first, r)
		}
		res[level] = r
	}
	return res, nil
}

// Sizes of bench-disk's measures.
const diskPipelined, diskSequential, diskFillMiB, diskFills = 1000, 200, 64, 5

// measureDiskLevel puts the guest vm (called name by axd) at level — or,
// for a ceiling row, attaches its discarding child — and measures its
// disk-backed ledger there.
func measureDiskLevel(ctx context.Context, l *Lab, vm *VM, vmName string, ceil *ceilings, level string) (diskLevelResult, error) {
	ca := l.Client(HostA)
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	r := diskLevelResult{level: level}
	if child, ok := ceilingChildren[level]; ok {
		detach, err := ceil.attach(ctx, child)
		if err != nil {
			return r, fmt.Errorf("%s: %w", level, err)
		}
		defer detach()
	} else if _, serr := l.vmStatus(ctx, ca, vmName); serr != nil && vm.Domain != "" {
		// A libvirt domain axd has not seen yet: at none there is nothing
		// to change; otherwise axctl protect DOMAIN discovers it.
		if level != api.LevelNone {
			if err := ca.Protect(ctx, vmName, api.ProtectRequest{Level: level, Peer: HostB}); err != nil {
				return r, err
			}
			if err := l.protectLevelAndWait(ctx, ca, vmName, HostB, level); err != nil {
				return r, err
			}
		}
	} else if level == api.LevelNone {
		if err := ca.Level(ctx, vmName, api.ProtectRequest{Level: level}); err != nil {
			return r, err
		}
	} else if err := l.protectLevelAndWait(ctx, ca, vmName, HostB, level); err != nil {
		return r, err
	}
	time.Sleep(2 * time.Second) // settle after the change
	s0, _ := l.vmStatus(ctx, ca, vmName)
	t0 := time.Now()
	var lat []time.Duration
	cpu0, fill0 := l.cpuOf(vm), time.Now()
	sampling := make(chan struct{})
	sampled := make(chan uint64)
	go func() {
		var most uint64
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sampling:
				sampled <- most
				return
			case <-t.C:
			}
			if st, err := l.vmStatus(ctx, ca, vmName); err == nil {
				most = max(most, st.DiskLag)
			}
		}
	}()
	stopSampling := sync.OnceValue(func() uint64 { close(sampling); return <-sampled })
	defer stopSampling()
	err := l.InNetns(HostC, func() error {
		median := func(writers int) (float64, error) {
			var rates []float64
			for range diskFills {
				took, err := workload.Fill(ctx, addr, diskFillMiB, writers, time.Minute)
				if err != nil {
					return 0, err
				}
				rates = append(rates, diskFillMiB*(1<<20)/took.Seconds()/1e6)
			}
			sort.Float64s(rates)
			return rates[len(rates)/2], nil
		}
		var err error
		if r.fillMBs, err = median(1); err != nil {
			return err
		}
		if r.fill4MBs, err = median(4); err != nil {
			return err
		}
		cpu1 := l.cpuOf(vm)
		r.maxLag = stopSampling()
		if st, err := l.vmStatus(ctx, ca, vmName); err == nil {
			r.pauseP50, r.diskMode = st.PauseP50MS, st.DiskMode
		}
		r.cpuPerGB = map[string]float64{}
		var total time.Duration
		for name, c := range cpu1 {
			r.cpuPerGB[name] = (c - cpu0[name]).Seconds() / (2 * diskFills * diskFillMiB * (1 << 20) / 1e9)
			total += c - cpu0[name]
		}
		r.cores = total.Seconds() / time.Since(fill0).Seconds()
		if r.pipelinedTotal, err = workload.AppendPipelined(ctx, addr, diskPipelined); err != nil {
			return err
		}
		lat, err = workload.AppendLatency(ctx, addr, diskSequential)
		return err
	})
	if err != nil {
		return r, fmt.Errorf("level %s: %w", level, err)
	}
	s1, _ := l.vmStatus(ctx, ca, vmName)
	r.opsPerSec = diskPipelined / r.pipelinedTotal.Seconds()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	r.p50, r.p99 = lat[len(lat)/2], lat[min(len(lat)-1, len(lat)*99/100)]
	if s1.DiskBytes > s0.DiskBytes {
		r.replBytesPerS = float64(s1.DiskBytes-s0.DiskBytes) / time.Since(t0).Seconds()
	}
	return r, nil
}

// meanResult averages two measures of one level.
func meanResult(a, b diskLevelResult) diskLevelResult {
	m := a
	m.fillMBs, m.fill4MBs = (a.fillMBs+b.fillMBs)/2, (a.fill4MBs+b.fill4MBs)/2
	m.opsPerSec = (a.opsPerSec + b.opsPerSec) / 2
	m.p50, m.p99 = (a.p50+b.p50)/2, (a.p99+b.p99)/2
	m.cores = (a.cores + b.cores) / 2
	m.cpuPerGB = map[string]float64{}
	for k := range a.cpuPerGB {
		m.cpuPerGB[k] = (a.cpuPerGB[k] + b.cpuPerGB[k]) / 2
	}
	return m
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// The bench's ceiling rows: the guest at level none with a second quorum
// child that discards, so only QEMU's part of replication is paid.
const (
	ceilingNull = "q+null"
	ceilingNBD  = "q+nbd"
)

// ceilingChildren names the node each ceiling row attaches.
var ceilingChildren = map[string]string{ceilingNull: "ax-bench-null", ceilingNBD: "ax-bench-nbd"}

// ceilings attaches discarding children to the guest's disk. It holds QEMU's
// one QMP connection only while it attaches or detaches: axd needs it too.
type ceilings struct {
	qmp    string
	disk   string
	size   int64
	socket string
	cancel context.CancelFunc
}

func newCeilings(ctx context.Context, vm *VM, dir string, size int64) (*ceilings, error) {
	if len(vm.Spec.Disks) == 0 {
		return nil, errors.New("bench-disk: the guest has no disk")
	}
	c := &ceilings{qmp: vm.QMP, disk: vm.Spec.Disks[0].Node, size: size, socket: filepath.Join(dir, "bench-nbd.sock")}
	os.Remove(c.socket)
	ln, err := net.Listen("unix", c.socket)
	if err != nil {
		return nil, err
	}
	srv := nbd.NewServer(nil)
	if err := srv.AddExport("discard", discardBackend(size)); err != nil {
		ln.Close()
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	c.cancel = cancel
	go srv.Serve(sctx, ln)
	return c, nil
}

// attach adds node as the disk's second quorum child; detach removes it.
func (c *ceilings) attach(ctx context.Context, node string) (detach func(), err error) {
	mon, err := qemu.Dial(c.qmp, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer mon.Close()
	if node == ceilingChildren[ceilingNull] {
		err = mon.AddNullNode(ctx, node, c.size)
	} else {
		err = mon.AddNBDTarget(ctx, node, c.socket, "discard")
	}
	if err != nil {
		return nil, err
	}
	if err := mon.AddQuorumChild(ctx, c.disk, node); err != nil {
		mon.DeleteNode(ctx, node)
		return nil, err
	}
	return func() {
		mon, err := qemu.Dial(c.qmp, 5*time.Second)
		if err != nil {
			return
		}
		defer mon.Close()
		mon.RemoveQuorumChild(context.Background(), c.disk, node)
		mon.DeleteNode(context.Background(), node)
	}, nil
}

func (c *ceilings) Close() {
	c.cancel()
	os.Remove(c.socket)
}

// discardBackend is an NBD export that drops writes and reads zeroes; its
// writes are done when started, as axd's queued ones are.
type discardBackend int64

func (d discardBackend) Size() int64 { return int64(d) }
func (d discardBackend) ReadAt(p []byte, _ int64) error {
	clear(p)
	return nil
}
func (discardBackend) WriteAtAsync([]byte, int64, bool) (func() error, error) { return nil, nil }
func (discardBackend) WriteAt([]byte, int64, bool) error                      { return nil }
func (discardBackend) WriteZeroes(int64, int64, bool) error                   { return nil }
func (discardBackend) Trim(int64, int64) error                                { return nil }
func (discardBackend) Flush() error                                           { return nil }
