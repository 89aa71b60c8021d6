package ctl

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/test/testenv"
)

// unpin-gates on a bpffs of the test's own: the named VM's gate goes, the
// others stay; a gate a running axd holds (its directory flocked) is left.
func TestUnpinGates(t *testing.T) {
	testenv.RequireRoot(t)
	root := t.TempDir()
	if err := unix.Mount("bpf", root, "bpf", 0, ""); err != nil {
		t.Fatalf("mount a bpffs on %s: %v", root, err)
	}
	t.Cleanup(func() { unix.Unmount(root, unix.MNT_DETACH) })
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if err := os.MkdirAll(filepath.Join(root, "a", vm), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	run := func(args ...string) string {
		t.Helper()
		var out bytes.Buffer
		if err := UnpinGates(context.Background(), append([]string{"--bpf-dir", root}, args...), &out); err != nil {
			t.Fatalf("unpin-gates %v: %v\n%s", args, err, out.String())
		}
		return out.String()
	}
	out := run("vm1")
	if _, err := os.Stat(filepath.Join(root, "a", "vm1")); !os.IsNotExist(err) || !strings.Contains(out, "removed") {
		t.Fatalf("vm1's gate is still pinned (%v):\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(root, "a", "vm2")); err != nil {
		t.Fatalf("unpin-gates vm1 removed vm2's gate: %v", err)
	}
	// vm3's gate is held (as a running axd's Gate holds its directory).
	held, err := os.Open(filepath.Join(root, "a", "vm3"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := unix.Flock(int(held.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	out = run()
	if _, err := os.Stat(filepath.Join(root, "a", "vm3")); err != nil || !strings.Contains(out, "held by a running axd") {
		t.Fatalf("a held gate was not left (%v):\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(root, "a", "vm2")); !os.IsNotExist(err) {
		t.Fatalf("unpin-gates without names left vm2's gate: %v", err)
	}
	// Not a bpffs: refused, nothing removed.
	plain := t.TempDir()
	os.MkdirAll(filepath.Join(plain, "a", "vm1"), 0o700)
	var o bytes.Buffer
	if err := UnpinGates(context.Background(), []string{"--bpf-dir", plain}, &o); err == nil {
		t.Fatal("unpin-gates removed directories outside a bpffs")
	}
	if _, err := os.Stat(filepath.Join(plain, "a", "vm1")); err != nil {
		t.Fatalf("a directory outside a bpffs was removed: %v", err)
	}
}
