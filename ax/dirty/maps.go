package dirty

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// vma is one line of /proc/PID/maps.
type vma struct {
	start, end   uint64 // virtual addresses, [start, end)
	perms        [4]byte
	offset       uint64 // file offset mapped at start
	major, minor uint32
	ino          uint64
}

func (v vma) shared() bool   { return v.perms[3] == 's' }
func (v vma) writable() bool { return v.perms[1] == 'w' }

func (v vma) String() string {
	return fmt.Sprintf("%x-%x %s %08x %02x:%02x %d", v.start, v.end, v.perms[:], v.offset, v.major, v.minor, v.ino)
}

// parseVMA parses a line of /proc/PID/maps:
//
//	7f2a40000000-7f2a50000000 rw-s 00000000 00:1a 4242   /dev/shm/vm1.ram
func parseVMA(line []byte) (vma, error) {
	var v vma
	full := line
	bad := func(what string) (vma, error) {
		return vma{}, fmt.Errorf("unexpected %s in line %q", what, full)
	}
	field := func() []byte {
		line = bytes.TrimLeft(line, " ")
		f, rest, _ := bytes.Cut(line, []byte{' '})
		line = rest
		return f
	}
	lo, hi, ok := bytes.Cut(field(), []byte{'-'})
	var ok1, ok2 bool
	v.start, ok1 = parseHex(lo)
	v.end, ok2 = parseHex(hi)
	if !ok || !ok1 || !ok2 || v.end < v.start {
		return bad("address range")
	}
	perms := field()
	if len(perms) != 4 {
		return bad("permissions")
	}
	copy(v.perms[:], perms)
	if v.offset, ok = parseHex(field()); !ok {
		return bad("offset")
	}
	maj, min, ok := bytes.Cut(field(), []byte{':'})
	major, ok1 := parseHex(maj)
	minor, ok2 := parseHex(min)
	if !ok || !ok1 || !ok2 || major > 1<<32-1 || minor > 1<<32-1 {
		return bad("device")
	}
	v.major, v.minor = uint32(major), uint32(minor)
	if v.ino, ok = parseDec(field()); !ok {
		return bad("inode")
	}
	return v, nil
}

// parseDec parses a non-empty decimal number.
func parseDec(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 19 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	return n, true
}

// parseHex parses a non-empty lower- or upper-case hexadecimal number.
func parseHex(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 16 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		n = n<<4 | uint64(c)
	}
	return n, true
}

// segment is a run of virtual memory that maps a run of the RAM file.
type segment struct {
	start, end uint64 // virtual addresses, [start, end)
	offset     uint64 // file offset mapped at start
}

// fileSegments appends to segs the shared mappings of the file
// (major:minor, ino) listed in maps, merging neighbours that continue one
// another in both memory and file (the kernel splits a mapping into
// several lines when madvise or mprotect changes part of it).
// It returns the first writable private mapping of the file, if any.
func fileSegments(maps []byte, major, minor uint32, ino uint64, segs []segment) ([]segment, *vma, error) {
	var private *vma
	for len(maps) > 0 {
		line, rest, _ := bytes.Cut(maps, []byte{'\n'})
		maps = rest
		if len(line) == 0 {
			continue
		}
		v, err := parseVMA(line)
		if err != nil {
			return segs, nil, err
		}
		if v.ino != ino || v.major != major || v.minor != minor {
			continue
		}
		if !v.shared() {
			if v.writable() && private == nil {
				p := v
				private = &p
			}
			continue
		}
		if n := len(segs); n > 0 {
			last := &segs[n-1]
			if last.end == v.start && last.offset+(last.end-last.start) == v.offset {
				last.end = v.end
				continue
			}
		}
		segs = append(segs, segment{start: v.start, end: v.end, offset: v.offset})
	}
	return segs, private, nil
}

// readAll reads f from its start into buf, reusing buf's memory.
func readAll(f *os.File, buf []byte) ([]byte, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return buf, err
	}
	buf = buf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := f.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if errors.Is(err, io.EOF) || (err == nil && n == 0) {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// processSegments reads pid's maps (open in mapsFile) and returns its
// shared mappings of file, failing when there is none or when the file
// is also mapped private and writable.
func processSegments(pid int, mapsFile *os.File, file *ramFile, buf []byte, segs []segment) ([]byte, []segment, error) {
	buf, err := readAll(mapsFile, buf)
	if err != nil {
		return buf, segs, fmt.Errorf("dirty: read /proc/%d/maps: %w", pid, err)
	}
	segs, private, err := fileSegments(buf, unix.Major(file.dev), unix.Minor(file.dev), file.ino, segs[:0])
	switch {
	case err != nil:
		return buf, segs, fmt.Errorf("dirty: /proc/%d/maps: %w", pid, err)
	case private != nil:
		return buf, segs, fmt.Errorf("dirty: process %d maps %s private (%s): the guest's writes stay in "+
			"its private copy and never reach the file; start QEMU with memory-backend-file share=on "+
			"(libvirt: <access mode='shared'/>)", pid, file.path, private)
	case len(segs) == 0:
		return buf, segs, fmt.Errorf("dirty: process %d does not map %s shared (no mapping of device %02x:%02x "+
			"inode %d in /proc/%d/maps; has it exited?); give the pid of the QEMU that uses this mem-path",
			pid, file.path, unix.Major(file.dev), unix.Minor(file.dev), file.ino, pid)
	}
	return buf, segs, nil
}

// checkSharedMapping fails unless process pid maps the file at path
// shared, and nowhere private and writable.
func checkSharedMapping(pid int, path string) error {
	file, err := openRAMFile(path, 0)
	if err != nil {
		return err
	}
	defer file.close()
	maps, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return fmt.Errorf("dirty: QEMU process: %w", err)
	}
	defer maps.Close()
	_, _, err = processSegments(pid, maps, file, nil, nil)
	return err
}
