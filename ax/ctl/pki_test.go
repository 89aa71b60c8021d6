package ctl

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/identity"
)

// The README's identity commands, run as an operator would.
func TestPKICommands(t *testing.T) {
	dir := t.TempDir()
	var out bytes.Buffer
	run := func(args ...string) error { out.Reset(); return PKI(args, &out) }
	if err := run("init", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	if err := run("init", "--dir", dir); err == nil {
		t.Error("a second init overwrote the CA")
	}
	for _, h := range []string{"a", "b"} {
		if err := run("issue", "--dir", dir, "--name", h); err != nil {
			t.Fatal(err)
		}
	}
	if err := run("issue", "--dir", dir, "--name", "w", "--role", "witness", "--out", filepath.Join(dir, "w")); err != nil {
		t.Fatal(err)
	}
	id, err := identity.Load(identity.Files{CA: identity.CAPath(dir), Cert: identity.CertPath(dir, "a"), Key: identity.KeyPath(dir, "a")})
	if err != nil || id.Name() != "a" || id.Role() != identity.RoleHost {
		t.Fatalf("a: %v", err)
	}
	w, err := identity.Load(identity.Files{CA: identity.CAPath(dir), Cert: identity.CertPath(filepath.Join(dir, "w"), "w"), Key: identity.KeyPath(filepath.Join(dir, "w"), "w")})
	if err != nil || w.Role() != identity.RoleWitness {
		t.Fatalf("w: %v", err)
	}
	for _, bad := range [][]string{
		{"issue", "--dir", dir, "--name", "../x"},
		{"issue", "--dir", dir, "--name", "c", "--role", "admin"},
		{"issue", "--dir", dir},
		{"issue", "--dir", t.TempDir(), "--name", "c"}, // no CA there
		{"rotate"},
		{},
	} {
		if err := run(bad...); err == nil {
			t.Errorf("pki %v succeeded", bad)
		}
	}

	psk := filepath.Join(dir, "psk")
	if err := run("psk", psk); err != nil {
		t.Fatal(err)
	}
	if k, err := identity.ReadKeyFile(psk); err != nil || len(k) != 32 {
		t.Errorf("psk: %d bytes, %v", len(k), err)
	}
	before, _ := os.ReadFile(psk)
	if err := run("psk", psk); err == nil || !strings.Contains(err.Error(), "never overwritten") {
		t.Errorf("second psk: %v", err)
	}
	if after, _ := os.ReadFile(psk); !bytes.Equal(before, after) {
		t.Error("the key changed")
	}
	// As the README says on a fresh host: axctl pki psk /etc/ax/psk, with
	// no /etc/ax yet. The directory made is private.
	fresh := filepath.Join(dir, "etc", "ax", "psk")
	if err := run("psk", fresh); err != nil {
		t.Fatalf("psk into a new directory: %v", err)
	}
	if fi, err := os.Stat(filepath.Dir(fresh)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("made %s with %v (%v), want mode 0700", filepath.Dir(fresh), fi.Mode(), err)
	}
}
