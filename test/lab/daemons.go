package lab

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/test/image"
	"golang.org/x/sys/unix"
)

// Ports of AX's services on the lab hosts.
const (
	ReplPort    = 7400 // TCP streams and UDP heartbeats on the replication link
	MgmtPort    = 7401 // UDP heartbeats on the management network
	WitnessPort = 7402
	MetricsPort = 9400
)

// Socket is the axd API socket of host h.
func (l *Lab) Socket(h string) string { return filepath.Join(l.StateDir, "axd-"+h+".sock") }

// Client returns an API client for host h's axd.
func (l *Lab) Client(h string) *api.Client { return api.NewClient(l.Socket(h)) }

// AxdStateDir is host h's axd state directory (replicas live here, on tmpfs).
func (l *Lab) AxdStateDir(h string) string { return filepath.Join(l.ShmDir, "axd-"+h) }

// BPFDir is where host h's axd pins its FT output gates: per lab and host,
// as labs with other prefixes run side by side on one bpffs.
func (l *Lab) BPFDir(h string) string { return filepath.Join(bpfRoot, l.Prefix, h) }

// bpfRoot holds the labs' pinned gates (removed with each lab).
const bpfRoot = "/sys/fs/bpf/ax-lab"

// MetricsAddr is where host h's axd serves /metrics (inside the lab).
func MetricsAddr(h string) string { return fmt.Sprintf("%s:%d", HostAddrs[h].Mgmt, MetricsPort) }

// DaemonConfig tunes the lab's axd processes.
type DaemonConfig struct {
	Axd   string        // path of the axd binary
	Epoch time.Duration // FT epoch; default axd's
	Extra []string      // more flags for both hosts' axd
	// HostExtra are more flags for one host's axd, by host.
	HostExtra map[string][]string
	// PSK runs the daemons in PSK mode (one pre-shared key) instead of
	// TLS mode with a certificate per host from the lab's own CA.
	PSK bool
	// Witness is WitnessAxd (axd --witness on w; also when empty) or
	// WitnessEtcd (a 3-member etcd cluster on w1–w3).
	Witness string
	// Libvirt runs each host's axd with --libvirt against that host's
	// lab libvirtd (StartLibvirtd first): its VMs are libvirt domains.
	Libvirt bool
}

// libvirtArgs are the flags pointing host h's axd at h's lab libvirtd:
// its socket, where it puts RAM files (below memory_backing_dir), the directory of its QEMUs' pid
// files as seen outside libvirtd's mount namespace, and the directories a
// domain's files may be in (the lab's state, and its tmpfs with the disks and axd's state).
func (l *Lab) libvirtArgs(h string) []string {
	return []string{
		"--libvirt", l.LibvirtURI(h),
		"--libvirt-socket", l.libvirtSocket(h),
		"--libvirt-ram-dir", filepath.Join(l.LibvirtRAMDir(h), "libvirt", "qemu"),
		"--libvirt-pid-dir", filepath.Join(l.LibvirtDir(h), "run", "qemu"),
		"--libvirt-dir", l.StateDir,
		"--libvirt-dir", l.ShmDir,
	}
}

// PKIDir holds the lab's CA and the hosts' and witness's certificates.
func (l *Lab) PKIDir() string { return filepath.Join(l.StateDir, "pki") }

