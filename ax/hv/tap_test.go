package hv

import (
	"context"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/axproject/ax/test/testenv"
)

// TestPlugTapRefuses needs no privilege: what is refused is refused before
// anything changes.
func TestPlugTapRefuses(t *testing.T) {
	cases := []struct {
		name, tap, bridge string
		want              string
	}{
		{"an interface that is not a tap", "lo", "", "not a tap"},
		{"tap name with a shell", "t;reboot", "", "tap"},
		{"tap name too long", "tap-a-very-long-name", "", "tap"},
		{"bridge name with a space", "axr0", "br pub", "bridge"},
	}
	for _, c := range cases {
		err := PlugTap(context.Background(), c.tap, c.bridge)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want it to say %q", c.name, err, c.want)
		}
	}
	if err := PlugTap(context.Background(), "", "br0"); err != nil {
		t.Errorf("no tap: %v", err)
	}
}

func TestTapExists(t *testing.T) {
	if ok, err := TapExists("axnosuchtap0"); ok || err != nil {
		t.Errorf("a missing tap: %v, %v", ok, err)
	}
	if ok, err := TapExists("lo"); !ok || err == nil || !strings.Contains(err.Error(), "not a tap") {
		t.Errorf("lo: %v, %v; want it found and refused", ok, err)
	}
	if _, err := TapExists("t;reboot"); err == nil {
		t.Error("a hostile name was looked up")
	}
}

// TestIntegrationPlugTap creates a tap and joins it to a bridge, in a
// network namespace of its own.
func TestIntegrationPlugTap(t *testing.T) {
	testenv.RequireRoot(t)
	runtime.LockOSThread() // the namespace is this thread's; the thread dies with the test
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("new network namespace: %v", err)
	}
	t.Cleanup(func() {
		netns.Set(orig)
		ns.Close()
		orig.Close()
	})
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-test"}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "uplink0"}}); err != nil {
		t.Fatal(err)
	}
	// Twice: the second finds the tap made by the first.
	for i := 0; i < 2; i++ {
		if err := PlugTap(context.Background(), "axr0", "br-test"); err != nil {
			t.Fatalf("plug %d: %v", i, err)
		}
	}
	link, err := netlink.LinkByName("axr0")
	if err != nil {
		t.Fatal(err)
	}
	bl, err := netlink.LinkByName("br-test")
	if err != nil {
		t.Fatal(err)
	}
	if tt, ok := link.(*netlink.Tuntap); !ok || tt.Mode != netlink.TUNTAP_MODE_TAP {
		t.Errorf("axr0 is %T %+v, want a tap", link, link)
	}
	if link.Attrs().MasterIndex != bl.Attrs().Index {
		t.Errorf("axr0's master is %d, want br-test (%d)", link.Attrs().MasterIndex, bl.Attrs().Index)
	}
	if link.Attrs().RawFlags&0x1 == 0 { // IFF_UP
		t.Error("axr0 is not up")
	}
	if err := PlugTap(context.Background(), "uplink0", "br-test"); err == nil || !strings.Contains(err.Error(), "not a tap") {
		t.Errorf("a bridge was plugged: %v", err)
	}
	if l, _ := netlink.LinkByName("uplink0"); l != nil && l.Attrs().MasterIndex != 0 {
		t.Error("uplink0 joined the bridge")
	}
	if err := PlugTap(context.Background(), "axr1", "br-missing"); err == nil || !strings.Contains(err.Error(), "br-missing") {
		t.Errorf("missing bridge: %v", err)
	}
}
