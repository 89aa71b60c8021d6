package dirty_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/dirty"
)

// The writer is this test binary run again as another process that maps
// a RAM file as QEMU does and writes to it on command, one command a line
// on its standard input, answering "ok" or "error: …" on its output:
//
//	set OFF VAL PFN…   store byte VAL at offset OFF of each page
//	punch PFN…         punch a hole over each page (fallocate)
//	remap              map the file again at another address, then unmap the old mapping
const (
	writerEnv     = "AX_DIRTY_TEST_WRITER" // "shared" or "private": how the writer maps the file
	writerFileEnv = "AX_DIRTY_TEST_FILE"
)

// TestHelperWriter is not a test: it is the writer process's main.
func TestHelperWriter(t *testing.T) {
	mode := os.Getenv(writerEnv)
	if mode == "" {
		return
	}
	if err := runWriter(mode, os.Getenv(writerFileEnv), os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "writer:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runWriter(mode, path string, in io.Reader, out io.Writer) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	flags := unix.MAP_SHARED
	if mode == "private" {
		flags = unix.MAP_PRIVATE
	}
	mapFile := func() ([]byte, error) {
		mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, flags)
		if err != nil {
			return nil, err
		}
		// Exact page-by-page answers from soft-dirty need 4 KiB entries.
		if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
			return nil, err
		}
		return mem, nil
	}
	mem, err := mapFile()
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "ready")

	lines := bufio.NewScanner(in)
	for lines.Scan() {
		fields := strings.Fields(lines.Text())
		if len(fields) == 0 {
			continue
		}
		nums := make([]int64, 0, len(fields)-1)
		for _, s := range fields[1:] {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				return err
			}
			nums = append(nums, n)
		}
		err := error(nil)
		switch fields[0] {
		case "set":
			if len(nums) < 2 {
				return fmt.Errorf("bad command %q", lines.Text())
			}
			off, val := nums[0], byte(nums[1])
			for _, pfn := range nums[2:] {
				mem[pfn*dirty.PageSize+off] = val
			}
		case "punch":
			for _, pfn := range nums {
				if err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
					pfn*dirty.PageSize, dirty.PageSize); err != nil {
					break
				}
			}
		case "remap":
			var again []byte
			if again, err = mapFile(); err == nil {
				err = unix.Munmap(mem)
				mem = again
			}
		default:
			return fmt.Errorf("unknown command %q", lines.Text())
		}
		if err != nil {
			fmt.Fprintln(out, "error:", err)
		} else {
			fmt.Fprintln(out, "ok")
		}
	}
	return lines.Err()
}

// writer is the test's end of a writer process.
type writer struct {
	t      testing.TB
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    *bufio.Scanner
	stderr bytes.Buffer
}

// startWriter starts a writer process that maps path (mode "shared" or
// "private"); it is stopped when the test ends.
func startWriter(t testing.TB, path, mode string) *writer {
	t.Helper()
	w := &writer{t: t}
	w.cmd = exec.Command(os.Args[0], "-test.run=^TestHelperWriter$", "-test.count=1")
	w.cmd.Env = append(os.Environ(), writerEnv+"="+mode, writerFileEnv+"="+path)
	w.cmd.Stderr = &w.stderr
	var err error
	if w.in, err = w.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := w.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	w.out = bufio.NewScanner(stdout)
	if err := w.cmd.Start(); err != nil {
		t.Fatalf("start writer process: %v", err)
	}
	t.Cleanup(func() {
		w.in.Close()
		if err := w.cmd.Wait(); err != nil {
			t.Errorf("writer process: %v; stderr:\n%s", err, w.stderr.String())
		}
	})
	w.expect("ready")
	return w
}

func (w *writer) pid() int { return w.cmd.Process.Pid }

func (w *writer) expect(want string) {
	w.t.Helper()
	if !w.out.Scan() {
		w.t.Fatalf("writer process ended (%v); stderr:\n%s", w.out.Err(), w.stderr.String())
	}
	if got := w.out.Text(); got != want {
		w.t.Fatalf("writer process answered %q, want %q", got, want)
	}
}

func (w *writer) do(cmd string, pages []uint64) {
	w.t.Helper()
	var b strings.Builder
	b.WriteString(cmd)
	for _, p := range pages {
		b.WriteByte(' ')
		b.WriteString(strconv.FormatUint(p, 10))
	}
	b.WriteByte('\n')
	if _, err := io.WriteString(w.in, b.String()); err != nil {
		w.t.Fatalf("command writer process: %v", err)
	}
	w.expect("ok")
}

// set stores val at offset off of each page, through the writer's mapping.
func (w *writer) set(off int, val byte, pages ...uint64) {
	w.t.Helper()
	w.do(fmt.Sprintf("set %d %d", off, val), pages)
}

// punch punches a hole over each page.
func (w *writer) punch(pages ...uint64) {
	w.t.Helper()
	w.do("punch", pages)
}

func (w *writer) remap() {
	w.t.Helper()
	w.do("remap", nil)
}

// newRAMFile creates a sparse file of n pages on tmpfs, where guest RAM
// lives, and removes it when the test ends.
func newRAMFile(t testing.TB, pages int) string {
	t.Helper()
	dir, err := os.MkdirTemp("/dev/shm", "ax-dirty-test-")
	if errors.Is(err, os.ErrNotExist) {
		dir = t.TempDir()
	} else if err != nil {
		t.Fatal(err)
	} else {
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	path := dir + "/ram"
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, int64(pages)*dirty.PageSize); err != nil {
		t.Fatal(err)
	}
	return path
}
