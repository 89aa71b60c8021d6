package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/monitor/agent"
)

// prober runs one check once. It returns nil when the application is
// healthy and an error saying what is wrong otherwise.
type prober func(ctx context.Context) error

// procRoot is where process checks look; tests point it elsewhere.
var procRoot = "/proc"

func newProber(ch *Check) prober {
	switch ch.Kind {
	case agent.KindProcess:
		if ch.Pidfile != "" {
			return func(context.Context) error { return pidfileAlive(ch.Pidfile) }
		}
		return func(context.Context) error { return processAlive(ch.Process) }
	case agent.KindTCP:
		return func(ctx context.Context) error {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", ch.Address)
			if err != nil {
				return err
			}
			return c.Close()
		}
	case agent.KindHTTP:
		client := &http.Client{
			// The first answer is the one judged: a redirect to a login
			// page is not a healthy application.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
			Transport:     &http.Transport{Proxy: nil, DisableKeepAlives: true},
		}
		return func(ctx context.Context) error { return httpStatus(ctx, client, ch.URL, ch.ExpectStatus) }
	case agent.KindCommand:
		return func(ctx context.Context) error { return runCommand(ctx, ch.Command, ch.ExpectExit) }
	}
	return func(context.Context) error { return fmt.Errorf("unknown check kind %q", ch.Kind) }
}

// processAlive looks for a live process whose comm or argv[0] base name is
// name. comm is cut to 15 bytes by the kernel, so longer names match argv[0].
func processAlive(name string) error {
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		dir := filepath.Join(procRoot, e.Name())
		if comm, err := os.ReadFile(filepath.Join(dir, "comm")); err == nil &&
			strings.TrimSuffix(string(comm), "\n") == name && !zombie(dir) {
			return nil
		}
		if cmd, err := os.ReadFile(filepath.Join(dir, "cmdline")); err == nil && len(cmd) > 0 {
			argv0, _, _ := bytes.Cut(cmd, []byte{0})
			if filepath.Base(string(argv0)) == name && !zombie(dir) {
				return nil
			}
		}
	}
	return fmt.Errorf("no process named %s", name)
}

// pidfileAlive checks that the process named by a pidfile exists.
func pidfileAlive(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return fmt.Errorf("pidfile %s holds no pid", path)
	}
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("process %d of %s is gone", pid, path)
	}
	if zombie(dir) {
		return fmt.Errorf("process %d of %s is a zombie", pid, path)
	}
	return nil
}

// zombie reads the state letter of /proc/PID/stat (after the comm in
// parentheses, which may itself hold spaces and parentheses).
func zombie(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] == 'Z' || b[i+2] == 'X'
}

func httpStatus(ctx context.Context, c *http.Client, url string, want int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "ax-agent")
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode != want {
		return fmt.Errorf("GET %s: status %d, want %d", url, resp.StatusCode, want)
	}
	return nil
}

// runCommand runs argv (no shell) and judges its exit code. Its output is
// kept, bounded, to explain a failure.
func runCommand(ctx context.Context, argv []string, want int) error {
	out, code, err := execBounded(ctx, argv)
	if err != nil {
		return err
	}
	if code != want {
		msg := fmt.Sprintf("%s exited %d, want %d", filepath.Base(argv[0]), code, want)
		if s := strings.TrimSpace(out); s != "" {
			msg += ": " + s
		}
		return errors.New(msg)
	}
	return nil
}

// execBounded runs argv until ctx ends, killing its whole process group
// then, and returns the start of its combined output and its exit code.
func execBounded(ctx context.Context, argv []string) (string, int, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out boundedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil, errors.Is(err, exec.ErrWaitDelay):
		// ErrWaitDelay: it exited 0 but left a child holding its output,
		// as a recovery action that starts a daemon may.
		return out.String(), 0, nil
	case ctx.Err() != nil:
		return out.String(), -1, fmt.Errorf("%s: timed out", filepath.Base(argv[0]))
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return out.String(), ee.ExitCode(), nil
	}
	return out.String(), -1, err
}

// boundedBuffer keeps the first agent.MaxDetail bytes written to it.
type boundedBuffer struct{ b []byte }

func (w *boundedBuffer) Write(p []byte) (int, error) {
	if room := agent.MaxDetail - len(w.b); room > 0 {
		w.b = append(w.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (w *boundedBuffer) String() string { return string(w.b) }
