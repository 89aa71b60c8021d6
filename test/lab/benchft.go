package lab

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/dirty"
)

// BenchFT reports FT's costs on the lab guest (memory dirtier at f.dirty
// MiB/s, axd's default 50 ms epochs), measured side by side in one run:
// pause median and p99, epochs per second, guest slowdown (tick rate while
// protected ÷ unprotected, windows alternated), bytes per dirty page,
// failover time — beside this machine's page-hash bandwidth and the device
// state save time, the limits the pause is made of.
//
// A libvirt domain (Nova-shaped, started by the lab's libvirtd, protected by
// name through axd --libvirt, QMP through libvirt's pass-through) is
// measured in the same run, after the AX-started guest, in a lab brought up
// again: pause, slowdown and failover, each beside the AX-started guest's as
// a ratio libvirt ÷ AX-started.
func BenchFT(ctx context.Context, l *Lab, f labFlags, window time.Duration, out io.Writer, log *slog.Logger) (err error) {
	f.libvirt = false // the AX-started guest first; the libvirt domain after it
	vm, down, err := benchLab(ctx, l, f, log)
	if err != nil {
		return err
	}
	defer down(&err)
	bin, err := f.binary("ax-workload")
	if err != nil {
		return err
	}
	hashGBs, err := hashBandwidth(vm.RAMFile, int64(vm.RAMMiB)<<20)
	if err != nil {
		return err
	}
	ca := l.Client(HostA)
	tickRate := func() (float64, error) { return tickRateOver(ctx, vm.Console, window) }
	var unprot, prot, epochsPerSec []float64
	var last api.VMStatus
	for round := 0; round < 2; round++ {
		r, err := tickRate()
		if err != nil {
			return err
		}
		unprot = append(unprot, r)
		if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
			return err
		}
		s0, _ := l.vmStatus(ctx, ca, vm.Name)
		t0 := time.Now()
		if r, err = tickRate(); err != nil {
			return err
		}
		prot = append(prot, r)
		last, _ = l.vmStatus(ctx, ca, vm.Name)
		epochsPerSec = append(epochsPerSec, float64(last.Epoch-s0.Epoch)/time.Since(t0).Seconds())
		if round == 0 {
			if err := ca.Unprotect(ctx, vm.Name); err != nil {
				return err
			}
		}
	}
	// Output commit on the lab path: round trips of the ledger's PING and a
	// bulk LIST transfer (16 MB) from the guest, held and not, with the
	// client's default TCP receive buffer and with 4 MiB (a client tuned for
	// a long-RTT path: the gate adds about one epoch cycle to the RTT).
	addr := fmt.Sprintf("%s:%d", vm.IP, LedgerPort)
	rttProt, err := l.pingRTTs(ctx, addr, 100)
	if err != nil {
		return err
	}
	if err := ca.Unprotect(ctx, vm.Name); err != nil {
		return err
	}
	rttUnprot, err := l.pingRTTs(ctx, addr, 100)
	if err != nil {
		return err
	}
	if err := l.fillLedger(ctx, addr, 16000, 1000); err != nil {
		return err
	}
	bw := map[string]float64{}
	measure := func(key string) error {
		for _, rmem := range []string{"default", "4MiB"} {
			v := "4096 131072 6291456"
			if rmem == "4MiB" {
				v = "4096 4194304 8388608"
			}
			if err := l.Exec(ctx, HostC, "sh", "-c", "echo "+v+" > /proc/sys/net/ipv4/tcp_rmem").Run(); err != nil {
				return fmt.Errorf("set tcp_rmem on c: %w", err)
			}
			r, err := l.listRate(ctx, addr)
			if err != nil {
				return fmt.Errorf("bulk transfer (%s, client rmem %s): %w", key, rmem, err)
			}
			bw[key+"/"+rmem] = r
		}
		return nil
	}
	// Frames per second from the guest to host c (UDP, 64 B and 1400 B
	// payloads), gated and not; and axd's CPU per held frame.
	const blastN = 40000
	blasts := map[string]frameRate{}
	var gateCPU time.Duration
	blast := func(key string) error {
		for _, size := range []int{64, 1400} {
			cpu0 := l.cpuOf(vm)["axd-"+HostA]
			r, err := l.blastRate(ctx, addr, blastN, size)
			if err != nil {
				return fmt.Errorf("frame rate (%s, %d B): %w", key, size, err)
			}
			if key == "held" {
				gateCPU += l.cpuOf(vm)["axd-"+HostA] - cpu0
			}
			blasts[fmt.Sprintf("%s/%d", key, size)] = r
		}
		return nil
	}
	if err := measure("unprotected"); err != nil {
		return err
	}
	if err := blast("unprotected"); err != nil {
		return err
	}
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		return err
	}
	if err := measure("held"); err != nil {
		return err
	}
	if err := blast("held"); err != nil {
		return err
	}
	bwProt, bwUnprot := bw["held/4MiB"], bw["unprotected/4MiB"]
	bytesPerPage := 0.0
	if last.DirtyTotal > 0 {
		bytesPerPage = float64(last.BytesTotal) / float64(last.DirtyTotal)
	}
	tr, err := l.FailoverTrial(ctx, vm.Name, HostA, HostB, 3*time.Second, bin, filepath.Join(l.StateDir, "bench.rec"))
	if err != nil {
		return err
	}

	slowdown := mean(prot) / mean(unprot)
	l.Exec(ctx, HostC, "sh", "-c", "echo 4096 131072 6291456 > /proc/sys/net/ipv4/tcp_rmem").Run()
	axRow := ftRow{pauseP50: last.PauseP50MS, pauseP99: last.PauseP99MS, unprot: mean(unprot), prot: mean(prot), failover: tr.Failover.Seconds()}
	lvRow, lvErr := benchFTLibvirt(ctx, l, f, window, bin, log)
	fmt.Fprintf(out, "FT bench: guest %d MiB, 1 vCPU, %s, memory dirtier %g MiB/s, 50 ms epochs, windows of %s alternated\n", vm.RAMMiB, vm.Accel, f.dirty, window)
	fmt.Fprintf(out, "  pause (stop→cont)         median %.1f ms, p99 %.1f ms   (target median ≤ 15 ms)\n", last.PauseP50MS, last.PauseP99MS)
	fmt.Fprintf(out, "    of which dirty scan     median %.1f ms; device-state save median %.1f ms\n", last.ScanP50MS, last.DevSaveP50MS)
	fmt.Fprintf(out, "  epochs per second         %.1f\n", mean(epochsPerSec))
	fmt.Fprintf(out, "  guest tick rate           unprotected %.2f/s, protected %.2f/s, ratio %.3f   (target ≥ 0.75)\n", mean(unprot), mean(prot), slowdown)
	fmt.Fprintf(out, "  bytes sent per dirty page %.0f (4096 of page data; the rest is device state, %d pages over %d epochs)\n", bytesPerPage, last.DirtyTotal, last.Epoch)
	fmt.Fprintf(out, "  failover (kill → first tick on b) %.2f s   (target ≤ 2 s)\n", tr.Failover.Seconds())
	addP50, addP99 := pct(rttProt, 0.5)-pct(rttUnprot, 0.5), pct(rttProt, 0.99)-pct(rttUnprot, 0.99)
	fmt.Fprintf(out, "  output commit, ledger PING round trip: unprotected p50 %.1f ms p99 %.1f ms; held p50 %.1f ms p99 %.1f ms; added p50 %.1f ms, p99 %.1f ms   (target p99 ≤ epoch + 10 ms = 60 ms)\n",
		pct(rttUnprot, 0.5), pct(rttUnprot, 0.99), pct(rttProt, 0.5), pct(rttProt, 0.99), addP50, addP99)
	for _, size := range []int{64, 1400} {
		u, h := blasts[fmt.Sprintf("unprotected/%d", size)], blasts[fmt.Sprintf("held/%d", size)]
		fmt.Fprintf(out, "  output commit, UDP frames from the guest (%d B payload, %d sent): unprotected %.0f frames/s (%d arrived), held %.0f frames/s (%d arrived), ratio %.3f   (target ≥ 0.5)\n",
			size, blastN, u.perSec, u.received, h.perSec, h.received, h.perSec/u.perSec)
	}
	heldFrames := blasts["held/64"].received + blasts["held/1400"].received
	cpuPerFrame := 0.0
	if heldFrames > 0 {
		cpuPerFrame = gateCPU.Seconds() / float64(heldFrames) * 1e6
	}
	fmt.Fprintf(out, "  output commit, axd CPU on the primary while blasting held: %.2f µs per frame (all of axd: checkpoints included)\n", cpuPerFrame)
	fmt.Fprintf(out, "  output commit, TCP bulk transfer from the guest (LIST, 16 MB; guest: CUBIC without HyStart, send buffers from 1 MiB), client's default rmem: unprotected %.2f MB/s, held %.2f MB/s, ratio %.3f   (target ≥ 0.5)\n",
		bw["unprotected/default"]/1e6, bw["held/default"]/1e6, bw["held/default"]/bw["unprotected/default"])
	fmt.Fprintf(out, "  output commit, the same with client rmem 4 MiB: unprotected %.2f MB/s, held %.2f MB/s, ratio %.3f\n",
		bwUnprot/1e6, bwProt/1e6, bwProt/bwUnprot)
	fmt.Fprintf(out, "  limits here: a full hash scan of this guest's RAM file takes %.1f ms (%.1f GB/s of RAM, holes skipped; see BenchmarkHashScan256MiB for a fully written file); device-state save %.1f ms\n",
		float64(vm.RAMMiB)/1024/hashGBs*1000, hashGBs, last.DevSaveP50MS)
	if lvErr != nil {
		fmt.Fprintf(out, "  libvirt domain: not measured: %v\n", lvErr)
	} else {
		fmt.Fprintf(out, "  libvirt domain (Nova-shaped, started by libvirtd, protected by name; QMP through libvirt's pass-through), measured after the AX-started guest in this run:\n")
		fmt.Fprintf(out, "    pause (stop→cont)       median %.1f ms, p99 %.1f ms; AX-started %.1f ms, %.1f ms; ratio libvirt ÷ AX-started %.2f (median), %.2f (p99)\n",
			lvRow.pauseP50, lvRow.pauseP99, axRow.pauseP50, axRow.pauseP99, lvRow.pauseP50/axRow.pauseP50, lvRow.pauseP99/axRow.pauseP99)
		fmt.Fprintf(out, "    guest tick rate         unprotected %.2f/s, protected %.2f/s, slowdown ratio %.3f; AX-started %.3f; ratio libvirt ÷ AX-started %.2f\n",
			lvRow.unprot, lvRow.prot, lvRow.slowdown(), axRow.slowdown(), lvRow.slowdown()/axRow.slowdown())
		fmt.Fprintf(out, "    failover (kill → first tick on b, resumed as the libvirt domain) %.2f s; AX-started %.2f s; ratio libvirt ÷ AX-started %.2f\n",
			lvRow.failover, axRow.failover, lvRow.failover/axRow.failover)
		fmt.Fprintf(out, "bench_ft_libvirt pause_ms_p50=%.1f pause_ms_p99=%.1f slowdown_ratio=%.3f failover_s=%.2f pause_p50_vs_ax=%.2f slowdown_vs_ax=%.2f failover_vs_ax=%.2f\n",
			lvRow.pauseP50, lvRow.pauseP99, lvRow.slowdown(), lvRow.failover, lvRow.pauseP50/axRow.pauseP50, lvRow.slowdown()/axRow.slowdown(), lvRow.failover/axRow.failover)
	}
	fmt.Fprintf(out, "bench_ft pause_ms_p50=%.1f pause_ms_p99=%.1f epochs_per_s=%.1f slowdown_ratio=%.3f bytes_per_dirty_page=%.0f failover_s=%.2f hash_gb_s=%.1f devsave_ms=%.1f added_latency_ms_p50=%.1f added_latency_ms_p99=%.1f tcp_ratio_default_rmem=%.3f tcp_ratio_4mib_rmem=%.3f frames_ratio_64=%.3f frames_ratio_1400=%.3f cpu_us_per_held_frame=%.2f\n",
		last.PauseP50MS, last.PauseP99MS, mean(epochsPerSec), slowdown, bytesPerPage, tr.Failover.Seconds(), hashGBs, last.DevSaveP50MS, addP50, addP99, bw["held/default"]/bw["unprotected/default"], bwProt/bwUnprot,
		blasts["held/64"].perSec/blasts["unprotected/64"].perSec, blasts["held/1400"].perSec/blasts["unprotected/1400"].perSec, cpuPerFrame)
	return nil
}

