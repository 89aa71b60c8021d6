package reserve

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/axproject/ax/ax/durable"
)

// ErrOverCommitted reports a promise the host cannot keep: granting it would
// promise more than the host has in some dimension. The error is an
// *OverCommitError saying which.
var ErrOverCommitted = errors.New("reserve: capacity over-committed")

// Default overcommit ratios. vCPUs are threads the host schedules and can
// share; a failed-over guest whose memory or disk does not fit does not run.
const (
	DefaultVCPURatio   = 4.0
	DefaultMemoryRatio = 1.0
	DefaultDiskRatio   = 1.0
)

// Options tune a Book. A nil *Options, or a zero field, means the default.
type Options struct {
	VCPURatio   float64 // vCPUs that may be promised per host CPU
	MemoryRatio float64 // bytes of memory that may be promised per host byte
	DiskRatio   float64 // bytes of disk that may be promised per host byte
}

// Promise is capacity held for one guest.
type Promise struct {
	Need Capacity `json:"need"`
	// Forced is set when the promise was made with force over capacity:
	// the host may not be able to run this guest after a failover.
	Forced bool      `json:"forced"`
	Since  time.Time `json:"since"`
}

// Overrun is one dimension in which a promise does not fit.
type Overrun struct {
	Dimension string // "vcpus", "memory" or "disk"
	Promised  int64  // already promised to other guests
	Asked     int64  // asked for this guest
	Limit     int64  // what the host may promise in all
}

// OverCommitError reports a promise refused because it does not fit. It
// wraps ErrOverCommitted.
type OverCommitError struct {
	VM   string
	Over []Overrun
}

func (e *OverCommitError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "reserve: cannot promise capacity for %s: ", e.VM)
	for i, o := range e.Over {
		if i > 0 {
			b.WriteString("; ")
		}
		f := formatBytes
		if o.Dimension == "vcpus" {
			f = func(n int64) string { return fmt.Sprint(n) }
		}
		fmt.Fprintf(&b, "%s over capacity: %s promised to other guests, %s asked, %s available on this host",
			o.Dimension, f(o.Promised), f(o.Asked), f(o.Limit))
	}
	b.WriteString("; use --force to promise anyway")
	return b.String()
}

func (e *OverCommitError) Unwrap() error { return ErrOverCommitted }

func formatBytes(n int64) string {
	const gib = 1 << 30
	if n%gib == 0 {
		return fmt.Sprintf("%d GiB", n/gib)
	}
	return fmt.Sprintf("%.2f GiB", float64(n)/gib)
}

// bookFile is the persisted form of a Book.
type bookFile struct {
	Version  int                `json:"version"`
	Promises map[string]Promise `json:"promises"`
}

const bookVersion = 1

// Book is what this host has promised to the guests it is partner for. It
// persists every change before reporting it, so promises survive a restart
// of axd. Its methods are safe for concurrent use.
type Book struct {
	path   string
	host   Capacity
	limits Capacity
	now    func() time.Time

	mu       sync.Mutex
	promises map[string]Promise
	reserved Capacity
}

// OpenBook opens the book persisted at path for a host of capacity host; a
// missing file is an empty book. Promises that no longer fit, because the
// host shrank or the ratios changed, are kept: Free then goes negative.
func OpenBook(path string, host Capacity, opts *Options) (*Book, error) {
	if host.negative() {
		return nil, fmt.Errorf("reserve: open book %s: negative host capacity %+v", path, host)
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	ratios := []*float64{&o.VCPURatio, &o.MemoryRatio, &o.DiskRatio}
	for i, def := range []float64{DefaultVCPURatio, DefaultMemoryRatio, DefaultDiskRatio} {
		r := ratios[i]
		if *r == 0 {
			*r = def
		}
		if *r < 0 || math.IsNaN(*r) || math.IsInf(*r, 0) {
			return nil, fmt.Errorf("reserve: open book %s: overcommit ratio %v, want a positive number", path, *r)
		}
	}
	b := &Book{
		path: path,
		host: host,
		limits: Capacity{
			VCPUs:       int(math.Floor(float64(host.VCPUs) * o.VCPURatio)),
			MemoryBytes: scale(host.MemoryBytes, o.MemoryRatio),
			DiskBytes:   scale(host.DiskBytes, o.DiskRatio),
		},
		now:      time.Now,
		promises: map[string]Promise{},
	}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return b, nil
	case err != nil:
		return nil, fmt.Errorf("reserve: open book: %w", err)
	}
	var f bookFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, corrupt(path, err.Error())
	}
	if f.Version != bookVersion {
		return nil, corrupt(path, fmt.Sprintf("version %d, this axd reads version %d", f.Version, bookVersion))
	}
	for vm, p := range f.Promises {
		if vm == "" || p.Need.negative() {
			return nil, corrupt(path, fmt.Sprintf("promise %q of %+v", vm, p.Need))
		}
		b.promises[vm] = p
		b.reserved = b.reserved.Add(p.Need)
	}
	return b, nil
}

