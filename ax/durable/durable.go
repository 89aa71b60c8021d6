// Package durable holds the file-system calls that make a write or a rename
// survive a crash, and the durable replacement of a whole file built on
// them, shared by every store that replaces files.
package durable

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// TempSuffix marks ReplaceFile's temporary files: PATH + TempSuffix + a
// random part, beside PATH. A crash can leave one behind; it is never PATH.
const TempSuffix = ".tmp-"

// ReplaceFile replaces path with data durably: a temporary file beside it
// (mode perm), fdatasync, rename over path, then the directory synced — so
// a crash leaves the old file or the new one, never a mix of both.
func ReplaceFile(path string, data []byte, perm os.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, base+TempSuffix+"*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := Fdatasync(f); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
