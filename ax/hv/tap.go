package hv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/names"
)

// PlugTap makes tap a persistent tap of this host (created if missing),
// joins it to bridge when bridge is not "", and sets it up. An existing
// interface named tap must be a tap: a partner's spec names it, and it must
// not make this host plug, say, its uplink into a bridge. tap "" does
// nothing.
func PlugTap(ctx context.Context, tap, bridge string) error {
	if tap == "" {
		return nil
	}
	if err := names.CheckInterface("tap", tap); err != nil {
		return err
	}
	if bridge != "" {
		if err := names.CheckInterface("bridge", bridge); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	link, err := netlink.LinkByName(tap)
	var missing netlink.LinkNotFoundError
	switch {
	case errors.As(err, &missing):
		if link, err = createTap(tap); err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("interface %s: %w", tap, err)
	default:
		if err := checkTap(link); err != nil {
			return err
		}
	}
	if bridge != "" {
		br, err := netlink.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("bridge %s for tap %s: %w (create it, or name an existing bridge with --bridge)", bridge, tap, err)
		}
		if err := netlink.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("join tap %s to bridge %s: %w", tap, bridge, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set tap %s up: %w", tap, err)
	}
	return nil
}

// TapExists says whether this host has an interface named tap, and
// refuses one that is not a tap: for taps another program (libvirt)
// creates, which AX only checks.
func TapExists(tap string) (bool, error) {
	if err := names.CheckInterface("tap", tap); err != nil {
		return false, err
	}
	link, err := netlink.LinkByName(tap)
	var missing netlink.LinkNotFoundError
	switch {
	case errors.As(err, &missing):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("interface %s: %w", tap, err)
	}
	if err := checkTap(link); err != nil {
		return true, err
	}
	return true, nil
}

// BridgeExists says why bridge is not a Linux bridge of this host (nil:
// it is one), where a replica's tap would be plugged at a failover.
func BridgeExists(bridge string) error {
	if err := names.CheckInterface("bridge", bridge); err != nil {
		return err
	}
	link, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", bridge, err)
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return fmt.Errorf("%s is a %s, not a bridge", bridge, link.Type())
	}
	return nil
}

// TapBridge is the bridge this host's interface tap is in, "" if none:
// for a tap another program plugged (os-vif, libvirt), whose bridge a
// partner's replica joins.
func TapBridge(tap string) (string, error) {
	if err := names.CheckInterface("tap", tap); err != nil {
		return "", err
	}
	link, err := netlink.LinkByName(tap)
	if err != nil {
		return "", fmt.Errorf("interface %s: %w", tap, err)
	}
	if link.Attrs().MasterIndex == 0 {
		return "", nil
	}
	master, err := netlink.LinkByIndex(link.Attrs().MasterIndex)
	if err != nil {
		return "", fmt.Errorf("interface %s: its master: %w", tap, err)
	}
	if _, ok := master.(*netlink.Bridge); !ok {
		return "", fmt.Errorf("interface %s is in %s, a %s, not a bridge", tap, master.Attrs().Name, master.Type())
	}
	return master.Attrs().Name, nil
}

// createTap adds a persistent tap, as `ip tuntap add mode tap` does, so
// that it outlives the descriptors used to make it.
func createTap(name string) (netlink.Link, error) {
	t := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI}
	err := netlink.LinkAdd(t)
	for _, f := range t.Fds {
		f.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("create tap %s: %w (axd needs CAP_NET_ADMIN)", name, err)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("tap %s after creating it: %w", name, err)
	}
	return link, nil
}

// checkTap refuses an interface that is not a tap.
func checkTap(link netlink.Link) error {
	name := link.Attrs().Name
	refuse := fmt.Errorf("interface %s exists on this host and is not a tap: refusing to plug it into a bridge", name)
	t, ok := link.(*netlink.Tuntap)
	if !ok {
		return refuse
	}
	switch t.Mode {
	case netlink.TUNTAP_MODE_TAP:
		return nil
	case netlink.TUNTAP_MODE_TUN:
		return refuse
	}
	// Kernels that do not report the mode over netlink show it in sysfs.
	raw, err := os.ReadFile(filepath.Join("/sys/class/net", name, "tun_flags"))
	if err != nil {
		return refuse
	}
	flags, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(raw)), "0x"), 16, 32)
	if err != nil || flags&unix.IFF_TAP == 0 {
		return refuse
	}
	return nil
}
