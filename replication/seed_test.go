package replication

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/axproject/ax/ax/dirty"
)

// The old primary's RAM seeds the replica it gets once its partner runs
// the VM: the base the next sync starts on is that RAM, never a replica to
// promote; a replica already there is kept; a file of the wrong size is
// refused.
func TestSeedReplica(t *testing.T) {
	const ramSize = 4 * PageSize
	dir := filepath.Join(t.TempDir(), "vm1")
	ram := make([]byte, ramSize)
	for i := range ram {
		ram[i] = byte(i / PageSize * 7)
	}
	from := filepath.Join(t.TempDir(), "old-ram")
	if err := os.WriteFile(from, ram, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := SeedReplica(dir, ramSize+PageSize, from); err == nil {
		t.Fatal("a RAM file of another size seeded the replica")
	}
	seeded, err := SeedReplica(dir, ramSize, from)
	if err != nil || !seeded {
		t.Fatalf("seed: %v %v", seeded, err)
	}
	rep, err := OpenReplica(dir, ramSize)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	if rep.Usable() {
		t.Fatal("a seeded replica is usable for a promotion")
	}
	base, err := rep.PageHashes()
	if err != nil {
		t.Fatal(err)
	}
	for p := range 4 {
		if base[p] != dirty.PageHash(ram[p*PageSize:(p+1)*PageSize]) {
			t.Fatalf("page %d of the base is not the seed's", p)
		}
	}
	// A replica is there now: a second seed leaves it.
	if err := os.WriteFile(from, make([]byte, ramSize), 0o600); err != nil {
		t.Fatal(err)
	}
	if seeded, err := SeedReplica(dir, ramSize, from); err != nil || seeded {
		t.Fatalf("seed over a replica: %v %v", seeded, err)
	}
	got, _ := os.ReadFile(rep.RAMPath())
	if !bytes.Equal(got, ram) {
		t.Fatal("the second seed changed the replica's RAM")
	}
	// A sync that is not on the base starts from zeros.
	if err := rep.BeginSync(); err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(rep.RAMPath())
	if !bytes.Equal(got, make([]byte, ramSize)) {
		t.Fatal("a sync from zeros kept the seed")
	}
}
