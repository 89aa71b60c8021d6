package netbuffer

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/axproject/ax/bpf"
)

// Config tunes a gate. The zero value (or a nil *Config) means defaults.
type Config struct {
	// MaxBytes bounds the memory held for one VM: frame bytes plus a
	// small fixed cost per frame. Default 64 MiB.
	MaxBytes int
	// MaxFrames bounds the number of held frames. Default 65536.
	MaxFrames int
	// RingBytes is the size of the kernel ring buffer that carries frames
	// to the gate, rounded up to a power of two. Default 4 MiB. An adopted
	// gate keeps its own. With PinDir it also bounds what is held while no
	// process holds the gate.
	RingBytes int
	// FirstEpoch tags the output before the first NextEpoch. Default 1,
	// the FT loop's first checkpoint. An adopted gate keeps its own.
	FirstEpoch uint64
	// ForceClsact attaches with clsact and cls_bpf even where tcx works.
	// It cannot go with PinDir.
	ForceClsact bool
	// PinDir, if set, is a directory on a bpffs (such as
	// /sys/fs/bpf/ax/HOST/VM; made 0700 if missing) where the gate is
	// pinned, so that it keeps holding the tap after this process ends, and
	// where a later Attach adopts it (see Leave). Pinned gates need tcx.
	PinDir string
	// Log receives warnings (rate-limited); default slog.Default().
	Log *slog.Logger
	// Observer, if set, is called for every released frame with the time
	// from capture to release, on the gate's goroutine: keep it quick
	// (a Prometheus histogram's Observe is fine).
	Observer func(delay time.Duration)
}

const (
	defaultMaxBytes  = 64 << 20
	defaultMaxFrames = 65536
	defaultRingBytes = 4 << 20
)

// ErrPinNeedsTCX means a pinned gate (Config.PinDir) was asked for on a
// kernel without tcx (Linux < 6.6): only a tcx link can be pinned to keep
// holding the tap with no process. Attach the gate unpinned there.
var ErrPinNeedsTCX = errors.New("netbuffer: a pinned gate needs tcx (Linux ≥ 6.6)")

// ErrDetached is returned by a gate's methods after Detach or Leave.
var ErrDetached = errors.New("netbuffer: gate detached")

// Gate holds a VM's output until the checkpoint that covers it commits.
// It is safe for concurrent use.
//
// ax_gate, at the tap's ingress, copies each frame the guest sends, tagged
// with the current epoch, into a ring buffer, and drops it. A goroutine
// owned by the gate moves frames from the ring buffer to a bounded queue in
// capture order. Release re-injects them with ax_release in live-frames
// mode, as if the tap had just received them; ax_gate recognises them by a
// per-gate random marker in their metadata and lets them through, and the
// bridge, OVS or routing behind the tap sees them as usual.
type Gate struct {
	cfg      Config
	log      *slog.Logger
	ifindex  int
	mode     Mode
	maxFrame int
	ns       netns.NsHandle
	nl       *netlink.Handle
	objs     gateObjects
	rel      releaseObjects
	att      attachment
	anchor   *anchor // nil: every re-injection run waits for RCU
	rd       *ringbuf.Reader
	pins     *pins // nil: not pinned
	adopted  bool

	stateMu sync.Mutex
	state   bpf.GateGateState

	reqs      chan request
	started   bool          // the loop was started
	done      chan struct{} // closed when the loop has ended
	leaving   atomic.Bool   // what the loop holds at its end is left, not discarded
	leftNow   int           // frames the loop held at its end, set before done closes
	closeOnce sync.Once
	closeErr  error
	finalMu   sync.Mutex
	final     kernelCounts // read before the maps closed

	captured, capturedBytes atomic.Uint64
	released, releasedBytes atomic.Uint64
	heldFrames, heldBytes   atomic.Int64
	drops                   [len(userReasons)]atomic.Uint64

	// Owned by the loop.
	q        *queue
	batch    []byte // ax_batch, memory-mapped
	zeros    []byte
	xdpCtx   [24]byte // struct xdp_md
	warnedAt time.Time
	warned   uint64 // drops already warned about
}

