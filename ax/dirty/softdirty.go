package dirty

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SoftDirtyTracker finds written pages from the kernel's soft-dirty bits
// in QEMU's page tables: Scan reads the bits over QEMU's mapping of the
// RAM file, with the PAGEMAP_SCAN ioctl (Linux 6.7+) or else from
// /proc/PID/pagemap, then clears them through /proc/PID/clear_refs.
//
// It sees what QEMU writes through its mapping (vCPUs, emulated devices,
// in-kernel vhost working on QEMU's memory); it does not see writes by
// other processes that map the file (vhost-user back ends) or write(2)
// to it. A page is reported whenever QEMU wrote it, even with the same
// content.
//
// Holes punched into the file (balloon, virtio-mem discards) drop
// page-table entries and their bits with them, so the tracker also maps
// the file read-only itself and compares its data pages with those of the
// last Scan, reporting pages that turned into holes. That costs about a
// nanosecond per data page (mincore over this process's own page-table
// entries, 8 bytes of page table per 4 KiB of RAM) and a SEEK_DATA per
// hole; the rest of a Scan grows with the number of written pages, not
// with the RAM's size.
//
// Transparent huge pages are not a concern for guest RAM on tmpfs: it is
// mapped with 4 KiB entries unless the mount (huge=) or
// /sys/kernel/mm/transparent_hugepage/shmem_enabled asks otherwise. Where
// a huge entry maps the file, its one bit stands for all its pages, which
// are then reported together: more pages than written, never fewer.
// Tracking stays exact only while the file's pages stay in memory (tmpfs
// without swap): an entry reclaimed while dirty loses its bit.
//
// clear_refs clears the bits of the whole process; nothing else may use
// soft-dirty tracking on QEMU (CRIU, another tracker) at the same time.
type SoftDirtyTracker struct {
	pid       int
	file      *ramFile
	maps      *os.File // /proc/PID/maps, read again on each Scan
	pagemap   *os.File
	clearRefs *os.File
	segs      []segment

	// noPagemapScan is set when the kernel lacks the PAGEMAP_SCAN ioctl
	// with PAGE_IS_SOFT_DIRTY; tests set it to exercise the fallback.
	noPagemapScan bool

	data    bitmap // the file's data pages at the last Scan
	finder  *dataFinder
	mapsBuf []byte // reused buffers
	segsBuf []segment
	entries []uint64
	regions []pageRegion

	scanned bool // a Scan has succeeded
	lost    bool // a Scan failed: the next one reports every page
	closed  bool
	sink    byte // keeps the reads that map pages
}

var _ Tracker = (*SoftDirtyTracker)(nil)

// pmSoftDirty is bit 55 of a /proc/PID/pagemap entry.
const pmSoftDirty = 1 << 55

// clearSoftDirty, written to /proc/PID/clear_refs, clears the process's
// soft-dirty bits.
var clearSoftDirty = []byte("4")

// The PAGEMAP_SCAN ioctl of <linux/fs.h>, Linux 6.7+.
type pmScanArg struct {
	size, flags, start, end, walkEnd, vec, vecLen, maxPages uint64
	categoryInverted, categoryMask, categoryAnyofMask       uint64
	returnMask                                              uint64
}

type pageRegion struct{ start, end, categories uint64 }

const (
	// _IOWR('f', 16, struct pm_scan_arg)
	pagemapScan = 3<<30 | uint(unsafe.Sizeof(pmScanArg{}))<<16 | 'f'<<8 | 16

	pageIsPresent   = 1 << 3
	pageIsSoftDirty = 1 << 7
)

// Batch sizes: 64 Ki pagemap entries (256 MiB of memory) per read, and
// up to 1 Ki runs of dirty pages per ioctl.
const (
	pagemapBatch = 64 << 10
	regionBatch  = 1 << 10
)

