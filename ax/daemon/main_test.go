package daemon

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// hungAfter is when the package's tests are taken for hung: they take
// about a minute, and go test's own -timeout (40 min in make test) would
// print the stacks before the names of the tests that hang, which a CI
// log's tail then lacks.
const hungAfter = 10 * time.Minute

func TestMain(m *testing.M) {
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
