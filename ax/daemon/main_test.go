package daemon

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/guard"
)

// hungAfter is when the package's tests are taken for hung: they take
// about a minute, and go test's own -timeout (40 min in make test) would
// print the stacks before the names of the tests that hang, which a CI
// log's tail then lacks.
const hungAfter = 10 * time.Minute

// guardEnv makes this test binary a guard process (axd's guard mode),
// for the tests that give axd a guard.
const guardEnv = "AX_DAEMON_TEST_GUARD"

// guestEnv makes this test binary stand for a guest's QEMU: it maps the
// RAM file named shared, as QEMU does, and waits to be killed.
const guestEnv = "AX_DAEMON_TEST_GUEST_RAM"

func TestMain(m *testing.M) {
	if os.Getenv(guardEnv) == "1" {
		os.Exit(guardMode(os.Args[1:]))
	}
	if ram := os.Getenv(guestEnv); ram != "" {
		os.Exit(guestMode(ram))
	}
	t := time.AfterFunc(hungAfter, func() {
		stacks := allStacks()
		fmt.Fprintf(os.Stderr, "ax/daemon tests hung: still running after %v; every goroutine:\n%s\n", hungAfter, stacks)
		fmt.Fprintf(os.Stderr, "ax/daemon tests hung after %v; where the tests' goroutines wait:\n%s", hungAfter, testFrames(stacks))
		os.Exit(2)
	})
	code := m.Run()
	t.Stop()
	os.Exit(code)
}

// testFrame is a frame of a goroutine's stack in a test file of this
// package, with the function above it.
var testFrame = regexp.MustCompile(`(?m)^(\S+)\(.*\)\n\s+(\S+_test\.go:\d+)`)

// testFrames summarises stacks: for each goroutine that runs test code,
// its header and the test frames, innermost first.
func testFrames(stacks string) string {
	var b strings.Builder
	for _, g := range strings.Split(stacks, "\n\n") {
		frames := testFrame.FindAllStringSubmatch(g, -1)
		if len(frames) == 0 {
			continue
		}
		header, _, _ := strings.Cut(g, "\n")
		fmt.Fprintf(&b, "%s\n", header)
		for _, f := range frames {
			fmt.Fprintf(&b, "    %s at %s\n", f[1], f[2])
		}
	}
	return b.String()
}

// A goroutine waiting in a test is found in a dump of the stacks.
func TestTestFrames(t *testing.T) {
	wait := make(chan struct{})
	started := make(chan struct{})
	go func() { close(started); <-wait }()
	<-started
	time.Sleep(10 * time.Millisecond) // for it to block on wait
	out := testFrames(allStacks())
	close(wait)
	if !strings.Contains(out, "TestTestFrames.func1") || !strings.Contains(out, "main_test.go:") {
		t.Fatalf("the waiting goroutine is not in the summary:\n%s", out)
	}
}

// guardMode runs a guard as axd does with --guard-pid and --guard-margin.
func guardMode(args []string) int {
	fs := flag.NewFlagSet("guard", flag.ContinueOnError)
	pid := fs.Int("guard-pid", 0, "")
	margin := fs.Duration("guard-margin", 50*time.Millisecond, "")
	if err := fs.Parse(args); err != nil || *pid <= 0 {
		return 2
	}
	if err := guard.Run(os.Stdin, *pid, *margin, guard.Dismissals(), slog.New(slog.NewTextHandler(os.Stderr, nil))); err != nil {
		return 1
	}
	return 0
}

// guestMode maps ram shared and waits to be killed.
func guestMode(ram string) int {
	f, err := os.OpenFile(ram, os.O_RDWR, 0)
	if err != nil {
		return 2
	}
	fi, err := f.Stat()
	if err != nil {
		return 2
	}
	if _, err := syscall.Mmap(int(f.Fd()), 0, int(fi.Size()), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED); err != nil {
		return 2
	}
	select {}
}