// NewSoftDirtyTracker tracks the pages that process pid (QEMU) writes
// through its shared mapping of the RAM file at path. The error wraps
// ErrSoftDirtyUnavailable when the kernel does not track soft-dirty bits.
// It clears nothing yet; the first Scan does.
func NewSoftDirtyTracker(pid int, path string) (*SoftDirtyTracker, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("dirty: soft-dirty tracker needs QEMU's pid, got %d", pid)
	}
	if err := softDirtyProbe(); err != nil {
		return nil, fmt.Errorf("dirty: soft-dirty tracker for %s: %w (probe: %v); use mode %q or %q",
			path, ErrSoftDirtyUnavailable, err, ModeHash, ModeAuto)
	}
	file, err := openRAMFile(path, 0)
	if err != nil {
		return nil, err
	}
	if err := file.mapShared(); err != nil {
		file.close()
		return nil, err
	}
	t := &SoftDirtyTracker{pid: pid, file: file, data: newBitmap(file.npages), finder: newDataFinder(file)}
	open := func(name string, flag int) (*os.File, error) {
		f, err := os.OpenFile(fmt.Sprintf("/proc/%d/%s", pid, name), flag, 0)
		if err != nil {
			return nil, fmt.Errorf("dirty: soft-dirty tracker for pid %d: %w", pid, err)
		}
		return f, nil
	}
	// The files stay open: they keep naming this process even if its pid
	// is reused after it exits.
	if t.maps, err = open("maps", os.O_RDONLY); err == nil {
		if t.pagemap, err = open("pagemap", os.O_RDONLY); err == nil {
			t.clearRefs, err = open("clear_refs", os.O_WRONLY)
		}
	}
	if err == nil {
		t.mapsBuf, t.segs, err = processSegments(pid, t.maps, file, nil, nil)
	}
	if err == nil {
		err = t.probePagemapScan()
	}
	if err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// probePagemapScan asks for the first page's bit with PAGEMAP_SCAN and
// falls back to reading pagemap when the kernel does not know the ioctl
// (ENOTTY, before 6.7) or the soft-dirty category (EINVAL).
func (t *SoftDirtyTracker) probePagemapScan() error {
	t.regions = make([]pageRegion, regionBatch)
	s := t.segs[0]
	_, _, err := t.pagemapScan(s.start, s.start+PageSize, pageIsSoftDirty)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
		t.noPagemapScan = true
		t.regions = nil
		return nil
	}
	return err
}

// Name returns ModeSoftDirty.
func (t *SoftDirtyTracker) Name() string { return ModeSoftDirty }

// Scan reports the pages written through QEMU's mapping since the last
// Scan and the pages whose hole was punched; see Tracker.Scan.
func (t *SoftDirtyTracker) Scan(dst []uint64) ([]uint64, error) {
	if t.closed {
		return dst, errClosed
	}
	n := len(dst)
	out, err := t.scan(dst)
	if err != nil {
		t.lost = true
		return dst[:n], err
	}
	if t.lost {
		out = everyPage(dst[:n], t.file.npages)
	}
	t.scanned, t.lost = true, false
	return out, nil
}

func (t *SoftDirtyTracker) scan(dst []uint64) ([]uint64, error) {
	if err := t.file.checkSize(); err != nil {
		return dst, err
	}
	if err := t.checkMappings(); err != nil {
		return dst, err
	}
	n := len(dst)
	var err error
	// Read, then clear: a write between the two would be lost, which is
	// why Scan must run while the VM is paused.
	if t.scanned && !t.lost {
		for _, s := range t.segs {
			if t.noPagemapScan {
				dst, err = t.readPagemap(dst, s)
			} else {
				dst, err = t.scanPagemap(dst, s, pageIsSoftDirty)
			}
			if err != nil {
				return dst, err
			}
		}
	}
	if _, err := t.clearRefs.Write(clearSoftDirty); err != nil {
		return dst, fmt.Errorf("dirty: clear soft-dirty bits of pid %d: %w", t.pid, err)
	}
	// After the clear: a page written from now on is data (or was), and
	// is reported by the next Scan too.
	if dst, err = t.walkData(dst, !t.scanned || t.lost); err != nil {
		return dst, err
	}
	found := dst[n:]
	if !slices.IsSorted(found) {
		slices.Sort(found)
	}
	return dst[:n+len(slices.Compact(found))], nil
}

// checkMappings fails when QEMU's mappings of the file moved since the
// last Scan: the bits of the old ones are gone with them. A Scan that
// reports every page anyway takes the new mappings.
func (t *SoftDirtyTracker) checkMappings() error {
	var err error
	t.mapsBuf, t.segsBuf, err = processSegments(t.pid, t.maps, t.file, t.mapsBuf, t.segsBuf)
	if err != nil {
		return err
	}
	if slices.Equal(t.segs, t.segsBuf) {
		return nil
	}
	if t.lost {
		t.segs = append(t.segs[:0], t.segsBuf...)
		return nil
	}
	return fmt.Errorf("dirty: process %d remapped %s (%x, was %x); writes to the old mapping are lost",
		t.pid, t.file.path, t.segsBuf, t.segs)
}

