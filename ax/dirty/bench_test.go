package dirty_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/dirty"
)

const benchRAM = 256 << 20

// writeData fills [off, off+n) of the file at path with bytes that differ
// from page to page, as a guest's memory does.
func writeData(b *testing.B, path string, off, n int64) {
	b.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(uint64(off), 7))
	buf := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; done += int64(len(buf)) {
		for i := 0; i < len(buf); i += 8 {
			v := rng.Uint64()
			for j := range 8 {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
		if _, err := f.WriteAt(buf, off+done); err != nil {
			b.Fatal(err)
		}
	}
}

// benchHashScans measures Scan of path with 1 worker and with one per CPU,
// side by side, dirtying pages before each Scan with dirtyPages.
func benchHashScans(b *testing.B, path string, dataBytes int64, dirtyPages func(*testing.B)) {
	for _, workers := range []int{1, runtime.NumCPU()} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			tr, err := dirty.NewHashTracker(path, dirty.HashOptions{Workers: workers})
			if err != nil {
				b.Fatal(err)
			}
			defer tr.Close()
			buf, err := tr.Scan(nil) // the first Scan hashes everything once
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(dataBytes)
			b.ReportAllocs()
			found := 0
			for b.Loop() {
				if dirtyPages != nil {
					dirtyPages(b)
				}
				if buf, err = tr.Scan(buf[:0]); err != nil {
					b.Fatal(err)
				}
				found += len(buf)
			}
			b.ReportMetric(float64(dataBytes)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GB/s")
			b.ReportMetric(float64(found)/float64(b.N), "pages/op")
		})
	}
}

// BenchmarkHashScan256MiB hashes a fully written 256 MiB RAM file on tmpfs
// with nothing written between scans: the whole cost of the hash tracker.
func BenchmarkHashScan256MiB(b *testing.B) {
	path := newRAMFile(b, benchRAM/dirty.PageSize)
	writeData(b, path, 0, benchRAM)
	benchHashScans(b, path, benchRAM, nil)
}

// BenchmarkHashScanSmallDirty writes 64 scattered pages before each Scan
// (a small epoch): the hash tracker's cost hardly depends on it.
func BenchmarkHashScanSmallDirty(b *testing.B) {
	path := newRAMFile(b, benchRAM/dirty.PageSize)
	writeData(b, path, 0, benchRAM)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, benchRAM, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	rng := rand.New(rand.NewPCG(1, 1))
	benchHashScans(b, path, benchRAM, func(*testing.B) {
		for range 64 {
			mem[rng.IntN(benchRAM)]++
		}
	})
}

// BenchmarkHashScanSparse256MiB scans a 256 MiB file of which 16 MiB, in
// runs of 64 KiB, hold data: holes are skipped, not hashed.
func BenchmarkHashScanSparse256MiB(b *testing.B) {
	path := newRAMFile(b, benchRAM/dirty.PageSize)
	const run, every = 64 << 10, 1 << 20
	for off := int64(0); off < benchRAM; off += every {
		writeData(b, path, off, run)
	}
	benchHashScans(b, path, benchRAM/every*run, nil)
}

// BenchmarkSoftDirtyScanSmallDirty has another process write 64 scattered
// pages of a 256 MiB file before each (timed) Scan.
func BenchmarkSoftDirtyScanSmallDirty(b *testing.B) {
	if !dirty.SoftDirtyAvailable() {
		b.Skip("kernel feature soft-dirty unavailable (needs CONFIG_MEM_SOFT_DIRTY; run it in the lab guest kernel)")
	}
	path := newRAMFile(b, benchRAM/dirty.PageSize)
	writeData(b, path, 0, benchRAM)
	w := startWriter(b, path, "shared")
	tr, err := dirty.NewSoftDirtyTracker(w.pid(), path)
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	buf, err := tr.Scan(nil)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	pages := make([]uint64, 64)
	b.ReportAllocs()
	found := 0
	for b.Loop() {
		b.StopTimer()
		for i := range pages {
			pages[i] = uint64(rng.IntN(benchRAM / dirty.PageSize))
		}
		w.set(0, byte(rng.Uint32()), pages...)
		b.StartTimer()
		if buf, err = tr.Scan(buf[:0]); err != nil {
			b.Fatal(err)
		}
		found += len(buf)
	}
	b.ReportMetric(float64(found)/float64(b.N), "pages/op")
}

// BenchmarkHashFirstScan256MiB measures a new tracker's first Scan, which
// also maps every page into axd's page table: the start of protection.
func BenchmarkHashFirstScan256MiB(b *testing.B) {
	path := newRAMFile(b, benchRAM/dirty.PageSize)
	writeData(b, path, 0, benchRAM)
	b.SetBytes(benchRAM)
	var buf []uint64
	for b.Loop() {
		tr, err := dirty.NewHashTracker(path, dirty.HashOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if buf, err = tr.Scan(buf[:0]); err != nil || len(buf) != benchRAM/dirty.PageSize {
			b.Fatalf("first Scan: %d pages, %v", len(buf), err)
		}
		tr.Close()
	}
}
