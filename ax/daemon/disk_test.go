package daemon

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/axproject/ax/replication"
)

func readDisk(t *testing.T, r *replicaDisks, i int, off, n int64) []byte {
	t.Helper()
	b, err := os.ReadFile(replicaDiskPath(r.dir, i))
	if err != nil {
		t.Fatal(err)
	}
	return b[off : off+n]
}

// The secondary's disks: applied at once before FT and at HA, journaled at
// FT until the epoch commits; leaving FT applies the journal; a resume drops
// uncommitted epochs and a fresh boot keeps every write.
func TestReplicaDisksLevels(t *testing.T) {
	for _, resume := range []bool{true, false} {
		r, err := openReplicaDisks(t.TempDir(), []int64{1 << 16, 1 << 16})
		if err != nil {
			t.Fatal(err)
		}
		w := func(epoch uint64, disk uint32, off uint64, s string) {
			t.Helper()
			if err := r.Write(epoch, replication.DiskWrite{Disk: disk, Offset: off, Data: []byte(s)}); err != nil {
				t.Fatal(err)
			}
		}
		w(0, 0, 0, "sync") // during the initial sync: at once
		if got := readDisk(t, r, 0, 0, 4); string(got) != "sync" {
			t.Fatalf("initial-sync write not applied: %q", got)
		}
		r.SetLevel(replication.StreamLevelFT)
		w(5, 1, 100, "e5")
		w(6, 1, 200, "e6")
		if got := readDisk(t, r, 1, 100, 2); !bytes.Equal(got, []byte{0, 0}) {
			t.Fatalf("FT write applied before its commit: %q", got)
		}
		if err := r.Commit(5); err != nil {
			t.Fatal(err)
		}
		if got := readDisk(t, r, 1, 100, 2); string(got) != "e5" {
			t.Fatalf("epoch 5 not applied on commit: %q", got)
		}
		if d := r.depth(); d.Records != 1 {
			t.Fatalf("journal depth %+v, want the one write of epoch 6", d)
		}
		if err := r.prepare(resume); err != nil {
			t.Fatal(err)
		}
		want := []byte("e6")
		if resume {
			want = []byte{0, 0} // the guest resumes at epoch 5: epoch 6 never happened
		}
		if got := readDisk(t, r, 1, 200, 2); !bytes.Equal(got, want) {
			t.Fatalf("resume=%v: epoch 6 write reads %q, want %q", resume, got, want)
		}
		r.Close()
		r.Close()
		if err := r.Write(7, replication.DiskWrite{Data: []byte("x")}); err == nil {
			t.Fatal("write after close accepted")
		}
	}
}

func TestReplicaDisksLeavingFTAppliesJournal(t *testing.T) {
	r, err := openReplicaDisks(t.TempDir(), []int64{4096})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.SetLevel(replication.StreamLevelFT)
	r.Write(3, replication.DiskWrite{Offset: 10, Data: []byte("held")})
	if err := r.SetLevel(replication.StreamLevelHA); err != nil {
		t.Fatal(err)
	}
	if got := readDisk(t, r, 0, 10, 4); string(got) != "held" {
		t.Fatalf("leaving FT did not apply the journal: %q", got)
	}
	r.Write(0, replication.DiskWrite{Offset: 20, Data: []byte("now")})
	if got := readDisk(t, r, 0, 20, 3); string(got) != "now" {
		t.Fatalf("HA write not applied at once: %q", got)
	}
	for _, bad := range []replication.DiskWrite{
		{Disk: 1, Data: []byte("x")},
		{Offset: 4095, Data: []byte("xy")},
	} {
		if err := r.Write(0, bad); err == nil || !strings.Contains(err.Error(), "disk") {
			t.Errorf("write %d@%d accepted: %v", bad.Disk, bad.Offset, err)
		}
	}
}
