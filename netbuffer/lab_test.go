package netbuffer_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/test/testenv"
)

// lab is one test's network, in a namespace of its own: a tap opened the
// way QEMU opens it, bridged with one end of a veth pair; frames that get
// past the gate are observed on the other end.
//
//	guest ──write──▶ tap ─▶ br0 ─▶ veth0 ══ veth1 ──▶ sniffer
type lab struct {
	tap     *os.File
	vnetHdr bool
	ifindex int // the tap's
	peer    *net.Interface
	sniff   int // AF_PACKET on veth1
}

var (
	guestMAC = net.HardwareAddr{0x02, 0xa7, 0, 0, 0, 1}
	peerMAC  = net.HardwareAddr{0x02, 0xa7, 0, 0, 0, 2}
)

const tapName = "axtap0"

// newLab builds the lab in a new network namespace, which the calling
// goroutine stays in until the test ends (the gate's own goroutine is not:
// the gate must find its way there).
func newLab(t testing.TB, vnetHdr bool) *lab {
	t.Helper()
	testenv.RequireRoot(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.New() // and enter it
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("new network namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := netns.Set(orig); err != nil {
			t.Errorf("back to the test's namespace: %v", err) // the thread stays locked and dies
			return
		}
		orig.Close()
		ns.Close()
		runtime.UnlockOSThread()
	})
	// IPv6 autoconfiguration would add the bridge's own frames to the
	// sniffer's; the guest's IPv6 frames do not need it.
	for _, f := range []string{"all", "default"} {
		p := filepath.Join("/proc/sys/net/ipv6/conf", f, "disable_ipv6")
		if err := os.WriteFile(p, []byte("1"), 0); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
	}

	l := &lab{vnetHdr: vnetHdr}
	l.tap = openTap(t, tapName, vnetHdr)
	t.Cleanup(func() { l.tap.Close() })

	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "axbr0"}}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "axveth0"}, PeerName: "axveth1", PeerHardwareAddr: peerMAC}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatalf("add a bridge (try: modprobe bridge): %v", err)
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add a veth pair (try: modprobe veth): %v", err)
	}
	for _, name := range []string{tapName, "axveth0"} {
		lk, err := netlink.LinkByName(name)
		must(t, err)
		must(t, netlink.LinkSetMaster(lk, br))
	}
	for _, name := range []string{"axbr0", "axveth0", "axveth1", tapName} {
		lk, err := netlink.LinkByName(name)
		must(t, err)
		must(t, netlink.LinkSetUp(lk))
	}
	tap, err := net.InterfaceByName(tapName)
	must(t, err)
	l.ifindex = tap.Index
	l.peer, err = net.InterfaceByName("axveth1")
	must(t, err)

	l.sniff, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	must(t, err)
	t.Cleanup(func() { unix.Close(l.sniff) })
	must(t, unix.Bind(l.sniff, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.peer.Index}))
	must(t, unix.SetsockoptInt(l.sniff, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20))

	// The bridge forwards once its ports are up; wait for a frame to pass.
	deadline := time.Now().Add(5 * time.Second)
	for {
		probe := frame(0, "ready")
		l.send(t, probe)
		if got := l.recv(t, 1, 100*time.Millisecond); len(got) == 1 {
			l.recv(t, 1000, 50*time.Millisecond) // late copies of earlier probes
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the lab's bridge never forwarded a frame")
		}
	}
	return l
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func ptr[T any](v T) *T { return &v }

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// openTap opens a tap the way QEMU does: /dev/net/tun, TUNSETIFF.
func openTap(t testing.TB, name string, vnetHdr bool) *os.File {
	t.Helper()
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		testenv.RequireFeature(t, "tun", false, fmt.Sprintf("open /dev/net/tun: %v; try: modprobe tun", err))
	}
	ifr, err := unix.NewIfreq(name)
	must(t, err)
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if vnetHdr {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		t.Fatalf("TUNSETIFF %s: %v", name, err)
	}
	if vnetHdr {
		// Let the guest's offloads through, as QEMU does with virtio-net.
		off := unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
		must(t, unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, off))
	}
	return os.NewFile(uintptr(fd), name)
}

// send writes frames into the tap as the guest would.
func (l *lab) send(t testing.TB, frames ...[]byte) {
	t.Helper()
	for _, f := range frames {
		if l.vnetHdr {
			f = append(make([]byte, 10), f...) // struct virtio_net_hdr, no offload
		}
		if _, err := l.tap.Write(f); err != nil {
			t.Fatalf("write to tap: %v", err)
		}
	}
}

// recv returns the guest's frames seen on the peer, until n arrived or
// wait passed without one.
func (l *lab) recv(t testing.TB, n int, wait time.Duration) [][]byte {
	t.Helper()
	must(t, unix.SetsockoptTimeval(l.sniff, unix.SOL_SOCKET, unix.SO_RCVTIMEO, ptr(unix.NsecToTimeval(wait.Nanoseconds()))))
	var got [][]byte
	buf := make([]byte, 1<<16)
	for len(got) < n {
		m, _, err := unix.Recvfrom(l.sniff, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			break
		}
		must(t, err)
		if m >= 14 && bytes.Equal(buf[6:12], guestMAC) {
			got = append(got, bytes.Clone(buf[:m]))
		}
	}
	return got
}