// ftRow is what bench-ft measures alike of the AX-started guest and the
// libvirt domain.
type ftRow struct {
	pauseP50, pauseP99 float64 // ms
	unprot, prot       float64 // guest ticks per second
	failover           float64 // s, kill → first tick on b
}

func (r ftRow) slowdown() float64 { return r.prot / r.unprot }

// benchFTLibvirt takes the lab down and up again with a libvirtd on a and b,
// the guest a Nova-shaped libvirt domain started on a and defined on b, and
// axd --libvirt; it measures the domain as BenchFT does the AX-started
// guest: tick rates unprotected and protected at FT (windows alternated),
// the pause, and a failover. It leaves the lab up (BenchFT's down ends it).
func benchFTLibvirt(ctx context.Context, l *Lab, f labFlags, window time.Duration, bin string, log *slog.Logger) (ftRow, error) {
	var r ftRow
	vm, err := benchLibvirtLab(ctx, l, f, log)
	if err != nil {
		return r, err
	}
	ca := l.Client(HostA)
	tickRate := func() (float64, error) { return tickRateOver(ctx, vm.Console, window) }
	var unprot, prot []float64
	var last api.VMStatus
	for round := 0; round < 2; round++ {
		u, err := tickRate()
		if err != nil {
			return r, err
		}
		unprot = append(unprot, u)
		if round == 0 { // axctl protect DOMAIN: discovered from libvirt
			if err := ca.Protect(ctx, vm.Domain, api.ProtectRequest{Level: api.LevelFT, Peer: HostB}); err != nil {
				return r, fmt.Errorf("protect libvirt domain %s: %w", vm.Domain, err)
			}
		}
		if err := l.protectAndWait(ctx, ca, vm.Domain, HostB); err != nil {
			return r, err
		}
		p, err := tickRate()
		if err != nil {
			return r, err
		}
		prot = append(prot, p)
		last, _ = l.vmStatus(ctx, ca, vm.Domain)
		if round == 0 {
			if err := ca.Unprotect(ctx, vm.Domain); err != nil {
				return r, err
			}
		}
	}
	tr, err := l.FailoverTrial(ctx, vm.Domain, HostA, HostB, 3*time.Second, bin, filepath.Join(l.StateDir, "bench-libvirt.rec"))
	if err != nil {
		return r, fmt.Errorf("libvirt failover: %w", err)
	}
	r = ftRow{pauseP50: last.PauseP50MS, pauseP99: last.PauseP99MS, unprot: mean(unprot), prot: mean(prot), failover: tr.Failover.Seconds()}
	return r, nil
}

