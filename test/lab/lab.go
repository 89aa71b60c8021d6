// Package lab builds AX's single-machine lab: network namespaces as hosts
// (hypervisors a and b, witness w, client c), their networks, and QEMU guests.
package lab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// The lab's hosts. Each is a network namespace named <prefix>-<host>; the
// switch namespace holds the bridges of the shared segments.
const (
	HostA      = "a"
	HostB      = "b"
	HostW      = "w"
	HostC      = "c"
	hostSwitch = "sw"
	// w1, w2 and w3 run the members of the etcd witness (when chosen).
	HostW1 = "w1"
	HostW2 = "w2"
	HostW3 = "w3"
)

// labHosts are every namespace of a lab.
var labHosts = []string{HostA, HostB, HostW, HostW1, HostW2, HostW3, HostC, hostSwitch}

// Addresses inside the lab's namespaces (never routed outside them).
const (
	PublicNet  = "10.77.0.0/24" // guests, clients, hypervisors' bridges
	ReplNet    = "10.77.1.0/24" // dedicated replication link a↔b
	MgmtNet    = "10.77.2.0/24" // management network a–b–w
	GuestIP    = "10.77.0.10"
	ClientIP   = "10.77.0.100"
	LedgerPort = 7000
)

// HostAddrs are each host's addresses: public, replication, management.
var HostAddrs = map[string]struct{ Public, Repl, Mgmt string }{
	HostA:  {"10.77.0.1", "10.77.1.1", "10.77.2.1"},
	HostB:  {"10.77.0.2", "10.77.1.2", "10.77.2.2"},
	HostW:  {"", "", "10.77.2.3"},
	HostW1: {"", "", "10.77.2.11"},
	HostW2: {"", "", "10.77.2.12"},
	HostW3: {"", "", "10.77.2.13"},
	HostC:  {ClientIP, "", ""},
}

// Names of links inside the host namespaces.
const (
	PublicBridge = "br-pub" // on a and b: guests' taps and the uplink
	ReplLink     = "repl0"
	MgmtLink     = "mgmt0"
	PublicLink   = "pub0"
)

// DefaultStateDir holds one directory per lab prefix.
const DefaultStateDir = "/run/ax-lab"

