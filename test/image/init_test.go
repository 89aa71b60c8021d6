package image

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/axproject/ax/test/testenv"
)

func busyboxSh(t *testing.T) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		testenv.RequireCommand(t, "busybox", "apt-get install busybox-static")
	}
	return bb
}

func TestLabInitParses(t *testing.T) {
	out, err := exec.Command(busyboxSh(t), "sh", "-n", "-c", LabInit).CombinedOutput()
	if err != nil {
		t.Fatalf("LabInit does not parse: %v: %s", err, out)
	}
}

// TestLabInitDiskLedger runs the part of LabInit that picks the ledger's
// disk, with the ledger replaced by echo.
func TestLabInitDiskLedger(t *testing.T) {
	bb := busyboxSh(t)
	start := strings.Index(LabInit, `if [ -n "$DISK" ]`)
	end := strings.Index(LabInit, "/bin/ax-workload app")
	if start < 0 || end < start {
		t.Fatal("LabInit has no disk selection before the ledger start")
	}
	fragment := strings.ReplaceAll(LabInit[start:end], "/bin/ax-workload", "echo")
	fragment = strings.ReplaceAll(fragment, " >/dev/console 2>&1 &", "")
	run := func(disk string) string {
		t.Helper()
		out, err := exec.Command(bb, "sh", "-c", "DISK="+disk+"\n"+fragment).CombinedOutput()
		if err != nil {
			t.Fatalf("DISK=%s: %v: %s", disk, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := run(""); got != "ledger" {
		t.Errorf("without ax.disk: %q, want the memory ledger", got)
	}
	if dev := anyBlockDevice(); dev == "" {
		t.Log("no block device under /dev to try ax.disk with")
	} else if got := run(dev); got != "ledger --disk "+dev {
		t.Errorf("ax.disk=%s: %q, want the ledger on it", dev, got)
	}
	if testing.Short() {
		return // a missing disk is waited for 5 s
	}
	missing := filepath.Join(t.TempDir(), "vdz")
	if got := run(missing); got != "AXINIT disk "+missing+" missing, ledger in memory\nledger" {
		t.Errorf("ax.disk of a missing device: %q", got)
	}
}

func anyBlockDevice() string {
	names, _ := filepath.Glob("/sys/block/*")
	for _, n := range names {
		dev := "/dev/" + filepath.Base(n)
		if fi, err := os.Stat(dev); err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
			return dev
		}
	}
	return ""
}
