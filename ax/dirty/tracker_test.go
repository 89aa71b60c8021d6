package dirty_test

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/test/testenv"
)

const scenarioPages = 2000 // 8 MiB

// step is one round of the scenario: writes by another process, then a
// Scan that must report exactly want (plus onlySoftDirty for the
// soft-dirty tracker, which sees writes that left the content as it was).
type step struct {
	name          string
	do            func(w *writer)
	want          []uint64
	onlySoftDirty []uint64
}

// initialData are the pages written before the tracker starts.
var initialData = []uint64{2, 3, 4, 500, 666, 667, 1500}

func scenario() []step {
	// Pages on both sides of every chunk boundary for 2, 3 and 8 workers,
	// and a stride across the file.
	var across []uint64
	for _, workers := range []int{2, 3, 8} {
		per := (scenarioPages + workers - 1) / workers
		for b := per; b < scenarioPages; b += per {
			across = append(across, uint64(b-1), uint64(b))
		}
	}
	for p := 1; p < scenarioPages; p += 37 {
		across = append(across, uint64(p))
	}
	slices.Sort(across)
	across = slices.Compact(across)
	last := uint64(scenarioPages - 1)

	return []step{
		{name: "first scan of a sparse file", want: initialData},
		{name: "nothing written", want: nil},
		{name: "one page into a hole", do: func(w *writer) { w.set(7, 9, 123) }, want: []uint64{123}},
		{name: "one byte of a data page", do: func(w *writer) { w.set(4095, 9, 500) }, want: []uint64{500}},
		{name: "first and last page", do: func(w *writer) { w.set(0, 5, 0, last) }, want: []uint64{0, last}},
		{name: "many pages across worker chunks", do: func(w *writer) { w.set(2048, 3, across...) }, want: across},
		// The hash tracker does not see a write that leaves a page as it
		// was; the replica already has that content, so nothing is lost.
		{name: "same content again", do: func(w *writer) { w.set(7, 9, 123) }, onlySoftDirty: []uint64{123}},
		{name: "zeros into a hole", do: func(w *writer) { w.set(0, 0, 700) }, onlySoftDirty: []uint64{700}},
		{name: "punch a written page", do: func(w *writer) { w.punch(500) }, want: []uint64{500}},
		{name: "punch a hole", do: func(w *writer) { w.punch(900) }},
		{name: "write then punch a hole", do: func(w *writer) { w.set(1, 1, 1100); w.punch(1100) }},
		{name: "punch then write", do: func(w *writer) { w.punch(2); w.set(9, 9, 2) }, want: []uint64{2}},
		{name: "write twice", do: func(w *writer) { w.set(9, 1, 3); w.set(9, 2, 3, 4) }, want: []uint64{3, 4}},
		{name: "nothing written at the end", want: nil},
	}
}

// runScenario plays the scenario against the tracker that open returns
// for the file the writer maps.
func runScenario(t *testing.T, softDirty bool, open func(t *testing.T, w *writer, path string) dirty.Tracker) {
	path := newRAMFile(t, scenarioPages)
	w := startWriter(t, path, "shared")
	w.set(100, 1, initialData...)
	tr := open(t, w, path)
	t.Cleanup(func() { tr.Close() })

	var got []uint64
	for _, s := range scenario() {
		if s.do != nil {
			s.do(w)
		}
		want := s.want
		if softDirty {
			want = append(slices.Clone(want), s.onlySoftDirty...)
			slices.Sort(want)
		}
		var err error
		got, err = tr.Scan(got[:0])
		if err != nil {
			t.Fatalf("%s: Scan: %v", s.name, err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: Scan = %s, want %s", s.name, pages(got), pages(want))
		}
	}
}

// pages prints a page list briefly.
func pages(p []uint64) string {
	if len(p) > 20 {
		return fmt.Sprintf("%d pages %v … %v", len(p), p[:10], p[len(p)-10:])
	}
	return fmt.Sprint(p)
}

func TestHashTracker(t *testing.T) {
	for _, workers := range []int{1, 3, 8} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			runScenario(t, false, func(t *testing.T, w *writer, path string) dirty.Tracker {
				tr, err := dirty.NewHashTracker(path, dirty.HashOptions{Workers: workers, Size: scenarioPages * dirty.PageSize})
				if err != nil {
					t.Fatal(err)
				}
				if tr.Name() != dirty.ModeHash || tr.Workers() != workers {
					t.Fatalf("Name, Workers = %q, %d; want %q, %d", tr.Name(), tr.Workers(), dirty.ModeHash, workers)
				}
				return tr
			})
		})
	}
}

