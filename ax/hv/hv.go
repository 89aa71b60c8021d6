// Package hv is the hypervisor seam of axd: a Driver gives each VM a Domain
// through which axd controls it (monitor and block operations), starts it
// and plugs its tap, so that nothing above it dials a socket or execs QEMU.
// QMP is today's driver; hvtest holds a recording fake for unit tests.
package hv

import (
	"context"
	"errors"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
)

// ErrNotRunning is what Control's error wraps when the hypervisor says the
// VM does not run (it ended, or is not defined here): no control path to
// it can come back, unlike one that failed on the way (libvirtd
// restarting).
var ErrNotRunning = errors.New("the VM does not run")

// Driver is a host's hypervisor. A libvirt driver would name domains by
// their libvirt name and reach their monitor over libvirt's RPC.
type Driver interface {
	// Domain returns the VM that g describes. Nothing is dialed or started
	// until one of its methods is called.
	Domain(g api.Guest) Domain
}

// Discoverer is a Driver that finds the VMs it runs by name, in the
// hypervisor's own record of them (libvirt: the domain's XML), so that
// axd can protect a VM nobody defined to it. Its VMs are reached by name:
// their specs need no QMP socket.
type Discoverer interface {
	Driver
	// DiscoverSpec describes the running VM name as AX protects it: its
	// guest and its hypervisor process's pid (0: unknown). An error says
	// what to change for the VM to be protectable.
	DiscoverSpec(ctx context.Context, name string) (api.VMSpec, error)
}

// Watcher is a Driver whose hypervisor also stops VMs at others' request
// (libvirt: virsh destroy, Nova, a guest's shutdown): axd hears of it and
// ends their protection rather than mistake it for a failure.
type Watcher interface {
	Driver
	// Stops streams the VMs the hypervisor stopped on request until ctx
	// ends or the hypervisor is lost; then the channel is closed. A crash
	// is no stop: it is not sent.
	Stops(ctx context.Context) (<-chan Stop, error)
}

// Stop is a VM the hypervisor stopped, and how (for the event log).
type Stop struct {
	VM  string
	How string
}

// Domain is one VM of this host, running or to be started.
type Domain interface {
	// Name is the VM's name.
	Name() string
	// Control connects to the running VM's monitor; ctx bounds the
	// connection (not the commands sent on it later). The caller closes it.
	Control(ctx context.Context) (Control, error)
	// Start starts the VM's hypervisor process, its output logged to
	// logPath, and returns once it runs (not once its monitor answers).
	// The process outlives axd; the handle only kills it.
	Start(ctx context.Context, logPath string) (Process, error)
	// StartIncoming starts the VM's hypervisor process as Start does, but
	// to resume a replica rather than boot: its RAM file already holds the
	// guest's memory, and it waits, paused, for the device state that
	// Control's LoadIncoming feeds it.
	StartIncoming(ctx context.Context, logPath string) (Process, error)
	// PlugTap makes the VM's tap exist, joins it to bridge ("": none) and
	// sets it up. An interface of that name that is not a tap is refused.
	PlugTap(ctx context.Context, bridge string) error
}

// Control is what axd asks of a running VM: the checkpoint and failover
// commands (qemu.Monitor) and the block operations of disk replication.
type Control interface {
	qemu.Monitor
	Block
}

// Block is the block-graph control disk replication needs: mirror a disk
// to an NBD target until in sync, then make the target a quorum child.
type Block interface {
	// AddNBDTarget adds block node node backed by export on the NBD
	// server listening on the unix socket socket.
	AddNBDTarget(ctx context.Context, node, socket, export string) error
	// DeleteNode removes a block node nothing uses any more.
	DeleteNode(ctx context.Context, node string) error
	// Mirror starts block job job copying device to target, write-blocking.
	Mirror(ctx context.Context, job, device, target string) error
	// BlockJobs lists the running block jobs.
	BlockJobs(ctx context.Context) ([]qemu.BlockJob, error)
	// CancelJob ends a block job; a ready mirror completes without the
	// guest switching to its target.
	CancelJob(ctx context.Context, job string, force bool) error
	// NodeSize is the size the guest sees of a block node.
	NodeSize(ctx context.Context, node string) (int64, error)
	// NodeDriver is a block node's driver (quorum, raw, qcow2, …).
	NodeDriver(ctx context.Context, node string) (string, error)
	// AddQuorumChild makes node another child of quorum node parent.
	AddQuorumChild(ctx context.Context, parent, node string) error
	// RemoveQuorumChild detaches node from parent (nothing if it is not a child).
	RemoveQuorumChild(ctx context.Context, parent, node string) error
}

// Process is a hypervisor process axd started.
type Process interface {
	// PID is its process ID.
	PID() int
	// Done is closed once the process has ended.
	Done() <-chan struct{}
	// Kill ends the process and returns once it is gone. Safe to call
	// twice, and after the process ended by itself.
	Kill() error
}

var _ Control = (*qemu.QMP)(nil)
