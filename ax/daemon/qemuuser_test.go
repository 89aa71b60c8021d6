package daemon

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/axproject/ax/test/testenv"
)

// A QEMU that runs as another user (libvirt's libvirt-qemu) is given the
// directory it writes in; one that runs as axd's user, or an unknown pid,
// changes nothing.
func TestGiveToQEMU(t *testing.T) {
	uid, gid, err := processOwner(os.Getpid())
	if err != nil || uid != os.Geteuid() || gid != os.Getegid() {
		t.Fatalf("own process: %d:%d %v, want %d:%d", uid, gid, err, os.Geteuid(), os.Getegid())
	}
	if _, _, err := processOwner(1 << 30); err == nil {
		t.Error("no error for a process that does not exist")
	}
	dir := t.TempDir()
	if err := giveToQEMU(dir, dir, 1<<30); err != nil {
		t.Errorf("a QEMU that is gone: %v", err)
	}
	if err := giveToQEMU(dir, dir, 0); err != nil {
		t.Fatal(err)
	}
	if err := giveToQEMU(dir, dir, os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if owner(t, dir) != [2]int{os.Geteuid(), os.Getegid()} {
		t.Fatalf("%s changed owner for a QEMU of axd's own user", dir)
	}

	testenv.RequireRoot(t)
	const nobody = 65534
	qemu := exec.Command("sleep", "30")
	qemu.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	// Above axd's state directory, others may search (as in /var/lib);
	// the state directory itself is root's alone (systemd's
	// StateDirectoryMode).
	for _, p := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	root := filepath.Join(dir, "state")
	vmDir := filepath.Join(root, "vms", "vm1")
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := giveToQEMU(root, filepath.Join(dir, "elsewhere"), qemu.Process.Pid); err == nil {
		t.Error("a directory outside the state directory was given to QEMU")
	}
	if err := giveToQEMU(root, vmDir, qemu.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if got := owner(t, vmDir); got != [2]int{nobody, nobody} {
		t.Errorf("%s belongs to %v, want QEMU's %d:%d", vmDir, got, nobody, nobody)
	}
	for _, p := range []string{root, filepath.Join(root, "vms")} {
		if st, _ := os.Stat(p); st.Mode().Perm() != 0o701 {
			t.Errorf("%s has mode %v, want 0701: QEMU reaches its directory, lists nothing", p, st.Mode().Perm())
		}
	}
	// QEMU's user can create its files there, as QEMU does.
	touch := exec.Command("touch", filepath.Join(vmDir, "devstate.1"))
	touch.SysProcAttr = qemu.SysProcAttr
	if out, err := touch.CombinedOutput(); err != nil {
		t.Errorf("QEMU's user cannot create a file in %s: %v %s", vmDir, err, out)
	}
	sock := filepath.Join(root, "nbd.sock")
	if err := os.WriteFile(sock, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := openNBDTo(root, sock, os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(sock); st.Mode().Perm() != 0o755 {
		t.Errorf("NBD socket opened for a QEMU of axd's own user: %v", st.Mode().Perm())
	}
	if err := openNBDTo(root, sock, qemu.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(sock); st.Mode().Perm() != 0o666 {
		t.Errorf("NBD socket has mode %v for a QEMU of another user, want 0666 (the server admits it to its exports only)", st.Mode().Perm())
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o755 {
		t.Errorf("%s above the state directory changed: %v", dir, st.Mode().Perm())
	}
}

func owner(t *testing.T, path string) [2]int {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	s := st.Sys().(*syscall.Stat_t)
	return [2]int{int(s.Uid), int(s.Gid)}
}
