package dirty

import (
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"

	"github.com/zeebo/xxh3"
)

// HashOptions configure a HashTracker. The zero value means defaults.
type HashOptions struct {
	// Workers is the number of goroutines that hash the file, each over
	// one contiguous share of its pages. 0 means runtime.GOMAXPROCS(0),
	// which is runtime.NumCPU() unless GOMAXPROCS or a CPU quota lowers it.
	Workers int

	// Size, when > 0, is the VM's RAM size in bytes; the file must have it.
	Size int64
}

// PageHash is the hash the tracker keeps of a page (xxh3 of its PageSize
// bytes); a replica's base is made of the same (replication).
func PageHash(page []byte) uint64 { return xxh3.Hash(page) }

// HashTracker finds written pages by keeping an xxh3 hash of every page of
// the RAM file and comparing on each Scan. It works on every kernel and
// sees writes made by any process; its cost grows with the RAM's size,
// less the file's holes, which it skips without reading: 256 MiB of data
// took 11.6 ms on one core of the development machine, 7.5 ms on two.
// The first Scan takes longer (40 ms for 256 MiB): it also maps every page
// into this process's page table.
//
// A page written with the content it already had is not reported: the
// replica already holds that content. For the same reason a page whose
// hole is punched (fallocate) is reported only when it held something
// other than zeros.
type HashTracker struct {
	file    *ramFile
	hashes  []uint64 // per page, of the content last reported
	zero    uint64   // the hash of a page of zeros: what a hole holds
	workers []hashWorker
	scanned bool // a Scan has succeeded
	lost    bool // a Scan failed: the next one reports every page
	closed  bool
	wg      sync.WaitGroup
}

// hashWorker hashes pages [lo, hi); its slices are reused across scans.
type hashWorker struct {
	lo, hi int
	finder *dataFinder
	dirty  []uint64
	err    error
}

var _ Tracker = (*HashTracker)(nil)

// NewHashTracker maps the RAM file at path read-only and prepares to hash
// it. It reads nothing yet; the first Scan does.
func NewHashTracker(path string, opts HashOptions) (*HashTracker, error) {
	if opts.Workers < 0 {
		return nil, fmt.Errorf("dirty: hash tracker: %d workers; want 0 (one per CPU) or more", opts.Workers)
	}
	f, err := openRAMFile(path, opts.Size)
	if err != nil {
		return nil, err
	}
	if err := f.mapShared(); err != nil {
		f.close()
		return nil, err
	}
	t := &HashTracker{
		file:   f,
		hashes: make([]uint64, f.npages),
		zero:   PageHash(make([]byte, PageSize)),
	}
	for i := range t.hashes {
		t.hashes[i] = t.zero // what a hole holds; the first Scan reports the data pages anyway
	}

	n := opts.Workers
	if n == 0 {
		n = runtime.GOMAXPROCS(0)
	}
	n = min(n, f.npages)
	per := (f.npages + n - 1) / n
	for lo := 0; lo < f.npages; lo += per {
		t.workers = append(t.workers, hashWorker{lo: lo, hi: min(lo+per, f.npages), finder: newDataFinder(f)})
	}
	return t, nil
}

// Name returns ModeHash.
func (t *HashTracker) Name() string { return ModeHash }

// Workers returns how many goroutines hash the file.
func (t *HashTracker) Workers() int { return len(t.workers) }

// Scan hashes every data page of the file and reports those whose hash
// changed; see Tracker.Scan.
func (t *HashTracker) Scan(dst []uint64) ([]uint64, error) {
	if t.closed {
		return dst, errClosed
	}
	if err := t.file.checkSize(); err != nil {
		t.lost = true
		return dst, err
	}
	all := !t.scanned || t.lost
	for i := 1; i < len(t.workers); i++ {
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			t.scanPages(&t.workers[i], all)
		}()
	}
	t.scanPages(&t.workers[0], all) // the caller's goroutine is a worker too
	t.wg.Wait()

	var errs []error
	for i := range t.workers {
		if t.workers[i].err != nil {
			errs = append(errs, t.workers[i].err)
		}
	}
	if len(errs) > 0 {
		t.lost = true
		return dst, errors.Join(errs...)
	}
	if t.lost {
		dst = everyPage(dst, t.file.npages)
	} else {
		for i := range t.workers {
			dst = append(dst, t.workers[i].dirty...)
		}
	}
	t.scanned, t.lost = true, false
	return dst, nil
}

// scanPages compares worker w's pages with their last hashes. With all
// set, it reports every data page.
func (t *HashTracker) scanPages(w *hashWorker, all bool) {
	w.dirty = w.dirty[:0]
	w.err = nil
	w.finder.reset()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer t.file.recoverFault(&w.err)

	hashes, zero, mem := t.hashes, t.zero, t.file.mem
	for pos := w.lo; pos < w.hi; {
		start, end, err := w.finder.next(pos, w.hi)
		if err != nil {
			w.err = err
			return
		}
		// A hole reads as zeros; it is dirty when the page held something
		// else before its hole was punched.
		for p := pos; p < start; p++ {
			if hashes[p] != zero {
				hashes[p] = zero
				w.dirty = append(w.dirty, uint64(p))
			}
		}
		for p := start; p < end; p++ {
			h := PageHash(mem[p*PageSize : (p+1)*PageSize])
			if h != hashes[p] || all {
				hashes[p] = h
				w.dirty = append(w.dirty, uint64(p))
			}
		}
		pos = end
	}
}

// SetBaseline makes hashes (one xxh3 per page, as Scan computes them) the
// content last reported, before the first Scan: that Scan then reports the
// pages that differ from it — a replica already holding hashes needs only
// those — instead of every data page. len(hashes) must be the page count.
func (t *HashTracker) SetBaseline(hashes []uint64) error {
	if t.scanned {
		return errors.New("dirty: hash tracker: a baseline is set before the first scan")
	}
	if len(hashes) != len(t.hashes) {
		return fmt.Errorf("dirty: hash tracker: baseline of %d pages for %d", len(hashes), len(t.hashes))
	}
	copy(t.hashes, hashes)
	t.scanned = true
	return nil
}

// Close unmaps the file and closes it. It is safe to call more than once.
func (t *HashTracker) Close() error {
	if t.closed {
		return nil
	}
	t.closed = true
	return t.file.close()
}

// Rebase records pages[i] as the content the replica now holds for page
// pfns[i]. The FT loop calls it for pages it copied while the VM ran (the
// initial sync): such a copy may be newer than the scan that reported the
// page, and a later write that restored the scanned content would otherwise
// go unreported, leaving the replica with the copy. Not concurrent with Scan.
func (t *HashTracker) Rebase(pfns []uint64, pages []byte) {
	for i, pfn := range pfns {
		if pfn < uint64(len(t.hashes)) {
			t.hashes[pfn] = PageHash(pages[i*PageSize : (i+1)*PageSize])
		}
	}
}
