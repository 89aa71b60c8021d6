//go:build !lab

package main

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"
)

// The axctl a host installs (built without the lab tag) links no test code
// and says how to get the lab.
func TestShippedAxctlLinksNoTestCode(t *testing.T) {
	err := run(context.Background(), []string{"lab", "up"}, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "-tags lab") {
		t.Errorf("lab in the shipped axctl: %v", err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool on PATH to list axctl's packages")
	}
	out, err := exec.Command(goBin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/axproject/ax/test/") {
			t.Errorf("axctl links %s", pkg)
		}
	}
	// The check can fail: the lab build does link the lab.
	out, err = exec.Command(goBin, "list", "-tags", "lab", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "github.com/axproject/ax/test/lab") {
		t.Error("the lab build of axctl does not link test/lab")
	}
}
