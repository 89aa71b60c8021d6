package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/durable"
	"github.com/axproject/ax/ax/names"
)

// RecordVersion is the format of the records this axd writes. It refuses
// records of a later format rather than guess what they mean.
const RecordVersion = 1

// Record is what axd keeps of one VM across its own restarts: enough to
// know, after a crash, what the VM was doing here and which epochs it must
// never reuse.
type Record struct {
	Version int    `json:"version"`
	VM      string `json:"vm"`
	State   string `json:"state"` // State.String(), for people reading the file
	Role    string `json:"role"`
	Level   string `json:"level"`
	Peer    string `json:"peer,omitempty"`
	// NextEpoch is the first epoch a new stream of this VM may use.
	NextEpoch uint64 `json:"next_epoch,omitempty"`
	Alarm     string `json:"alarm,omitempty"`
	// Declared is the level the operator declared for the VM, towards
	// DeclaredPeer: it outlives failovers, and axd protects the VM again by
	// itself while it runs here below it. UnprotectedSince is when a VM so
	// declared last stopped being protected (zero while it is).
	Declared         string    `json:"declared,omitempty"`
	DeclaredPeer     string    `json:"declared_peer,omitempty"`
	UnprotectedSince time.Time `json:"unprotected_since,omitzero"`
	// LeftGuard is the guard process a stopping axd left holding the
	// guest across its restart (guard.Leave), for the next axd to dismiss
	// once its own guard holds the guest.
	LeftGuard int       `json:"left_guard,omitempty"`
	Updated   time.Time `json:"updated"`
	// Spec is the VM as it was defined here (as adopted from the partner,
	// for a replica).
	Spec *api.VMSpec `json:"spec,omitempty"`
}

// Store keeps the records of this host's VMs. axd writes one at each
// transition that changes a VM's state, and deletes it when the VM is gone.
type Store interface {
	Save(Record) error
	Delete(vm string) error
	// Load returns every record, ordered by VM name.
	Load() ([]Record, error)
}

// MemoryStore is a Store that keeps nothing across restarts (tests, and
// axd without a state directory).
type MemoryStore struct {
	mu   sync.Mutex
	recs map[string]Record
}

func (m *MemoryStore) Save(r Record) error {
	if err := names.Check("VM", r.VM); err != nil {
		return err
	}
	if r.Version == 0 {
		r.Version = RecordVersion
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.recs == nil {
		m.recs = map[string]Record{}
	}
	m.recs[r.VM] = r
	return nil
}

func (m *MemoryStore) Delete(vm string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.recs, vm)
	return nil
}

func (m *MemoryStore) Load() ([]Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Record, 0, len(m.recs))
	for _, r := range m.recs {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out, nil
}

// FileStore keeps one JSON file per VM in a directory. A record replaces
// the old one durably (durable.ReplaceFile), so a crash leaves either the
// old record or the new, never a torn one.
type FileStore struct {
	dir string
	mu  sync.Mutex // one writer at a time per store
}

// NewFileStore returns a store in dir, creating it (mode 0700: records name
// the host's VMs and partners).
func NewFileStore(dir string) (*FileStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state store: %w", err)
	}
	return &FileStore{dir: dir}, nil
}

func (f *FileStore) path(vm string) (string, error) {
	p, err := names.Join(f.dir, "VM", vm)
	return p + ".json", err
}

func (f *FileStore) Save(r Record) error {
	if r.Version == 0 {
		r.Version = RecordVersion
	}
	if err := names.Check("VM", r.VM); err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	path, err := f.path(r.VM)
	if err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := durable.ReplaceFile(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("state store: saving %s: %w", r.VM, err)
	}
	return nil
}

func (f *FileStore) Delete(vm string) error {
	path, err := f.path(vm)
	if err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state store: %w", err)
	}
	return durable.SyncDir(f.dir)
}

// Load reads every record. A file that does not parse, or whose VM name
// does not match its file name, is an error naming the file: axd must not
// guess what a VM was doing.
func (f *FileStore) Load() ([]Record, error) {
	ents, err := os.ReadDir(f.dir)
	if err != nil {
		return nil, fmt.Errorf("state store: %w", err)
	}
	var out []Record
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
			continue // temporaries of an interrupted save, and anything not ours
		}
		path := filepath.Join(f.dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("state store: %w", err)
		}
		var r Record
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("state store: %s: %w (move it away to start without it)", path, err)
		}
		if r.VM+".json" != name {
			return nil, fmt.Errorf("state store: %s holds VM %q, not %q", path, r.VM, strings.TrimSuffix(name, ".json"))
		}
		if err := names.Check("VM", r.VM); err != nil {
			return nil, fmt.Errorf("state store: %s: %w", path, err)
		}
		if r.Version > RecordVersion || r.Version < 1 {
			return nil, fmt.Errorf("state store: %s is of format %d; this axd reads format %d (written by another axd version: upgrade axd, or move the file away to start without it)", path, r.Version, RecordVersion)
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out, nil
}
