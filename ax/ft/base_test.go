package ft

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/axproject/ax/ax/dirty"
)

// baseOf is the base of a replica holding the RAM file's pages, but zeros
// at page 3 and other bytes at page 7.
func baseOf(t *testing.T, ram *RAM) []uint64 {
	t.Helper()
	page := make([]byte, PageSize)
	base := make([]uint64, ram.Pages())
	for pfn := range base {
		if err := ram.ReadPage(uint64(pfn), page); err != nil {
			t.Fatal(err)
		}
		base[pfn] = dirty.PageHash(page)
	}
	base[3] = dirty.PageHash(make([]byte, PageSize))
	base[7] = 42
	return base
}

// syncOnBase runs the loop until its first checkpoint and returns the pages
// of the initial sync.
func syncOnBase(t *testing.T, ram *RAM, tr dirty.Tracker, base []uint64) (*fakeStream, []uint64) {
	t.Helper()
	st := newFakeStream(true)
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir(), Base: base}, &fakeMonitor{}, tr, ram, st, nil, Observer{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- l.Run(ctx) }()
	select {
	case <-st.sent:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("run: %v", err)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	pfns := slices.Clone(st.syncPFNs)
	slices.Sort(pfns)
	return st, pfns
}

// On a base, the initial sync sends exactly the pages whose content the
// replica does not hold — with a tracker that compares (hashing: its first
// scan starts from the base) and with one that cannot (its first round is
// filtered by hashing every page).
func TestInitialSyncOnBase(t *testing.T) {
	t.Run("hash tracker", func(t *testing.T) {
		ram, path := testRAM(t, 16)
		tr, err := dirty.NewHashTracker(path, dirty.HashOptions{Size: 16 * PageSize})
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		st, pfns := syncOnBase(t, ram, tr, baseOf(t, ram))
		if !st.onBase || !slices.Equal(pfns, []uint64{3, 7}) {
			t.Fatalf("on base %v, sync pages %v; want pages 3 and 7", st.onBase, pfns)
		}
	})
	t.Run("tracker without baseline", func(t *testing.T) {
		ram, _ := testRAM(t, 16)
		all := make([]uint64, 16)
		for i := range all {
			all[i] = uint64(i)
		}
		st, pfns := syncOnBase(t, ram, &fakeTracker{scans: [][]uint64{all}}, baseOf(t, ram))
		if !st.onBase || !slices.Equal(pfns, []uint64{3, 7}) {
			t.Fatalf("on base %v, sync pages %v; want pages 3 and 7", st.onBase, pfns)
		}
	})
	t.Run("no base: from zeros", func(t *testing.T) {
		ram, _ := testRAM(t, 16)
		st, pfns := syncOnBase(t, ram, &fakeTracker{scans: [][]uint64{{0, 1, 2}}}, nil)
		if st.onBase || !slices.Equal(pfns, []uint64{0, 1, 2}) {
			t.Fatalf("on base %v, sync pages %v", st.onBase, pfns)
		}
	})
	t.Run("base of another size", func(t *testing.T) {
		ram, _ := testRAM(t, 16)
		l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir(), Base: make([]uint64, 15)}, &fakeMonitor{}, &fakeTracker{}, ram, newFakeStream(true), nil, Observer{}, nil)
		if err := l.Run(context.Background()); err == nil {
			t.Fatal("a base of 15 pages for 16 taken")
		}
	})
}
