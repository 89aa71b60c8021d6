package daemon

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/monitor/agent"
)

// Bounds of what a spec may ask for.
const (
	maxRAMMiB    = 4 << 20 // 4 TiB
	maxVCPUs     = 4096
	maxAppendLen = 2048
	maxDisks     = 32
)

// checkSpecFields checks every field of a spec against the safe forms AX
// passes to QEMU and to the kernel: names from the safe alphabet, paths
// absolute and free of QEMU's option syntax, enums from their sets. It
// says nothing about whether the VM can be protected (checkSpec does).
func checkSpecFields(s api.VMSpec) error {
	if s.Name == "" {
		return fmt.Errorf("%w: a VM needs a name", names.ErrBadName)
	}
	if err := names.Check("vm", s.Name); err != nil {
		return err
	}
	g := s.Guest
	if g.Name != "" && g.Name != s.Name {
		if err := names.Check("guest", g.Name); err != nil {
			return err
		}
	}
	if g.RAMMiB < 0 || g.RAMMiB > maxRAMMiB {
		return fmt.Errorf("VM %s: %d MiB of RAM, want 1..%d", s.Name, g.RAMMiB, maxRAMMiB)
	}
	if g.VCPUs < 0 || g.VCPUs > maxVCPUs {
		return fmt.Errorf("VM %s: %d vCPUs, want 1..%d", s.Name, g.VCPUs, maxVCPUs)
	}
	for _, p := range []struct{ kind, path string }{
		{"QMP socket", g.QMP}, {"RAM file", g.RAMFile}, {"console", g.Console}, {"agent socket", g.Agent},
		{"pid file", g.PIDFile}, {"kernel", g.Kernel}, {"initrd", g.Initrd},
	} {
		if p.path == "" {
			continue
		}
		if err := names.CheckPath(p.kind, p.path); err != nil {
			return fmt.Errorf("VM %s: %w", s.Name, err)
		}
	}
	if g.Tap != "" {
		if err := names.CheckInterface("tap", g.Tap); err != nil {
			return fmt.Errorf("VM %s: %w", s.Name, err)
		}
	}
	if s.Bridge != "" {
		if err := names.CheckInterface("bridge", s.Bridge); err != nil {
			return fmt.Errorf("VM %s: %w", s.Name, err)
		}
	}
	if g.MAC != "" {
		hw, err := net.ParseMAC(g.MAC)
		if err != nil || len(hw) != 6 || hw[0]&1 != 0 || hw.String() != strings.ToLower(g.MAC) {
			return fmt.Errorf("VM %s: MAC %q is not a unicast Ethernet address written as xx:xx:xx:xx:xx:xx", s.Name, g.MAC)
		}
	}
	if len(g.Append) > maxAppendLen {
		return fmt.Errorf("VM %s: kernel command line of %d bytes, want at most %d", s.Name, len(g.Append), maxAppendLen)
	}
	for i := 0; i < len(g.Append); i++ {
		if c := g.Append[i]; c < 0x20 || c > 0x7e {
			return fmt.Errorf("VM %s: kernel command line has byte %#x at %d; printable ASCII only", s.Name, c, i)
		}
	}
	switch g.Accel {
	case "", "kvm", "tcg":
	default:
		return fmt.Errorf("VM %s: accelerator %q, want kvm or tcg", s.Name, g.Accel)
	}
	if g.VsockCID != 0 && (g.VsockCID < 3 || g.VsockCID == ^uint32(0)) {
		return fmt.Errorf("VM %s: vsock CID %d is reserved", s.Name, g.VsockCID)
	}
	if len(g.Disks) > maxDisks {
		return fmt.Errorf("VM %s: %d disks, AX protects at most %d", s.Name, len(g.Disks), maxDisks)
	}
	seen := map[string]bool{}
	for _, dk := range g.Disks {
		if dk.Node == "" || dk.Path == "" {
			return fmt.Errorf("VM %s: a disk needs its block node name and image path (got %+v)", s.Name, dk)
		}
		if err := names.CheckNode(dk.Node); err != nil {
			return fmt.Errorf("VM %s: %w", s.Name, err)
		}
		if seen[dk.Node] {
			return fmt.Errorf("VM %s: two disks named %s", s.Name, dk.Node)
		}
		seen[dk.Node] = true
		if err := names.CheckPath("disk", dk.Path); err != nil {
			return fmt.Errorf("VM %s: %w", s.Name, err)
		}
		if dk.Format != "" && dk.Format != "raw" && dk.Format != "qcow2" {
			return fmt.Errorf("VM %s: disk %s has format %q; AX protects raw and qcow2 disks", s.Name, dk.Node, dk.Format)
		}
	}
	switch s.Tracker {
	case "", dirty.ModeAuto, dirty.ModeHash, dirty.ModeSoftDirty:
	default:
		return fmt.Errorf("VM %s: tracker %q, want %s, %s or %s", s.Name, s.Tracker, dirty.ModeAuto, dirty.ModeHash, dirty.ModeSoftDirty)
	}
	if s.Policy != "" {
		if _, err := agent.ParsePolicy(s.Policy); err != nil {
			return fmt.Errorf("VM %s: policy: %w", s.Name, err)
		}
	}
	if s.PID < 0 {
		return fmt.Errorf("VM %s: pid %d", s.Name, s.PID)
	}
	return nil
}

