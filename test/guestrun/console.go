package guestrun

import (
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// panicText starts the kernel's panic line.
const panicText = "Kernel panic - not syncing"

// faultLine matches a kernel message (printk timestamp first) that reports a
// fault the kernel survived.
var faultLine = regexp.MustCompile(`\[\s*\d+\.\d+\]\s+(Oops|BUG:|general protection fault|double fault|WARNING: CPU:)`)

// tailLines is how much console an error quotes.
const tailLines = 15

// console follows the guest's serial console: it forwards every line to out
// and turns the init's markers into res.
type console struct {
	out     io.Writer
	now     func() time.Time
	start   time.Time
	pkgs    map[string]string // binary name → import path
	res     *Result
	running int // index in res.Tests of the binary between its markers, or -1
	begun   time.Time
	done    bool
	panic   string
	tail    []string
}

func newConsole(out io.Writer, now func() time.Time, bins []binary, res *Result) *console {
	c := &console{out: out, now: now, start: now(), pkgs: map[string]string{}, res: res, running: -1}
	for _, b := range bins {
		c.pkgs[b.Name] = b.Package.Path
	}
	return c
}

// line takes one console line without its newline.
func (c *console) line(s string) {
	s = strings.TrimRight(s, "\r")
	fmt.Fprintln(c.out, s)
	if len(c.tail) == tailLines {
		c.tail = append(c.tail[:0], c.tail[1:]...)
	}
	c.tail = append(c.tail, s)

	if i := strings.Index(s, panicText); i >= 0 && c.panic == "" {
		c.panic = s[i:]
	}
	if faultLine.MatchString(s) {
		c.res.KernelFaults = append(c.res.KernelFaults, strings.TrimSpace(s))
	}
	if c.running >= 0 {
		if rest, ok := strings.CutPrefix(s, "--- FAIL: "); ok {
			if name := strings.Fields(rest); len(name) > 0 {
				t := &c.res.Tests[c.running]
				t.Failed = append(t.Failed, name[0])
			}
		}
	}
	i := strings.Index(s, "AXRUN-")
	if i < 0 {
		return
	}
	f := strings.Fields(s[i:])
	switch {
	case f[0] == markKernel && i == 0 && len(f) == 2:
		c.res.Kernel = f[1]
	case f[0] == markWarn && i == 0:
		c.res.Warnings = append(c.res.Warnings, strings.TrimSpace(strings.TrimPrefix(s, markWarn)))
	case f[0] == markBegin && len(f) == 2 && c.running < 0 && c.pkgs[f[1]] != "" && !c.ran(f[1]):
		c.begun = c.now()
		if len(c.res.Tests) == 0 {
			c.res.Boot = c.begun.Sub(c.start)
		}
		c.res.Tests = append(c.res.Tests, TestRun{Package: c.pkgs[f[1]], Name: f[1], ExitCode: -1})
		c.running = len(c.res.Tests) - 1
	case f[0] == markEnd && len(f) == 3 && c.running >= 0 && f[1] == c.res.Tests[c.running].Name:
		code, err := strconv.Atoi(f[2])
		if err != nil {
			return
		}
		t := &c.res.Tests[c.running]
		t.ExitCode, t.Duration = code, c.now().Sub(c.begun)
		c.running = -1
	case f[0] == markDone && len(f) == 1 && c.running < 0:
		c.done = true
	}
}

func (c *console) ran(name string) bool {
	for _, t := range c.res.Tests {
		if t.Name == name {
			return true
		}
	}
	return false
}

// ended closes the binary still running when the console stopped.
func (c *console) ended() {
	if c.running >= 0 {
		c.res.Tests[c.running].Duration = c.now().Sub(c.begun)
	}
}

// doing says what the guest was doing, for errors.
func (c *console) doing() string {
	switch {
	case c.running >= 0:
		t := c.res.Tests[c.running]
		return fmt.Sprintf("while running the tests of %s (%s.test)", t.Package, t.Name)
	case len(c.res.Tests) == 0:
		return "while the guest booted"
	default:
		t := c.res.Tests[len(c.res.Tests)-1]
		return fmt.Sprintf("after the tests of %s (%s.test) ended", t.Package, t.Name)
	}
}

// notRun lists the binaries that never began.
func (c *console) notRun(bins []binary) []string {
	var out []string
	for _, b := range bins {
		if !c.ran(b.Name) {
			out = append(out, b.Package.Path)
		}
	}
	return out
}

func (c *console) consoleTail() string {
	if len(c.tail) == 0 {
		return "the console stayed empty"
	}
	return "console ends:\n  " + strings.Join(c.tail, "\n  ")
}
