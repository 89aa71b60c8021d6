package witness

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/axproject/ax/ax/durable"
)

// The state file keeps what a restarted witness must not forget: who holds
// each VM's lease, and the bound on request timestamps it may have accepted
// (see Server). It is JSON, replaced whole by rename after an fdatasync:
//
//	{"version":1,"state":{"accepted_up_to":…,"leases":[{"vm":…,"holder":…,"expires_at":…}]},"sha256":"…"}
//
// "sha256" covers the bytes of "state" as they stand in the file, so a file
// damaged in place is refused rather than read as some other state.

// stateVersion is the format this witness writes and the newest it reads.
const stateVersion = 1

var (
	// ErrStateVersion reports a state file written by a newer witness.
	ErrStateVersion = errors.New("witness: state file from a newer version")
	// ErrStateCorrupt reports a state file that cannot be read back.
	ErrStateCorrupt = errors.New("witness: state file corrupt")
)

type stateEnvelope struct {
	Version  int             `json:"version"`
	State    json.RawMessage `json:"state"`
	Checksum string          `json:"sha256"`
}

type savedState struct {
	// AcceptedUpTo (Unix ms, senders' clocks): no request with a later
	// timestamp has been accepted.
	AcceptedUpTo int64        `json:"accepted_up_to"`
	Leases       []savedLease `json:"leases"`
}

type savedLease struct {
	VM        string `json:"vm"`
	Holder    string `json:"holder"`
	ExpiresAt int64  `json:"expires_at"` // Unix ms, the witness's clock
}

// encodeState returns the file's bytes; leases are sorted by VM so that the
// same state always writes the same file.
func encodeState(st savedState) ([]byte, error) {
	st.Leases = slices.Clone(st.Leases)
	slices.SortFunc(st.Leases, func(a, b savedLease) int { return strings.Compare(a.VM, b.VM) })
	if st.Leases == nil {
		st.Leases = []savedLease{}
	}
	body, err := json.Marshal(st)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	out, err := json.Marshal(stateEnvelope{Version: stateVersion, State: body, Checksum: hex.EncodeToString(sum[:])})
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

// decodeState reads a state file's bytes; errors wrap ErrStateVersion or
// ErrStateCorrupt.
func decodeState(data []byte) (savedState, error) {
	// The version first, read leniently: a newer format may have any shape.
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return savedState{}, fmt.Errorf("%w: %v (a torn or damaged file)", ErrStateCorrupt, err)
	}
	if v.Version > stateVersion {
		return savedState{}, fmt.Errorf("%w: format version %d, this witness reads up to %d", ErrStateVersion, v.Version, stateVersion)
	}
	if v.Version < 1 {
		return savedState{}, fmt.Errorf("%w: format version %d", ErrStateCorrupt, v.Version)
	}
	var env stateEnvelope
	if err := decodeStrict(bytes.TrimSuffix(data, []byte("\n")), &env); err != nil {
		return savedState{}, fmt.Errorf("%w: %v", ErrStateCorrupt, err)
	}
	var want [sha256.Size]byte
	if err := decodeHex(want[:], env.Checksum); err != nil {
		return savedState{}, fmt.Errorf("%w: checksum: %v", ErrStateCorrupt, err)
	}
	if sha256.Sum256(env.State) != want {
		return savedState{}, fmt.Errorf("%w: checksum does not match the contents", ErrStateCorrupt)
	}
	var st savedState
	if err := decodeStrict(env.State, &st); err != nil {
		return savedState{}, fmt.Errorf("%w: %v", ErrStateCorrupt, err)
	}
	if st.AcceptedUpTo <= 0 {
		return savedState{}, fmt.Errorf("%w: accepted_up_to %d", ErrStateCorrupt, st.AcceptedUpTo)
	}
	if len(st.Leases) > maxLeases {
		return savedState{}, fmt.Errorf("%w: %d leases, at most %d", ErrStateCorrupt, len(st.Leases), maxLeases)
	}
	seen := make(map[string]bool, len(st.Leases))
	for _, l := range st.Leases {
		if err := checkName("vm", l.VM); err != nil {
			return savedState{}, fmt.Errorf("%w: %v", ErrStateCorrupt, err)
		}
		if err := checkName("holder", l.Holder); err != nil {
			return savedState{}, fmt.Errorf("%w: vm %q: %v", ErrStateCorrupt, l.VM, err)
		}
		if l.ExpiresAt <= 0 {
			return savedState{}, fmt.Errorf("%w: vm %q: expires_at %d", ErrStateCorrupt, l.VM, l.ExpiresAt)
		}
		if seen[l.VM] {
			return savedState{}, fmt.Errorf("%w: vm %q listed twice", ErrStateCorrupt, l.VM)
		}
		seen[l.VM] = true
	}
	return st, nil
}

// loadState reads path; found is false when there is no file yet.
func loadState(path string) (st savedState, found bool, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return savedState{}, false, nil
	}
	if err != nil {
		return savedState{}, false, fmt.Errorf("witness: read state file: %w", err)
	}
	st, err = decodeState(data)
	switch {
	case errors.Is(err, ErrStateVersion):
		return savedState{}, false, fmt.Errorf("witness: state file %s: %w: it was written by a newer axd; run that version, or move the file aside to start without the leases it holds", path, err)
	case err != nil:
		return savedState{}, false, fmt.Errorf("witness: state file %s: %w: restore it from a backup, or move it aside to start without the leases it holds (the witness then refuses takeovers for one lease TTL)", path, err)
	}
	return st, true, nil
}

// saveState replaces path with st durably: a temporary file beside it,
// fdatasync, rename, then the directory synced, so a crash leaves the old
// file or the new one, never a mix.
func saveState(path string, st savedState) error {
	data, err := encodeState(st)
	if err != nil {
		return fmt.Errorf("witness: encode state: %w", err)
	}
	if err := durable.ReplaceFile(path, data, 0o600); err != nil {
		return fmt.Errorf("witness: save state: %w", err)
	}
	return nil
}

// tempSuffix marks saveState's temporary files; removeTemps clears those a
// crash left behind.
const tempSuffix = durable.TempSuffix

func removeTemps(path string) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), base+tempSuffix) && e.Type().IsRegular() {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}
