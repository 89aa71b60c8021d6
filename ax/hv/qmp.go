package hv

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
)

// QMP drives QEMU processes over their QMP unix sockets: the socket is the
// one the guest description names (api.QEMU), and Start runs QEMU with the
// command line qemu.Guest.Args builds for it. The zero value is ready to
// use.
type QMP struct {
	// Binary is the emulator Start runs (default qemu.Binary).
	Binary string
	// DialTimeout bounds Control when its context has no deadline
	// (default 2 s).
	DialTimeout time.Duration
	// KillTimeout bounds how long a Process's Kill waits for QEMU to go
	// (default 5 s).
	KillTimeout time.Duration
}

var _ Driver = (*QMP)(nil)

// Domain returns the QEMU that g describes.
func (q *QMP) Domain(g api.Guest) Domain { return &qmpDomain{drv: q, g: g} }

type qmpDomain struct {
	drv *QMP
	g   api.Guest
}

func (d *qmpDomain) Name() string { return d.g.Name }

// Control dials the QMP socket and completes the QMP greeting within ctx.
// QEMU serves one client per QMP socket: a second one is greeted only once
// the first has gone, so the greeting is bounded too, not only the dial.
func (d *qmpDomain) Control(ctx context.Context) (Control, error) {
	if d.g.QMP == "" {
		return nil, fmt.Errorf("VM %s has no QMP socket in its spec", d.g.Name)
	}
	if _, ok := ctx.Deadline(); !ok {
		timeout := d.drv.DialTimeout
		if timeout <= 0 {
			timeout = 2 * time.Second
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	dl, _ := ctx.Deadline()
	timeout := time.Until(dl)
	if err := ctx.Err(); err != nil || timeout <= 0 {
		return nil, fmt.Errorf("qmp %s: %w", d.g.QMP, context.DeadlineExceeded)
	}
	sock, err := qmp.NewSocketMonitor("unix", d.g.QMP, timeout)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist) {
			// No QEMU listens there: it ended.
			return nil, fmt.Errorf("qmp %s: %w (%w)", d.g.QMP, err, ErrNotRunning)
		}
		return nil, fmt.Errorf("qmp %s: %w", d.g.QMP, err)
	}
	// Disconnect closes the connection, which ends a greeting still awaited.
	stop := context.AfterFunc(ctx, func() { sock.Disconnect() })
	mon, err := qemu.New(sock)
	if !stop() {
		if err == nil {
			mon.Close()
		}
		return nil, fmt.Errorf("qmp %s: no greeting from QEMU (is another client connected?): %w", d.g.QMP, ctx.Err())
	}
	if err != nil {
		sock.Disconnect()
		return nil, fmt.Errorf("qmp %s: %w", d.g.QMP, err)
	}
	return mon, nil
}

// Start runs QEMU in its own session, so that it outlives axd.
func (d *qmpDomain) Start(ctx context.Context, logPath string) (Process, error) {
	return d.start(ctx, qemu.GuestFor(d.g), logPath)
}

// StartIncoming runs QEMU with -incoming defer.
func (d *qmpDomain) StartIncoming(ctx context.Context, logPath string) (Process, error) {
	g := qemu.GuestFor(d.g)
	g.Incoming = true
	return d.start(ctx, g, logPath)
}

func (d *qmpDomain) start(ctx context.Context, g qemu.Guest, logPath string) (Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	bin := d.drv.Binary
	if bin == "" {
		bin = qemu.Binary
	}
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("QEMU log of %s: %w", g.Name, err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, g.Args()...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s for %s: %w", bin, g.Name, err)
	}
	timeout := d.drv.KillTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	p := &process{cmd: cmd, done: make(chan struct{}), killTimeout: timeout}
	// The process is reaped as soon as it ends; Done and Kill watch that.
	// This goroutine ends with QEMU (with axd if QEMU outlives it).
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (d *qmpDomain) PlugTap(ctx context.Context, bridge string) error {
	return PlugTap(ctx, d.g.Tap, bridge)
}

// process is a QEMU that Start ran.
type process struct {
	cmd         *exec.Cmd
	done        chan struct{}
	killTimeout time.Duration

	once   sync.Once
	sigErr error
}

func (p *process) PID() int              { return p.cmd.Process.Pid }
func (p *process) Done() <-chan struct{} { return p.done }

// Kill signals once; every call waits for the process to be gone.
func (p *process) Kill() error {
	p.once.Do(func() {
		select {
		case <-p.done:
			return
		default:
		}
		if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
			p.sigErr = fmt.Errorf("kill QEMU pid %d: %w", p.PID(), err)
		}
	})
	if p.sigErr != nil {
		return p.sigErr
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(p.killTimeout):
		// A process in uninterruptible sleep (D state) outlasts SIGKILL.
		return fmt.Errorf("QEMU pid %d still there %s after SIGKILL (see /proc/%d/status)", p.PID(), p.killTimeout, p.PID())
	}
}