type op int

const (
	opRelease op = iota
	opDiscard
	opOpen
	opDrain
)

type request struct {
	op   op
	upTo uint64
	done chan error
}

// Attach shuts a gate on the guest-facing tap ifname: from now on its
// frames are held until released. The caller must be in the tap's network
// namespace; Release may later be called from anywhere. With
// Config.PinDir, Attach adopts the gate pinned there for this tap if there
// is one, and pins a new one there otherwise (see the package comment).
func Attach(ifname string, cfg *Config) (*Gate, error) {
	runtime.LockOSThread() // one namespace for the lookup and the attach
	defer runtime.UnlockOSThread()
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("netbuffer: tap %s: %w", ifname, err)
	}
	return attach(ifi.Index, cfg)
}

func attach(ifindex int, cfg *Config) (*Gate, error) {
	g := &Gate{ifindex: ifindex, ns: netns.None(), reqs: make(chan request, 16), done: make(chan struct{})}
	if cfg != nil {
		g.cfg = *cfg
	}
	g.cfg.setDefaults()
	g.log = g.cfg.Log.With("ifindex", ifindex)
	g.q = newQueue(chunkSize(g.cfg.MaxBytes))
	if g.cfg.PinDir != "" && g.cfg.ForceClsact {
		return nil, fmt.Errorf("%w: drop ForceClsact or PinDir", ErrPinNeedsTCX)
	}
	if err := g.setup(); err != nil {
		// An adoption that failed leaves the pinned gate as it found it.
		err = errors.Join(err, g.teardown(g.adopted))
		return nil, fmt.Errorf("netbuffer: attach to ifindex %d: %w", ifindex, err)
	}
	return g, nil
}

// setup adopts the gate pinned in PinDir, or makes a new one; on error,
// teardown undoes what it did.
func (g *Gate) setup() (err error) {
	if g.ns, err = netns.Get(); err != nil {
		return fmt.Errorf("network namespace: %w", err)
	}
	if g.cfg.PinDir != "" {
		if g.pins, err = openPins(g.cfg.PinDir); err != nil {
			return err
		}
		found, err := g.pins.found()
		if err != nil {
			return err
		}
		if found {
			g.adopted = true
			return g.adopt()
		}
	}
	return g.create()
}

// create loads and attaches a new gate, pinned if PinDir is set.
func (g *Gate) create() (err error) {
	var markBuf [4]byte
	if _, err := rand.Read(markBuf[:]); err != nil {
		return err
	}
	mark := binary.LittleEndian.Uint32(markBuf[:]) | 1 // never 0, the default
	if err := g.loadRelease(mark); err != nil {
		return err
	}
	if g.maxFrame, err = g.probeMaxFrame(); err != nil {
		return err
	}
	if err := g.loadGate(mark); err != nil {
		return err
	}
	g.state.Epoch = g.cfg.FirstEpoch
	if err := g.objs.AxState.Update(uint32(0), &g.state, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set epoch: %w", err)
	}
	if g.pins != nil {
		m := meta{ifindex: g.ifindex, mark: mark, maxFrame: g.maxFrame, ringBytes: g.cfg.RingBytes}
		if m.netns, err = nsInode(g.ns); err != nil {
			return err
		}
		if err := g.pins.pinNew(&g.objs, m); err != nil {
			return err
		}
	}
	if err := g.start(); err != nil {
		return err
	}

	// Last, so that nothing before can fail with the guest's frames held.
	if g.pins != nil {
		// Through a local: a failed attach must leave g.att nil, not an
		// interface holding a nil *tcxAttachment that teardown would call.
		a, err := attachPinned(g.objs.AxGate, g.ifindex, g.pins.path(pinLink))
		if err != nil {
			return err
		}
		g.att, g.mode = a, ModeTCX
		return nil
	}
	if g.nl, err = netlink.NewHandleAt(g.ns, unix.NETLINK_ROUTE); err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	if g.att, g.mode, err = attachIngress(g.nl, g.objs.AxGate, g.ifindex, g.cfg.ForceClsact); err != nil {
		return err
	}
	return nil
}

