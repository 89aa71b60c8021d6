package doctor

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/netbuffer"
)

// Host is the machine the probes ask: each field is one question to the
// OS, so tests answer with fakes and need neither root nor QEMU.
type Host struct {
	Root bool // the probes run as root

	KernelRelease func() (string, error)
	// KernelConfig returns the running kernel's build options
	// (CONFIG_X → "y", "m", "n" for "is not set"), or an error when the
	// kernel publishes none (/proc/config.gz, /boot/config-RELEASE).
	KernelConfig func(release string) (map[string]string, error)
	// SoftDirty says whether a written page's soft-dirty bit is set.
	SoftDirty func() bool
	// PagemapScan asks the PAGEMAP_SCAN ioctl for soft-dirty pages of one
	// page of this process: unix.ENOTTY when the kernel lacks the ioctl,
	// unix.EINVAL when it lacks the soft-dirty category.
	PagemapScan func() error
	// ChecksumKfunc says whether the output gate can complete offloaded
	// checksums (the bpf_cast_to_kern_ctx kfunc).
	ChecksumKfunc func() bool
	// OpenDevice opens path read-write and closes it again.
	OpenDevice func(path string) error
	// ReadFile reads /proc files (cpuinfo).
	ReadFile func(path string) ([]byte, error)
	// FSType is the statfs magic of the file system at path.
	FSType func(path string) (int64, error)
	// VsockSocket opens and closes an AF_VSOCK socket.
	VsockSocket func() error
	// LookPath finds a program.
	LookPath func(name string) (string, error)
	// Output runs a program and returns its standard output.
	Output func(ctx context.Context, name string, args ...string) ([]byte, error)
	// QMPCommands starts binary without a machine and asks it, over QMP,
	// the commands it knows.
	QMPCommands func(ctx context.Context, binary string) ([]string, error)
	// CheckPrivate, ReadKeyFile and LoadIdentity are package identity's,
	// as fields so tests can refuse access as a non-root user meets it.
	CheckPrivate func(path string) error
	ReadKeyFile  func(path string) ([]byte, error)
	LoadIdentity func(identity.Files) (*identity.Identity, error)
	// DialTCP connects to addr and closes the connection.
	DialTCP func(ctx context.Context, addr string) error
	Now     func() time.Time
}

// Real is this machine.
func Real() *Host {
	return &Host{
		Root:          os.Geteuid() == 0,
		KernelRelease: kernelRelease,
		KernelConfig:  kernelConfig,
		SoftDirty:     dirty.SoftDirtyAvailable,
		PagemapScan:   dirty.PagemapScanProbe,
		ChecksumKfunc: netbuffer.CompletesChecksums,
		OpenDevice: func(path string) error {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			return f.Close()
		},
		ReadFile: os.ReadFile,
		FSType: func(path string) (int64, error) {
			var st unix.Statfs_t
			if err := unix.Statfs(path, &st); err != nil {
				return 0, &os.PathError{Op: "statfs", Path: path, Err: err}
			}
			return int64(st.Type), nil
		},
		VsockSocket: func() error {
			fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			return unix.Close(fd)
		},
		LookPath: lookPath,
		Output: func(ctx context.Context, name string, args ...string) ([]byte, error) {
			return exec.CommandContext(ctx, name, args...).Output()
		},
		QMPCommands:  qmpCommands,
		CheckPrivate: identity.CheckPrivate,
		ReadKeyFile:  identity.ReadKeyFile,
		LoadIdentity: identity.Load,
		DialTCP: func(ctx context.Context, addr string) error {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return err
			}
			return c.Close()
		},
		Now: time.Now,
	}
}

// lookPath also looks in the sbin directories, which a user's PATH may
// lack (libvirtd lives in /usr/sbin).
func lookPath(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		if p, err2 := exec.LookPath(dir + "/" + name); err2 == nil {
			return p, nil
		}
	}
	return "", err
}

func kernelRelease() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// kernelConfig reads /proc/config.gz (CONFIG_IKCONFIG_PROC), else the
// distribution's /boot/config-RELEASE.
func kernelConfig(release string) (map[string]string, error) {
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("/proc/config.gz: %w", err)
		}
		return parseKernelConfig(z)
	}
	f, err := os.Open("/boot/config-" + release)
	if err != nil {
		return nil, fmt.Errorf("no kernel config: neither /proc/config.gz nor %w", err)
	}
	defer f.Close()
	return parseKernelConfig(f)
}

