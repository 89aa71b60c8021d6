// Package durable holds the two file-system calls that make a write or a
// rename survive a crash, shared by every store that replaces files.
package durable

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// Fdatasync flushes f's data (and the metadata needed to read it back) to
// stable storage, retrying on EINTR.
func Fdatasync(f *os.File) error {
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := sc.Control(func(fd uintptr) {
		for {
			serr = syscall.Fdatasync(int(fd))
			if serr != syscall.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("fdatasync %s: %w", f.Name(), serr)
	}
	return nil
}

// SyncDir makes renames and creations in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, syscall.EINVAL) {
		// Some file systems cannot sync a directory; their renames are
		// as durable as they get.
		return nil
	}
	return err
}
