// Package hvtest is a recording fake of the hypervisor seam (ax/hv) for
// unit tests: it remembers what was asked, in order, and answers as told.
package hvtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/qemu"
)

// Op names one thing the fake can be asked; Fail makes it fail.
type Op string

const (
	OpDial     Op = "dial"     // Domain.Control
	OpStart    Op = "start"    // Domain.Start and Domain.StartIncoming
	OpPlug     Op = "plug"     // Domain.PlugTap
	OpKill     Op = "kill"     // Process.Kill
	OpStop     Op = "stop"     // Monitor.Stop
	OpCont     Op = "cont"     // Monitor.Cont
	OpStatus   Op = "status"   // Monitor.Status
	OpSave     Op = "save"     // Monitor.SaveDeviceState
	OpLoad     Op = "load"     // Monitor.LoadIncoming
	OpAnnounce Op = "announce" // Monitor.Announce
	OpReset    Op = "reset"    // Monitor.Reset
	OpQuit     Op = "quit"     // Monitor.Quit
	OpClose    Op = "close"    // Monitor.Close
	OpBlock    Op = "block"    // every block operation
)

// Fake is a hv.Driver that records every call as "VM op [args]" and keeps
// a run state per VM: "running" once dialed (a VM axd did not start runs),
// "inmigrate" after StartIncoming, "paused" after a load or stop,
// "running" after cont. Safe for concurrent use.
type Fake struct {
	mu      sync.Mutex
	calls   []string
	fail    map[Op]error
	pinned  map[string]string // VM → what Status answers regardless
	state   map[string]string
	started map[string]Launch
	loaded  map[string][]byte
	pid     int
	noPIDs  bool
	// opened counts the controls ever opened; those opened before severed
	// fail every call (Sever).
	opened, severed int
}

var _ hv.Driver = (*Fake)(nil)

// New returns a fake where everything succeeds.
func New() *Fake {
	return &Fake{fail: map[Op]error{}, pinned: map[string]string{}, state: map[string]string{},
		started: map[string]Launch{}, loaded: map[string][]byte{}, pid: 4000}
}

// NoPIDs makes the processes started from now on answer pid 0, as a
// process whose pid is not known: for tests of axd where the pid would be
// looked up in /proc (the dirty tracker of a promoted VM protected again).
func (f *Fake) NoPIDs() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noPIDs = true
}

// Fail makes every later op fail with err (recorded all the same); a nil
// err makes it succeed again.
func (f *Fake) Fail(op Op, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, op)
		return
	}
	f.fail[op] = err
}

// SetStatus pins what Status answers for vm ("" unpins: the state follows
// the commands again).
func (f *Fake) SetStatus(vm, status string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if status == "" {
		delete(f.pinned, vm)
		return
	}
	f.pinned[vm] = status
}

// Calls returns what was asked so far, in order.
func (f *Fake) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// Reset forgets the calls recorded so far.
func (f *Fake) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = nil
}

// State is vm's run state as the commands left it.
func (f *Fake) State(vm string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state[vm]
}

// Launch is how the fake was asked to start a VM.
type Launch struct {
	api.Guest
	// Incoming: by StartIncoming, to resume a replica.
	Incoming bool
}

// Started returns how vm was last started.
func (f *Fake) Started(vm string) (Launch, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g, ok := f.started[vm]
	return g, ok
}

// Loaded returns the device state fed to vm by its last load.
func (f *Fake) Loaded(vm string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.loaded[vm]
}

// record notes a call and returns the error it was told to give.
func (f *Fake) record(vm string, op Op, args ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, strings.Join(append([]string{vm, string(op)}, args...), " "))
	if err := f.fail[op]; err != nil {
		return fmt.Errorf("fake %s of %s: %w", op, vm, err)
	}
	return nil
}

func (f *Fake) setState(vm, st string) {
	f.mu.Lock()
	f.state[vm] = st
	f.mu.Unlock()
}

// Domain returns the fake's VM named by g.
func (f *Fake) Domain(g api.Guest) hv.Domain { return &domain{f: f, g: g} }

type domain struct {
	f *Fake
	g api.Guest
}

func (d *domain) Name() string { return d.g.Name }

func (d *domain) Control(ctx context.Context) (hv.Control, error) {
	if err := d.f.record(d.g.Name, OpDial); err != nil {
		return nil, err
	}
	d.f.mu.Lock()
	if d.f.state[d.g.Name] == "" {
		d.f.state[d.g.Name] = "running"
	}
	d.f.mu.Unlock()
	d.f.mu.Lock()
	d.f.opened++
	n := d.f.opened
	d.f.mu.Unlock()
	return &control{f: d.f, vm: d.g.Name, n: n}, nil
}

func (d *domain) Start(ctx context.Context, logPath string) (hv.Process, error) {
	return d.start(false)
}

func (d *domain) StartIncoming(ctx context.Context, logPath string) (hv.Process, error) {
	return d.start(true)
}

