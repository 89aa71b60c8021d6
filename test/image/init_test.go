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

// TestLabInitModuleParams runs LabInit's module loading, insmod replaced
// by echo: each module gets the NAME.PARAM=VALUE parameters of the command
// line, as modprobe gives them, and no other module's.
func TestLabInitModuleParams(t *testing.T) {
	bb := busyboxSh(t)
	start := strings.Index(LabInit, "for m in $(cat /etc/ax/modules)")
	end := strings.Index(LabInit, "IP=; DIRTY=0")
	if start < 0 || end < start {
		t.Fatal("LabInit loads no modules before it reads its parameters")
	}
	dir := t.TempDir()
	modules, cmdline := filepath.Join(dir, "modules"), filepath.Join(dir, "cmdline")
	os.WriteFile(modules, []byte("virtio_ring.ko\nvirtio_net.ko\nvirtio_blk.ko.xz\n"), 0o644)
	os.WriteFile(cmdline, []byte("console=ttyS0 virtio_net.csum=0 ax.ip=10.77.0.10/24 virtio_net.gso=0 virtio_blk.queue_depth=8 virtio_netx.bad=1\n"), 0o644)
	fragment := strings.NewReplacer("/etc/ax/modules", modules, "/proc/cmdline", cmdline, "insmod ", "echo insmod ").Replace(LabInit[start:end])
	out, err := exec.Command(bb, "sh", "-c", fragment).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	want := "insmod /lib/modules/virtio_ring.ko\ninsmod /lib/modules/virtio_net.ko csum=0 gso=0\ninsmod /lib/modules/virtio_blk.ko.xz queue_depth=8"
	if got := strings.TrimSpace(string(out)); got != want {
		t.Errorf("module loading:\n%s\nwant:\n%s", got, want)
	}
}
