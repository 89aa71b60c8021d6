// Command ax-guestrun runs Go packages' tests inside a lab guest booted on the
// Debian kernel, for the kernel features this host lacks (soft-dirty, vsock
// loopback, sch_plug, netem, clsact without tcx).
//
//	ax-guestrun -pkg github.com/axproject/ax/ax/dirty[:regexp] [-pkg …] [-timeout 10m]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/test/guestrun"
	"github.com/axproject/ax/test/image"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "ax-guestrun:", err)
		}
		os.Exit(1)
	}
}

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ax-guestrun", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var pkgs, env listFlag
	fs.Var(&pkgs, "pkg", "`import/path[:regexp]` whose tests run in the guest, with an optional -test.run regexp (repeatable; also as arguments)")
	fs.Var(&env, "env", "`KEY=VALUE` set in the guest besides the defaults (repeatable)")
	timeout := fs.Duration("timeout", guestrun.DefaultTimeout, "limit for the whole run: compile, image, boot, tests")
	tags := fs.String("tags", "", "comma-separated build tags for the test binaries")
	modules := fs.String("modules", strings.Join(guestrun.DefaultModules, ","), "comma-separated guest-kernel modules to load")
	ram := fs.Int("ram", guestrun.DefaultRAMMiB, "guest RAM in MiB")
	accel := fs.String("accel", "auto", "auto, kvm or tcg")
	short := fs.Bool("short", false, "pass -test.short to the test binaries")
	kernel := fs.String("kernel", "", "guest vmlinuz instead of Debian's cloud kernel (with -kernel-modules)")
	kmods := fs.String("kernel-modules", "", "the lib/modules/<version> directory of -kernel")
	verbose := fs.Bool("v", false, "log the runner's steps to stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pkgs = append(pkgs, fs.Args()...)
	if len(pkgs) == 0 {
		fs.Usage()
		return errors.New("no packages: give -pkg import/path[:regexp]")
	}
	cfg := guestrun.Config{
		Timeout: *timeout,
		RAMMiB:  *ram,
		Accel:   *accel,
		Output:  stdout,
		Env:     append(append([]string(nil), guestrun.DefaultEnv...), env...),
		Modules: splitList(*modules),
		Tags:    splitList(*tags),
		Image:   image.Config{Kernel: *kernel, Modules: *kmods},
	}
	if *short {
		cfg.TestArgs = append(cfg.TestArgs, "-test.short")
	}
	if *verbose {
		cfg.Log = slog.New(slog.NewTextHandler(stderr, nil))
	}
	for _, s := range pkgs {
		p, err := guestrun.ParsePackage(s)
		if err != nil {
			return err
		}
		cfg.Packages = append(cfg.Packages, p)
	}
	res, err := guestrun.Run(ctx, cfg)
	if res != nil && res.Image != "" { // a guest was started
		summary(stdout, res)
	}
	return err
}

func splitList(s string) []string {
	out := []string{}
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// summary prints one line per test binary and a closing line like the demo's.
func summary(w io.Writer, res *guestrun.Result) {
	fmt.Fprintln(w)
	failed := 0
	for _, t := range res.Tests {
		state := "ok  "
		switch {
		case t.ExitCode < 0:
			state, failed = "DIED", failed+1
		case !t.Passed():
			state, failed = "FAIL", failed+1
		}
		line := fmt.Sprintf("%s %s %.2fs", state, t.Package, t.Duration.Seconds())
		if len(t.Failed) > 0 {
			line += " failed: " + strings.Join(t.Failed, " ")
		}
		fmt.Fprintln(w, line)
	}
	for _, f := range res.KernelFaults {
		fmt.Fprintln(w, "kernel fault:", f)
	}
	for _, m := range res.Warnings {
		fmt.Fprintln(w, "guest warning:", m)
	}
	state := "ok"
	if !res.Passed() {
		state = "fail"
	}
	fmt.Fprintf(w, "guestrun=%s accel=%s kernel=%s binaries=%d failed=%d build_s=%.2f boot_s=%.2f total_s=%.2f\n",
		state, res.Accel, res.Kernel, len(res.Tests), failed, res.Build.Seconds(), res.Boot.Seconds(),
		res.Total.Round(10*time.Millisecond).Seconds())
}
