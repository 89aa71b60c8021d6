package netbuffer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/axproject/ax/bpf"
)

// The programs and maps, without the global variables: cilium/ebpf maps
// those into memory and unmaps them only when garbage collected, which
// would keep the kernel objects alive after Detach.
type gateObjects struct {
	bpf.GatePrograms
	bpf.GateMaps
}

func (o *gateObjects) Close() error {
	return errors.Join(o.GatePrograms.Close(), o.GateMaps.Close())
}

type releaseObjects struct {
	bpf.ReleasePrograms
	bpf.ReleaseMaps
}

func (o *releaseObjects) Close() error {
	return errors.Join(o.ReleasePrograms.Close(), o.ReleaseMaps.Close())
}

// mmapBatch maps ax_batch, for Detach to unmap (see gateObjects).
func mmapBatch(m *ebpf.Map) ([]byte, error) {
	size := int(m.ValueSize())
	page := os.Getpagesize()
	size = (size + page - 1) / page * page
	b, err := unix.Mmap(m.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map ax_batch into memory: %w", err)
	}
	return b, nil
}

func (g *Gate) loadRelease(mark uint32) error {
	spec, err := bpf.LoadRelease()
	if err != nil {
		return err
	}
	if err := spec.Variables["release_mark"].Set(mark); err != nil {
		return err
	}
	if err := spec.LoadAndAssign(&g.rel, nil); err != nil {
		return fmt.Errorf("load ax_release: %w", err)
	}
	return nil
}

func (g *Gate) loadGate(mark uint32) error {
	spec, err := bpf.LoadGate()
	if err != nil {
		return err
	}
	if err := spec.Variables["release_mark"].Set(mark); err != nil {
		return err
	}
	if err := spec.Variables["max_frame"].Set(uint32(g.maxFrame)); err != nil {
		return err
	}
	spec.Maps["ax_frames"].MaxEntries = uint32(g.cfg.RingBytes)
	if err := spec.LoadAndAssign(&g.objs, nil); err != nil {
		return fmt.Errorf("load ax_gate: %w", err)
	}
	return nil
}

// probeMaxFrame finds the largest frame live-frames mode accepts (one page
// minus the kernel's headroom and tailroom: with 4 KiB pages 3408 bytes on
// Linux 6.18, 3368 on 6.1), running ax_release_probe, which drops everything, on the
// tap. ax_gate drops longer frames rather than capture what it could not
// re-inject.
func (g *Gate) probeMaxFrame() (int, error) {
	var ctx [24]byte
	binary.NativeEndian.PutUint32(ctx[12:], uint32(g.ifindex))
	buf := make([]byte, bpf.MaxFrame)
	fits := func(n int) error {
		binary.NativeEndian.PutUint32(ctx[4:], uint32(n)) // data_end
		_, err := g.rel.AxReleaseProbe.Run(&ebpf.RunOptions{
			Data: buf[:n], Context: ctx[:], Repeat: 1, Flags: unix.BPF_F_TEST_XDP_LIVE_FRAMES,
		})
		return err
	}
	const minFrame = 60 // an Ethernet frame without FCS
	if err := fits(minFrame); err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, ebpf.ErrNotSupported) {
			return 0, fmt.Errorf("re-injection needs BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (Linux ≥ 5.18): %w", ebpf.ErrNotSupported)
		}
		return 0, fmt.Errorf("probe re-injection: %w", err)
	}
	lo, hi := minFrame, bpf.MaxFrame+1 // fits(lo), !fits(hi) or beyond the copy limit
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if fits(mid) == nil {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo, nil
}

// CompletesChecksums reports whether ax_gate can see that a frame's
// checksum was left to the device (CHECKSUM_PARTIAL), which the gate then
// completes before re-injection: this takes the bpf_cast_to_kern_ctx kfunc
// (Linux ≥ 6.3). Without it such frames would go out with a wrong checksum,
// so the guest must not offload checksums (virtio-net csum=off).
func CompletesChecksums() bool {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var fn *btf.Func
	return spec.TypeByName("bpf_cast_to_kern_ctx", &fn) == nil
}
