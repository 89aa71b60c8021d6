package lab

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

func nsExists(name string) bool {
	_, err := os.Stat("/run/netns/" + name)
	return err == nil
}

// ip runs one iproute2 command and returns its error with ip's own message.
func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
	}
	return nil
}

// addNetns records, then creates, a namespace with its loopback up.
func (l *Lab) addNetns(ctx context.Context, h string) error {
	ns := l.Netns(h)
	l.state.Namespaces = append(l.state.Namespaces, ns)
	if err := l.state.save(); err != nil {
		return err
	}
	if err := ip(ctx, "netns", "add", ns); err != nil {
		return err
	}
	return ip(ctx, "-n", ns, "link", "set", "lo", "up")
}

// buildNetwork makes the hosts and three segments:
//
//	public  (bridge "pub" in the switch namespace): a and b through their
//	        own bridge br-pub (which guests' taps join), c directly
//	mgmt    (bridge "mgmt" in the switch namespace): a, b, w, and w1–w3
//	        (the etcd witness's members)
//	repl    a veth pair a↔b, the dedicated replication link
//
// Every link is created inside a lab namespace, none in the caller's.
func (l *Lab) buildNetwork(ctx context.Context) error {
	for _, h := range labHosts {
		if err := l.addNetns(ctx, h); err != nil {
			return err
		}
	}
	sw := l.Netns(hostSwitch)
	steps := [][]string{
		{"-n", sw, "link", "add", "pub", "type", "bridge"},
		{"-n", sw, "link", "set", "pub", "up"},
		{"-n", sw, "link", "add", "mgmt", "type", "bridge"},
		{"-n", sw, "link", "set", "mgmt", "up"},
	}
	for _, h := range []string{HostA, HostB, HostC} {
		ns := l.Netns(h)
		steps = append(steps,
			[]string{"-n", ns, "link", "add", PublicLink, "type", "veth", "peer", "name", h + "-pub", "netns", sw},
			[]string{"-n", sw, "link", "set", h + "-pub", "master", "pub", "up"},
		)
		if h == HostC {
			steps = append(steps,
				[]string{"-n", ns, "addr", "add", HostAddrs[h].Public + "/24", "dev", PublicLink},
				[]string{"-n", ns, "link", "set", PublicLink, "up"})
			continue
		}
		steps = append(steps,
			[]string{"-n", ns, "link", "add", PublicBridge, "type", "bridge"},
			[]string{"-n", ns, "link", "set", PublicLink, "master", PublicBridge, "up"},
			[]string{"-n", ns, "addr", "add", HostAddrs[h].Public + "/24", "dev", PublicBridge},
			[]string{"-n", ns, "link", "set", PublicBridge, "up"})
	}
	for _, h := range []string{HostA, HostB, HostW, HostW1, HostW2, HostW3} {
		ns := l.Netns(h)
		steps = append(steps,
			[]string{"-n", ns, "link", "add", MgmtLink, "type", "veth", "peer", "name", h + "-mgmt", "netns", sw},
			[]string{"-n", sw, "link", "set", h + "-mgmt", "master", "mgmt", "up"},
			[]string{"-n", ns, "addr", "add", HostAddrs[h].Mgmt + "/24", "dev", MgmtLink},
			[]string{"-n", ns, "link", "set", MgmtLink, "up"})
	}
	a, b := l.Netns(HostA), l.Netns(HostB)
	steps = append(steps,
		[]string{"-n", a, "link", "add", ReplLink, "type", "veth", "peer", "name", ReplLink, "netns", b},
		[]string{"-n", a, "addr", "add", HostAddrs[HostA].Repl + "/24", "dev", ReplLink},
		[]string{"-n", b, "addr", "add", HostAddrs[HostB].Repl + "/24", "dev", ReplLink},
		[]string{"-n", a, "link", "set", ReplLink, "up"},
		[]string{"-n", b, "link", "set", ReplLink, "up"})
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			return fmt.Errorf("lab network: %w", err)
		}
	}
	return nil
}

// CutLinks takes host h off every segment (as when its power fails):
// its public uplink, management and replication links go down.
//
// All three go down in one netlink session (ip -batch), microseconds
// apart: cut one by one on a loaded machine, the partner could hear the
// host on one path well after another went silent — what a host that runs
// on without it looks like, not a dead one.
func (l *Lab) CutLinks(ctx context.Context, h string) error {
	var batch strings.Builder
	for _, link := range []string{PublicLink, MgmtLink, ReplLink} {
		fmt.Fprintf(&batch, "link set %s down\n", link)
	}
	cmd := exec.CommandContext(ctx, "ip", "-n", l.Netns(h), "-force", "-batch", "-")
	cmd.Stdin = strings.NewReader(batch.String())
	out, err := cmd.CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Cannot find device") {
		return fmt.Errorf("ip -n %s -batch (%s): %s", l.Netns(h), strings.ReplaceAll(strings.TrimSpace(batch.String()), "\n", "; "), strings.TrimSpace(string(out)))
	}
	return nil
}

// SetLink brings one of host h's links up or down (fault tests).
func (l *Lab) SetLink(ctx context.Context, h, link string, up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	return ip(ctx, "-n", l.Netns(h), "link", "set", link, state)
}

// InNetns runs fn on a thread switched into host h's network namespace.
// Sockets fn creates stay in that namespace after it returns.
func (l *Lab) InNetns(h string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is left locked on error paths so Go discards it
		// rather than reusing a thread in the wrong namespace.
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + l.Netns(h))
		if err != nil {
			errc <- fmt.Errorf("netns %s: %w", l.Netns(h), err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", l.Netns(h), err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns back: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// DialFrom opens a TCP connection from host h's namespace.
func (l *Lab) DialFrom(ctx context.Context, h, addr string) (net.Conn, error) {
	var conn net.Conn
	err := l.InNetns(h, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return conn, err
}

// Exec returns a command that runs in host h's namespace.
func (l *Lab) Exec(ctx context.Context, h string, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", l.Netns(h), name}, args...)...)
}

// Unreachable makes each of addrs unreachable from host h (a blackhole
// route per address, so packets to it are dropped), or reachable again
// (cut false). A partition of two hosts is one such call on each side.
func (l *Lab) Unreachable(ctx context.Context, h string, cut bool, addrs ...string) error {
	op := "add"
	if !cut {
		op = "del"
	}
	for _, a := range addrs {
		if err := ip(ctx, "-n", l.Netns(h), "route", op, "blackhole", a+"/32"); err != nil {
			return err
		}
	}
	return nil
}
