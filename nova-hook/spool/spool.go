// Package spool keeps the libvirt hook events axd could not take, one
// file each in a directory, for axd to replay: written atomically, bounded
// in count and bytes, the oldest dropped first.
package spool

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
)

// Bounds of a spool: a host whose axd stays down keeps the newest events.
const (
	MaxEvents = 256
	MaxBytes  = 64 << 20
)

// tmpPrefix marks a file being written; replay leaves it unless it is
// older than staleTmp (a hook killed while writing).
const (
	tmpPrefix = ".tmp-"
	staleTmp  = time.Minute
)

// Put writes ev into dir (created 0700) and drops the oldest events beyond
// the bounds; it returns the names of those it dropped.
func Put(dir string, ev api.HookEvent) (dropped []string, err error) {
	data, err := json.Marshal(ev)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if len(data) > api.MaxHookEvent {
		return nil, fmt.Errorf("spool: event of %d bytes is over %d", len(data), api.MaxHookEvent)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	f, err := os.CreateTemp(dir, tmpPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	defer os.Remove(f.Name()) // after the rename, a no-op
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	// Names sort in the order the events happened (then by writer).
	name := fmt.Sprintf("%020d-%07d.json", ev.Time.UnixNano(), os.Getpid())
	if err := os.Rename(f.Name(), filepath.Join(dir, name)); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return trim(dir, name)
}

type entry struct {
	name string
	size int64
}

// list returns dir's events, oldest first.
func list(dir string) ([]entry, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []entry
	for _, de := range des {
		if strings.HasPrefix(de.Name(), ".") || !de.Type().IsRegular() || !strings.HasSuffix(de.Name(), ".json") {
			continue
		}
		info, err := de.Info()
		if err != nil {
			continue // taken meanwhile
		}
		out = append(out, entry{de.Name(), info.Size()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

// trim drops the oldest events beyond the bounds, never keep.
func trim(dir, keep string) ([]string, error) {
	es, err := list(dir)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	var total int64
	for _, e := range es {
		total += e.size
	}
	var dropped []string
	for len(es) > 0 && (len(es) > MaxEvents || total > MaxBytes) && es[0].name != keep {
		if err := os.Remove(filepath.Join(dir, es[0].name)); err == nil {
			dropped = append(dropped, es[0].name)
		}
		total -= es[0].size
		es = es[1:]
	}
	return dropped, nil
}

// Replay hands dir's events to take, oldest first, removing each once
// taken (whether take accepted it or not: an event take refuses now it
// would refuse again). It returns how many it handed over and what went
// wrong with the others or with take. A missing dir holds no events.
func Replay(dir string, take func(api.HookEvent) error) (int, []error) {
	es, err := list(dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, []error{fmt.Errorf("spool: %w", err)}
	}
	var errs []error
	n := 0
	for _, e := range es {
		path := filepath.Join(dir, e.name)
		ev, err := read(path)
		os.Remove(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("spool: %s: %w", e.name, err))
			continue
		}
		n++
		if err := take(ev); err != nil {
			errs = append(errs, fmt.Errorf("spool: %s: %w", e.name, err))
		}
	}
	removeStale(dir)
	return n, errs
}

// read reads one spooled event, bounded, not through a symlink.
func read(path string) (api.HookEvent, error) {
	var ev api.HookEvent
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return ev, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, api.MaxHookEvent+1))
	if err != nil {
		return ev, err
	}
	if len(data) > api.MaxHookEvent {
		return ev, fmt.Errorf("over %d bytes", api.MaxHookEvent)
	}
	if err := json.Unmarshal(data, &ev); err != nil {
		return ev, fmt.Errorf("unreadable: %w", err)
	}
	return ev, nil
}

// removeStale removes what hooks killed while writing left behind.
func removeStale(dir string) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, de := range des {
		if !strings.HasPrefix(de.Name(), tmpPrefix) {
			continue
		}
		if info, err := de.Info(); err == nil && time.Since(info.ModTime()) > staleTmp {
			os.Remove(filepath.Join(dir, de.Name()))
		}
	}
}