// filePage returns the page of the file that virtual address addr of s
// maps, and whether that page lies inside the file.
func (t *SoftDirtyTracker) filePage(s segment, addr uint64) (uint64, bool) {
	pfn := (s.offset + addr - s.start) / PageSize
	return pfn, pfn < uint64(t.file.npages)
}

// readPagemap appends the file pages of s whose pagemap entry has the
// soft-dirty bit.
func (t *SoftDirtyTracker) readPagemap(dst []uint64, s segment) ([]uint64, error) {
	if t.entries == nil {
		t.entries = make([]uint64, pagemapBatch)
	}
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&t.entries[0])), len(t.entries)*8)
	for addr := s.start; addr < s.end; {
		n := min(uint64(len(t.entries)), (s.end-addr)/PageSize)
		got, err := unix.Pread(int(t.pagemap.Fd()), raw[:n*8], int64(addr/PageSize*8))
		if err != nil {
			return dst, fmt.Errorf("dirty: read /proc/%d/pagemap: %w", t.pid, err)
		}
		if got < 8 {
			return dst, fmt.Errorf("dirty: read /proc/%d/pagemap at %#x: nothing (has the process exited?)", t.pid, addr)
		}
		for i, e := range t.entries[:got/8] {
			if e&pmSoftDirty == 0 {
				continue
			}
			if pfn, ok := t.filePage(s, addr+uint64(i)*PageSize); ok {
				dst = append(dst, pfn)
			}
		}
		addr += uint64(got/8) * PageSize
	}
	return dst, nil
}

// scanPagemap appends the file pages of s that PAGEMAP_SCAN puts in
// category (PAGE_IS_SOFT_DIRTY but in tests).
func (t *SoftDirtyTracker) scanPagemap(dst []uint64, s segment, category uint64) ([]uint64, error) {
	for addr := s.start; addr < s.end; {
		n, walkEnd, err := t.pagemapScan(addr, s.end, category)
		if err != nil {
			return dst, err
		}
		for _, r := range t.regions[:n] {
			for a := r.start; a < r.end; a += PageSize {
				if pfn, ok := t.filePage(s, a); ok {
					dst = append(dst, pfn)
				}
			}
		}
		if walkEnd <= addr {
			return dst, fmt.Errorf("dirty: PAGEMAP_SCAN of pid %d stopped at %#x", t.pid, walkEnd)
		}
		addr = walkEnd
	}
	return dst, nil
}

// pagemapScan runs one PAGEMAP_SCAN for the pages of category in
// [start, end) into t.regions and returns the number of regions filled and
// where the walk stopped.
func (t *SoftDirtyTracker) pagemapScan(start, end, category uint64) (int, uint64, error) {
	arg := pmScanArg{
		size:         uint64(unsafe.Sizeof(pmScanArg{})),
		start:        start,
		end:          end,
		vec:          uint64(uintptr(unsafe.Pointer(&t.regions[0]))),
		vecLen:       uint64(len(t.regions)),
		categoryMask: category,
		returnMask:   category,
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, t.pagemap.Fd(), uintptr(pagemapScan), uintptr(unsafe.Pointer(&arg)))
	runtime.KeepAlive(t.regions) // the kernel wrote through arg.vec, which the collector does not see
	if errno != 0 {
		return 0, 0, fmt.Errorf("dirty: PAGEMAP_SCAN of pid %d: %w", t.pid, errno)
	}
	return int(r), arg.walkEnd, nil
}

// walkData records the file's data pages and appends the pages that were
// data at the last Scan and are holes now, and with all set every data
// page too.
func (t *SoftDirtyTracker) walkData(dst []uint64, all bool) (_ []uint64, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer t.file.recoverFault(&err)
	f := t.file
	t.finder.reset()
	for pos := 0; pos < f.npages; {
		start, end, err := t.finder.next(pos, f.npages)
		if err != nil {
			return dst, err
		}
		dst = t.data.takeRange(dst, pos, start)
		for p := start; p < end; p++ {
			if !t.data.has(p) {
				// Map the page here, so that mincore answers from this
				// process's page table next time.
				t.sink += f.mem[p*PageSize]
				t.data.set(p)
			}
			if all {
				dst = append(dst, uint64(p))
			}
		}
		pos = end
	}
	return dst, nil
}

