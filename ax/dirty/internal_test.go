package dirty

import (
	"errors"
	"os"
	"path/filepath"
	"runtime/debug"
	"unsafe"

	"golang.org/x/sys/unix"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func TestParseVMA(t *testing.T) {
	for _, tc := range []struct {
		line string
		want vma
		err  string
	}{
		{
			line: "7f2a40000000-7f2a50000000 rw-s 00000000 00:1a 4242                       /dev/shm/vm1.ram",
			want: vma{start: 0x7f2a40000000, end: 0x7f2a50000000, perms: [4]byte{'r', 'w', '-', 's'}, major: 0, minor: 0x1a, ino: 4242},
		},
		{
			line: "7f0000001000-7f0000003000 rw-p 00200000 fd:01 123 /var/lib/ax/my ram (deleted)",
			want: vma{start: 0x7f0000001000, end: 0x7f0000003000, perms: [4]byte{'r', 'w', '-', 'p'}, offset: 0x200000, major: 0xfd, minor: 1, ino: 123},
		},
		{
			line: "55d0c8e3c000-55d0c8e5d000 rw-p 00000000 00:00 0",
			want: vma{start: 0x55d0c8e3c000, end: 0x55d0c8e5d000, perms: [4]byte{'r', 'w', '-', 'p'}},
		},
		{line: "7f2a40000000 rw-s 00000000 00:1a 4242", err: "address range"},
		{line: "2000-1000 rw-s 00000000 00:1a 4242", err: "address range"},
		{line: "1000-2000 rw-sx 00000000 00:1a 4242", err: "permissions"},
		{line: "1000-2000 rw-s 0000z000 00:1a 4242", err: "offset"},
		{line: "1000-2000 rw-s 00000000 001a 4242", err: "device"},
		{line: "1000-2000 rw-s 00000000 00:1a", err: "inode"},
		{line: "", err: "address range"},
	} {
		got, err := parseVMA([]byte(tc.line))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseVMA(%q) error = %v, want one about the %s", tc.line, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseVMA(%q) = %v, %v; want %v", tc.line, got, err, tc.want)
		}
	}
}

