package api

import (
	"encoding/json"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// TestSpecJSONUnchanged reads a spec as axd took it while VMSpec embedded
// qemu.Guest (testdata, written by that code) and writes it back: every key
// is where it was, with its value, except "incoming", which was QEMU's
// launch flag and no spec needs (readers take a missing one as false).
// Spec files, the lab and partners on either side of the change read each
// other's specs.
func TestSpecJSONUnchanged(t *testing.T) {
	old, err := os.ReadFile("testdata/spec-with-qemu-guest.json")
	if err != nil {
		t.Fatal(err)
	}
	var s VMSpec
	if err := json.Unmarshal(old, &s); err != nil {
		t.Fatal(err)
	}
	g := s.Guest
	if g.QMP != "/var/lib/ax-lab/ax/vm1-a/qmp.sock" || g.PIDFile != "/var/lib/ax-lab/ax/vm1-a/qemu.pid" || g.Accel != "kvm" ||
		g.Kernel != "/var/cache/ax/lab/vmlinuz" || !strings.HasPrefix(g.Append, "console=ttyS0") ||
		g.VsockCID != 1234 || len(g.Disks) != 2 || !g.Disks[1].Plain || g.Disks[1].Format != "qcow2" {
		t.Fatalf("read %+v", s)
	}
	again, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var want, got map[string]any
	if err := json.Unmarshal(old, &want); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(again, &got); err != nil {
		t.Fatal(err)
	}
	delete(want["guest"].(map[string]any), "incoming")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("written back as\n  %s\nwant the keys and values of\n  %s", again, old)
	}
}

// TestNoHypervisorImports: the API describes VMs to axd and its partners;
// it must not need a hypervisor's package to do so.
func TestNoHypervisorImports(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		parsed, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range parsed.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			for _, hv := range []string{"/ax/qemu", "/ax/hv", "go-qemu", "libvirt"} {
				if strings.Contains(path, hv) {
					t.Errorf("%s imports %s", f, path)
				}
			}
		}
	}
}
