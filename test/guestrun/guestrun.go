// Package guestrun runs the project's Go tests inside a lab guest booted on the
// Debian kernel, whose features (soft-dirty, vsock loopback, sch_plug, …) the host kernel lacks.
//
// Run compiles each package's test binary on the host (static), packs the
// binaries into a guest image with a dedicated init, boots it under QEMU with
// the serial console on a pipe, and follows the console: every binary is
// framed by AXRUN-BEGIN and AXRUN-END lines carrying its exit code, and the
// guest ends with AXRUN-DONE before powering off. A guest kernel panic, a
// guest that stops early and a run past its timeout are errors that say what
// was running.
package guestrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/axproject/ax/test/image"
	"github.com/axproject/ax/test/lab"
)

// DefaultModules are the guest-kernel modules loaded before the tests run:
// the features the host kernel lacks and the tc pieces of the clsact fallback.
var DefaultModules = []string{
	"vsock_loopback", "vhost_vsock", "sch_plug", "sch_netem", "cls_bpf", "sch_ingress", "act_bpf",
	// The netbuffer tests open taps and bridge them to veths.
	"tun", "veth", "bridge",
}

// DefaultEnv makes the tests fail, not skip, when a feature the guest kernel
// is known to have, or root, is missing.
var DefaultEnv = []string{
	"AX_REQUIRE_FEATURES=soft-dirty,vsock-loopback,clsact",
	"AX_REQUIRE_PRIVILEGED=1",
}

// Defaults for Config's zero values.
const (
	DefaultTimeout = 10 * time.Minute
	DefaultRAMMiB  = 512
)

var (
	// ErrGuestPanic means the guest kernel panicked; the error names the
	// test binary that was running and quotes the panic line.
	ErrGuestPanic = errors.New("guest kernel panicked")
	// ErrTimeout means the run did not finish within Config.Timeout.
	ErrTimeout = errors.New("guest test run timed out")
	// ErrGuestExited means QEMU ended before the guest reported that every
	// test binary ran, without a kernel panic on the console.
	ErrGuestExited = errors.New("guest stopped before all tests ran")
	// ErrTestsFailed means at least one test binary exited non-zero.
	ErrTestsFailed = errors.New("guest tests failed")
	// ErrKernelFault means the guest kernel reported an Oops, BUG or
	// similar fault while the tests ran, but went on.
	ErrKernelFault = errors.New("guest kernel reported a fault")
)

// Package is one Go package whose tests run in the guest.
type Package struct {
	Path string // import path, e.g. github.com/axproject/ax/ax/dirty
	Run  string // -test.run regexp; empty runs every test
}

// ParsePackage reads "import/path[:regexp]". Import paths hold no colon, so
// the first colon starts the regexp.
func ParsePackage(s string) (Package, error) {
	path, run, _ := strings.Cut(s, ":")
	path = strings.TrimSpace(path)
	if path == "" {
		return Package{}, fmt.Errorf("package %q: empty import path (want import/path[:regexp])", s)
	}
	return Package{Path: path, Run: run}, nil
}

// Config says what runs in the guest and how.
type Config struct {
	Packages []Package
	// Tags are build tags for compiling the test binaries.
	Tags []string
	// TestArgs are extra flags for every test binary, e.g. -test.short.
	TestArgs []string
	// Modules are loaded (with their dependencies) before the tests; nil
	// means DefaultModules, an empty non-nil slice none.
	Modules []string
	// Env is set in the guest as KEY=VALUE; nil means DefaultEnv. AX_GUESTRUN=1,
	// PATH, HOME and TMPDIR are always set.
	Env []string
	// Timeout bounds the whole run: compiling, building the image, booting
	// and testing. Default DefaultTimeout.
	Timeout time.Duration
	// TestTimeout is each binary's -test.timeout, so a hung test dumps its
	// goroutines before the guest is killed. Default 9/10 of Timeout.
	TestTimeout time.Duration
	RAMMiB      int    // default DefaultRAMMiB
	CPUs        int    // default 1
	Accel       string // "", "auto", "kvm", "tcg"
	// Output receives the guest console live, line by line. Default: discarded.
	Output io.Writer
	// Image chooses the kernel (CacheDir, KernelPackage, Kernel, Modules,
	// Busybox); Run sets its Init, WantModules, Binaries and Files.
	Image image.Config
	// Go is the go command; default "go".
	Go  string
	Log *slog.Logger
}

// TestRun is one test binary's run in the guest.
type TestRun struct {
	Package  string        // import path
	Name     string        // binary name in the guest (without .test)
	ExitCode int           // -1 when it never ended
	Duration time.Duration // from its begin to its end marker, as seen on the host
	Failed   []string      // names from its "--- FAIL:" lines
}

// Passed reports whether the binary exited 0.
func (t TestRun) Passed() bool { return t.ExitCode == 0 }