// ensureIdentities makes the lab's CA, a certificate for a and b and one
// for the witness w, and the PSK, once per lab.
func (l *Lab) ensureIdentities() error {
	dir := l.PKIDir()
	if _, err := os.Stat(identity.CAPath(dir)); err != nil {
		if err := identity.NewCA(dir, "ax-lab-ca", 24*time.Hour*30); err != nil {
			return err
		}
		for _, h := range []string{HostA, HostB} {
			if err := identity.Issue(dir, dir, h, identity.RoleHost, 24*time.Hour*30); err != nil {
				return err
			}
		}
		if err := identity.Issue(dir, dir, HostW, identity.RoleWitness, 24*time.Hour*30); err != nil {
			return err
		}
	}
	psk := filepath.Join(l.StateDir, "psk")
	if _, err := os.Stat(psk); err != nil {
		key := make([]byte, 32)
		rand.Read(key)
		if err := os.WriteFile(psk, []byte(hex.EncodeToString(key)+"\n"), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// identityArgs are the flags giving host h its identity.
func (l *Lab) identityArgs(h string, cfg DaemonConfig) []string {
	if cfg.PSK {
		return []string{"--psk-file", filepath.Join(l.StateDir, "psk")}
	}
	dir := l.PKIDir()
	args := []string{"--ca", identity.CAPath(dir), "--cert", identity.CertPath(dir, h), "--key", identity.KeyPath(dir, h)}
	if h != HostW {
		args = append(args, "--witness-name", HostW)
	}
	return args
}

// StartDaemons starts the witness on w and axd on a and b, each knowing the
// other as its partner, and waits until they serve.
func (l *Lab) StartDaemons(ctx context.Context, cfg DaemonConfig) error {
	if err := l.loadState(); err != nil {
		return err
	}
	if err := l.ensureIdentities(); err != nil {
		return fmt.Errorf("lab identities: %w", err)
	}
	switch cfg.Witness {
	case "", WitnessAxd:
		witness := fmt.Sprintf("%s:%d", HostAddrs[HostW].Mgmt, WitnessPort)
		wargs := append([]string{"--witness", "--listen", witness, "--witness-state", filepath.Join(l.StateDir, "witness-state.json")}, l.identityArgs(HostW, cfg)...)
		if err := l.startProc(ctx, HostW, "axd-witness", cfg.Axd, wargs...); err != nil {
			return err
		}
	case WitnessEtcd:
		if err := l.StartEtcd(ctx); err != nil {
			return err
		}
	default:
		return fmt.Errorf("lab witness %q: want %s or %s", cfg.Witness, WitnessAxd, WitnessEtcd)
	}
	for _, h := range []string{HostA, HostB} {
		if err := l.StartAxd(ctx, h, cfg); err != nil {
			return err
		}
	}
	return nil
}

// StartAxd starts (or restarts) host h's axd.
func (l *Lab) StartAxd(ctx context.Context, h string, cfg DaemonConfig) error {
	if err := l.loadState(); err != nil {
		return err
	}
	other := HostB
	if h == HostB {
		other = HostA
	}
	stateDir := l.AxdStateDir(h)
	if !contains(l.state.Files, l.ShmDir) {
		os.MkdirAll(l.ShmDir, 0o755)
		if err := l.recordFile(l.ShmDir); err != nil {
			return err
		}
	}
	args := []string{
		"--host", h, "--socket", l.Socket(h), "--state-dir", stateDir,
		"--repl-listen", fmt.Sprintf("%s:%d", HostAddrs[h].Repl, ReplPort),
		"--mgmt-listen", fmt.Sprintf("%s:%d", HostAddrs[h].Mgmt, MgmtPort),
		"--peer", fmt.Sprintf("%s=%s:%d,%s:%d", other, HostAddrs[other].Repl, ReplPort, HostAddrs[other].Mgmt, MgmtPort),
		"--metrics", MetricsAddr(h),
		"--bridge", PublicBridge,
		"--image-dir", image.DefaultCacheDir,
		"--bpf-dir", l.BPFDir(h),
	}
	if !contains(l.state.Files, filepath.Dir(l.BPFDir(h))) {
		if err := l.recordFile(filepath.Dir(l.BPFDir(h))); err != nil {
			return err
		}
	}
	// The guests' own kernels (--kernel) may live elsewhere: the lab's
	// hosts allow the directories its guests boot from.
	dirs := map[string]bool{}
	for _, vm := range l.state.VMs {
		for _, f := range []string{vm.Spec.Kernel, vm.Spec.Initrd} {
			if f != "" && !dirs[filepath.Dir(f)] {
				dirs[filepath.Dir(f)] = true
				args = append(args, "--image-dir", filepath.Dir(f))
			}
		}
	}
	if err := l.ensureIdentities(); err != nil {
		return fmt.Errorf("lab identities: %w", err)
	}
	args = append(args, l.identityArgs(h, cfg)...)
	if cfg.Witness == WitnessEtcd {
		args = append(args, l.etcdArgs(h)...)
	} else {
		args = append(args, "--witness-addr", fmt.Sprintf("%s:%d", HostAddrs[HostW].Mgmt, WitnessPort))
	}
	if cfg.Epoch > 0 {
		args = append(args, "--epoch", cfg.Epoch.String())
	}
	if cfg.Libvirt {
		args = append(args, l.libvirtArgs(h)...)
	}
	args = append(args, cfg.Extra...)
	args = append(args, cfg.HostExtra[h]...)
	os.Remove(l.Socket(h))
	if err := l.startProc(ctx, h, "axd-"+h, cfg.Axd, args...); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := l.Client(h).Status(ctx); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("axd on %s did not start; see %s", h, filepath.Join(l.StateDir, "axd-"+h+".log"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (l *Lab) loadState() error {
	if l.state != nil {
		return nil
	}
	s, err := l.State()
	if err != nil {
		return err
	}
	l.state = s
	return nil
}

// startProc starts a lab process in host h's namespace, detached, its
// output appended to <state>/<name>.log, and records it.
func (l *Lab) startProc(ctx context.Context, h, name, bin string, args ...string) error {
	_, err := l.startLogged(h, name, filepath.Join(l.StateDir, name+".log"), bin, args...)
	return err
}

// startLogged starts bin in host h's namespace in its own session (it
// outlives the lab command; no terminal signal reaches it), its output
// appended to logPath, records it under name, and returns its PID.
func (l *Lab) startLogged(h, name, logPath, bin string, args ...string) (int, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.Netns(h), bin}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", name, err)
	}
	go cmd.Wait() // reap it if it exits while this process still runs (tests)
	ticks, _, err := procStat(cmd.Process.Pid)
	if err != nil {
		return 0, fmt.Errorf("start %s: it exited at once; see %s", name, logPath)
	}
	l.state.Procs = append(l.state.Procs, Proc{Name: name, PID: cmd.Process.Pid, StartTicks: ticks})
	return cmd.Process.Pid, l.state.save()
}

// netnsPIDs lists the processes whose network namespace is ns.
func netnsPIDs(ns string) []int {
	var st syscall.Stat_t
	if err := syscall.Stat("/run/netns/"+ns, &st); err != nil {
		return nil
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil && link == want {
			pids = append(pids, pid)
		}
	}
	return pids
}

// KillHost is the sudden death of host h: every process in its namespace
// (QEMU, axd) is killed with SIGKILL and its links are cut.
func (l *Lab) KillHost(ctx context.Context, h string) error {
	for _, pid := range netnsPIDs(l.Netns(h)) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	return l.CutLinks(ctx, h)
}

// ReviveHost brings host h's links back up (after KillHost); its daemons
// are started again with StartAxd.
func (l *Lab) ReviveHost(ctx context.Context, h string) error {
	for _, link := range []string{PublicLink, MgmtLink, ReplLink} {
		if err := ip(ctx, "-n", l.Netns(h), "link", "set", link, "up"); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
			return err
		}
	}
	// The guest's tap is stale (its QEMU died); remove it so a guest
	// coming back here can plug in afresh.
	for _, vm := range l.state.VMs {
		if vm.Host == h {
			ip(ctx, "-n", l.Netns(h), "link", "del", vm.Tap)
		}
	}
	return nil
}

// killNamespaceProcs ends every process still inside the lab's namespaces:
// guests that an axd started (replicas promoted), which the lab did not
// record itself.
func (l *Lab) killNamespaceProcs(nss []string) {
	var pids []int
	for _, ns := range nss {
		pids = append(pids, netnsPIDs(ns)...)
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	deadline := time.Now().Add(3 * time.Second)
	for _, pid := range pids {
		for time.Now().Before(deadline) && syscall.Kill(pid, 0) == nil {
			if isZombie(pid) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// isZombie reports whether pid has ended (gone, or a zombie not yet reaped).
func isZombie(pid int) bool {
	_, state, err := procStat(pid)
	return err != nil || state == 'Z'
}

// DefineGuest registers a lab guest with its host's axd.
func (l *Lab) DefineGuest(ctx context.Context, vm *VM) error {
	spec := api.VMSpec{Name: vm.Name, PID: vm.PID, Guest: vm.Spec, Bridge: PublicBridge, Policy: "restart-app"}
	return l.Client(vm.Host).Define(ctx, spec)
}

// Scrape fetches http://addr/metrics from host from's namespace.
func (l *Lab) Scrape(ctx context.Context, from, addr string) (string, error) {
	return l.HTTPGet(ctx, from, addr, "/metrics")
}

// HTTPGet fetches http://addr/path from host from's namespace.
func (l *Lab) HTTPGet(ctx context.Context, from, addr, path string) (string, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := l.DialFrom(dctx, from, addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET http://%s%s: %s", addr, path, resp.Status)
	}
	return string(body), nil
}

// StartPrometheus runs a Prometheus server on host w that scrapes both
// hosts' axd every second and loads the given rule files; it serves on
// w's management address, port 9090.
func (l *Lab) StartPrometheus(ctx context.Context, ruleFiles ...string) (string, error) {
	if err := l.loadState(); err != nil {
		return "", err
	}
	dir := filepath.Join(l.StateDir, "prometheus")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	var rules strings.Builder
	for _, f := range ruleFiles {
		abs, _ := filepath.Abs(f)
		fmt.Fprintf(&rules, "  - %q\n", abs)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
%sscrape_configs:
  - job_name: axd
    static_configs:
      - targets: [%q, %q]
`, rules.String(), MetricsAddr(HostA), MetricsAddr(HostB))
	conf := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		return "", err
	}
	addr := fmt.Sprintf("%s:9090", HostAddrs[HostW].Mgmt)
	err := l.startProc(ctx, HostW, "prometheus", "prometheus", "--config.file="+conf,
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr)
	return addr, err
}

// AxdPID is the pid of the axd running on host h, as the lab recorded it
// (the last one started: an axd killed and started again stays listed).
func (l *Lab) AxdPID(h string) (int, error) {
	if err := l.loadState(); err != nil {
		return 0, err
	}
	pid := 0
	for _, p := range l.state.Procs {
		if p.Name == "axd-"+h && !isZombie(p.PID) {
			pid = p.PID
		}
	}
	if pid == 0 {
		return 0, fmt.Errorf("no axd runs on %s in the lab's state", h)
	}
	return pid, nil
}

// qemuPIDs are the QEMU processes running in host h's network namespace.
func qemuPIDs(l *Lab, h string) ([]int, error) {
	var ns unix.Stat_t
	if err := unix.Stat("/run/netns/"+l.Netns(h), &ns); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || !strings.HasPrefix(string(comm), "qemu-system") {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && st.Ino == ns.Ino && st.Dev == ns.Dev {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// Takeover is when, after axd on a primary stopped working, its guest's
// QEMU was stopped (or gone) and the partner ran the VM (promoting counts).
type Takeover struct{ Stopped, Running time.Duration }

// watchTakeover samples every 10 ms from t0, for up to within, whether the
// old primary's QEMU pid is stopped and whether host to runs vm; it returns
// once to runs it — an error if the old QEMU still ran then, or if to never
// took over.
func (l *Lab) watchTakeover(ctx context.Context, vm string, pid int, to string, t0 time.Time, within time.Duration) (Takeover, error) {
	var tk Takeover
	c := l.Client(to)
	for deadline := t0.Add(within); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		_, st, err := procStat(pid)
		stopped := err != nil || st == 'T' || st == 'Z'
		if stopped && tk.Stopped == 0 {
			tk.Stopped = time.Since(t0)
		}
		if s, err := l.vmStatus(ctx, c, vm); err == nil && (s.Role != api.RoleSecondary || s.State == "promoting") {
			tk.Running = time.Since(t0)
			if !stopped {
				return tk, fmt.Errorf("%s runs %s (%s) while the old primary's QEMU (pid %d) still runs", to, vm, s.State, pid)
			}
			return tk, nil
		}
	}
	return tk, fmt.Errorf("%s did not take %s over within %s:%s", to, vm, within, l.eventsText(ctx, c))
}