// parseKernelConfig reads a kernel .config: CONFIG_X=y|m|value lines and
// "# CONFIG_X is not set" ones, which it records as "n".
func parseKernelConfig(r io.Reader) (map[string]string, error) {
	cfg := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if name, ok := strings.CutPrefix(line, "# "); ok {
			if name, ok := strings.CutSuffix(name, " is not set"); ok && strings.HasPrefix(name, "CONFIG_") {
				cfg[name] = "n"
			}
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read kernel config: %w", err)
	}
	return cfg, nil
}

// maxQMPLine bounds one line of QEMU's answers (query-commands is some
// 20 KiB on QEMU 7.2).
const maxQMPLine = 4 << 20

// qmpCommands starts binary with no machine and its QMP monitor on
// stdio, asks query-commands and quits it; ctx bounds the whole exchange
// and the process is waited for before returning.
func qmpCommands(ctx context.Context, binary string) ([]string, error) {
	cmd := exec.CommandContext(ctx, binary, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second // QEMU's children must not keep us waiting on its pipes
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	cmds, qerr := converseQMP(stdout, stdin)
	stdin.Close() // QEMU quits at the end of its stdio monitor if "quit" did not reach it
	werr := cmd.Wait()
	if qerr != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s did not answer QMP in time: %w", binary, ctx.Err())
		}
		if werr != nil {
			return nil, fmt.Errorf("%s: %w (%s): %w", binary, qerr, oneLine(stderr.String()), werr)
		}
		return nil, fmt.Errorf("%s: %w", binary, qerr)
	}
	return cmds, nil
}

// converseQMP speaks QMP on r and w: it reads the greeting, leaves
// capabilities negotiation, asks query-commands and sends quit. Events
// between the answers are skipped.
func converseQMP(r io.Reader, w io.Writer) ([]string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxQMPLine)
	type message struct {
		QMP    json.RawMessage `json:"QMP"`
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	next := func(what string) (message, error) {
		for sc.Scan() {
			var m message
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				return m, fmt.Errorf("qmp %s: not a QMP message: %w", what, err)
			}
			switch {
			case m.Error != nil:
				return m, fmt.Errorf("qmp %s: %s: %s", what, m.Error.Class, m.Error.Desc)
			case m.QMP != nil || m.Return != nil:
				return m, nil
			}
			// An event: not the answer.
		}
		if err := sc.Err(); err != nil {
			return message{}, fmt.Errorf("qmp %s: %w", what, err)
		}
		return message{}, fmt.Errorf("qmp %s: %w", what, io.ErrUnexpectedEOF)
	}
	if m, err := next("greeting"); err != nil {
		return nil, err
	} else if m.QMP == nil {
		return nil, errors.New("qmp greeting: the monitor did not greet")
	}
	ask := func(command string) (json.RawMessage, error) {
		if _, err := fmt.Fprintf(w, "{\"execute\":%q}\n", command); err != nil {
			return nil, fmt.Errorf("qmp %s: %w", command, err)
		}
		m, err := next(command)
		if err == nil && m.Return == nil {
			err = fmt.Errorf("qmp %s: an answer without a return", command)
		}
		return m.Return, err
	}
	if _, err := ask("qmp_capabilities"); err != nil {
		return nil, err
	}
	ret, err := ask("query-commands")
	if err != nil {
		return nil, err
	}
	var list []struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(ret, &list); err != nil {
		return nil, fmt.Errorf("qmp query-commands: %w", err)
	}
	io.WriteString(w, `{"execute":"quit"}`+"\n") // best effort: closing stdin ends it too
	cmds := make([]string, 0, len(list))
	for _, c := range list {
		cmds = append(cmds, c.Name)
	}
	return cmds, nil
}

// parseVersion finds "major.minor" in a kernel release.
func parseVersion(release string) (major, minor int, err error) {
	a, rest, _ := strings.Cut(release, ".")
	b := rest
	if i := strings.IndexFunc(rest, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		b = rest[:i]
	}
	if major, err = strconv.Atoi(a); err == nil {
		minor, err = strconv.Atoi(b)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("kernel release %q: not MAJOR.MINOR", release)
	}
	return major, minor, nil
}
