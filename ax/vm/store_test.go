package vm

import (
	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/durable"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func testStore(t *testing.T, s Store) {
	t.Helper()
	a := Record{Version: RecordVersion, VM: "vm-a", State: Protected.String(), Role: api.RolePrimary, Level: "ft", Peer: "b", NextEpoch: 9, Updated: time.Unix(100, 0).UTC(),
		Spec: &api.VMSpec{Name: "vm-a", Bridge: "br0", Guest: api.Guest{RAMMiB: 256, Disks: []api.Disk{{Node: "disk0", Path: "/d", Format: "raw"}}}}}
	b := Record{Version: RecordVersion, VM: "vm-b", State: Ready.String(), Role: api.RoleSecondary, Level: "ha", Peer: "a", Updated: time.Unix(200, 0).UTC()}
	for _, r := range []Record{b, a} {
		if err := s.Save(r); err != nil {
			t.Fatal(err)
		}
	}
	a.State, a.NextEpoch = Fenced.String(), 12
	if err := s.Save(a); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !reflect.DeepEqual(got[0], a) || !reflect.DeepEqual(got[1], b) {
		t.Fatalf("loaded %+v, want %+v and %+v", got, a, b)
	}
	if err := s.Delete("vm-b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("vm-b"); err != nil {
		t.Fatalf("deleting twice: %v", err)
	}
	if got, _ := s.Load(); len(got) != 1 || got[0].VM != "vm-a" {
		t.Fatalf("after delete: %+v", got)
	}
	for _, bad := range []string{"", "../x", "a/b", ".hidden", strings.Repeat("v", 129)} {
		if err := s.Save(Record{VM: bad}); err == nil {
			t.Errorf("saved a record for VM %q", bad)
		}
	}
}

func TestMemoryStore(t *testing.T) { testStore(t, &MemoryStore{}) }

func TestFileStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vms")
	s, err := NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	testStore(t, s)
	// A new store on the same directory (axd restarted) reads the same.
	s2, err := NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s2.Load()
	if err != nil || len(got) != 1 || got[0].State != "fenced" || got[0].NextEpoch != 12 {
		t.Fatalf("reopened: %+v %v", got, err)
	}
	// The longest VM name fits.
	long := strings.Repeat("v", 128)
	if err := s.Save(Record{VM: long}); err != nil {
		t.Fatal(err)
	}
	// Leftovers of an interrupted save are not records.
	os.WriteFile(filepath.Join(dir, "vm-a.json"+durable.TempSuffix+"123"), []byte("{"), 0o600)
	if got, err := s.Load(); err != nil || len(got) != 2 {
		t.Fatalf("with a temporary left over: %+v %v", got, err)
	}
}

func TestFileStoreRefusesBadRecords(t *testing.T) {
	for name, c := range map[string]struct{ file, body, want string }{
		"torn":          {"vm1.json", `{"vm":"vm1","sta`, "move it away"},
		"renamed":       {"vm2.json", `{"vm":"vm1"}`, `holds VM "vm1"`},
		"unsafe inside": {"x.json", `{"vm":"../x"}`, `holds VM "../x"`},
		"newer":         {"vm3.json", `{"version":2,"vm":"vm3"}`, "is of format 2; this axd reads format 1"},
		"unversioned":   {"vm4.json", `{"vm":"vm4"}`, "is of format 0"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := NewFileStore(dir)
			os.WriteFile(filepath.Join(dir, c.file), []byte(c.body), 0o600)
			if _, err := s.Load(); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("load: %v, want an error with %q", err, c.want)
			}
		})
	}
}