func TestFileSegments(t *testing.T) {
	const maps = `55d0c8e3c000-55d0c8e5d000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000200000 rw-s 00000000 00:1a 77   /dev/shm/ram
7f0000200000-7f0000400000 rw-s 00200000 00:1a 77   /dev/shm/ram
7f0000400000-7f0000401000 ---p 00000000 00:00 0
7f1000000000-7f1000001000 r--s 00000000 00:1a 78   /dev/shm/other
7f2000000000-7f2000100000 rw-s 00400000 00:1a 77   /dev/shm/ram
7f2000100000-7f2000200000 r--p 00500000 00:1a 77   /dev/shm/ram
7f3000000000-7f3000001000 rw-s 00000000 00:1b 77   /other/fs/same/inode
`
	got, private, err := fileSegments([]byte(maps), 0, 0x1a, 77, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []segment{
		{start: 0x7f0000000000, end: 0x7f0000400000, offset: 0}, // two lines, one mapping
		{start: 0x7f2000000000, end: 0x7f2000100000, offset: 0x400000},
	}
	if !slices.Equal(got, want) {
		t.Errorf("segments = %x, want %x", got, want)
	}
	if private != nil {
		t.Errorf("a read-only private mapping was taken for a writable one: %v", private)
	}

	_, private, err = fileSegments([]byte(maps+"7f4000000000-7f4000001000 rw-p 00000000 00:1a 77 /dev/shm/ram\n"), 0, 0x1a, 77, nil)
	if err != nil || private == nil || private.start != 0x7f4000000000 {
		t.Errorf("writable private mapping: got %v, %v", private, err)
	}

	if _, _, err := fileSegments([]byte("garbage\n"), 0, 0x1a, 77, nil); err == nil {
		t.Error("no error for a malformed maps line")
	}
}

func TestFilePage(t *testing.T) {
	tr := &SoftDirtyTracker{file: &ramFile{npages: 16}}
	s := segment{start: 0x10000, end: 0x20000, offset: 8 * PageSize}
	for _, tc := range []struct {
		addr uint64
		pfn  uint64
		in   bool
	}{
		{0x10000, 8, true},
		{0x17000, 15, true},
		{0x18000, 16, false}, // the mapping runs past the end of the file
	} {
		if pfn, in := tr.filePage(s, tc.addr); pfn != tc.pfn || in != tc.in {
			t.Errorf("filePage(%#x) = %d, %v; want %d, %v", tc.addr, pfn, in, tc.pfn, tc.in)
		}
	}
}

func TestBitmap(t *testing.T) {
	const n = 1000
	b := newBitmap(n)
	model := make([]bool, n)
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		lo := rng.IntN(n)
		hi := lo + rng.IntN(min(n-lo, 200)+1)
		if rng.IntN(2) == 0 {
			for p := lo; p < hi; p++ {
				b.set(p)
				model[p] = true
			}
			continue
		}
		got := b.takeRange(nil, lo, hi)
		var want []uint64
		for p := lo; p < hi; p++ {
			if model[p] {
				want = append(want, uint64(p))
				model[p] = false
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("takeRange(%d, %d) = %v, want %v", lo, hi, got, want)
		}
		for p := range n {
			if b.has(p) != model[p] {
				t.Fatalf("has(%d) = %v, want %v", p, b.has(p), model[p])
			}
		}
	}
}

func TestPagemapScanNumber(t *testing.T) {
	// _IOWR('f', 16, struct pm_scan_arg) in <linux/fs.h>: a 96-byte argument.
	if pagemapScan != 0xc0606610 {
		t.Errorf("PAGEMAP_SCAN = %#x, want 0xc0606610", pagemapScan)
	}
}

// dataPages lists the data pages of the file at path as the finder sees them.
func dataPages(t *testing.T, path string) []uint64 {
	t.Helper()
	f, err := openRAMFile(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.close()
	if err := f.mapShared(); err != nil {
		t.Fatal(err)
	}
	finder := newDataFinder(f)
	var got []uint64
	for pos := 0; pos < f.npages; {
		start, end, err := finder.next(pos, f.npages)
		if err != nil {
			t.Fatal(err)
		}
		if start < pos || end <= start && start != f.npages || end > f.npages {
			t.Fatalf("next(%d) = [%d, %d) out of order", pos, start, end)
		}
		for p := start; p < end; p++ {
			got = append(got, uint64(p))
		}
		pos = end
	}
	return got
}

func TestDataFinder(t *testing.T) {
	const npages = 6000
	// Runs short and long, at the start and the end, longer than a window.
	var want []uint64
	for _, run := range [][2]int{{0, 1}, {5, 6}, {7, 9}, {40, 41}, {100, 1100}, {1200, 1200 + maxWindow + 77}, {npages - 2, npages}} {
		for p := run[0]; p < run[1]; p++ {
			want = append(want, uint64(p))
		}
	}
	for _, dir := range []string{"/dev/shm", t.TempDir()} {
		t.Run(dir, func(t *testing.T) {
			f, err := os.CreateTemp(dir, "ax-dirty-finder-")
			if err != nil {
				t.Skip(err)
			}
			t.Cleanup(func() { os.Remove(f.Name()) })
			defer f.Close()
			if err := f.Truncate(npages * PageSize); err != nil {
				t.Fatal(err)
			}
			for _, p := range want {
				if _, err := f.WriteAt([]byte{1}, int64(p)*PageSize+100); err != nil {
					t.Fatal(err)
				}
			}
			// On a disk file system, data that is not in memory is still
			// data: drop it from the page cache.
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
			if got := dataPages(t, f.Name()); !slices.Equal(got, want) {
				t.Errorf("data pages = %v, want %v", got, want)
			}
		})
	}
}

// The PAGEMAP_SCAN plumbing (argument layout, continuing a walk that
// filled its vector, regions to file pages), tested with the category of
// present pages, which every kernel since 6.7 has, on a mapping of this
// process; whether soft-dirty bits come back is tested on a kernel that
// has both, in TestSoftDirtyTracker.
func TestPagemapScanPresent(t *testing.T) {
	const npages = 64
	path := t.TempDir() + "/ram"
	if dir, err := os.MkdirTemp("/dev/shm", "ax-dirty-test-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(dir) })
		path = dir + "/ram"
	}
	if err := os.WriteFile(path, make([]byte, npages*PageSize), 0o600); err != nil {
		t.Fatal(err)
	}
	file, err := openRAMFile(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer file.close()
	if err := file.mapShared(); err != nil {
		t.Fatal(err)
	}
	pagemap, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatal(err)
	}
	defer pagemap.Close()

	// The segment is the file's second half, mapped at offset 32 pages.
	second := file.mem[32*PageSize:]
	present := []uint64{1, 32, 33, 34, 40, 50, 51, 63}
	// Map every page, then unmap all but runs of them.
	for p := range npages {
		testSink += file.mem[p*PageSize]
	}
	for p := range npages {
		if !slices.Contains(present, uint64(p)) {
			if err := unix.Madvise(file.mem[p*PageSize:(p+1)*PageSize], unix.MADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
		}
	}
	start := uint64(uintptr(unsafe.Pointer(&second[0])))
	tr := &SoftDirtyTracker{
		pid:     os.Getpid(),
		file:    file,
		pagemap: pagemap,
		regions: make([]pageRegion, 2), // fills up: the walk goes on from where it stopped
	}
	seg := segment{start: start, end: start + 32*PageSize, offset: 32 * PageSize}
	if _, _, err := tr.pagemapScan(seg.start, seg.start+PageSize, pageIsPresent); err != nil {
		skipWithoutPagemapScan(t, err)
	}
	got, err := tr.scanPagemap(nil, seg, pageIsPresent)
	if err != nil {
		t.Fatal(err)
	}
	if want := present[1:]; !slices.Equal(got, want) {
		t.Errorf("PAGEMAP_SCAN found present pages %v, want %v", got, want)
	}
}

var testSink byte

func skipWithoutPagemapScan(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, unix.ENOTTY) {
		t.Skipf("no PAGEMAP_SCAN before Linux 6.7: %v", err)
	}
	t.Fatal(err)
}

// Reading the mapping past the end of a file that shrank is an error, not
// a crash.
func TestRecoverFault(t *testing.T) {
	path := t.TempDir() + "/ram"
	if err := os.WriteFile(path, make([]byte, 2*PageSize), 0o600); err != nil {
		t.Fatal(err)
	}
	file, err := openRAMFile(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer file.close()
	if err := file.mapShared(); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, PageSize); err != nil {
		t.Fatal(err)
	}
	err = func() (err error) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer file.recoverFault(&err)
		testSink += file.mem[PageSize]
		return nil
	}()
	if err == nil || !strings.Contains(err.Error(), "faulted") {
		t.Fatalf("reading past the end: err = %v, want a fault", err)
	}
	t.Log(err)
}

func TestHashRebaseCatchesRestoredPage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ram")
	data := make([]byte, 4*PageSize)
	data[PageSize] = 1 // page 1 holds content A
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	tr, err := NewHashTracker(path, HashOptions{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if _, err := tr.Scan(nil); err != nil { // baseline: page 1 = A
		t.Fatal(err)
	}
	// The copy sent to the replica was B (the page changed after the scan)…
	sent := make([]byte, PageSize)
	sent[0] = 2
	tr.Rebase([]uint64{1}, sent)
	// …and the guest then restored A: without the rebase this goes unseen.
	got, err := tr.Scan(nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0] != 1 {
		t.Fatalf("scan after rebase = %v, want [1]", got)
	}
}
