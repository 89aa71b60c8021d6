package guestrun

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/test/image"
	"github.com/axproject/ax/test/lab"
	"github.com/axproject/ax/test/testenv"
)

const fixtures = "github.com/axproject/ax/test/guestrun/internal/fixtures/"

func requireGuest(t *testing.T) {
	t.Helper()
	testenv.RequireLong(t)
	testenv.RequireRoot(t) // the image cache lives under /var/cache
	testenv.RequireCommand(t, lab.QEMUBinary, "make deps, or apt-get install qemu-system-x86")
	testenv.RequireCommand(t, "go", "put Go on PATH")
}

// runFixtures runs fixture packages in one guest and returns the console,
// which the tests quote when something is wrong.
func runFixtures(t *testing.T, ctx context.Context, cfg Config, names ...string) (*Result, string, error) {
	t.Helper()
	for _, n := range names {
		p, _ := ParsePackage(fixtures + n)
		cfg.Packages = append(cfg.Packages, p)
	}
	cfg.Tags = []string{"axguestfixture"}
	var out syncBuffer
	if cfg.Output == nil {
		cfg.Output = &out
	}
	res, err := Run(ctx, cfg)
	if errors.Is(err, image.ErrNoKernel) {
		if testenv.Privileged() {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	if res != nil {
		t.Logf("accel=%s build=%s boot=%s total=%s", res.Accel, res.Build.Round(time.Millisecond), res.Boot.Round(time.Millisecond), res.Total.Round(time.Millisecond))
		checkNoQEMU(t, res.Image)
	}
	return res, out.String(), err
}

// checkNoQEMU fails if a QEMU still runs this image: Run must leave none.
func checkNoQEMU(t *testing.T, key string) {
	t.Helper()
	if key == "" {
		return
	}
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range cmdlines {
		data, err := os.ReadFile(p)
		if err == nil && bytes.Contains(data, []byte(lab.QEMUBinary)) && bytes.Contains(data, []byte(key)) {
			t.Errorf("QEMU of image %s still runs: %s", key, p)
		}
	}
}

func TestIntegrationPassAndFail(t *testing.T) {
	requireGuest(t)
	res, out, err := runFixtures(t, context.Background(), Config{Timeout: 3 * time.Minute}, "fail", "pass")
	if !errors.Is(err, ErrTestsFailed) || errors.Is(err, ErrGuestPanic) || errors.Is(err, ErrGuestExited) {
		t.Fatalf("err = %v, want only ErrTestsFailed; console:\n%s", err, out)
	}
	if len(res.Tests) != 2 {
		t.Fatalf("tests = %+v; console:\n%s", res.Tests, out)
	}
	fail, pass := res.Tests[0], res.Tests[1]
	if fail.Passed() || fail.ExitCode <= 0 || len(fail.Failed) != 1 || fail.Failed[0] != "TestFails" {
		t.Errorf("fail fixture reported as %+v", fail)
	}
	// The pass fixture checks the guest kernel, mounts, modules, env and testdata itself.
	if !pass.Passed() || pass.Package != fixtures+"pass" {
		t.Errorf("pass fixture reported as %+v; console:\n%s", pass, out)
	}
	if !strings.Contains(out, "--- PASS: TestInGuest") {
		t.Errorf("pass fixture's test did not run (skipped?); console:\n%s", out)
	}
	if !strings.HasPrefix(res.Kernel, "6.1.") {
		t.Errorf("guest kernel %q, want the Debian 6.1 cloud kernel", res.Kernel)
	}
	if len(res.Warnings) > 0 || len(res.KernelFaults) > 0 {
		t.Errorf("warnings %q, kernel faults %q", res.Warnings, res.KernelFaults)
	}
	if _, err := os.Stat(filepath.Join(image.DefaultCacheDir, "images", res.Image)); err == nil {
		t.Errorf("test image %s left in the lab's cache", res.Image)
	}
}

func TestIntegrationGuestPanic(t *testing.T) {
	requireGuest(t)
	res, out, err := runFixtures(t, context.Background(), Config{Timeout: 3 * time.Minute}, "pass", "panic", "hang")
	if !errors.Is(err, ErrGuestPanic) {
		t.Fatalf("err = %v, want ErrGuestPanic; console:\n%s", err, out)
	}
	for _, want := range []string{fixtures + "panic", "sysrq triggered crash", "never started: " + fixtures + "hang"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if len(res.Tests) != 2 || !res.Tests[0].Passed() || res.Tests[1].ExitCode != -1 {
		t.Errorf("tests = %+v", res.Tests)
	}
}

func TestIntegrationCancelKillsGuest(t *testing.T) {
	requireGuest(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Cancel once the hanging test runs, as Ctrl-C would.
	out := &watchWriter{match: "=== RUN   TestHangs", hit: cancel}
	res, _, err := runFixtures(t, ctx, Config{Timeout: 3 * time.Minute, Output: out}, "hang")
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), fixtures+"hang") {
		t.Fatalf("err = %v, want context.Canceled naming the hang fixture; console:\n%s", err, out.String())
	}
	if len(res.Tests) != 1 || res.Tests[0].ExitCode != -1 {
		t.Errorf("tests = %+v", res.Tests)
	}
}

func TestIntegrationTimeout(t *testing.T) {
	requireGuest(t)
	// Too short for any boot: the run ends while compiling or booting, and
	// returns at all only if QEMU (or the go command) is killed.
	_, out, err := runFixtures(t, context.Background(), Config{Timeout: 1500 * time.Millisecond}, "hang")
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout; console:\n%s", err, out)
	}
}

// syncBuffer is a bytes.Buffer safe for the runner and the test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// watchWriter calls hit once when the output holds match.
type watchWriter struct {
	syncBuffer
	match string
	hit   func()
	once  sync.Once
}

func (w *watchWriter) Write(p []byte) (int, error) {
	n, err := w.syncBuffer.Write(p)
	if strings.Contains(w.String(), w.match) {
		w.once.Do(w.hit)
	}
	return n, err
}
