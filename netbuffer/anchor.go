package netbuffer

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
)

// anchor keeps a program in the kernel's XDP dispatcher.
//
// BPF_PROG_RUN with repeat > 1 adds the XDP program to the dispatcher for
// the run and removes it afterwards, and each change waits for an RCU grace
// period: a run then costs some 25 ms on Linux 6.18 (HZ=250), whatever
// the number of frames. When the program is already in the dispatcher
// those changes are no-ops and a run of 256 frames takes a few hundred
// microseconds. An attached XDP program stays in the dispatcher; so
// ax_release is attached, in generic mode, to the loopback device of a
// private, empty network namespace, which is down and where it never runs.
//
// Without the anchor re-injection is correct all the same, only slower.
type anchor struct {
	ns   netns.NsHandle
	link link.Link
}

// noAnchor turns the anchor off (tests).
var noAnchor bool

// newAnchor attaches prog in a new network namespace. It works on a
// goroutine of its own: should the way back to the original namespace
// fail, that goroutine's thread dies with it.
func newAnchor(prog *ebpf.Program) (*anchor, error) {
	type result struct {
		a   *anchor
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		a, back, err := attachAnchor(prog)
		if back {
			runtime.UnlockOSThread()
		}
		res <- result{a, err}
	}()
	r := <-res
	return r.a, r.err
}

func attachAnchor(prog *ebpf.Program) (a *anchor, back bool, err error) {
	orig, err := netns.Get()
	if err != nil {
		return nil, true, err
	}
	defer orig.Close()
	ns, err := netns.New() // and enter it
	if err != nil {
		return nil, true, fmt.Errorf("new network namespace: %w", err)
	}
	const loopback = 1 // LOOPBACK_IFINDEX, down in a new namespace
	l, attachErr := link.AttachXDP(link.XDPOptions{Program: prog, Interface: loopback, Flags: link.XDPGenericMode})
	if err := netns.Set(orig); err != nil {
		if l != nil {
			l.Close()
		}
		ns.Close()
		return nil, false, fmt.Errorf("return to the original network namespace: %w", err)
	}
	if attachErr != nil {
		ns.Close()
		return nil, true, fmt.Errorf("attach XDP to the private loopback: %w", attachErr)
	}
	return &anchor{ns: ns, link: l}, true, nil
}

func (a *anchor) close() error {
	if a == nil {
		return nil
	}
	return errors.Join(a.link.Close(), a.ns.Close())
}
