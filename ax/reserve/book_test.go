package reserve

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

const gib = 1 << 30

// testHost has 8 CPUs (32 vCPUs at the default ratio), 16 GiB and 100 GiB.
var testHost = Capacity{VCPUs: 8, MemoryBytes: 16 * gib, DiskBytes: 100 * gib}

func need(vcpus int, memGiB, diskGiB int64) Capacity {
	return Capacity{VCPUs: vcpus, MemoryBytes: memGiB * gib, DiskBytes: diskGiB * gib}
}

type bookStep struct {
	vm      string
	need    Capacity
	force   bool
	release bool
	// wantOver lists the dimensions refused, in order; nil: accepted.
	wantOver []string
}

func TestReserveBookAccounting(t *testing.T) {
	tests := []struct {
		name         string
		steps        []bookStep
		wantReserved Capacity
		wantForced   map[string]bool
	}{
		{
			name:         "promises add up",
			steps:        []bookStep{{vm: "a", need: need(4, 4, 20)}, {vm: "b", need: need(2, 8, 30)}},
			wantReserved: need(6, 12, 50),
			wantForced:   map[string]bool{"a": false, "b": false},
		},
		{
			name:         "exactly the limit",
			steps:        []bookStep{{vm: "a", need: need(32, 16, 100)}},
			wantReserved: need(32, 16, 100),
			wantForced:   map[string]bool{"a": false},
		},
		{
			name:         "vcpus over the ratio",
			steps:        []bookStep{{vm: "a", need: need(30, 1, 1)}, {vm: "b", need: need(3, 1, 1), wantOver: []string{"vcpus"}}},
			wantReserved: need(30, 1, 1),
			wantForced:   map[string]bool{"a": false},
		},
		{
			name:         "memory is not overcommitted",
			steps:        []bookStep{{vm: "a", need: need(1, 12, 1)}, {vm: "b", need: need(1, 5, 1), wantOver: []string{"memory"}}},
			wantReserved: need(1, 12, 1),
			wantForced:   map[string]bool{"a": false},
		},
		{
			name:         "disk is not overcommitted",
			steps:        []bookStep{{vm: "a", need: need(1, 1, 101), wantOver: []string{"disk"}}},
			wantReserved: Capacity{},
			wantForced:   map[string]bool{},
		},
		{
			name:         "every dimension over at once",
			steps:        []bookStep{{vm: "a", need: need(33, 17, 101), wantOver: []string{"vcpus", "memory", "disk"}}},
			wantReserved: Capacity{},
			wantForced:   map[string]bool{},
		},
		{
			name:         "replacing counts only the difference",
			steps:        []bookStep{{vm: "a", need: need(2, 10, 10)}, {vm: "a", need: need(2, 16, 10)}},
			wantReserved: need(2, 16, 10),
			wantForced:   map[string]bool{"a": false},
		},
		{
			name: "replacing over the limit keeps the old promise",
			steps: []bookStep{
				{vm: "a", need: need(2, 10, 10)}, {vm: "b", need: need(2, 4, 10)},
				{vm: "a", need: need(2, 13, 10), wantOver: []string{"memory"}},
			},
			wantReserved: need(4, 14, 20),
			wantForced:   map[string]bool{"a": false, "b": false},
		},
		{
			name:         "release frees",
			steps:        []bookStep{{vm: "a", need: need(2, 12, 10)}, {vm: "a", release: true}, {vm: "b", need: need(2, 16, 10)}},
			wantReserved: need(2, 16, 10),
			wantForced:   map[string]bool{"b": false},
		},
		{
			name:         "release of a guest without a promise",
			steps:        []bookStep{{vm: "a", need: need(1, 1, 1)}, {vm: "nobody", release: true}, {vm: "nobody", release: true}},
			wantReserved: need(1, 1, 1),
			wantForced:   map[string]bool{"a": false},
		},
		{
			name:         "force records an overcommit",
			steps:        []bookStep{{vm: "a", need: need(2, 12, 10)}, {vm: "b", need: need(2, 8, 10), force: true}},
			wantReserved: need(4, 20, 20),
			wantForced:   map[string]bool{"a": false, "b": true},
		},
		{
			name:         "force that is not needed is not recorded",
			steps:        []bookStep{{vm: "a", need: need(2, 2, 2), force: true}},
			wantReserved: need(2, 2, 2),
			wantForced:   map[string]bool{"a": false},
		},
		{
			name: "shrinking a forced promise needs no force",
			steps: []bookStep{
				{vm: "a", need: need(2, 12, 10)}, {vm: "b", need: need(2, 8, 10), force: true},
				{vm: "b", need: need(2, 6, 10)},
			},
			wantReserved: need(4, 18, 20),
			wantForced:   map[string]bool{"a": false, "b": true},
		},
		{
			name: "a forced promise shrunk to fit is no longer forced",
			steps: []bookStep{
				{vm: "a", need: need(2, 12, 10)}, {vm: "b", need: need(2, 8, 10), force: true},
				{vm: "b", need: need(2, 4, 10)},
			},
			wantReserved: need(4, 16, 20),
			wantForced:   map[string]bool{"a": false, "b": false},
		},
		{
			name: "over by force, others must still fit",
			steps: []bookStep{
				{vm: "a", need: need(2, 20, 10), force: true},
				{vm: "b", need: need(1, 1, 1), wantOver: []string{"memory"}},
			},
			wantReserved: need(2, 20, 10),
			wantForced:   map[string]bool{"a": true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "book.json")
			b, err := OpenBook(path, testHost, nil)
			if err != nil {
				t.Fatal(err)
			}
			for i, s := range tt.steps {
				if s.release {
					if err := b.Release(s.vm); err != nil {
						t.Fatalf("step %d: release %s: %v", i, s.vm, err)
					}
					continue
				}
				err := b.Promise(s.vm, s.need, s.force)
				checkOver(t, fmt.Sprintf("step %d", i), err, s.wantOver)
			}
			if got := b.Reserved(); got != tt.wantReserved {
				t.Errorf("reserved %+v, want %+v", got, tt.wantReserved)
			}
			if got, want := b.Free(), b.Limits().Sub(tt.wantReserved); got != want {
				t.Errorf("free %+v, want %+v", got, want)
			}
			forced := map[string]bool{}
			for vm, p := range b.Promises() {
				forced[vm] = p.Forced
			}
			if !reflect.DeepEqual(forced, tt.wantForced) {
				t.Errorf("promises (forced) %v, want %v", forced, tt.wantForced)
			}
			// What was reported is what was persisted.
			again, err := OpenBook(path, testHost, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(again.Promises(), b.Promises()) || again.Reserved() != b.Reserved() {
				t.Errorf("reopened book %+v, want %+v", again.Promises(), b.Promises())
			}
		})
	}
}