func (d *domain) start(incoming bool) (hv.Process, error) {
	if err := d.f.record(d.g.Name, OpStart); err != nil {
		return nil, err
	}
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	d.f.started[d.g.Name] = Launch{Guest: d.g, Incoming: incoming}
	d.f.state[d.g.Name] = "running"
	if incoming {
		d.f.state[d.g.Name] = "inmigrate"
	}
	d.f.pid++
	pid := d.f.pid
	if d.f.noPIDs {
		pid = 0
	}
	return &process{f: d.f, vm: d.g.Name, pid: pid, done: make(chan struct{})}, nil
}

func (d *domain) PlugTap(ctx context.Context, bridge string) error {
	if d.g.Tap == "" {
		return nil
	}
	return d.f.record(d.g.Name, OpPlug, d.g.Tap, bridge)
}

// process is a started fake VM; Kill ends it once.
type process struct {
	f    *Fake
	vm   string
	pid  int
	once sync.Once
	done chan struct{}
	err  error
}

func (p *process) PID() int              { return p.pid }
func (p *process) Done() <-chan struct{} { return p.done }

func (p *process) Kill() error {
	p.once.Do(func() {
		if p.err = p.f.record(p.vm, OpKill); p.err == nil {
			p.f.setState(p.vm, "killed")
			close(p.done)
		}
	})
	return p.err
}

// control is a connection to a fake VM's monitor.
type control struct {
	f  *Fake
	vm string
	n  int // its number among the controls opened
}

// Sever cuts every control opened so far, as a restart of libvirtd cuts
// the monitors passed through it: their calls fail from now on (recorded
// all the same), while controls opened later work.
func (f *Fake) Sever() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.severed = f.opened
}

// rec records op on the control's VM; it fails on a severed control.
func (c *control) rec(op Op, args ...string) error {
	err := c.f.record(c.vm, op, args...)
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	if c.n <= c.f.severed {
		return fmt.Errorf("fake %s of %s: the connection to the monitor was lost", op, c.vm)
	}
	return err
}

func (c *control) Stop(ctx context.Context) error {
	if err := c.rec(OpStop); err != nil {
		return err
	}
	c.f.setState(c.vm, "paused")
	return nil
}

func (c *control) Cont(ctx context.Context) error {
	if err := c.rec(OpCont); err != nil {
		return err
	}
	c.f.setState(c.vm, "running")
	return nil
}

func (c *control) SaveDeviceState(ctx context.Context, path string) error {
	if err := c.rec(OpSave); err != nil {
		return err
	}
	return os.WriteFile(path, []byte("device state of "+c.vm), 0o600)
}

func (c *control) Status(ctx context.Context) (string, error) {
	if err := c.rec(OpStatus); err != nil {
		return "", err
	}
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	if st, ok := c.f.pinned[c.vm]; ok {
		return st, nil
	}
	return c.f.state[c.vm], nil
}

// LoadIncoming does what QEMU does with a unix: URI: listen there, take
// one connection and read the device state to its end.
func (c *control) LoadIncoming(ctx context.Context, uri string) error {
	if err := c.rec(OpLoad); err != nil {
		return err
	}
	path, ok := strings.CutPrefix(uri, "unix:")
	if !ok {
		return fmt.Errorf("fake load of %s: only unix: URIs, not %q", c.vm, uri)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	conn, err := ln.Accept()
	if err != nil {
		return errors.Join(fmt.Errorf("fake load of %s: nobody fed the device state", c.vm), ctx.Err(), err)
	}
	defer conn.Close()
	data, err := io.ReadAll(conn)
	if err != nil {
		return err
	}
	c.f.mu.Lock()
	c.f.loaded[c.vm] = data
	c.f.state[c.vm] = "paused"
	c.f.mu.Unlock()
	return nil
}

func (c *control) Announce(ctx context.Context) error { return c.rec(OpAnnounce) }
func (c *control) Reset(ctx context.Context) error    { return c.rec(OpReset) }

func (c *control) Quit(ctx context.Context) error {
	if err := c.rec(OpQuit); err != nil {
		return err
	}
	c.f.setState(c.vm, "quit")
	return nil
}

func (c *control) Close() error { return c.rec(OpClose) }

func (c *control) AddNBDTarget(ctx context.Context, node, socket, export string) error {
	return c.rec(OpBlock, "add-nbd", node, export)
}

func (c *control) DeleteNode(ctx context.Context, node string) error {
	return c.rec(OpBlock, "delete", node)
}

func (c *control) Mirror(ctx context.Context, job, device, target string) error {
	return c.rec(OpBlock, "mirror", job, device, target)
}

func (c *control) BlockJobs(ctx context.Context) ([]qemu.BlockJob, error) {
	return nil, c.rec(OpBlock, "jobs")
}

func (c *control) CancelJob(ctx context.Context, job string, force bool) error {
	return c.rec(OpBlock, "cancel", job, fmt.Sprint(force))
}

func (c *control) NodeSize(ctx context.Context, node string) (int64, error) {
	return 0, c.rec(OpBlock, "size", node)
}

func (c *control) NodeDriver(ctx context.Context, node string) (string, error) {
	return "quorum", c.rec(OpBlock, "driver", node)
}

func (c *control) AddQuorumChild(ctx context.Context, parent, node string) error {
	return c.rec(OpBlock, "add-child", parent, node)
}

func (c *control) RemoveQuorumChild(ctx context.Context, parent, node string) error {
	return c.rec(OpBlock, "remove-child", parent, node)
}
