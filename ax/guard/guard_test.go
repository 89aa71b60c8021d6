package guard

import (
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A child process of this test binary run in guard mode (see TestMain).
const helperEnv = "AX_GUARD_TEST_PID"

func TestMain(m *testing.M) {
	if s := os.Getenv(helperEnv); s != "" {
		pid, _ := strconv.Atoi(s)
		if err := Run(os.Stdin, pid, 20*time.Millisecond, Dismissals(), slog.New(slog.NewTextHandler(os.Stderr, nil))); err != nil {
			os.Exit(2)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// guest starts a process standing for QEMU; it is killed at the end.
func guest(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd.Process.Pid
}

func stopped(t *testing.T, pid int) bool {
	t.Helper()
	st, err := Stopped(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// run starts Run on a pipe and returns its writing end and Run's result.
func run(t *testing.T, pid int, margin time.Duration) (io.WriteCloser, <-chan error) {
	t.Helper()
	r, w := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- Run(r, pid, margin, nil, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() { w.Close() })
	return w, done
}

func say(t *testing.T, w io.Writer, line string) {
	t.Helper()
	if _, err := io.WriteString(w, line+"\n"); err != nil {
		t.Fatal(err)
	}
}

func arm(in time.Duration) string {
	return "arm " + strconv.FormatInt(int64(Monotonic()+in), 10)
}

// Armed and not renewed: the guest is stopped, and verified so.
func TestGuardStopsWhenNotRenewed(t *testing.T) {
	pid := guest(t)
	w, done := run(t, pid, 50*time.Millisecond)
	say(t, w, arm(150*time.Millisecond))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !stopped(t, pid) {
		t.Fatal("the guard returned and the guest runs")
	}
}

// Renewed in time, it never stops the guest; exit ends it.
func TestGuardRenewedNeverStops(t *testing.T) {
	pid := guest(t)
	w, done := run(t, pid, 50*time.Millisecond)
	for range 20 {
		say(t, w, arm(150*time.Millisecond))
		time.Sleep(20 * time.Millisecond)
	}
	say(t, w, "exit")
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if stopped(t, pid) {
		t.Fatal("the guest was stopped although renewed")
	}
}

// axd gone while armed: the guest is stopped at once, well before the
// deadline (what it would do unreplicated could be undone by a takeover).
// Gone while disarmed (a planned failover): the guard just ends.
func TestGuardAfterAxdIsGone(t *testing.T) {
	t.Run("armed", func(t *testing.T) {
		pid := guest(t)
		w, done := run(t, pid, 50*time.Millisecond)
		say(t, w, arm(time.Hour))
		w.Close()
		select {
		case err := <-done:
			if err != nil || !stopped(t, pid) {
				t.Fatalf("guard of a gone axd: %v, stopped %v", err, stopped(t, pid))
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the guard of a gone axd waits for its deadline (an hour away) instead of stopping the guest")
		}
	})
	t.Run("disarmed", func(t *testing.T) {
		pid := guest(t)
		w, done := run(t, pid, 50*time.Millisecond)
		say(t, w, arm(100*time.Millisecond))
		say(t, w, "disarm")
		w.Close()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		time.Sleep(150 * time.Millisecond)
		if stopped(t, pid) {
			t.Fatal("a disarmed guard stopped the guest")
		}
	})
}

func TestGuardRefusesBadLines(t *testing.T) {
	for _, line := range []string{"arm", "arm x", "arm -5", "arm 1 2", "stop", "", "leave", "leave -1"} {
		pid := guest(t)
		w, done := run(t, pid, time.Millisecond)
		say(t, w, line)
		if err := <-done; err == nil || !strings.Contains(err.Error(), "bad line") {
			t.Errorf("line %q: %v", line, err)
		}
		if stopped(t, pid) {
			t.Errorf("line %q stopped the guest", line)
		}
	}
}

// The guest's process is gone: nothing to stop, the guard ends.
func TestGuardGuestGone(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	w, done := run(t, cmd.Process.Pid, time.Millisecond)
	say(t, w, arm(0))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A guard process (this binary in guard mode) survives its parent's end of
// the pipe closing, enforces its deadline, and Close of a live one is clean.
func TestGuardProcess(t *testing.T) {
	pid := guest(t)
	t.Setenv(helperEnv, strconv.Itoa(pid))
	logPath := t.TempDir() + "/guard.log"
	h, err := Start(os.Args[0], nil, logPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Arm(Monotonic() + time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if stopped(t, pid) {
		t.Fatal("a guard told to exit stopped the guest")
	}

	h, err = Start(os.Args[0], nil, logPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Arm(Monotonic() + 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	h.w.Close() // axd died: its end of the pipe closes
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("guard: %v", err)
	}
	if !stopped(t, pid) {
		log, _ := os.ReadFile(logPath)
		t.Fatalf("the guard of a dead axd did not stop the guest:\n%s", log)
	}
	syscall.Kill(pid, syscall.SIGCONT)
}

// A planned restart: the guard left by axd holds the guest running until
// its deadline and stops it then — unless a restarted axd dismisses it.
func TestGuardLeave(t *testing.T) {
	t.Run("not back in time", func(t *testing.T) {
		pid := guest(t)
		w, done := run(t, pid, 20*time.Millisecond)
		say(t, w, "leave "+strconv.FormatInt(int64(Monotonic()+300*time.Millisecond), 10))
		w.Close()
		time.Sleep(100 * time.Millisecond)
		if stopped(t, pid) {
			t.Fatal("the guard stopped the guest at once although axd left on purpose")
		}
		select {
		case err := <-done:
			if err != nil || !stopped(t, pid) {
				t.Fatalf("guard after the restart grace: %v, stopped %v", err, stopped(t, pid))
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the guard did not stop the guest at the end of the restart grace")
		}
	})
	t.Run("dismissed", func(t *testing.T) {
		pid := guest(t)
		r, w := io.Pipe()
		dismissed := make(chan struct{})
		done := make(chan error, 1)
		go func() { done <- Run(r, pid, 20*time.Millisecond, dismissed, slog.New(slog.DiscardHandler)) }()
		say(t, w, "leave "+strconv.FormatInt(int64(Monotonic()+300*time.Millisecond), 10))
		w.Close()
		close(dismissed)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		time.Sleep(400 * time.Millisecond)
		if stopped(t, pid) {
			t.Fatal("a dismissed guard stopped the guest")
		}
	})
}

// Leave lets the guard process outlive axd's end of the pipe; Dismiss ends
// it without a stop, and refuses a process that is not that guest's guard.
func TestGuardProcessLeaveDismiss(t *testing.T) {
	pid := guest(t)
	t.Setenv(helperEnv, strconv.Itoa(pid))
	h, err := Start(os.Args[0], []string{"--guard-pid", strconv.Itoa(pid)}, t.TempDir()+"/guard.log")
	if err != nil {
		t.Fatal(err)
	}
	gpid := h.PID()
	proc, _ := os.FindProcess(gpid)
	waited := make(chan struct{})
	go func() { proc.Wait(); close(waited) }()
	if err := h.Leave(Monotonic() + time.Hour); err != nil {
		t.Fatal(err)
	}
	select {
	case <-waited:
		t.Fatal("the guard ended when axd left")
	case <-time.After(200 * time.Millisecond):
	}
	if err := Dismiss(gpid, pid+1); err == nil {
		t.Fatal("Dismiss accepted a guard of another guest")
	}
	if err := Dismiss(os.Getpid(), pid); err == nil {
		t.Fatal("Dismiss accepted a process that is no guard")
	}
	if err := Dismiss(gpid, pid); err != nil {
		t.Fatal(err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("a dismissed guard did not end")
	}
	if stopped(t, pid) {
		t.Fatal("a dismissed guard stopped the guest")
	}
}