func corrupt(path, why string) error {
	return fmt.Errorf("reserve: open book %s: corrupt: %s; restore it, or remove it and promise every protected guest again", path, why)
}

// scale returns n times ratio, exactly when ratio is 1 (float64 would round
// counts of bytes beyond 2^53).
func scale(n int64, ratio float64) int64 {
	if ratio == 1 {
		return n
	}
	f := math.Floor(float64(n) * ratio)
	if f >= math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(f)
}

// Promise holds need for vm. A promise replacing an earlier one for vm counts
// only what it adds, dimension by dimension, so shrinking a promise always
// works. When the host cannot hold it, Promise returns an *OverCommitError,
// unless force is set: then the promise is kept, marked Forced.
func (b *Book) Promise(vm string, need Capacity, force bool) error {
	if vm == "" {
		return errors.New("reserve: promise: no guest name")
	}
	if need.negative() {
		return fmt.Errorf("reserve: promise for %s: negative need %+v", vm, need)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	old := b.promises[vm]
	others := b.reserved.Sub(old.Need)
	var over []Overrun
	stillOver := false
	check := func(dim string, others, need, old, limit int64) {
		if others+need <= limit {
			return
		}
		// A promise that does not grow in this dimension makes nothing
		// worse, even on a book already over by force.
		if need <= old {
			stillOver = true
			return
		}
		over = append(over, Overrun{Dimension: dim, Promised: others, Asked: need, Limit: limit})
	}
	check("vcpus", int64(others.VCPUs), int64(need.VCPUs), int64(old.Need.VCPUs), int64(b.limits.VCPUs))
	check("memory", others.MemoryBytes, need.MemoryBytes, old.Need.MemoryBytes, b.limits.MemoryBytes)
	check("disk", others.DiskBytes, need.DiskBytes, old.Need.DiskBytes, b.limits.DiskBytes)
	if len(over) > 0 && !force {
		return &OverCommitError{VM: vm, Over: over}
	}
	next := maps.Clone(b.promises)
	forced := len(over) > 0 || old.Forced && stillOver
	next[vm] = Promise{Need: need, Forced: forced, Since: b.now().UTC().Round(0)}
	if err := b.save(next); err != nil {
		return fmt.Errorf("reserve: promise for %s: %w", vm, err)
	}
	b.promises = next
	b.reserved = others.Add(need)
	return nil
}

// Release drops the promise for vm. Releasing a guest without a promise does
// nothing, so cleanup may run twice.
func (b *Book) Release(vm string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.promises[vm]
	if !ok {
		return nil
	}
	next := maps.Clone(b.promises)
	delete(next, vm)
	if err := b.save(next); err != nil {
		return fmt.Errorf("reserve: release %s: %w", vm, err)
	}
	b.promises = next
	b.reserved = b.reserved.Sub(p.Need)
	return nil
}

// save writes promises to a temporary file, syncs it and renames it over the
// book, so a crash leaves the old book or the new one, never half of either.
func (b *Book) save(promises map[string]Promise) error {
	data, err := json.MarshalIndent(bookFile{Version: bookVersion, Promises: promises}, "", "\t")
	if err != nil {
		return err
	}
	dir := filepath.Dir(b.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return durable.ReplaceFile(b.path, append(data, '\n'), 0o600)
}

// Promises returns a copy of the promises, by guest.
func (b *Book) Promises() map[string]Promise {
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.promises)
}

// Reserved returns the sum of all promises.
func (b *Book) Reserved() Capacity {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.reserved
}

// Host returns the host's capacity as measured.
func (b *Book) Host() Capacity { return b.host }

// Limits returns what the host may promise in all: its capacity times the
// overcommit ratios.
func (b *Book) Limits() Capacity { return b.limits }

// Free returns what may still be promised without force. A dimension is
// negative when forced promises exceed the limit.
func (b *Book) Free() Capacity {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limits.Sub(b.reserved)
}