// adopt takes over the gate an earlier process pinned in PinDir: the link
// holding the tap, the maps, and the frames the ring buffer holds, which
// the loop reads in with their epochs. The gate is shut at its epoch.
func (g *Gate) adopt() error {
	pg, err := g.pins.load(g.ifindex, g.ns)
	if err != nil {
		return err
	}
	g.att, g.mode = &tcxAttachment{l: pg.link, pinned: true}, ModeTCX
	g.objs.GateMaps = pg.maps
	g.maxFrame, g.cfg.RingBytes = pg.meta.maxFrame, pg.meta.ringBytes
	g.drops[userLeft].Store(pg.meta.left)
	if err := g.loadRelease(pg.meta.mark); err != nil {
		return err
	}
	if err := g.objs.AxState.Lookup(uint32(0), &g.state); err != nil {
		return fmt.Errorf("read the gate's state: %w", err)
	}
	if g.state.Open != 0 {
		// Left open by a process that ended without Leave.
		g.log.Warn("netbuffer: the pinned gate was open: shutting it", "pins", g.pins.dir)
		g.state.Open = 0
		if err := g.objs.AxState.Update(uint32(0), &g.state, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("shut the gate: %w", err)
		}
	}
	if err := g.start(); err != nil {
		return err
	}
	// Read in what was captured while no process held the gate, so that
	// it is held, and counted in Stats, when Attach returns.
	if err := g.do(request{op: opDrain}); err != nil {
		return err
	}
	g.pins.owned = true
	g.log.Info("netbuffer: adopted a pinned gate", "pins", g.pins.dir, "epoch", g.state.Epoch,
		"held_frames", g.heldFrames.Load(), "left_before", pg.meta.left)
	return nil
}

// start sets up re-injection and starts the loop, which reads the ring
// buffer from where the last reader stopped.
func (g *Gate) start() (err error) {
	if !noAnchor {
		var aerr error
		if g.anchor, aerr = newAnchor(g.rel.AxRelease); aerr != nil {
			g.log.Warn("netbuffer: re-injection will wait for RCU at every batch (slower)", "err", aerr)
		}
	}
	if !CompletesChecksums() {
		g.log.Warn("netbuffer: this kernel cannot tell partial checksums (Linux < 6.3): the guest must not offload them (virtio-net csum=off)")
	}
	if g.batch, err = mmapBatch(g.rel.AxBatch); err != nil {
		return err
	}
	g.zeros = make([]byte, bpf.MaxFrame)
	binary.NativeEndian.PutUint32(g.xdpCtx[12:], uint32(g.ifindex)) // ingress_ifindex
	if g.rd, err = ringbuf.NewReader(g.objs.AxFrames); err != nil {
		return fmt.Errorf("ring buffer reader: %w", err)
	}
	ready := make(chan error, 1)
	g.started = true
	go g.loop(ready)
	return <-ready
}

