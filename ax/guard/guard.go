// Package guard is the process that stops a primary's guest when axd can no
// longer: started by axd for each protected VM, it outlives axd (a crash,
// a kill), and knows the moment from which the partner could run the VM —
// axd tells it after every tick of its failure detector. If that moment
// comes near and axd has not pushed it further, the guard stops QEMU
// (SIGSTOP: no QMP connection needed, nothing the hung axd holds) and checks
// that it is stopped, so that when the witness hands the VM's lease to the
// partner the old copy no longer runs.
//
// axd talks to its guard over the guard's standard input, one line at a
// time: "arm NS" (stop the guest by CLOCK_MONOTONIC nanoseconds NS, less
// the margin, unless armed again later), "disarm" (nothing to enforce: a
// planned failover pauses the guest itself), "leave NS" and "exit". When
// axd's end of the pipe closes without "exit" (axd died), an armed guard
// stops the guest at once, without waiting for the deadline: with axd gone,
// nothing the guest does from then on is replicated — at HA its disk writes
// complete on the local disk alone (axd served the partner's quorum child),
// at FT no checkpoint covers it — and the partner may resume the VM from
// before them. An axd that comes back finds the guest stopped and resumes it
// if no one took the VM over. A disarmed guard just exits.
//
// "leave NS" is a planned restart of axd: the partner was told it and will
// not take the VM over before NS (its own count of the same grace ends
// later), the guest runs on with its output held. The guard then outlives
// axd armed for NS: the restarted axd dismisses it (SIGUSR1, see Dismiss)
// once its own guard holds the guest; if none does in time, the guard stops
// the guest before the partner may take over.
package guard

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Monotonic returns CLOCK_MONOTONIC now, the clock axd and its guards share.
func Monotonic() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(err) // CLOCK_MONOTONIC exists on every Linux
	}
	return time.Duration(ts.Nano())
}

// Stopped reports whether process pid is stopped by a signal (its state in
// /proc is T): its vCPUs do not run.
func Stopped(pid int) (bool, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false, err
	}
	// pid (comm) state ...: comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false, fmt.Errorf("guard: cannot parse /proc/%d/stat", pid)
	}
	return s[i+2] == 'T', nil
}

// Stop stops process pid with SIGSTOP and checks it is stopped.
func Stop(pid int) error {
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("SIGSTOP %d: %w", pid, err)
	}
	// The state changes once the kernel delivered the signal.
	for range 100 {
		if st, err := Stopped(pid); err != nil {
			return err
		} else if st {
			return nil
		}
		time.Sleep(time.Millisecond)
	}
	return fmt.Errorf("process %d is not stopped after SIGSTOP", pid)
}

// Run is the guard of process pid: it reads axd's lines from r and stops
// pid once an armed deadline, less margin, has passed. It returns when told
// to exit, when r ends and nothing is armed, when dismissed is closed (a
// restarted axd guards the guest now), or once it stopped the guest (or the
// guest's process is gone).
func Run(r io.Reader, pid int, margin time.Duration, dismissed <-chan struct{}, log *slog.Logger) error {
	type line struct {
		text string
		err  error
	}
	lines := make(chan line)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lines <- line{text: sc.Text()}
		}
		err := sc.Err()
		if err == nil {
			err = io.EOF
		}
		lines <- line{err: err}
	}()
	var deadline time.Duration // CLOCK_MONOTONIC; 0: disarmed
	axdGone, leaving := false, false
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	arm := func() {
		timer.Stop()
		if deadline > 0 {
			timer.Reset(max(deadline-margin-Monotonic(), 0))
		}
	}
	for {
		select {
		case <-dismissed:
			log.Info("guard: dismissed: a restarted axd guards the guest now", "pid", pid)
			return nil
		case l := <-lines:
			if l.err != nil {
				axdGone = true
				if deadline == 0 {
					return nil
				}
				if leaving {
					log.Info("guard: axd restarts; holding the guest until it is back", "pid", pid,
						"stop_in", (deadline - margin - Monotonic()).String())
					lines = nil
					continue
				}
				log.Warn("guard: axd is gone; stopping the guest now (what it does unreplicated could be undone by a takeover)", "pid", pid,
					"deadline_in", (deadline - margin - Monotonic()).String())
				lines = nil            // nothing more comes
				deadline = Monotonic() // due now
				timer.Stop()
				timer.Reset(0)
				continue
			}
			switch f := strings.Fields(l.text); {
			case len(f) == 2 && f[0] == "arm":
				ns, err := strconv.ParseInt(f[1], 10, 64)
				if err != nil || ns <= 0 {
					return fmt.Errorf("guard: bad line %q", l.text)
				}
				deadline = time.Duration(ns)
				arm()
			case len(f) == 2 && f[0] == "leave":
				ns, err := strconv.ParseInt(f[1], 10, 64)
				if err != nil || ns <= 0 {
					return fmt.Errorf("guard: bad line %q", l.text)
				}
				deadline, leaving = time.Duration(ns), true
				arm()
			case len(f) == 1 && f[0] == "disarm":
				deadline, leaving = 0, false
				arm()
			case len(f) == 1 && f[0] == "exit":
				return nil
			default:
				return fmt.Errorf("guard: bad line %q", l.text)
			}
		case <-timer.C:
			if deadline == 0 {
				continue
			}
			if now := Monotonic(); now < deadline-margin {
				arm() // re-armed meanwhile
				continue
			}
			err := Stop(pid)
			if errors.Is(err, syscall.ESRCH) {
				return nil // no guest left to stop
			}
			if err != nil {
				log.Error("guard: stopping the guest failed; retrying", "pid", pid, "err", err)
				timer.Reset(5 * time.Millisecond)
				continue
			}
			why := "axd did not renew its lease in time"
			switch {
			case leaving:
				why = "axd did not come back from its restart in time"
			case axdGone:
				why = "axd is gone"
			}
			log.Warn("guard: guest stopped (SIGSTOP): "+why, "pid", pid)
			return nil
		}
	}
}

