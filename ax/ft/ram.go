package ft

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// RAM is a read-only shared mapping of a VM's RAM file: the pages QEMU's
// guest writes are visible here without copying through the kernel.
type RAM struct {
	f    *os.File
	mem  []byte
	size int64
}

// OpenRAM maps the RAM file at path, which must be size bytes.
func OpenRAM(path string, size int64) (*RAM, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("ft: guest RAM file: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ft: guest RAM file: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() != size || size%PageSize != 0 {
		f.Close()
		return nil, fmt.Errorf("ft: guest RAM file %s is %d bytes, want a regular file of %d", path, fi.Size(), size)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ft: map guest RAM file %s: %w", path, err)
	}
	return &RAM{f: f, mem: mem, size: size}, nil
}

// Pages is the number of pages in the RAM file.
func (r *RAM) Pages() uint64 { return uint64(r.size / PageSize) }

// ReadPage copies page pfn into dst (PageSize bytes).
func (r *RAM) ReadPage(pfn uint64, dst []byte) error {
	if pfn >= r.Pages() {
		return fmt.Errorf("ft: page %d beyond the guest RAM (%d pages)", pfn, r.Pages())
	}
	copy(dst[:PageSize], r.mem[pfn*PageSize:])
	return nil
}

// Close unmaps; safe to call twice.
func (r *RAM) Close() error {
	if r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem = nil
	r.f.Close()
	return err
}
