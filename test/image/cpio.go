package image

import (
	"fmt"
	"io"
	"sort"
)

// cpioEntry is one file of an initramfs. Mode carries the type bits.
type cpioEntry struct {
	Name string
	Mode uint32
	Data []byte // file content, or the target of a symlink
}

const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
)

// writeCpio writes entries as a "newc" cpio archive, the format the kernel
// unpacks as initramfs. Entries are sorted and timestamps zeroed so equal
// inputs give byte-identical archives (the image cache is keyed by content).
func writeCpio(w io.Writer, entries []cpioEntry) error {
	sorted := append([]cpioEntry(nil), entries...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	ino := uint32(1)
	for _, e := range sorted {
		if err := writeCpioRecord(w, e.Name, e.Mode, ino, e.Data); err != nil {
			return err
		}
		ino++
	}
	return writeCpioRecord(w, "TRAILER!!!", 0, 0, nil)
}

func writeCpioRecord(w io.Writer, name string, mode, ino uint32, data []byte) error {
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	// newc header: magic then 13 eight-digit hex fields.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("cpio: %w", err)
	}
	if len(data) > 0 {
		if _, err := w.Write(data); err != nil {
			return fmt.Errorf("cpio: %w", err)
		}
		if n := len(data) % 4; n != 0 {
			if _, err := w.Write(make([]byte, 4-n)); err != nil {
				return fmt.Errorf("cpio: %w", err)
			}
		}
	}
	return nil
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
