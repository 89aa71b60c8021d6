package netbuffer_test

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/test/testenv"
)

// pinDir mounts a bpffs of the test's own on a temporary directory and
// returns a pin directory in it, not made yet (Attach makes it). The
// bpffs goes at the end of the test, with whatever is pinned in it.
func pinDir(t testing.TB) string {
	t.Helper()
	testenv.RequireRoot(t)
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount a bpffs on %s: %v", mnt, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount the test's bpffs: %v", err)
		}
	})
	return filepath.Join(mnt, "ax", "host", "vm")
}

// TestIntegrationEnsureBPFFS: a directory on a bpffs is fine, one elsewhere
// is refused, and with nothing on /sys/fs/bpf (in a mount namespace of the
// test's own) EnsureBPFFS mounts a bpffs there, once.
func TestIntegrationEnsureBPFFS(t *testing.T) {
	dir := pinDir(t)
	must(t, netbuffer.EnsureBPFFS(dir))
	if err := netbuffer.EnsureBPFFS(t.TempDir()); err == nil || !strings.Contains(err.Error(), "not on a bpffs") {
		t.Errorf("a plain directory: %v, want an error saying it is not on a bpffs", err)
	}

	errc := make(chan error, 1)
	go func() {
		// The thread changes mount namespace, so it stays locked and ends
		// with the goroutine.
		runtime.LockOSThread()
		errc <- ensureInPrivateMountNS()
	}()
	must(t, <-errc)
}

func ensureInPrivateMountNS() error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil {
		return err
	}
	if st.Type == unix.BPF_FS_MAGIC { // the host has one: not in this namespace
		if err := unix.Unmount("/sys/fs/bpf", unix.MNT_DETACH); err != nil {
			return err
		}
	}
	for range 2 {
		if err := netbuffer.EnsureBPFFS("/sys/fs/bpf/ax/host/vm"); err != nil {
			return err
		}
	}
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil {
		return err
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return errors.New("EnsureBPFFS mounted no bpffs on /sys/fs/bpf")
	}
	mounts, err := os.ReadFile("/proc/thread-self/mountinfo")
	if err != nil {
		return err
	}
	if n := strings.Count(string(mounts), " /sys/fs/bpf "); n != 1 {
		return errors.New("EnsureBPFFS twice: not one mount on /sys/fs/bpf")
	}
	return nil
}