// benchLab brings the lab up with a guest (per f) serving, both axd and
// the witness running and the guest defined on a. down takes it all away,
// reporting a teardown failure through *err when nothing failed before.
func benchLab(ctx context.Context, l *Lab, f labFlags, log *slog.Logger) (vm *VM, down func(err *error), err error) {
	icfg, err := f.imageConfig(log)
	if err != nil {
		return nil, nil, err
	}
	if err := l.Up(ctx); err != nil {
		return nil, nil, err
	}
	down = func(err *error) {
		if derr := l.Down(context.Background()); derr != nil && *err == nil {
			*err = derr
		}
	}
	if vm, err = bootGuest(ctx, l, f, icfg, io.Discard); err == nil {
		err = startDaemons(ctx, l, f, vm)
	}
	if err != nil {
		down(&err)
		return nil, nil, err
	}
	return vm, down, nil
}

// benchLibvirtLab takes the lab down and brings it up again with a
// libvirtd on a and b, the guest (per f) a Nova-shaped libvirt domain
// started on a and defined on b, serving, and axd --libvirt on both.
func benchLibvirtLab(ctx context.Context, l *Lab, f labFlags, log *slog.Logger) (*VM, error) {
	if err := checkLibvirtPrereqs(); err != nil {
		return nil, err
	}
	if err := l.Down(ctx); err != nil {
		return nil, err
	}
	f.libvirt = true
	icfg, err := f.imageConfig(log)
	if err != nil {
		return nil, err
	}
	if err := l.Up(ctx); err != nil {
		return nil, err
	}
	if err := startLibvirtds(ctx, l, io.Discard); err != nil {
		return nil, err
	}
	vm, err := bootGuest(ctx, l, f, icfg, io.Discard)
	if err == nil {
		err = startDaemons(ctx, l, f, vm)
	}
	return vm, err
}