// Handle is axd's end of a guard process.
type Handle struct {
	cmd *exec.Cmd
	pid int
	w   io.WriteCloser
	err error // the first write error
}

// Start starts a guard for process pid: exe run with args (axd's own
// binary, in guard mode). The guard gets its own process group, so that
// signals to axd's do not reach it, and writes its log to logPath.
func Start(exe string, args []string, logPath string) (*Handle, error) {
	cmd := exec.Command(exe, args...)
	w, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("guard: %w", err)
	}
	return &Handle{cmd: cmd, w: w, pid: cmd.Process.Pid}, nil
}

// PID is the guard's process ID.
func (h *Handle) PID() int { return h.pid }

func (h *Handle) send(line string) error {
	if h.err != nil {
		return h.err
	}
	if _, err := io.WriteString(h.w, line+"\n"); err != nil {
		h.err = fmt.Errorf("guard %d: %w", h.PID(), err)
	}
	return h.err
}

// Arm tells the guard to stop the guest by deadline (CLOCK_MONOTONIC).
func (h *Handle) Arm(deadline time.Duration) error {
	return h.send("arm " + strconv.FormatInt(int64(deadline), 10))
}

// Disarm tells the guard there is nothing to enforce for now.
func (h *Handle) Disarm() error { return h.send("disarm") }

// Leave hands the guest to the guard across axd's restart: it stops the
// guest by deadline (CLOCK_MONOTONIC) unless a restarted axd dismisses it
// first. The guard is left running; Leave closes axd's end.
func (h *Handle) Leave(deadline time.Duration) error {
	err := h.send("leave " + strconv.FormatInt(int64(deadline), 10))
	h.w.Close()
	// Reaped by no one: the guard is in its own process group and outlives
	// axd; init inherits it.
	h.cmd.Process.Release()
	return err
}

// Dismissals is closed when this process gets SIGUSR1 (Dismiss): what a
// guard process passes Run as dismissed.
func Dismissals() <-chan struct{} {
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	dismissed := make(chan struct{})
	go func() { <-usr1; close(dismissed) }()
	return dismissed
}

// Dismiss tells the guard pid of the guest guestPID, left by an earlier axd,
// that this axd guards the guest now: it exits without stopping it. A pid
// that is not such a guard (gone, reused) is left alone and reported.
func Dismiss(pid, guestPID int) error {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return fmt.Errorf("guard %d: %w", pid, err)
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	ours := false
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "--guard-pid" && args[i+1] == strconv.Itoa(guestPID) {
			ours = true
		}
	}
	if !ours {
		return fmt.Errorf("process %d is not the guard of process %d", pid, guestPID)
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		return fmt.Errorf("guard %d: %w", pid, err)
	}
	return nil
}

// Close tells the guard to exit and waits for it.
func (h *Handle) Close() error {
	h.send("exit")
	h.w.Close()
	err := h.cmd.Wait()
	if h.err != nil && err == nil {
		err = h.err
	}
	return err
}
