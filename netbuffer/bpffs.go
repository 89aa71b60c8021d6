package netbuffer

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// bpffsRoot is where a bpffs is mounted by convention (systemd mounts one
// there at boot).
const bpffsRoot = "/sys/fs/bpf"

// EnsureBPFFS makes sure that a gate can be pinned in dir: when dir is
// under /sys/fs/bpf and nothing is mounted there, it mounts a bpffs there
// (mode 0700, as systemd does). It fails, saying what to do, when dir (or
// its closest existing parent) is not on a bpffs. It makes no directory.
func EnsureBPFFS(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("netbuffer: %w", err)
	}
	if abs == bpffsRoot || strings.HasPrefix(abs, bpffsRoot+"/") {
		var st unix.Statfs_t
		if err := unix.Statfs(bpffsRoot, &st); err != nil {
			return fmt.Errorf("netbuffer: %s: %w", bpffsRoot, err)
		}
		if st.Type == unix.SYSFS_MAGIC { // sysfs's own directory: nothing is mounted there
			err := unix.Mount("bpf", bpffsRoot, "bpf", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700")
			if err != nil {
				return fmt.Errorf("netbuffer: mount a bpffs on %s: %w", bpffsRoot, err)
			}
		}
	}
	return onBPFFS(abs)
}

// onBPFFS checks that dir, or its closest existing parent, is on a bpffs.
func onBPFFS(dir string) error {
	at := filepath.Clean(dir)
	for {
		var st unix.Statfs_t
		err := unix.Statfs(at, &st)
		if errors.Is(err, fs.ErrNotExist) && at != filepath.Dir(at) {
			at = filepath.Dir(at)
			continue
		}
		if err != nil {
			return fmt.Errorf("netbuffer: %s: %w", at, err)
		}
		if st.Type != unix.BPF_FS_MAGIC {
			return fmt.Errorf("netbuffer: %s is not on a bpffs (%s is on %s): pin gates under %s (netbuffer.EnsureBPFFS mounts one there), or mount one: mount -t bpf bpf DIR",
				dir, at, fsName(st.Type), bpffsRoot)
		}
		return nil
	}
}

// fsName names the filesystems a pin directory is most likely put on by
// mistake.
func fsName(magic int64) string {
	switch magic {
	case unix.SYSFS_MAGIC:
		return "sysfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	}
	return fmt.Sprintf("a filesystem of type %#x", magic)
}