// expectNone fails if a guest frame reaches the peer within wait.
func (l *lab) expectNone(t testing.TB, wait time.Duration, why string) {
	t.Helper()
	if got := l.recv(t, 1, wait); len(got) > 0 {
		t.Fatalf("%s: a frame got out: %s", why, describe(got[0]))
	}
}

// expect fails unless exactly want reach the peer, in order.
func (l *lab) expect(t testing.TB, why string, want ...[]byte) {
	t.Helper()
	got := l.recv(t, len(want)+1, 300*time.Millisecond)
	if len(got) != len(want) {
		t.Fatalf("%s: %d frames reached the peer, want %d: %s", why, len(got), len(want), describeAll(got))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("%s: frame %d is %s, want %s (all: %s)", why, i, describe(got[i]), describe(want[i]), describeAll(got))
		}
	}
}

// frame builds a test frame (EtherType 0x88b5, local experimental) whose
// payload names it.
func frame(seq int, label string) []byte {
	f := append(ethHeader(broadcast, 0x88b5), fmt.Sprintf("%s#%d", label, seq)...)
	for len(f) < 60 {
		f = append(f, 0)
	}
	return f
}

var broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

func ethHeader(dst net.HardwareAddr, etherType uint16) []byte {
	h := append(append(append([]byte{}, dst...), guestMAC...), 0, 0)
	binary.BigEndian.PutUint16(h[12:], etherType)
	return h
}

func describe(f []byte) string {
	if len(f) < 14 {
		return fmt.Sprintf("%x", f)
	}
	if et := binary.BigEndian.Uint16(f[12:]); et == 0x88b5 {
		return strings.TrimRight(string(f[14:]), "\x00")
	} else {
		return fmt.Sprintf("ethertype %#04x len %d", et, len(f))
	}
}

func describeAll(fs [][]byte) string {
	var s []string
	for _, f := range fs {
		s = append(s, describe(f))
	}
	return "[" + strings.Join(s, " ") + "]"
}

// frames builds n test frames labelled label.
func frames(n int, label string) [][]byte {
	var fs [][]byte
	for i := range n {
		fs = append(fs, frame(i, label))
	}
	return fs
}

// requireTCX skips unless tcx links work here (in the lab's namespace).
func requireTCX(t testing.TB) {
	t.Helper()
	err := probeTCX()
	testenv.RequireFeature(t, "tcx", err == nil, fmt.Sprintf("tcx links need Linux ≥ 6.6: %v", err))
}

func probeTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}, // TCX_NEXT
		License:      "MIT",
	})
	if err != nil {
		return err
	}
	defer prog.Close()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return err
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: lo.Index, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return err
	}
	return l.Close()
}

// anyMode is the configuration for the best attach mode here: tcx, or
// clsact on kernels without it.
func anyMode(t testing.TB) netbuffer.Config {
	t.Helper()
	if probeTCX() == nil {
		return netbuffer.Config{}
	}
	requireClsact(t)
	return netbuffer.Config{ForceClsact: true}
}

// requireClsact skips unless a clsact qdisc can be added (in the lab).
func requireClsact(t testing.TB) {
	t.Helper()
	err := probeClsact()
	testenv.RequireFeature(t, "clsact", err == nil, fmt.Sprintf("needs sch_clsact (try: modprobe sch_ingress): %v", err))
}

func probeClsact() error {
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "axprobe0"}, PeerName: "axprobe1"}
	if err := netlink.LinkAdd(v); err != nil {
		return err
	}
	defer netlink.LinkDel(v)
	return netlink.QdiscAdd(clsactOn(v.Attrs().Index))
}

func clsactOn(ifindex int) *netlink.GenericQdisc {
	return &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
}

// hasClsact reports whether the device has a clsact qdisc.
func hasClsact(t testing.TB, ifindex int) bool {
	t.Helper()
	lk, err := netlink.LinkByIndex(ifindex)
	must(t, err)
	qs, err := netlink.QdiscList(lk)
	must(t, err)
	for _, q := range qs {
		if q.Type() == "clsact" {
			return true
		}
	}
	return false
}

// tcxPrograms counts the programs on the device's tcx ingress.
func tcxPrograms(t testing.TB, ifindex int) int {
	t.Helper()
	r, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return 0 // no tcx here: nothing attached with it
	}
	return len(r.Programs)
}

// bpfFDs counts this process's descriptors of BPF programs, maps, links
// and network namespaces, and its memory mappings of maps.
func bpfFDs(t testing.TB) map[string]int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	must(t, err)
	n := map[string]int{}
	for _, e := range ents {
		dst, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(dst, "anon_inode:bpf") {
			n[strings.TrimPrefix(dst, "anon_inode:")]++
		}
		if err == nil && strings.HasPrefix(dst, "net:[") {
			n["network namespace"]++
		}
	}
	// Memory-mapped maps keep their map alive without a descriptor.
	maps, err := os.ReadFile("/proc/self/maps")
	must(t, err)
	n["mmap of bpf-map"] = strings.Count(string(maps), "anon_inode:bpf-map")
	return n
}