// tickRateOver is the guest's ticks per second over one window.
func tickRateOver(ctx context.Context, console string, window time.Duration) (float64, error) {
	t0, n0 := time.Now(), mustTick(console)
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(window):
	}
	return float64(mustTick(console)-n0) / time.Since(t0).Seconds(), nil
}

func mustTick(console string) uint64 {
	n, _ := LastTick(console)
	return n
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

// hashBandwidth times full hash scans of the guest's RAM file (median of 5).
func hashBandwidth(path string, size int64) (float64, error) {
	t, err := dirty.NewHashTracker(path, dirty.HashOptions{Size: size})
	if err != nil {
		return 0, err
	}
	defer t.Close()
	var d []time.Duration
	var buf []uint64
	for i := 0; i < 6; i++ {
		t0 := time.Now()
		if buf, err = t.Scan(buf[:0]); err != nil {
			return 0, err
		}
		if i > 0 { // the first scan also maps every page: not the steady state
			d = append(d, time.Since(t0))
		}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return float64(size) / d[len(d)/2].Seconds() / 1e9, nil
}

func pct(v []time.Duration, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return float64(s[min(len(s)-1, int(q*float64(len(s))))].Microseconds()) / 1000
}

// fillLedger appends n records of size bytes (pipelined, one connection).
func (l *Lab) fillLedger(ctx context.Context, addr string, n, size int) error {
	conn, err := l.DialFrom(ctx, HostC, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(120 * time.Second))
	text := strings.Repeat("x", size)
	go func() {
		w := bufio.NewWriter(conn)
		for i := 0; i < n; i++ {
			fmt.Fprintf(w, "APPEND %s\n", text)
		}
		w.Flush()
	}()
	r := bufio.NewReader(conn)
	for i := 0; i < n; i++ {
		if _, err := r.ReadString('\n'); err != nil {
			return fmt.Errorf("fill ledger: %w", err)
		}
	}
	return nil
}

// pingRTTs measures n sequential PING round trips to the ledger from host c.
func (l *Lab) pingRTTs(ctx context.Context, addr string, n int) ([]time.Duration, error) {
	conn, err := l.DialFrom(ctx, HostC, addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReader(conn)
	var d []time.Duration
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if _, err := conn.Write([]byte("PING\n")); err != nil {
			return nil, err
		}
		if _, err := r.ReadString('\n'); err != nil {
			return nil, err
		}
		d = append(d, time.Since(t0))
	}
	return d, nil
}

// listRate reads the whole ledger from host c as a bulk transfer — raw
// bytes into a large buffer, as a bulk client reads, not line by line —
// and returns bytes per second.
func (l *Lab) listRate(ctx context.Context, addr string) (float64, error) {
	conn, err := l.DialFrom(ctx, HostC, addr)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	t0 := time.Now()
	if _, err := conn.Write([]byte("LIST\n")); err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	var n int
	var tailBuf []byte
	for {
		m, err := conn.Read(buf)
		n += m
		tailBuf = append(tailBuf, buf[:m]...)
		if len(tailBuf) > 64 {
			tailBuf = tailBuf[len(tailBuf)-64:]
		}
		// The listing ends with "END <count>\n".
		if i := bytes.LastIndex(tailBuf, []byte("\nEND ")); i >= 0 && bytes.HasSuffix(tailBuf, []byte("\n")) {
			break
		}
		if err != nil {
			return 0, fmt.Errorf("bulk transfer: %w after %d bytes", err, n)
		}
	}
	return float64(n) / time.Since(t0).Seconds(), nil
}

// frameRate is what host c received of a guest's UDP blast.
type frameRate struct {
	sent, received int
	perSec         float64 // received frames per second, first to last arrival
}

// blastRate has the guest at addr (its ledger) send n datagrams of size
// bytes to host c and measures the frames per second that arrive there.
func (l *Lab) blastRate(ctx context.Context, addr string, n, size int) (frameRate, error) {
	var fr frameRate
	err := l.InNetns(HostC, func() error {
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(HostAddrs[HostC].Public), Port: 9999})
		if err != nil {
			return err
		}
		defer pc.Close()
		// A burst released at a commit must not overflow the receiver.
		if raw, err := pc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, 64<<20)
			})
		}
		d := net.Dialer{Timeout: 10 * time.Second}
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		if _, err := fmt.Fprintf(conn, "BLAST %s:9999 %d %d\n", HostAddrs[HostC].Public, n, size); err != nil {
			return err
		}
		reply := make(chan string, 1)
		go func() {
			conn.SetReadDeadline(time.Now().Add(2 * time.Minute))
			line, _ := bufio.NewReader(conn).ReadString('\n')
			reply <- line
		}()
		buf := make([]byte, 2048)
		var first, last time.Time
		for fr.received < n {
			pc.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, _, err := pc.ReadFrom(buf); err != nil {
				break // two seconds without a frame: the blast is over
			}
			last = time.Now()
			if first.IsZero() {
				first = last
			}
			fr.received++
		}
		line := <-reply
		if _, err := fmt.Sscanf(line, "BLASTED %d", &fr.sent); err != nil {
			return fmt.Errorf("blast: %q", strings.TrimSpace(line))
		}
		if fr.received > 1 {
			fr.perSec = float64(fr.received-1) / last.Sub(first).Seconds()
		}
		return nil
	})
	return fr, err
}
