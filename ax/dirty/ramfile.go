package dirty

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ramFile is the VM's RAM file, opened read-only.
type ramFile struct {
	path   string
	f      *os.File
	fd     int
	size   int64
	npages int
	dev    uint64 // st_dev, to find the file in /proc/PID/maps
	ino    uint64
	mem    []byte // the file mapped read-only and shared, once mapShared is called
}

// openRAMFile opens path and checks that it can be guest RAM: a regular
// file, a whole number of pages long and, when wantSize > 0, of that size.
func openRAMFile(path string, wantSize int64) (*ramFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dirty: open RAM file: %w", err)
	}
	r := &ramFile{path: path, f: f, fd: int(f.Fd())}
	var st unix.Stat_t
	if err := unix.Fstat(r.fd, &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("dirty: stat RAM file %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, fmt.Errorf("dirty: RAM file %s is not a regular file (mode %#o); "+
			"give the mem-path of QEMU's memory-backend-file", path, st.Mode&unix.S_IFMT)
	}
	switch {
	case st.Size == 0:
		err = fmt.Errorf("dirty: RAM file %s is empty; is QEMU running with this mem-path?", path)
	case st.Size%PageSize != 0:
		err = fmt.Errorf("dirty: RAM file %s is %d bytes, not a whole number of %d-byte pages",
			path, st.Size, PageSize)
	case wantSize > 0 && st.Size != wantSize:
		err = fmt.Errorf("dirty: RAM file %s is %d bytes but the VM's RAM is %d bytes; is it the right file?",
			path, st.Size, wantSize)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	r.size = st.Size
	r.npages = int(st.Size / PageSize)
	r.dev = st.Dev
	r.ino = st.Ino
	return r, nil
}

// mapShared maps the whole file read-only and shared. Only pages known to
// hold data may be read through the mapping: a read fault in a hole of a
// tmpfs file allocates a page there on some kernels (6.1), undoing the
// holes the balloon punched. So never MAP_POPULATE either.
func (r *ramFile) mapShared() error {
	mem, err := unix.Mmap(r.fd, 0, int(r.size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("dirty: map RAM file %s: %w", r.path, err)
	}
	r.mem = mem
	return nil
}

// checkSize fails when the file no longer has the size it had when opened:
// reading a mapping past the end of its file faults.
func (r *ramFile) checkSize() error {
	var st unix.Stat_t
	if err := unix.Fstat(r.fd, &st); err != nil {
		return fmt.Errorf("dirty: stat RAM file %s: %w", r.path, err)
	}
	if st.Size != r.size {
		return fmt.Errorf("dirty: RAM file %s changed size from %d to %d bytes; the VM must be resynchronised",
			r.path, r.size, st.Size)
	}
	return nil
}

// recoverFault, deferred by a function that reads the mapping with
// debug.SetPanicOnFault(true), turns a memory fault into an error in
// *err: the file can shrink under the mapping (someone truncates it), and
// reading past its end raises SIGBUS, which must not crash axd.
func (r *ramFile) recoverFault(err *error) {
	p := recover()
	if p == nil {
		return
	}
	fault, ok := p.(interface{ Addr() uintptr })
	if !ok {
		panic(p)
	}
	*err = fmt.Errorf("dirty: reading RAM file %s faulted at address %#x; was it truncated?", r.path, fault.Addr())
}

func (r *ramFile) close() error {
	var err error
	if r.mem != nil {
		err = unix.Munmap(r.mem)
		r.mem = nil
	}
	return errors.Join(err, r.f.Close())
}

// A dataFinder finds the runs of data pages (pages that are not holes) of
// a mapped RAM file; each goroutine needs its own.
//
// SEEK_HOLE is not used: it walks the file's page cache page by page up to
// the next hole, however far that is (2 ms for 256 MiB of data here, a
// sixth of the time to hash it, and more for a worker whose share ends
// before the hole). mincore answers for a bounded window, in about a
// nanosecond a page where this process has page-table entries (pages it
// read before), and each page in memory is data. SEEK_DATA jumps over
// holes, cheaply, and tells the pages that are data but not in memory
// (swapped out, or on a disk file system) from holes. A run of data costs
// a few microseconds to find, mostly mincore looking past its end.
type dataFinder struct {
	file   *ramFile
	vec    []byte // mincore's answer for pages [base, base+len(vec))
	base   int
	window int // pages asked of mincore at once; grows along a run of data
}

const (
	minWindow = 16
	maxWindow = 4096
)

func newDataFinder(file *ramFile) *dataFinder {
	return &dataFinder{file: file, vec: make([]byte, 0, maxWindow)}
}

// reset forgets mincore's answers; a scan starts with it.
func (f *dataFinder) reset() {
	f.vec = f.vec[:0]
	f.window = minWindow
}

// next returns a run of data pages, the first in [from, to), as
// [start, end); start == to when there is none. The run may stop short of
// the next hole.
func (f *dataFinder) next(from, to int) (start, end int, err error) {
	for from < to {
		if from < f.base || from >= f.base+len(f.vec) {
			n := min(f.window, to-from)
			f.vec = f.vec[:n]
			if err := mincore(f.file.mem[from*PageSize:(from+n)*PageSize], f.vec); err != nil {
				f.vec = f.vec[:0]
				return 0, 0, fmt.Errorf("dirty: mincore on RAM file %s: %w", f.file.path, err)
			}
			f.base = from
		}
		i := from - f.base
		j := i
		for j < len(f.vec) && f.vec[j]&1 != 0 {
			j++
		}
		if j > i {
			if j == len(f.vec) {
				f.window = min(2*f.window, maxWindow)
			}
			return from, f.base + j, nil
		}
		// Page from is not in memory: a hole, or data elsewhere.
		f.window = minWindow
		off, err := unix.Seek(f.file.fd, int64(from)*PageSize, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // holes up to the end of the file
		}
		if err != nil {
			return 0, 0, fmt.Errorf("dirty: find data in RAM file %s: %w", f.file.path, err)
		}
		// A run of data that starts inside a page (file system blocks
		// smaller than a page) makes the whole page data.
		if p := int(off / PageSize); p > from {
			from = p
			continue
		}
		return from, from + 1, nil
	}
	return to, to, nil
}

func mincore(mem, vec []byte) error {
	_, _, errno := unix.Syscall(unix.SYS_MINCORE,
		uintptr(unsafe.Pointer(unsafe.SliceData(mem))), uintptr(len(mem)), uintptr(unsafe.Pointer(unsafe.SliceData(vec))))
	if errno != 0 {
		return errno
	}
	return nil
}
