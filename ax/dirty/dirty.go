package dirty

import (
	"errors"
	"fmt"
)

// PageSize is the unit of tracking: a page number (pfn) is a file offset
// divided by PageSize.
const PageSize = 4096

// Tracker modes, as accepted by Select and returned by Tracker.Name.
const (
	ModeAuto      = "auto"
	ModeHash      = "hash"
	ModeSoftDirty = "soft-dirty"
)

// A Tracker reports which pages of a VM's RAM file were written.
//
// Scans are exact only while nothing writes the file, that is while the
// VM's vCPUs and devices are paused; the FT epoch loop scans inside its
// pause. A Tracker is not safe for concurrent use.
type Tracker interface {
	// Name is the mode of the backend: ModeHash or ModeSoftDirty.
	Name() string

	// Scan appends to dst, in ascending order, the page numbers written
	// since the previous Scan and returns the extended slice.
	//
	// The first Scan reports every page that holds data, that is every
	// page but the file's holes. Holes read as zeros, so a replica that
	// starts as a zero-filled file of the same size (a sparse file) holds
	// the whole RAM once it has applied the first Scan's pages: the initial
	// full sync is the first Scan.
	//
	// When Scan fails, the next one that succeeds reports every page of
	// the file, holes included: what happened in between is unknown.
	//
	// Scan forgets what it reported: a caller whose checkpoint of these
	// pages fails must keep them and send them again with the next.
	Scan(dst []uint64) ([]uint64, error)

	// Close releases the tracker's mapping and files. It is safe to call
	// more than once.
	Close() error
}

// ErrSoftDirtyUnavailable means the kernel does not track soft-dirty
// bits (CONFIG_MEM_SOFT_DIRTY is off, or the architecture lacks it).
var ErrSoftDirtyUnavailable = errors.New("the kernel does not track soft-dirty pages (needs CONFIG_MEM_SOFT_DIRTY=y)")

// everyPage appends every page number of a file of npages pages.
func everyPage(dst []uint64, npages int) []uint64 {
	for p := range npages {
		dst = append(dst, uint64(p))
	}
	return dst
}

// errClosed is returned by Scan after Close.
var errClosed = errors.New("dirty: tracker is closed")

// Select returns the tracker for mode:
//
//   - ModeAuto: soft-dirty when the kernel supports it and pid is QEMU's
//     pid (> 0), else hash.
//   - ModeHash: hash the RAM file at path (opts apply).
//   - ModeSoftDirty: soft-dirty bits of pid's mapping of path; the error
//     wraps ErrSoftDirtyUnavailable when the kernel lacks them.
//
// When pid > 0, Select also checks, whatever the mode, that the process
// maps path shared: with a private mapping (QEMU's share=off) the guest's
// writes never reach the file, and hashing it would silently see none.
func Select(mode string, pid int, path string, opts HashOptions) (Tracker, error) {
	switch mode {
	case ModeAuto:
		if pid > 0 && SoftDirtyAvailable() {
			return NewSoftDirtyTracker(pid, path)
		}
	case ModeHash:
	case ModeSoftDirty:
		if pid <= 0 {
			return nil, fmt.Errorf("dirty: mode %q needs the pid of the QEMU process that maps %s", mode, path)
		}
		return NewSoftDirtyTracker(pid, path) // fails with ErrSoftDirtyUnavailable and the reason
	default:
		return nil, fmt.Errorf("dirty: unknown tracker mode %q (want %q, %q or %q)",
			mode, ModeAuto, ModeHash, ModeSoftDirty)
	}
	if pid > 0 {
		if err := checkSharedMapping(pid, path); err != nil {
			return nil, err
		}
	}
	return NewHashTracker(path, opts)
}
