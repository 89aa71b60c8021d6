package guestrun

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/axproject/ax/test/image"
	"github.com/axproject/ax/test/lab"
)

// kernelArgs: the console on the serial port the host reads, and a panic
// reboots at once, which -no-reboot turns into QEMU's exit.
const kernelArgs = "console=ttyS0 panic=-1 quiet"

// poweroffGrace is how long QEMU may take to exit after AXRUN-DONE.
const poweroffGrace = 10 * time.Second

// qemuArgs is the test guest's command line: no network, no disk, the serial
// console on QEMU's stdout.
func qemuArgs(cfg Config, img *image.Image) []string {
	args := []string{
		"-name", "ax-guestrun",
		"-machine", "pc,accel=" + cfg.Accel,
		"-m", strconv.Itoa(cfg.RAMMiB) + "M",
		"-smp", strconv.Itoa(cfg.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", kernelArgs,
		"-serial", "stdio",
	}
	if cfg.Accel == "kvm" {
		args = append(args, "-cpu", "host")
	} else {
		// TCG's richest CPU, RDRAND included, so the guest's random pool
		// is ready at once for tests using crypto/rand.
		args = append(args, "-cpu", "max")
	}
	return args
}

// boot runs the guest and follows its console into res until QEMU exits.
func boot(ctx context.Context, cfg Config, img *image.Image, bins []binary, res *Result) error {
	cmd := exec.Command(lab.QEMUBinary, qemuArgs(cfg, img)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("start %s: %w", lab.QEMUBinary, err)
	}
	stderr := &lastBytes{max: 4096}
	cmd.Stderr = stderr
	// QEMU dies with this process, even if it is killed, but a terminal's
	// Ctrl-C reaches only this process, which then ends QEMU itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w (try: make deps, or apt-get install qemu-system-x86)", lab.QEMUBinary, err)
	}
	cfg.Log.Info("guest started", "pid", cmd.Process.Pid, "accel", cfg.Accel, "ram_mib", cfg.RAMMiB)
	c := newConsole(cfg.Output, time.Now, bins, res)

	// The watcher kills QEMU (by its PID) when the run is cancelled or
	// times out, or when it lingers after the guest said it was done.
	exited := make(chan struct{})
	guestDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		var grace <-chan time.Time
		for {
			select {
			case <-exited:
				return
			case <-ctx.Done():
				cmd.Process.Kill()
				return
			case <-guestDone:
				guestDone = nil
				grace = time.After(poweroffGrace)
			case <-grace:
				cfg.Log.Warn("guest did not power off; killing QEMU", "pid", cmd.Process.Pid)
				cmd.Process.Kill()
				return
			}
		}
	})

	r := bufio.NewReaderSize(stdout, 64<<10)
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			wasDone := c.done
			c.line(strings.TrimSuffix(line, "\n"))
			if c.done && !wasDone {
				close(guestDone)
			}
		}
		if err != nil {
			break
		}
	}
	waitErr := cmd.Wait()
	close(exited)
	wg.Wait()
	c.ended()

	return verdict(ctx, cfg, c, bins, waitErr, stderr.String())
}

// verdict turns how the guest ended into Run's error: a panic first, then a
// complete run, then the timeout or cancellation, else an early exit.
func verdict(ctx context.Context, cfg Config, c *console, bins []binary, waitErr error, stderr string) error {
	switch {
	case c.panic != "":
		return fmt.Errorf("%w %s: %s%s", ErrGuestPanic, c.doing(), c.panic, neverStarted(c, bins))
	case c.done:
		if len(c.notRun(bins)) > 0 {
			return fmt.Errorf("%w after AXRUN-DONE%s; %s", ErrGuestExited, neverStarted(c, bins), c.consoleTail())
		}
		return nil
	case errors.Is(context.Cause(ctx), ErrTimeout):
		return fmt.Errorf("%w after %s %s%s; %s", ErrTimeout, cfg.Timeout, c.doing(), neverStarted(c, bins), c.consoleTail())
	case ctx.Err() != nil:
		return fmt.Errorf("guest test run stopped %s%s: %w", c.doing(), neverStarted(c, bins), context.Cause(ctx))
	default:
		why := "QEMU exited"
		if waitErr != nil {
			why = "QEMU: " + waitErr.Error()
		}
		if s := strings.TrimSpace(stderr); s != "" {
			why += ": " + s
		}
		return fmt.Errorf("%w %s (%s)%s; %s", ErrGuestExited, c.doing(), why, neverStarted(c, bins), c.consoleTail())
	}
}

// neverStarted names, for an error, the packages whose tests never began.
func neverStarted(c *console, bins []binary) string {
	missing := c.notRun(bins)
	if len(missing) == 0 {
		return ""
	}
	return "; never started: " + strings.Join(missing, ", ")
}

// lastBytes keeps the last max bytes written to it: QEMU's stderr, for errors.
type lastBytes struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (l *lastBytes) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	if len(l.buf) > l.max {
		l.buf = append(l.buf[:0], l.buf[len(l.buf)-l.max:]...)
	}
	return len(p), nil
}

func (l *lastBytes) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.buf)
}
