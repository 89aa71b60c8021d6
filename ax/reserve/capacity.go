package reserve

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Capacity is an amount of the three resources a guest needs on the host
// that would run it.
type Capacity struct {
	VCPUs       int   `json:"vcpus"`
	MemoryBytes int64 `json:"memory_bytes"`
	DiskBytes   int64 `json:"disk_bytes"`
}

// Add returns c plus o.
func (c Capacity) Add(o Capacity) Capacity {
	return Capacity{VCPUs: c.VCPUs + o.VCPUs, MemoryBytes: c.MemoryBytes + o.MemoryBytes, DiskBytes: c.DiskBytes + o.DiskBytes}
}

// Sub returns c minus o.
func (c Capacity) Sub(o Capacity) Capacity {
	return Capacity{VCPUs: c.VCPUs - o.VCPUs, MemoryBytes: c.MemoryBytes - o.MemoryBytes, DiskBytes: c.DiskBytes - o.DiskBytes}
}

func (c Capacity) negative() bool { return c.VCPUs < 0 || c.MemoryBytes < 0 || c.DiskBytes < 0 }

// HostCapacity measures this host: the CPUs axd may run on, the RAM the
// kernel manages and the size of the file system holding dir, where replica
// disks live — less the blocks only root may use, which a guest's disk
// cannot count on.
func HostCapacity(dir string) (Capacity, error) {
	// NumCPU honours the scheduler affinity axd was started with.
	c := Capacity{VCPUs: runtime.NumCPU()}
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return Capacity{}, fmt.Errorf("reserve: host capacity: %w", err)
	}
	c.MemoryBytes, err = parseMemTotal(f)
	f.Close()
	if err != nil {
		return Capacity{}, fmt.Errorf("reserve: host capacity: /proc/meminfo: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return Capacity{}, fmt.Errorf("reserve: host capacity: statfs %s: %w", dir, err)
	}
	used := st.Blocks - st.Bfree
	c.DiskBytes = int64((used + st.Bavail) * uint64(st.Bsize))
	return c, nil
}

// parseMemTotal returns the MemTotal line of /proc/meminfo in bytes.
func parseMemTotal(r io.Reader) (int64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("unexpected MemTotal line %q", sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil || kb <= 0 || kb > 1<<53 {
			return 0, fmt.Errorf("unexpected MemTotal line %q", sc.Text())
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("no MemTotal line")
}