func (c *Config) setDefaults() {
	if c.MaxBytes <= 0 {
		c.MaxBytes = defaultMaxBytes
	}
	if c.MaxFrames <= 0 {
		c.MaxFrames = defaultMaxFrames
	}
	if c.RingBytes <= 0 {
		c.RingBytes = defaultRingBytes
	}
	c.RingBytes = max(1<<bitsFor(c.RingBytes), os.Getpagesize())
	if c.FirstEpoch == 0 {
		c.FirstEpoch = 1
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
}

// bitsFor returns the smallest b with 1<<b >= n.
func bitsFor(n int) int {
	b := 0
	for 1<<b < n {
		b++
	}
	return b
}

// chunkSize sizes the queue's chunks: large enough to amortise, small
// enough that a small MaxBytes is not dwarfed by one chunk.
func chunkSize(maxBytes int) int {
	return min(max(maxBytes/16, 64<<10), 1<<20)
}

// Mode says whether the gate is attached with tcx or clsact.
func (g *Gate) Mode() Mode { return g.mode }

// Anchored reports whether ax_release is anchored in the XDP dispatcher,
// which makes re-injection fast (see anchor).
func (g *Gate) Anchored() bool { return g.anchor != nil }

// MaxFrame is the longest frame the gate can hold and re-inject; longer
// ones are dropped (DropTooBig).
func (g *Gate) MaxFrame() int { return g.maxFrame }

// Pinned reports whether the gate is pinned (Config.PinDir): it then keeps
// holding the tap after this process lets go (Leave).
func (g *Gate) Pinned() bool { return g.pins != nil }

// Adopted reports whether Attach adopted a gate pinned in Config.PinDir by
// an earlier process, rather than making a new one.
func (g *Gate) Adopted() bool { return g.adopted }

// NextEpoch tags the frames captured from now on with epoch. The FT loop
// calls it while the guest is paused, so that every frame belongs to the
// checkpoint that follows it. Epochs never go back.
func (g *Gate) NextEpoch(epoch uint64) error {
	g.stateMu.Lock()
	defer g.stateMu.Unlock()
	if g.detached() {
		return ErrDetached
	}
	if epoch < g.state.Epoch {
		return fmt.Errorf("netbuffer: epoch %d is before the current epoch %d", epoch, g.state.Epoch)
	}
	g.state.Epoch = epoch
	return g.writeState()
}

// Release re-injects, in capture order, the held frames tagged with epochs
// up to upTo: the checkpoint covering them has committed.
//
// Frames the kernel tagged ≤ upTo may still sit in the ring buffer, not yet
// read: Release first drains the ring buffer of everything captured before
// the call, so those are released by this call, not the next. A frame is
// never released before its epoch; it may be released late, in the next
// call, only if it was tagged ≤ upTo but reached the ring buffer after the
// call started. Release stops at the first frame of a later epoch, so order
// is kept even then.
//
// A frame that cannot be re-injected is dropped and counted (DropInject);
// the first error is returned after the others have been tried.
// Release(math.MaxUint64) releases everything.
func (g *Gate) Release(upTo uint64) error {
	return g.do(request{op: opRelease, upTo: upTo})
}

// Discard drops every held frame (counted as DropDiscarded), for instance
// after a failover, when the secondary has taken over the guest.
func (g *Gate) Discard() error {
	return g.do(request{op: opDiscard})
}

// Open releases everything held and lets the guest's frames pass from then
// on, keeping the gate attached (FT paused). Hold shuts it again.
// With FT off, Detach instead: then nothing is attached at all.
func (g *Gate) Open() error {
	return g.do(request{op: opOpen})
}

// Hold shuts the gate: frames are held again, tagged with the current epoch.
func (g *Gate) Hold() error {
	return g.setOpen(false)
}

func (g *Gate) setOpen(open bool) error {
	g.stateMu.Lock()
	defer g.stateMu.Unlock()
	if g.detached() {
		return ErrDetached
	}
	g.state.Open = 0
	if open {
		g.state.Open = 1
	}
	return g.writeState()
}

func (g *Gate) writeState() error {
	if err := g.objs.AxState.Update(uint32(0), &g.state, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("netbuffer: update gate state: %w", err)
	}
	return nil
}

func (g *Gate) detached() bool {
	select {
	case <-g.done:
		return true
	default:
		return false
	}
}

// do hands r to the loop and waits for its answer.
func (g *Gate) do(r request) error {
	r.done = make(chan error, 1)
	select {
	case g.reqs <- r:
	case <-g.done:
		return ErrDetached
	}
	// Wake the loop if it waits for frames; it serves requests when woken.
	_ = g.rd.Flush()
	select {
	case err := <-r.done:
		return err
	case <-g.done:
		select {
		case err := <-r.done:
			return err
		default:
			return ErrDetached
		}
	}
}

// Detach removes the gate from the tap: frames flow normally again. What
// is still held is discarded (release it first if it should go out). Every
// kernel object the gate made is gone afterwards: the link or filter, the
// clsact qdisc if the gate added it, programs and maps, and a pinned gate's
// pins, whichever process made them. Safe to call twice; after Leave it
// does nothing (the pins hold the tap: adopt the gate and Detach it, or
// Unpin).
func (g *Gate) Detach() error {
	g.closeOnce.Do(func() {
		if err := g.teardown(false); err != nil {
			g.closeErr = fmt.Errorf("netbuffer: detach: %w", err)
		}
	})
	return g.closeErr
}

// Close is Detach.
func (g *Gate) Close() error { return g.Detach() }

// Leave ends this process's hold on a pinned gate without detaching it,
// for a later process to adopt (Attach with the same PinDir): its goroutine
// stops and its descriptors close, and the pinned gate keeps holding the
// tap, shut even if it was open: ax_gate captures the guest's frames into
// the ring buffer until it is full, then drops them, counted. The frames
// this process held in memory are dropped (DropLeft): they were never
// released, so none got out early, and the guest's transport sends them
// again. Safe to call twice; after Leave (or Detach) the gate's methods
// return ErrDetached. A gate that is not pinned cannot be left: Detach it.
func (g *Gate) Leave() error {
	if g.pins == nil {
		return errors.New("netbuffer: leave: the gate is not pinned (Config.PinDir), so leaving would let its frames pass: Detach it instead")
	}
	g.closeOnce.Do(func() {
		if err := g.teardown(true); err != nil {
			g.closeErr = fmt.Errorf("netbuffer: leave: %w", err)
		}
	})
	return g.closeErr
}

// teardown undoes whatever attach did, in reverse. With keep a pinned gate
// stays in the kernel, holding the tap, and only this process lets go.
func (g *Gate) teardown(keep bool) error {
	var errs []error
	// Stop capturing first: from here on the tap's frames pass.
	if g.att != nil && !keep {
		if err := g.att.detach(); err != nil {
			errs = append(errs, err)
		}
	}
	g.kernelDrops() // keep the final counts for Stats
	if g.rd != nil {
		g.leaving.Store(keep)
		errs = append(errs, g.rd.Close()) // ends the loop, which drops what it holds
	}
	if g.started {
		<-g.done
	} else {
		close(g.done)
	}
	if err := g.anchor.close(); err != nil {
		errs = append(errs, err)
	}
	g.anchor = nil
	// Under both locks: a concurrent NextEpoch or Stats must not use a
	// closed (and maybe reused) descriptor.
	g.stateMu.Lock()
	g.finalMu.Lock()
	if keep && g.started {
		errs = append(errs, g.handOver())
	}
	if g.att != nil && keep {
		errs = append(errs, g.att.close())
	}
	if g.objs.AxGate != nil || g.objs.AxFrames != nil {
		errs = append(errs, g.objs.Close())
	}
	if g.batch != nil {
		errs = append(errs, unix.Munmap(g.batch))
		g.batch = nil
	}
	if g.rel.AxRelease != nil {
		errs = append(errs, g.rel.Close())
	}
	g.finalMu.Unlock()
	g.stateMu.Unlock()
	if g.pins != nil {
		errs = append(errs, g.pins.close(!keep))
	}
	if g.nl != nil {
		g.nl.Close()
	}
	if g.ns.IsOpen() {
		errs = append(errs, g.ns.Close())
	}
	return errors.Join(errs...)
}

// handOver leaves the pinned gate ready for the next process: shut, and
// with the frames this one dropped on leaving counted. It runs under
// stateMu, after the loop has ended.
func (g *Gate) handOver() error {
	var errs []error
	if g.state.Open != 0 {
		g.state.Open = 0
		if err := g.objs.AxState.Update(uint32(0), &g.state, ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("shut the gate before leaving it (it may let frames pass): %w", err))
		}
	}
	if g.leftNow > 0 {
		errs = append(errs, g.pins.addLeft(g.leftNow))
		g.log.Warn("netbuffer: left the pinned gate, dropping the frames held in memory", "frames", g.leftNow, "pins", g.pins.dir)
	}
	return errors.Join(errs...)
}