func requireSoftDirty(t *testing.T) {
	t.Helper()
	testenv.RequireFeature(t, "soft-dirty", dirty.SoftDirtyAvailable(),
		"needs CONFIG_MEM_SOFT_DIRTY; CI runs it in the lab guest kernel")
}

func TestSoftDirtyTracker(t *testing.T) {
	requireSoftDirty(t)
	for _, pagemapScan := range []bool{true, false} {
		t.Run(fmt.Sprintf("pagemap-scan=%v", pagemapScan), func(t *testing.T) {
			runScenario(t, true, func(t *testing.T, w *writer, path string) dirty.Tracker {
				tr, err := dirty.NewSoftDirtyTracker(w.pid(), path)
				if err != nil {
					t.Fatal(err)
				}
				if !pagemapScan {
					dirty.DisablePagemapScan(tr)
				} else if !dirty.UsesPagemapScan(tr) {
					tr.Close()
					t.Skip("the kernel has no PAGEMAP_SCAN with PAGE_IS_SOFT_DIRTY (Linux 6.7+); pagemap reads are tested")
				}
				if tr.Name() != dirty.ModeSoftDirty {
					t.Fatalf("Name = %q, want %q", tr.Name(), dirty.ModeSoftDirty)
				}
				return tr
			})
		})
	}
}

