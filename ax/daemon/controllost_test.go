package daemon

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/hv/hvtest"
)

// The hypervisor's control path fails under FT for good (libvirtd
// restarted: every monitor passed through it is cut): the guest, which a
// cut-short checkpoint may leave paused, runs again through a new monitor,
// and the VM comes back to FT on a new stream — not left at HA on a dead
// monitor.
func TestControlLostUnderFT(t *testing.T) {
	p := runPair(t)
	p.defineVM(t)
	p.protectFT(t)
	before := vm1(p.a).Committed
	// Cut short where it hurts most: the guest paused, every monitor open
	// so far gone.
	p.fakeA.SetStatus("vm1", "paused")
	p.fakeA.Fail(hvtest.OpDial, errors.New("dial unix /run/libvirt/libvirt-sock: connect: connection refused"))
	p.fakeA.Sever()
	// libvirtd takes a moment to start again: no new monitor meanwhile.
	time.Sleep(time.Second)
	p.fakeA.Fail(hvtest.OpDial, nil)
	until(t, "the guest resumed through a new monitor", func() bool {
		for _, e := range events(p.a, "restore") {
			if strings.Contains(e, "runs again") {
				return true
			}
		}
		return false
	}, func() string { return strings.Join(events(p.a, "alarm"), "\n") })
	p.fakeA.SetStatus("vm1", "")
	// The stream ended with the reason, and a new one is at FT with
	// checkpoints committed through the new monitor.
	until(t, "FT protection on a new stream", func() bool {
		lost, again := false, false
		for _, e := range p.a.eventsSince(0) {
			switch {
			case e.Kind == "alarm" && strings.Contains(e.Text, "control path failed"):
				lost = true
			case lost && e.Kind == "protected":
				again = true
			}
		}
		a := vm1(p.a)
		return again && a.State == "protected" && a.Level == api.LevelFT && a.Committed > before+3
	}, func() string { return fmt.Sprintf("%s\nevents: %+v", both(p)(), p.a.eventsSince(0)) })
	for _, e := range events(p.a, "alarm") {
		if strings.Contains(e, "stays protected at level ha") {
			t.Errorf("FT fell back to HA on a dead monitor: %s", e)
		}
	}
}

// When no new control reaches the guest either (the domain ended: virsh
// destroy, QEMU gone), the stream does not start again on it: FT ends as
// any FT failure does, and the domain's end is left to its stop event or
// its process's end.
func TestControlLostWithTheGuest(t *testing.T) {
	p := runPair(t)
	p.defineVM(t)
	p.protectFT(t)
	p.fakeA.Fail(hvtest.OpDial, fmt.Errorf("libvirt domain vm1 is not running (shut off): %w", hv.ErrNotRunning))
	p.fakeA.Sever()
	until(t, "FT ended as an FT failure", func() bool {
		for _, e := range events(p.a, "alarm") {
			if strings.Contains(e, "stays protected at level ha") {
				return true
			}
		}
		return false
	}, func() string { return fmt.Sprintf("%+v", p.a.eventsSince(0)) })
	for _, e := range p.a.eventsSince(0) {
		if strings.Contains(e.Text, "control path failed") {
			t.Errorf("a stream started again on a guest no control reaches: %s", e.Text)
		}
	}
}