// checkSpec refuses a VM that cannot be protected at level: any level
// needs a valid spec, and QMP when needQMP (the driver reaches VMs by the
// spec's socket); FT (and a VM defined without disks, which
// only FT can protect whole) needs its RAM as a shared named file of its
// size.
func checkSpec(s api.VMSpec, level string, needQMP bool) error {
	if err := checkSpecFields(s); err != nil {
		return err
	}
	if needQMP && s.Guest.QMP == "" {
		return fmt.Errorf("VM %s: no QMP socket given", s.Name)
	}
	if level != api.LevelFT {
		return nil
	}
	if s.Guest.RAMFile == "" {
		return fmt.Errorf("VM %s: its RAM is not a shared named file: %s", s.Name, sharedRAMHelp)
	}
	fi, err := os.Stat(s.Guest.RAMFile)
	if err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("VM %s: RAM file %s is not a regular file (%v): %s", s.Name, s.Guest.RAMFile, err, sharedRAMHelp)
	}
	if want := int64(s.Guest.RAMMiB) << 20; fi.Size() != want {
		return fmt.Errorf("VM %s: RAM file %s is %d bytes but the VM has %d MiB", s.Name, s.Guest.RAMFile, fi.Size(), s.Guest.RAMMiB)
	}
	if s.PID > 0 {
		// Select checks that QEMU maps the file shared: with share=off the
		// guest's writes never reach it.
		t, err := dirty.Select(dirty.ModeHash, s.PID, s.Guest.RAMFile, dirty.HashOptions{Size: fi.Size()})
		if err != nil {
			return fmt.Errorf("VM %s: %v: %s", s.Name, err, sharedRAMHelp)
		}
		t.Close()
	}
	return nil
}

// errPolicy is wrapped by refusals of a partner's spec under this host's
// own policy.
var errPolicy = errors.New("outside this host's policy")

// adoptSpec checks the spec a primary sent for vm against this host's own
// configuration and returns the spec this host will use: the primary's
// paths and interface names describe the primary, so everything
// host-specific is decided here (the replica's files, its tap), and the
// rest must pass this host's policy (its image directories, its bridges).
// authPeer is the primary's name from its certificate ("" in PSK mode).
func (d *Daemon) adoptSpec(vm, authPeer string, ss streamSpec) (api.VMSpec, error) {
	s := ss.Spec
	if s.Name != vm {
		return s, fmt.Errorf("replica %s: the spec names VM %q", vm, s.Name)
	}
	if err := checkSpecFields(s); err != nil {
		return s, fmt.Errorf("replica %s: %w", vm, err)
	}
	if err := names.Check("host", ss.Primary); err != nil {
		return s, fmt.Errorf("replica %s: primary: %w", vm, err)
	}
	if authPeer != "" && ss.Primary != authPeer {
		return s, fmt.Errorf("replica %s: the spec says it comes from %q but the stream is %q's (certificate)", vm, ss.Primary, authPeer)
	}
	if _, ok := d.cfg.Peers[ss.Primary]; !ok {
		return s, fmt.Errorf("replica %s: primary %q is not one of this host's peers", vm, ss.Primary)
	}
	if s.Guest.RAMMiB <= 0 {
		return s, fmt.Errorf("replica %s: %d MiB of RAM", vm, s.Guest.RAMMiB)
	}
	for _, p := range []struct{ kind, path string }{{"kernel", s.Guest.Kernel}, {"initrd", s.Guest.Initrd}} {
		if p.path == "" {
			continue
		}
		if err := names.CheckPath(p.kind, p.path, d.cfg.ImageDirs...); err != nil || len(d.cfg.ImageDirs) == 0 {
			if err == nil {
				err = fmt.Errorf("%s %s: this host allows no image directory (axd --image-dir DIR)", p.kind, p.path)
			}
			return s, fmt.Errorf("replica %s: %w: %w", vm, errPolicy, err)
		}
	}
	if s.Bridge != "" && !d.bridgeAllowed(s.Bridge) {
		return s, fmt.Errorf("replica %s: %w: bridge %q is not one this host plugs replicas into (axd --bridge NAME; allowed: %v)", vm, errPolicy, s.Bridge, d.cfg.Bridges)
	}
	if s.Guest.Tap != "" {
		s.Guest.Tap = replicaTap(vm)
	}
	// Where the primary keeps its files means nothing here; promote sets
	// this host's own.
	s.Guest.QMP, s.Guest.Console, s.Guest.Agent, s.Guest.PIDFile, s.Guest.RAMFile = "", "", "", "", ""
	s.PID = 0
	return s, nil
}

// bridgeAllowed: the bridges the configuration names or matches (a
// pattern of path.Match: brq* for Neutron's Linux bridge agent's
// brq<network>), or, when it names none, any Linux bridge that exists on
// this host.
func (d *Daemon) bridgeAllowed(br string) bool {
	if len(d.cfg.Bridges) > 0 {
		return slices.ContainsFunc(d.cfg.Bridges, func(pattern string) bool {
			ok, err := path.Match(pattern, br)
			return err == nil && ok
		})
	}
	_, err := os.Stat(filepath.Join("/sys/class/net", br, "bridge"))
	return err == nil
}

// replicaTap is the tap this host gives a partner's VM: a name derived from
// the VM's, so a peer cannot make this host take over one of its own
// interfaces by naming it.
func replicaTap(vm string) string {
	h := sha256.Sum256([]byte(vm))
	return "axr" + hex.EncodeToString(h[:6])
}