// A Scan after QEMU remapped its RAM fails; the next one reports every
// page and follows the new mapping.
func TestSoftDirtyTrackerRemap(t *testing.T) {
	requireSoftDirty(t)
	path := newRAMFile(t, 64)
	w := startWriter(t, path, "shared")
	w.set(0, 1, 5, 6)
	tr, err := dirty.NewSoftDirtyTracker(w.pid(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if _, err := tr.Scan(nil); err != nil {
		t.Fatal(err)
	}
	w.remap()
	w.set(0, 2, 7)
	if _, err := tr.Scan(nil); err == nil || !strings.Contains(err.Error(), "remapped") {
		t.Fatalf("Scan after remap: err = %v, want it to say the file was remapped", err)
	}
	if got, err := tr.Scan(nil); err != nil || len(got) != 64 {
		t.Fatalf("second Scan after remap = %v, %v; want every page", got, err)
	}
	w.set(0, 3, 9)
	if got, err := tr.Scan(nil); err != nil || !slices.Equal(got, []uint64{9}) {
		t.Fatalf("Scan after a write through the new mapping = %v, %v; want [9]", got, err)
	}
}

func TestHashTrackerMoreWorkersThanPages(t *testing.T) {
	path := newRAMFile(t, 1)
	tr, err := dirty.NewHashTracker(path, dirty.HashOptions{Workers: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Workers() != 1 {
		t.Errorf("Workers = %d, want 1 for a one-page file", tr.Workers())
	}
	check := func(want ...uint64) {
		t.Helper()
		got, err := tr.Scan(nil)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("Scan = %v, %v; want %v", got, err, want)
		}
	}
	check()
	w := startWriter(t, path, "shared")
	w.set(17, 1, 0)
	check(0)
	check()
}

// Scan appends to dst and leaves what it held.
func TestScanAppends(t *testing.T) {
	path := newRAMFile(t, 16)
	startWriter(t, path, "shared").set(0, 1, 3, 9)
	tr, err := dirty.NewHashTracker(path, dirty.HashOptions{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	got, err := tr.Scan([]uint64{42})
	if want := []uint64{42, 3, 9}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("Scan([42]) = %v, %v; want %v", got, err, want)
	}
}

// A file that changes size fails the Scan; once it is back, the next Scan
// reports every page.
func TestHashTrackerSizeChange(t *testing.T) {
	path := newRAMFile(t, 16)
	w := startWriter(t, path, "shared")
	w.set(0, 1, 1, 2)
	tr, err := dirty.NewHashTracker(path, dirty.HashOptions{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if _, err := tr.Scan(nil); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 8*dirty.PageSize); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Scan(nil); err == nil || !strings.Contains(err.Error(), "changed size") {
		t.Fatalf("Scan of a truncated file: err = %v, want it to say the size changed", err)
	}
	if err := os.Truncate(path, 16*dirty.PageSize); err != nil {
		t.Fatal(err)
	}
	got, err := tr.Scan(nil)
	if err != nil || len(got) != 16 {
		t.Fatalf("Scan after the size came back = %v, %v; want every page", got, err)
	}
	if got, err := tr.Scan(nil); err != nil || len(got) != 0 {
		t.Fatalf("next Scan = %v, %v; want none", got, err)
	}
}

func TestCloseTwice(t *testing.T) {
	tr, err := dirty.NewHashTracker(newRAMFile(t, 4), dirty.HashOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tr.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := tr.Scan(nil); err == nil {
		t.Fatal("Scan after Close succeeded")
	}
}

func TestNewHashTrackerErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, size int64) string {
		p := dir + "/" + name
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, path string
		opts       dirty.HashOptions
		want       string
	}{
		{"missing", dir + "/nothing", dirty.HashOptions{}, "no such file"},
		{"directory", dir, dirty.HashOptions{}, "not a regular file"},
		{"empty", write("empty", 0), dirty.HashOptions{}, "is empty"},
		{"partial page", write("odd", 3*dirty.PageSize+1), dirty.HashOptions{}, "not a whole number of 4096-byte pages"},
		{"wrong size", write("small", 4*dirty.PageSize), dirty.HashOptions{Size: 8 * dirty.PageSize}, "is 16384 bytes but the VM's RAM is 32768 bytes"},
		{"negative workers", write("ok", dirty.PageSize), dirty.HashOptions{Workers: -1}, "-1 workers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr, err := dirty.NewHashTracker(tc.path, tc.opts)
			if err == nil {
				tr.Close()
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

func TestSelect(t *testing.T) {
	path := newRAMFile(t, 16)
	shared := startWriter(t, path, "shared")

	for _, tc := range []struct {
		mode     string
		pid      int
		wantName string // "" when Select must fail
		wantErr  string
	}{
		{mode: "auto", wantName: dirty.ModeHash},
		{mode: "hash", wantName: dirty.ModeHash},
		{mode: "hash", pid: shared.pid(), wantName: dirty.ModeHash},
		{mode: "auto", pid: shared.pid(), wantName: map[bool]string{true: dirty.ModeSoftDirty, false: dirty.ModeHash}[dirty.SoftDirtyAvailable()]},
		{mode: "soft-dirty", wantErr: "needs the pid"},
		{mode: "hash", pid: os.Getpid(), wantErr: "does not map"},
		{mode: "dirty-ring", wantErr: `unknown tracker mode "dirty-ring"`},
	} {
		t.Run(fmt.Sprintf("%s/pid=%d", tc.mode, tc.pid), func(t *testing.T) {
			tr, err := dirty.Select(tc.mode, tc.pid, path, dirty.HashOptions{})
			if tc.wantName == "" {
				if err == nil {
					tr.Close()
					t.Fatalf("Select succeeded, want an error saying %q", tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %q does not say %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			if tr.Name() != tc.wantName {
				t.Fatalf("Select chose %q, want %q", tr.Name(), tc.wantName)
			}
		})
	}

	t.Run("soft-dirty", func(t *testing.T) {
		tr, err := dirty.Select(dirty.ModeSoftDirty, shared.pid(), path, dirty.HashOptions{})
		if dirty.SoftDirtyAvailable() {
			if err != nil {
				t.Fatal(err)
			}
			tr.Close()
			return
		}
		if !errors.Is(err, dirty.ErrSoftDirtyUnavailable) {
			t.Fatalf("Select(soft-dirty) on a kernel without it: err = %v, want ErrSoftDirtyUnavailable", err)
		}
		t.Log(err)
	})

	// A private mapping (QEMU's share=off) never writes the file: refuse it
	// whatever the mode.
	t.Run("private mapping", func(t *testing.T) {
		private := startWriter(t, path, "private")
		for _, mode := range []string{dirty.ModeAuto, dirty.ModeHash} {
			tr, err := dirty.Select(mode, private.pid(), path, dirty.HashOptions{})
			if err == nil {
				tr.Close()
				t.Fatalf("Select(%s) of a private mapping succeeded", mode)
			}
			if !strings.Contains(err.Error(), "share=on") {
				t.Fatalf("Select(%s): error %q does not say to use share=on", mode, err)
			}
		}
	})
}

func TestSoftDirtyAvailable(t *testing.T) {
	t.Logf("soft-dirty available: %v", dirty.SoftDirtyAvailable())
	if testenv.FeatureRequired("soft-dirty") && !dirty.SoftDirtyAvailable() {
		t.Fatal("AX_REQUIRE_FEATURES names soft-dirty but the kernel does not set the bits")
	}
}
