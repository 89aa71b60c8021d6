package durable

import (
	"os"
	"path/filepath"
	"testing"
)

func TestSyncs(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("x")
	if err := Fdatasync(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := Fdatasync(f); err == nil {
		t.Fatal("fdatasync of a closed file succeeded")
	}
	if err := SyncDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("sync of a missing directory succeeded")
	}
}