// Result is what a run found. Run returns it even with an error, filled as
// far as the run got.
type Result struct {
	Accel  string
	Kernel string // guest uname -r
	Image  string // image key
	// Build is compiling and packing the image; Boot is from QEMU's start to
	// the first test binary; Total is the whole Run.
	Build, Boot, Total time.Duration
	Tests              []TestRun
	// KernelFaults are console lines where the guest kernel reported an
	// Oops, BUG, general protection fault, double fault or warning.
	KernelFaults []string
	// Warnings are the guest init's complaints (a module that did not load, …).
	Warnings []string
}

// Passed reports whether tests ran, every binary exited 0 and the kernel
// reported no fault.
func (r *Result) Passed() bool {
	if len(r.Tests) == 0 || len(r.KernelFaults) > 0 {
		return false
	}
	for _, t := range r.Tests {
		if !t.Passed() {
			return false
		}
	}
	return true
}

// Run compiles cfg.Packages' tests, boots a guest on the lab kernel and runs
// them there. Test failures give ErrTestsFailed; a guest panic ErrGuestPanic;
// the timeout ErrTimeout; QEMU ending early ErrGuestExited.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	start := time.Now()
	cfg, err := withDefaults(cfg)
	if err != nil {
		return nil, err
	}
	res := &Result{Accel: cfg.Accel}
	defer func() { res.Total = time.Since(start) }()
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.Timeout, ErrTimeout)
	defer cancel()

	work, err := os.MkdirTemp("", "ax-guestrun-")
	if err != nil {
		return res, fmt.Errorf("guestrun: %w", err)
	}
	defer os.RemoveAll(work)
	bins, err := compile(ctx, cfg, work)
	if err != nil {
		return res, stopped(ctx, cfg, "compiling the test binaries", err)
	}
	img, err := buildImage(ctx, cfg, bins)
	if err != nil {
		return res, stopped(ctx, cfg, "building the guest image", err)
	}
	res.Image = img.Key
	if !img.Cached {
		// Test images change with every edit of the code under test; keep
		// them out of the lab's cache once used.
		defer os.RemoveAll(filepath.Dir(img.Initrd))
	}
	res.Build = time.Since(start)
	cfg.Log.Info("guest image ready", "key", img.Key, "binaries", len(bins), "build", res.Build.Round(time.Millisecond))

	err = boot(ctx, cfg, img, bins, res)
	if err != nil {
		return res, err
	}
	var errs []error
	var failed []string
	for _, t := range res.Tests {
		if !t.Passed() {
			failed = append(failed, fmt.Sprintf("%s (exit %d)", t.Package, t.ExitCode))
		}
	}
	if len(failed) > 0 {
		errs = append(errs, fmt.Errorf("%w: %s", ErrTestsFailed, strings.Join(failed, ", ")))
	}
	if len(res.KernelFaults) > 0 {
		errs = append(errs, fmt.Errorf("%w: %s", ErrKernelFault, res.KernelFaults[0]))
	}
	return res, errors.Join(errs...)
}

// stopped explains an error of a step cut short by the timeout.
func stopped(ctx context.Context, cfg Config, step string, err error) error {
	if errors.Is(context.Cause(ctx), ErrTimeout) {
		return fmt.Errorf("%w after %s while %s", ErrTimeout, cfg.Timeout, step)
	}
	return err
}

func withDefaults(cfg Config) (Config, error) {
	if len(cfg.Packages) == 0 {
		return cfg, errors.New("guestrun: no packages to test")
	}
	if cfg.Modules == nil {
		cfg.Modules = DefaultModules
	}
	if cfg.Env == nil {
		cfg.Env = DefaultEnv
	}
	for _, kv := range cfg.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || !validEnvKey(k) {
			return cfg, fmt.Errorf("guestrun: env %q is not KEY=VALUE", kv)
		}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.TestTimeout <= 0 {
		cfg.TestTimeout = cfg.Timeout * 9 / 10
	}
	if cfg.RAMMiB <= 0 {
		cfg.RAMMiB = DefaultRAMMiB
	}
	if cfg.CPUs <= 0 {
		cfg.CPUs = 1
	}
	switch cfg.Accel {
	case "", "auto":
		cfg.Accel = lab.DetectAccel()
	case "kvm", "tcg":
	default:
		return cfg, fmt.Errorf("guestrun: accel %q: want auto, kvm or tcg", cfg.Accel)
	}
	if cfg.Output == nil {
		cfg.Output = io.Discard
	}
	if cfg.Go == "" {
		cfg.Go = "go"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Image.Log == nil {
		cfg.Image.Log = cfg.Log
	}
	return cfg, nil
}

func validEnvKey(k string) bool {
	if k == "" {
		return false
	}
	for i, c := range k {
		switch {
		case c == '_', c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