// checkOver checks err refuses exactly the dimensions want (nil: no error)
// and says what the operator needs to know.
func checkOver(t *testing.T, step string, err error, want []string) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		return
	}
	var oe *OverCommitError
	if !errors.Is(err, ErrOverCommitted) || !errors.As(err, &oe) {
		t.Fatalf("%s: %v, want an over-commit error", step, err)
	}
	var dims []string
	for _, o := range oe.Over {
		dims = append(dims, o.Dimension)
		if !strings.Contains(err.Error(), o.Dimension+" over capacity") {
			t.Errorf("%s: %q does not name %s", step, err, o.Dimension)
		}
	}
	if !reflect.DeepEqual(dims, want) {
		t.Errorf("%s: over in %v, want %v", step, dims, want)
	}
	if !strings.Contains(err.Error(), "use --force to promise anyway") {
		t.Errorf("%s: %q does not say how to override", step, err)
	}
}

func TestReserveOverCommitErrorText(t *testing.T) {
	b, err := OpenBook(filepath.Join(t.TempDir(), "book.json"), testHost, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Promise("a", need(30, 12, 1), false); err != nil {
		t.Fatal(err)
	}
	err = b.Promise("vm-7", Capacity{VCPUs: 4, MemoryBytes: 4*gib + gib/2, DiskBytes: gib}, false)
	want := "reserve: cannot promise capacity for vm-7: " +
		"vcpus over capacity: 30 promised to other guests, 4 asked, 32 available on this host; " +
		"memory over capacity: 12 GiB promised to other guests, 4.50 GiB asked, 16 GiB available on this host; " +
		"use --force to promise anyway"
	if err == nil || err.Error() != want {
		t.Errorf("got  %v\nwant %s", err, want)
	}
}

func TestReserveBookRatios(t *testing.T) {
	tests := []struct {
		name string
		opts *Options
		want Capacity
	}{
		{"defaults", nil, Capacity{VCPUs: 32, MemoryBytes: 16 * gib, DiskBytes: 100 * gib}},
		{"zero fields are defaults", &Options{}, Capacity{VCPUs: 32, MemoryBytes: 16 * gib, DiskBytes: 100 * gib}},
		{"no vcpu overcommit", &Options{VCPURatio: 1}, Capacity{VCPUs: 8, MemoryBytes: 16 * gib, DiskBytes: 100 * gib}},
		{"fractional", &Options{VCPURatio: 1.5, MemoryRatio: 0.5, DiskRatio: 2}, Capacity{VCPUs: 12, MemoryBytes: 8 * gib, DiskBytes: 200 * gib}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := OpenBook(filepath.Join(t.TempDir(), "book.json"), testHost, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := b.Limits(); got != tt.want {
				t.Errorf("limits %+v, want %+v", got, tt.want)
			}
			if b.Host() != testHost || b.Free() != tt.want {
				t.Errorf("host %+v free %+v", b.Host(), b.Free())
			}
		})
	}
	if _, err := OpenBook(filepath.Join(t.TempDir(), "book.json"), testHost, &Options{MemoryRatio: -1}); err == nil {
		t.Error("negative ratio accepted")
	}
}

func TestReserveBookRejectsBadInput(t *testing.T) {
	b, err := OpenBook(filepath.Join(t.TempDir(), "book.json"), testHost, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Promise("", need(1, 1, 1), false); err == nil {
		t.Error("promise without a guest name accepted")
	}
	if err := b.Promise("a", Capacity{MemoryBytes: -1}, true); err == nil {
		t.Error("negative need accepted")
	}
	if len(b.Promises()) != 0 {
		t.Errorf("promises after refusals: %v", b.Promises())
	}
}

func TestReserveBookPersistence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "book.json")
	b, err := OpenBook(path, testHost, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("an empty book wrote its file: %v", err)
	}
	now := time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.UTC)
	b.now = func() time.Time { return now }
	for _, s := range []bookStep{
		{vm: "a", need: need(4, 8, 40)},
		{vm: "b", need: need(4, 12, 40), force: true},
		{vm: "c", need: need(1, 1, 1), force: true},
		{vm: "c", release: true},
	} {
		var err error
		if s.release {
			err = b.Release(s.vm)
		} else {
			err = b.Promise(s.vm, s.need, s.force)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	again, err := OpenBook(path, testHost, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Promise{
		"a": {Need: need(4, 8, 40), Since: now},
		"b": {Need: need(4, 12, 40), Forced: true, Since: now},
	}
	if got := again.Promises(); !reflect.DeepEqual(got, want) {
		t.Errorf("reopened promises %+v, want %+v", got, want)
	}
	if got := again.Reserved(); got != need(8, 20, 80) {
		t.Errorf("reopened reserved %+v", got)
	}
	// A smaller host keeps the promises; Free shows the shortfall.
	small, err := OpenBook(path, Capacity{VCPUs: 1, MemoryBytes: 4 * gib, DiskBytes: 50 * gib}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := small.Free(), (Capacity{VCPUs: -4, MemoryBytes: -16 * gib, DiskBytes: -30 * gib}); got != want {
		t.Errorf("free on a smaller host %+v, want %+v", got, want)
	}
	names, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "*.tmp"))
	if len(names) != 0 {
		t.Errorf("temporary files left: %v", names)
	}
}

func TestReserveBookCorrupt(t *testing.T) {
	tests := []struct {
		name, content string
	}{
		{"not json", "{\"version\": 1, \"promises\": {"},
		{"empty", ""},
		{"wrong version", `{"version": 2, "promises": {}}`},
		{"no version", `{"promises": {}}`},
		{"negative need", `{"version": 1, "promises": {"a": {"need": {"vcpus": -1}}}}`},
		{"empty guest name", `{"version": 1, "promises": {"": {"need": {"vcpus": 1}}}}`},
		{"wrong type", `{"version": 1, "promises": {"a": {"need": {"vcpus": "two"}}}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "book.json")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := OpenBook(path, testHost, nil)
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "corrupt") {
				t.Errorf("OpenBook = %v, want an error naming %s as corrupt", err, path)
			}
		})
	}
}

// TestBookConcurrent promises from many goroutines at once: whatever the
// interleaving, what was accepted fits the host.
func TestReserveBookConcurrent(t *testing.T) {
	b, err := OpenBook(filepath.Join(t.TempDir(), "book.json"), testHost, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted := map[string]Capacity{}
	for i := range 40 {
		wg.Go(func() {
			vm := fmt.Sprintf("vm-%d", i%20) // two goroutines per guest: replacements race too
			n := need(1+i%5, int64(1+i%3), int64(5+i%7))
			err := b.Promise(vm, n, false)
			if err != nil && !errors.Is(err, ErrOverCommitted) {
				t.Error(err)
			}
			if err == nil {
				mu.Lock()
				accepted[vm] = n
				mu.Unlock()
			}
			b.Free()
			b.Promises()
		})
	}
	wg.Wait()
	r, l := b.Reserved(), b.Limits()
	if r.VCPUs > l.VCPUs || r.MemoryBytes > l.MemoryBytes || r.DiskBytes > l.DiskBytes {
		t.Errorf("reserved %+v beyond limits %+v", r, l)
	}
	var sum Capacity
	for _, p := range b.Promises() {
		sum = sum.Add(p.Need)
		if p.Forced {
			t.Error("forced promise without force")
		}
	}
	if sum != r || len(accepted) != len(b.Promises()) {
		t.Errorf("promises sum to %+v for %d guests, reserved %+v, %d guests accepted", sum, len(b.Promises()), r, len(accepted))
	}
}

func TestReserveParseMemTotal(t *testing.T) {
	tests := []struct {
		name, in string
		want     int64 // 0: error
	}{
		{"typical", "MemTotal:       16318076 kB\nMemFree:         1234 kB\n", 16318076 << 10},
		{"not first", "Foo: 1 kB\nMemTotal: 4 kB\n", 4 << 10},
		{"missing", "MemFree: 1 kB\n", 0},
		{"no unit", "MemTotal: 4\n", 0},
		{"not a number", "MemTotal: x kB\n", 0},
		{"zero", "MemTotal: 0 kB\n", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMemTotal(strings.NewReader(tt.in))
			if tt.want == 0 {
				if err == nil {
					t.Errorf("got %d, want an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("got %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}

func TestReserveHostCapacity(t *testing.T) {
	c, err := HostCapacity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if c.VCPUs != runtime.NumCPU() || c.MemoryBytes <= 0 || c.DiskBytes <= 0 {
		t.Errorf("host capacity %+v", c)
	}
	if _, err := HostCapacity(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("capacity of a missing directory")
	}
}
