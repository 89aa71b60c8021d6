package openstack

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// libvirtdDirs are the paths a privileged libvirtd keeps its state under
// whatever its configuration says: in the mount namespace the private
// libvirtd runs in, a directory of the test is mounted over each.
var libvirtdDirs = []string{"/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"}

// startLibvirtd starts a libvirtd with no domain, as the compute host's
// (Nova's fake driver defines none), in a mount namespace of its own; it
// is stopped by its pid at the test's end. It returns the path of its
// read-write socket.
func startLibvirtd(t *testing.T, dir string) string {
	t.Helper()
	dir = filepath.Join(dir, "libvirtd")
	sock := filepath.Join(dir, "sock")
	conf := filepath.Join(dir, "libvirtd.conf")
	args := []string{"--mount", "--propagation", "private", "--", "sh", "-c",
		`set -e; conf=$1 pid=$2; shift 2; while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done; exec libvirtd -f "$conf" -p "$pid"`,
		"sh", conf, filepath.Join(dir, "libvirtd.pid")}
	for _, p := range libvirtdDirs {
		own := filepath.Join(dir, filepath.Base(p))
		if err := os.MkdirAll(own, 0o700); err != nil {
			t.Fatal(err)
		}
		args = append(args, own, p)
	}
	if err := os.MkdirAll(sock, 0o700); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		conf: fmt.Sprintf("unix_sock_dir = %q\nunix_sock_rw_perms = \"0700\"\nunix_sock_ro_perms = \"0700\"\nunix_sock_admin_perms = \"0700\"\nauth_unix_ro = \"none\"\nauth_unix_rw = \"none\"\nlog_outputs = \"3:stderr\"\n", sock),
		// QEMU as root without a security driver or cgroups: this libvirtd
		// never starts a guest, only answers that none is defined.
		filepath.Join(dir, "libvirt", "qemu.conf"): "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\ncgroup_controllers = [ ]\n",
	}
	for path, text := range files {
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	log, err := os.Create(filepath.Join(dir, "libvirtd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		log.Close()
	})
	rw := filepath.Join(sock, "libvirt-sock")
	// It answers once its QEMU driver has probed QEMU (seconds under TCG).
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(250 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := exec.CommandContext(ctx, "virsh", "-c", "qemu:///system?socket="+rw, "version").Run()
		cancel()
		if err == nil {
			return rw
		}
		select {
		case <-done:
			b, _ := os.ReadFile(log.Name())
			t.Fatalf("libvirtd ended: %s", tail(string(b), 2000))
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(log.Name())
			t.Fatalf("libvirtd does not answer within a minute: %v: %s", err, tail(string(b), 2000))
		}
	}
}