// Close closes the tracker's files. It is safe to call more than once.
func (t *SoftDirtyTracker) Close() error {
	if t.closed {
		return nil
	}
	t.closed = true
	var errs []error
	for _, f := range []*os.File{t.maps, t.pagemap, t.clearRefs} {
		if f != nil {
			errs = append(errs, f.Close())
		}
	}
	errs = append(errs, t.file.close())
	return errors.Join(errs...)
}

// bitmap is a set of page numbers.
type bitmap []uint64

func newBitmap(n int) bitmap { return make(bitmap, (n+63)/64) }

func (b bitmap) has(p int) bool { return b[p/64]&(1<<(p%64)) != 0 }
func (b bitmap) set(p int)      { b[p/64] |= 1 << (p % 64) }

// takeRange removes pages [lo, hi) and appends those that were present.
func (b bitmap) takeRange(dst []uint64, lo, hi int) []uint64 {
	for p := lo; p < hi; p++ {
		if p%64 == 0 && b[p/64] == 0 {
			p += 63
			continue
		}
		if b[p/64]&(1<<(p%64)) != 0 {
			b[p/64] &^= 1 << (p % 64)
			dst = append(dst, uint64(p))
		}
	}
	return dst
}

// SoftDirtyAvailable reports whether the kernel tracks soft-dirty bits.
// It tries for real, once per process: it writes a page of its own,
// clears its bit through /proc/self/clear_refs and checks that the bit
// is clear, then writes again and checks that it is set. A kernel
// without CONFIG_MEM_SOFT_DIRTY accepts the clear but never sets the bit.
func SoftDirtyAvailable() bool { return softDirtyProbe() == nil }

// PagemapScanProbe asks the PAGEMAP_SCAN ioctl for the soft-dirty bit of a
// page of this process's own: nil when the tracker can use it, unix.ENOTTY
// when the kernel lacks the ioctl (before 6.7), unix.EINVAL when it lacks
// the soft-dirty category.
func PagemapScanProbe() error {
	mem, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("map a probe page: %w", err)
	}
	defer unix.Munmap(mem)
	mem[0] = 1
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return err
	}
	defer f.Close()
	regions := make([]pageRegion, 1)
	start := uint64(uintptr(unsafe.Pointer(&mem[0])))
	arg := pmScanArg{
		size: uint64(unsafe.Sizeof(pmScanArg{})), start: start, end: start + PageSize,
		vec: uint64(uintptr(unsafe.Pointer(&regions[0]))), vecLen: 1,
		categoryMask: pageIsSoftDirty, returnMask: pageIsSoftDirty,
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(pagemapScan), uintptr(unsafe.Pointer(&arg)))
	runtime.KeepAlive(regions) // the kernel writes through arg.vec, which the collector does not see
	if errno != 0 {
		return errno
	}
	return nil
}

// softDirtyProbe says why soft-dirty tracking does not work, or nil.
var softDirtyProbe = sync.OnceValue(func() error {
	// A shared tmpfs page, as guest RAM is.
	fd, err := unix.MemfdCreate("ax-dirty-probe", unix.MFD_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, PageSize); err != nil {
		return err
	}
	mem, err := unix.Mmap(fd, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	defer unix.Munmap(mem)
	pagemap, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return err
	}
	defer pagemap.Close()
	bit := func() (bool, error) {
		var e [8]byte
		addr := uintptr(unsafe.Pointer(&mem[0]))
		if _, err := pagemap.ReadAt(e[:], int64(addr/PageSize*8)); err != nil {
			return false, err
		}
		return binary.NativeEndian.Uint64(e[:])&pmSoftDirty != 0, nil
	}

	mem[0] = 1
	if err := os.WriteFile("/proc/self/clear_refs", []byte("4"), 0); err != nil {
		return err
	}
	if set, err := bit(); err != nil || set {
		return errors.Join(err, errors.New("clear_refs left the soft-dirty bit set"))
	}
	mem[0] = 2
	if set, err := bit(); err != nil || !set {
		return errors.Join(err, errors.New("a write did not set the soft-dirty bit"))
	}
	return nil
})
