package netbuffer

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Mode says how a gate is attached to its tap.
type Mode string

const (
	// ModeTCX: a tcx link at the head of the tap's ingress (Linux ≥ 6.6).
	ModeTCX Mode = "tcx"
	// ModeClsact: a direct-action cls_bpf filter on the tap's clsact qdisc,
	// added if missing (older kernels, or Config.ForceClsact).
	ModeClsact Mode = "clsact"
)

// attachment is the gate program's hold on the tap's ingress.
type attachment interface {
	// detach removes the program from the tap.
	detach() error
	// close lets go of the attachment's descriptors: a pinned attachment
	// stays on the tap, holding it; any other goes.
	close() error
}

// attachIngress attaches prog at the tap's ingress, with tcx unless
// forceClsact or the kernel lacks it. nl works in the tap's namespace.
func attachIngress(nl *netlink.Handle, prog *ebpf.Program, ifindex int, forceClsact bool) (attachment, Mode, error) {
	if !forceClsact {
		a, err := attachTCX(prog, ifindex)
		if err == nil {
			return a, ModeTCX, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return nil, "", err
		}
	}
	a, err := attachClsact(nl, prog, ifindex)
	if err != nil {
		return nil, "", err
	}
	return a, ModeClsact, nil
}

// attachPinned attaches prog with tcx and pins the link at path, where it
// holds the tap after this process has gone. A cls_bpf filter outlives its
// process too, but nothing names it to a later one: pinned gates are tcx
// only.
func attachPinned(prog *ebpf.Program, ifindex int, path string) (*tcxAttachment, error) {
	a, err := attachTCX(prog, ifindex)
	if errors.Is(err, ebpf.ErrNotSupported) {
		return nil, fmt.Errorf("%w: %w", ErrPinNeedsTCX, err)
	}
	if err != nil {
		return nil, err
	}
	if err := a.l.Pin(path); err != nil {
		return nil, errors.Join(fmt.Errorf("pin tcx link: %w", err), a.l.Close())
	}
	a.pinned = true
	return a, nil
}

func attachTCX(prog *ebpf.Program, ifindex int) (*tcxAttachment, error) {
	l, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    ebpf.AttachTCXIngress,
		Anchor:    link.Head(), // before anything that might redirect the guest's frames
	})
	if err != nil {
		return nil, fmt.Errorf("attach tcx ingress: %w", err)
	}
	return &tcxAttachment{l: l}, nil
}

type tcxAttachment struct {
	l      link.Link
	pinned bool
}

func (a *tcxAttachment) detach() error {
	if !a.pinned {
		return a.l.Close()
	}
	// A pinned link outlives its descriptor: unpin it, and detach it in
	// case some other process has it open too.
	err := a.l.Unpin()
	if derr := a.l.Detach(); derr != nil && !errors.Is(derr, ebpf.ErrNotSupported) {
		err = errors.Join(err, derr)
	}
	return errors.Join(err, a.l.Close())
}

func (a *tcxAttachment) close() error { return a.l.Close() }

// The gate's filter: first on ingress, all protocols.
const (
	clsactPriority = 1
	clsactHandle   = 1
)

type clsactAttachment struct {
	nl         *netlink.Handle
	filter     *netlink.BpfFilter
	addedQdisc *netlink.GenericQdisc // nil when the qdisc was there before
}

func attachClsact(nl *netlink.Handle, prog *ebpf.Program, ifindex int) (*clsactAttachment, error) {
	a := &clsactAttachment{nl: nl}
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	switch err := nl.QdiscAdd(qdisc); {
	case err == nil:
		a.addedQdisc = qdisc
	case errors.Is(err, unix.EEXIST):
		// Someone else's clsact (or ingress) qdisc: share it, leave it.
	default:
		return nil, fmt.Errorf("add clsact qdisc (is sch_clsact available? try: modprobe sch_ingress): %w", err)
	}
	a.filter = &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    netlink.HANDLE_MIN_INGRESS,
			Handle:    clsactHandle,
			Priority:  clsactPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         "ax_gate",
		DirectAction: true,
	}
	if err := nl.FilterAdd(a.filter); err != nil {
		err = fmt.Errorf("add cls_bpf ingress filter (priority %d): %w", clsactPriority, err)
		return nil, errors.Join(err, a.removeQdisc())
	}
	return a, nil
}

// close is detach: a filter that stayed would hold the tap with nobody to
// release its frames.
func (a *clsactAttachment) close() error { return a.detach() }

func (a *clsactAttachment) detach() error {
	err := a.nl.FilterDel(a.filter)
	if gone(err) {
		err = nil // the tap went away, and the filter with it
	}
	if err != nil {
		return fmt.Errorf("delete cls_bpf ingress filter: %w", err)
	}
	return a.removeQdisc()
}

// removeQdisc removes the clsact qdisc if the gate added it and nobody
// else has filters on it since.
func (a *clsactAttachment) removeQdisc() error {
	if a.addedQdisc == nil {
		return nil
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		l, err := a.nl.LinkByIndex(a.addedQdisc.LinkIndex)
		if gone(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("look up tap: %w", err)
		}
		fs, err := a.nl.FilterList(l, parent)
		if err != nil {
			return fmt.Errorf("list tc filters: %w", err)
		}
		if len(fs) > 0 {
			return nil // in use by someone else now
		}
	}
	err := a.nl.QdiscDel(a.addedQdisc)
	if gone(err) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("delete clsact qdisc: %w", err)
	}
	a.addedQdisc = nil
	return nil
}

// gone reports whether err says the device or object no longer exists.
func gone(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.As(err, &nf)
}
