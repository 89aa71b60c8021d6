package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// giveToQEMU makes dir, below axd's state directory root, belong to the
// user and group the VM's QEMU (pid) runs as, when that is not axd's own:
// QEMU itself creates files there — each checkpoint's device state on a
// primary, the socket a replica's device state comes in on — and libvirt
// runs it as an unprivileged user (libvirt-qemu on Debian). axd, root,
// still reads and writes there. pid 0 (unknown) changes nothing.
func giveToQEMU(root, dir string, pid int) error {
	uid, gid, other, err := qemuUser(pid)
	if err != nil || !other {
		return err
	}
	if err := reachable(root, filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		return fmt.Errorf("giving %s to QEMU's user %d:%d: %w", dir, uid, gid, err)
	}
	return nil
}

// openNBDTo lets the VM's QEMU (pid) connect to axd's NBD socket sock,
// below root, when it runs as another user than axd: the socket is made
// connectable by all, and the NBD server admits such a client only to the
// exports added for its own pid (nbd.Server.AddExportFor).
func openNBDTo(root, sock string, pid int) error {
	_, _, other, err := qemuUser(pid)
	if err != nil || !other {
		return err
	}
	if err := reachable(root, filepath.Dir(sock)); err != nil {
		return err
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		return fmt.Errorf("letting QEMU's user connect to %s: %w", sock, err)
	}
	return nil
}

// qemuUser is the user and group QEMU (pid) runs as, and whether they are
// not axd's own. pid 0 (unknown) is taken as axd's, and so is a process
// that is gone: what was to be given to it is moot, and the next command
// to that QEMU fails on its own.
func qemuUser(pid int) (uid, gid int, other bool, err error) {
	if pid <= 0 {
		return 0, 0, false, nil
	}
	if uid, gid, err = processOwner(pid); errors.Is(err, fs.ErrNotExist) {
		return 0, 0, false, nil
	} else if err != nil {
		return 0, 0, false, fmt.Errorf("the user QEMU runs as: %w", err)
	}
	return uid, gid, uid != os.Geteuid() || gid != os.Getegid(), nil
}

// reachable gives dir and the directories above it up to root search
// permission for others (o+x, not read: QEMU reaches its files by name and
// lists nothing). dir must be root or below it.
func reachable(root, dir string) error {
	rel, err := filepath.Rel(root, dir)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("%s is not below axd's state directory %s", dir, root)
	}
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		if m := st.Mode().Perm(); m&0o001 == 0 {
			if err := os.Chmod(p, m|0o001); err != nil {
				return fmt.Errorf("letting QEMU's user reach %s: %w", dir, err)
			}
		}
		if p == filepath.Clean(root) || p == filepath.Dir(p) {
			return nil
		}
	}
}

// processOwner is the effective user and group of process pid.
func processOwner(pid int) (uid, gid int, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	uid, gid = -1, -1
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "Uid:\treal\teffective\tsaved\tfs"
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "Uid" && k != "Gid") {
			continue
		}
		f := strings.Fields(v)
		if len(f) < 2 {
			return 0, 0, fmt.Errorf("process %d: malformed %s line %q", pid, k, sc.Text())
		}
		n, err := strconv.Atoi(f[1])
		if err != nil || n < 0 {
			return 0, 0, fmt.Errorf("process %d: malformed %s line %q", pid, k, sc.Text())
		}
		if k == "Uid" {
			uid = n
		} else {
			gid = n
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, fmt.Errorf("process %d: %w", pid, err)
	}
	if uid < 0 || gid < 0 {
		return 0, 0, fmt.Errorf("process %d: no Uid or Gid in its status", pid)
	}
	return uid, gid, nil
}