// Sentinel errors callers decide on.
var (
	ErrNotRoot   = errors.New("the lab must run as root: network namespaces and taps need CAP_NET_ADMIN (try: sudo)")
	ErrLabUp     = errors.New("lab already up")
	ErrStaleLab  = errors.New("stale lab")
	ErrNoLab     = errors.New("no lab")
	ErrBadPrefix = errors.New("bad lab prefix")
)

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,7}$`)

// Lab is one lab, identified by its prefix.
type Lab struct {
	Prefix   string
	StateDir string // <state root>/<prefix>
	ShmDir   string // guest RAM files (tmpfs)
	// QEMUUser: the user (and group) the lab's libvirtds run QEMU as;
	// "" is root (StartLibvirtd).
	QEMUUser string
	// LibvirtHostnames runs each libvirtd in a UTS namespace of its own
	// named <prefix>-<h> (StartLibvirtd): Nova's libvirt driver names its
	// compute node (and Placement its resource provider) after libvirt's
	// hostname, which two libvirtds of one machine would otherwise share.
	LibvirtHostnames bool
	log              *slog.Logger
	state            *State
}

// Config selects a lab.
type Config struct {
	Prefix    string // default "ax"
	StateRoot string // default DefaultStateDir
	Log       *slog.Logger
}

// Open names the lab with cfg's prefix without changing anything.
func Open(cfg Config) (*Lab, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "ax"
	}
	if !prefixRE.MatchString(cfg.Prefix) {
		return nil, fmt.Errorf("%w %q: use 1-8 lowercase letters and digits, starting with a letter", ErrBadPrefix, cfg.Prefix)
	}
	if cfg.StateRoot == "" {
		cfg.StateRoot = DefaultStateDir
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Lab{
		Prefix:   cfg.Prefix,
		StateDir: filepath.Join(cfg.StateRoot, cfg.Prefix),
		ShmDir:   filepath.Join("/dev/shm", "ax-lab-"+cfg.Prefix),
		log:      cfg.Log,
	}, nil
}

// Netns is the namespace name of host h.
func (l *Lab) Netns(h string) string { return l.Prefix + "-" + h }

// State returns the lab's recorded state, or ErrNoLab.
func (l *Lab) State() (*State, error) {
	s, err := loadState(stateFile(l.StateDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w %q is up", ErrNoLab, l.Prefix)
	}
	return s, err
}

// checkPrereqs says in one sentence what the machine lacks.
func checkPrereqs(needQEMU bool) error {
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("the ip command is missing (try: make deps, or apt-get install iproute2)")
	}
	if needQEMU {
		if _, err := exec.LookPath(QEMUBinary); err != nil {
			return fmt.Errorf("%s is missing (try: make deps, or apt-get install qemu-system-x86)", QEMUBinary)
		}
	}
	return nil
}

// Up creates the lab's hosts and networks. A lab with the same prefix that is
// up, or left over from a crash, is refused; on failure everything made so far
// is removed again.
func (l *Lab) Up(ctx context.Context) (err error) {
	if err := checkPrereqs(true); err != nil {
		return err
	}
	if s, err := l.State(); err == nil {
		if s.Status == "up" && l.allAlive(s) {
			return fmt.Errorf("%w: lab %q is already up since %s; use it, or remove it with: axctl lab down --prefix %s",
				ErrLabUp, l.Prefix, s.Created.Format(time.TimeOnly), l.Prefix)
		}
		return fmt.Errorf("%w: lab %q from an earlier run was left behind (state in %s); remove it with: axctl lab down --prefix %s",
			ErrStaleLab, l.Prefix, l.StateDir, l.Prefix)
	} else if !errors.Is(err, ErrNoLab) {
		return fmt.Errorf("%w: %v; remove it with: axctl lab down --prefix %s", ErrStaleLab, err, l.Prefix)
	}
	for _, h := range labHosts {
		if nsExists(l.Netns(h)) {
			return fmt.Errorf("network namespace %s exists but no lab %q is recorded: another lab or tool owns it; choose another --prefix, or delete it with: ip netns del %s",
				l.Netns(h), l.Prefix, l.Netns(h))
		}
	}
	if err := os.MkdirAll(l.StateDir, 0o755); err != nil {
		return fmt.Errorf("lab state: %w", err)
	}
	l.state = &State{Prefix: l.Prefix, Status: "creating", Created: time.Now(), path: stateFile(l.StateDir)}
	if err := l.state.save(); err != nil {
		os.RemoveAll(l.StateDir)
		return err
	}
	defer func() {
		if err != nil {
			l.log.Warn("lab up failed; removing what was made", "err", err)
			if derr := l.Down(context.Background()); derr != nil {
				l.log.Error("lab cleanup after failure", "err", derr)
			}
		}
	}()
	if err := l.buildNetwork(ctx); err != nil {
		return err
	}
	l.state.Status = "up"
	return l.state.save()
}

func (l *Lab) allAlive(s *State) bool {
	for _, p := range s.Procs {
		if !p.alive() {
			return false
		}
	}
	for _, ns := range s.Namespaces {
		if !nsExists(ns) {
			return false
		}
	}
	return true
}

// Down removes every process, namespace and file the lab recorded. It is
// safe to run twice and after a crash; without a lab it does nothing.
func (l *Lab) Down(ctx context.Context) error {
	s := l.state
	if s == nil {
		var err error
		if s, err = l.State(); errors.Is(err, ErrNoLab) {
			return nil
		} else if err != nil {
			return err
		}
	}
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	var errs []error
	for i := len(s.Procs) - 1; i >= 0; i-- {
		s.Procs[i].stop(3 * time.Second)
	}
	l.killNamespaceProcs(s.Namespaces)
	for i := len(s.Namespaces) - 1; i >= 0; i-- {
		ns := s.Namespaces[i]
		if !nsExists(ns) {
			continue
		}
		if pids := netnsPIDs(ns); len(pids) > 0 {
			errs = append(errs, fmt.Errorf("processes %v still run in %s", pids, ns))
		}
		if out, err := exec.CommandContext(ctx, "ip", "netns", "del", ns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %s", ns, strings.TrimSpace(string(out))))
		}
	}
	for i := len(s.Files) - 1; i >= 0; i-- {
		if err := os.RemoveAll(s.Files[i]); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("lab down left something behind: %w", errors.Join(errs...))
	}
	l.state = nil
	if err := os.RemoveAll(l.StateDir); err != nil {
		return fmt.Errorf("lab down: %w", err)
	}
	// The state root is shared by all prefixes; remove it only when empty.
	os.Remove(filepath.Dir(l.StateDir))
	return nil
}

// recordFile notes a path outside StateDir that Down must remove.
func (l *Lab) recordFile(path string) error {
	l.state.Files = append(l.state.Files, path)
	return l.state.save()
}

// Leftovers lists what of the lab still exists on the machine: namespaces,
// live processes, files. Empty after a clean Down; tests assert on it.
func (l *Lab) Leftovers(s *State) []string {
	var left []string
	for _, h := range labHosts {
		if nsExists(l.Netns(h)) {
			left = append(left, "netns "+l.Netns(h))
		}
	}
	if s != nil {
		for _, p := range s.Procs {
			if p.alive() {
				left = append(left, fmt.Sprintf("process %s pid %d", p.Name, p.PID))
			}
		}
		for _, f := range s.Files {
			if _, err := os.Lstat(f); err == nil {
				left = append(left, "file "+f)
			}
		}
	}
	for _, f := range []string{l.StateDir, l.ShmDir} {
		if _, err := os.Lstat(f); err == nil {
			left = append(left, "file "+f)
		}
	}
	return left
}
