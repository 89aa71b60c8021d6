package vagrant

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/test/testenv"
)

// root is the top of the tree, where the Vagrantfile and the Makefile are.
func root(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "Vagrantfile")); err != nil {
		t.Fatalf("no Vagrantfile at the top of the tree: %v", err)
	}
	return dir
}

// TestVagrantfileValidates runs `vagrant validate` (CI runs it; the lab
// itself is too long for CI: make vagrant-test).
func TestVagrantfileValidates(t *testing.T) {
	testenv.RequireCommand(t, "vagrant", "make deps, or apt-get install vagrant vagrant-libvirt")
	cmd := exec.Command("vagrant", "validate")
	cmd.Dir = root(t)
	// Nothing staged, no box built: what a fresh checkout has.
	cmd.Env = append(os.Environ(), "AX_VAGRANT_CACHE="+t.TempDir(), "VAGRANT_CHECKPOINT_DISABLE=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "validated successfully") {
		t.Fatalf("vagrant validate: %v\n%s", err, out)
	}
}

// TestVagrantScripts: the lab's shell scripts parse, and the libvirtd
// helper's status says which libvirtd would be used without starting or
// stopping any.
func TestVagrantScripts(t *testing.T) {
	dir := root(t)
	for _, s := range []string{"box.sh", "libvirtd.sh", "provision.sh", "up.sh", "down.sh"} {
		if out, err := exec.Command("sh", "-n", filepath.Join(dir, "test", "vagrant", s)).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", s, err, out)
		}
	}
	out, err := exec.Command("sh", filepath.Join(dir, "test", "vagrant", "libvirtd.sh"), "bogus").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "usage") {
		t.Errorf("libvirtd.sh bogus: %v, %q, want its usage", err, out)
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		return
	}
	out, err = exec.Command("sh", filepath.Join(dir, "test", "vagrant", "libvirtd.sh"), "status").Output()
	if s := strings.TrimSpace(string(out)); err != nil || !regexp.MustCompile(`^(none|another|ours \(pid \d+\))$`).MatchString(s) {
		t.Errorf("libvirtd.sh status: %v, %q", err, s)
	}
}

// The FT guest inside ax-a: the lab guest image (test/image), as the
// single-machine lab runs it, on ax-a's public bridge.
const (
	guestIP     = "10.78.0.50"
	ledgerAddr  = guestIP + ":7000"
	guestDir    = "/run/ax-guest/vm1"
	recordFile  = "/var/tmp/ax-records"
	tickPattern = `AXTICK (\d+)`
)

func guestSpec() api.VMSpec {
	accel := "tcg"
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		if cpu, err := os.ReadFile("/proc/cpuinfo"); err == nil && qemu.HardwareVirt(cpu) != "" {
			accel = "kvm" // the boxes have nested KVM then (see the Vagrantfile)
		}
	}
	return api.VMSpec{
		Name:   "vm1",
		PID:    -1, // filled in by the start script
		Bridge: "br-pub",
		Guest: api.Guest{
			Name:    "vm1",
			RAMMiB:  128,
			RAMFile: "/dev/shm/ax-guest/vm1.ram",
			Console: guestDir + "/console.log",
			Agent:   guestDir + "/agent.sock",
			Tap:     "tap-vm1",
			MAC:     "52:54:00:a7:00:01",
			Boot: api.Boot{Kernel: "/var/lib/ax-guest/vmlinuz", Initrd: "/var/lib/ax-guest/initrd",
				Append: "console=ttyS0 quiet panic=-1 ax.ip=" + guestIP + "/24 ax.dirty=0 ax.tick=100ms"},
			QEMU: api.QEMU{QMP: guestDir + "/qmp.sock", PIDFile: guestDir + "/qemu.pid", Accel: accel},
		},
	}
}

// startScript starts the guest's QEMU under ax-a's systemd and defines it
// with axd (its spec gets QEMU's PID). The guest runs at a lower priority
// than axd: under TCG its QEMU would take a whole vCPU, and axd renews
// its lease beside it.
func startScript(spec api.VMSpec) (string, error) {
	js, err := json.Marshal(spec)
	if err != nil {
		return "", err
	}
	var args []string
	for _, a := range append([]string{qemu.Binary}, qemu.GuestFor(spec.Guest).Args()...) {
		args = append(args, shellQuote(a))
	}
	return fmt.Sprintf(`set -e
mkdir -p %[1]s /dev/shm/ax-guest
ip tuntap add dev %[2]s mode tap
ip link set %[2]s master %[3]s up
systemd-run --unit ax-guest-vm1 --collect -p Nice=10 %[4]s
i=0; while [ ! -s %[5]s ]; do i=$((i+1)); [ $i -lt 60 ] || { journalctl -u ax-guest-vm1 | tail; exit 1; }; sleep 1; done
pid=$(cat %[5]s)
sed "s/\"pid\":-1/\"pid\":$pid/" >%[1]s/spec.json <<'EOF'
%[6]s
EOF
axctl define %[1]s/spec.json
`, guestDir, spec.Guest.Tap, spec.Bridge, strings.Join(args, " "), spec.Guest.PIDFile, js), nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// lab runs commands on the host and in the machines.
type lab struct {
	t         *testing.T
	root      string
	sshConfig string // from vagrant ssh-config, once the machines are up
}

func (l *lab) run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = l.root
	cmd.Env = append(os.Environ(), "VAGRANT_CHECKPOINT_DISABLE=1")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// ssh runs script as root on machine, with plain ssh and the machines'
// ssh-config (vagrant ssh would start Ruby for each command: seconds of CPU
// the nested guest needs more on a small host).
func (l *lab) ssh(ctx context.Context, machine, script string) (string, error) {
	if l.sshConfig == "" {
		out, err := l.run(ctx, "vagrant", "ssh-config")
		if err != nil {
			return out, fmt.Errorf("vagrant ssh-config: %w", err)
		}
		f := filepath.Join(l.t.TempDir(), "ssh-config")
		if err := os.WriteFile(f, []byte(out), 0o600); err != nil {
			return "", err
		}
		l.sshConfig = f
	}
	return l.run(ctx, "ssh", "-F", l.sshConfig, "-o", "ConnectTimeout=30", machine, "sudo sh -c "+shellQuote(script))
}

func (l *lab) mustSSH(ctx context.Context, machine, script string) string {
	l.t.Helper()
	out, err := l.ssh(ctx, machine, script)
	if err != nil {
		l.t.Fatalf("%s: %s: %v\n%s", machine, script, err, out)
	}
	return out
}

// waitFor retries check every interval until it returns true or the time is up.
func waitFor(ctx context.Context, timeout, interval time.Duration, check func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if check() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(interval)
	}
}

func lastTick(console string) uint64 {
	m := regexp.MustCompile(tickPattern).FindAllStringSubmatch(console, -1)
	if len(m) == 0 {
		return 0
	}
	n, _ := strconv.ParseUint(m[len(m)-1][1], 10, 64)
	return n
}

func firstTick(console string) uint64 {
	m := regexp.MustCompile(tickPattern).FindStringSubmatch(console)
	if m == nil {
		return 0
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}

// TestVagrantFailover is make vagrant-test: it brings the Vagrant lab up
// with make vagrant-up, boots the lab guest on ax-a, protects it with FT
// (partner ax-b, witness ax-w), runs the ledger client on ax-c, kills ax-a
// (virsh destroy of its domain), and checks that the guest resumed on ax-b
// from its last checkpoint and that no acknowledged record was lost. It
// ends with make vagrant-down (AX_VAGRANT_KEEP=1 keeps the lab).
func TestVagrantFailover(t *testing.T) {
	if os.Getenv("AX_VAGRANT") != "1" {
		t.Skip("the Vagrant lab takes half an hour under TCG: run make vagrant-test (AX_VAGRANT=1, as root)")
	}
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "vagrant", "make deps")
	ctx := t.Context()
	l := &lab{t: t, root: root(t)}
	start := time.Now()
	if os.Getenv("AX_VAGRANT_KEEP") != "1" {
		t.Cleanup(func() {
			out, err := l.run(context.Background(), "make", "--no-print-directory", "vagrant-down")
			t.Logf("make vagrant-down: %v\n%s", err, out)
		})
	}
	out, err := l.run(ctx, "make", "--no-print-directory", "vagrant-up")
	if err != nil {
		t.Fatalf("make vagrant-up: %v\n%s", err, out)
	}
	up := time.Since(start)
	t.Logf("make vagrant-up: %s\n%s", up.Round(time.Second), lastLines(out, 3))
	for _, m := range []string{"ax-a", "ax-b"} {
		t.Logf("%s: %s", m, l.mustSSH(ctx, m, "systemctl is-active axd && axctl status"))
	}
	t.Logf("ax-w: %s", l.mustSSH(ctx, "ax-w", "systemctl is-active ax-witness"))

	// The guest on ax-a.
	spec := guestSpec()
	script, err := startScript(spec)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	l.mustSSH(ctx, "ax-a", script)
	ping := func() bool {
		out, err := l.ssh(ctx, "ax-c", "echo PING | nc -w 20 -q 10 "+guestIP+" 7000")
		return err == nil && strings.Contains(out, "PONG")
	}
	if !waitFor(ctx, 15*time.Minute, 5*time.Second, ping) {
		con, _ := l.ssh(ctx, "ax-a", "tail -20 "+spec.Guest.Console)
		t.Fatalf("the guest's ledger never answered from ax-c; console:\n%s", con)
	}
	boot := time.Since(t0)
	t.Logf("guest serving on ax-a after %s", boot.Round(time.Second))

	t0 = time.Now()
	l.mustSSH(ctx, "ax-a", "axctl protect vm1 --level ft --peer b")
	protect := time.Since(t0)
	// protect returns once the VM is protected, but FT may have fallen back
	// to HA (a checkpoint that failed): nothing to fail over then.
	var st api.Status
	if out := l.mustSSH(ctx, "ax-a", "axctl status --json"); json.Unmarshal([]byte(out), &st) != nil || len(st.VMs) != 1 || st.VMs[0].Level != "ft" {
		diag, _ := l.ssh(ctx, "ax-a", "axctl status; axctl events | tail -30; tail -20 $(find /var/lib/ax -name guard.log)")
		t.Fatalf("vm1 is not at level ft after axctl protect:\n%s", diag)
	}
	t.Logf("FT protected in %s: %s", protect.Round(time.Second), l.mustSSH(ctx, "ax-a", "axctl status"))

	// The client writes records while a fails.
	l.mustSSH(ctx, "ax-c", fmt.Sprintf("rm -f %[1]s; systemd-run --unit ax-client --collect ax-workload client --addr %[2]s --rate 5 --record %[1]s --tag v", recordFile, ledgerAddr))
	acked := func() int {
		out, err := l.ssh(ctx, "ax-c", "cat "+recordFile+" 2>/dev/null | wc -l")
		if err != nil {
			return -1
		}
		n, _ := strconv.Atoi(strings.TrimSpace(lastLines(out, 1)))
		return n
	}
	if !waitFor(ctx, 5*time.Minute, 5*time.Second, func() bool { return acked() >= 50 }) {
		t.Fatalf("the client got under 50 acks in 5 minutes (%d); ax-a: %s", acked(), l.mustSSH(ctx, "ax-a", "axctl status; axctl events | tail -20"))
	}
	ackedBefore := acked()
	conA, _ := l.ssh(ctx, "ax-a", "cat "+spec.Guest.Console)
	tickA := lastTick(conA)
	statusA, _ := l.ssh(ctx, "ax-a", "axctl status")

	// Kill ax-a: its whole machine, as a host failure would.
	id, err := os.ReadFile(filepath.Join(l.root, ".vagrant", "machines", "ax-a", "libvirt", "id"))
	if err != nil {
		t.Fatalf("ax-a's domain: %v", err)
	}
	kill := time.Now()
	if out, err := l.run(ctx, "virsh", "-c", "qemu:///system", "destroy", strings.TrimSpace(string(id))); err != nil {
		t.Fatalf("virsh destroy ax-a: %v\n%s", err, out)
	}
	t.Logf("killed ax-a at tick %d with %d records acked; ax-a said before:\n%s", tickA, ackedBefore, statusA)
	if !waitFor(ctx, 10*time.Minute, 2*time.Second, ping) {
		t.Fatalf("the guest never answered after ax-a died; ax-b: %s", l.mustSSH(ctx, "ax-b", "axctl status; axctl events | tail -30"))
	}
	failover := time.Since(kill)
	t.Logf("the guest answers again %s after ax-a died; ax-b: %s", failover.Round(time.Millisecond), l.mustSSH(ctx, "ax-b", "axctl status"))

	// The client goes on; then verify everything it was acknowledged.
	if !waitFor(ctx, 5*time.Minute, 5*time.Second, func() bool { return acked() >= ackedBefore+20 }) {
		t.Fatalf("the client got no 20 more acks after the failover (%d before, %d now)", ackedBefore, acked())
	}
	l.mustSSH(ctx, "ax-c", "systemctl stop ax-client")
	t0 = time.Now()
	vout := l.mustSSH(ctx, "ax-c", fmt.Sprintf("ax-workload verify --addr %s --record %s --timeout 5m", ledgerAddr, recordFile))
	verify := time.Since(t0)
	m := regexp.MustCompile(`acked=(\d+) verified=(\d+) records=(\d+) missing=(\d+)`).FindStringSubmatch(vout)
	if m == nil {
		t.Fatalf("verify said %q", vout)
	}
	if m[4] != "0" || m[1] != m[2] {
		t.Errorf("acknowledged records lost: %s", m[0])
	}

	// The guest on b continued from a checkpoint, not a fresh boot, and
	// its kernel is sane.
	conB := l.mustSSH(ctx, "ax-b", "cat $(find /var/lib/ax -name console.log | head -1)")
	tickB := firstTick(conB)
	if tickB <= 1 {
		t.Errorf("the guest on ax-b started at tick %d: not resumed (ax-a was at %d)", tickB, tickA)
	}
	for _, bad := range []string{"Oops", "BUG:", "general protection fault", "Kernel panic", "double fault"} {
		if strings.Contains(conB, bad) {
			t.Errorf("the resumed guest's console shows %q:\n%s", bad, lastLines(conB, 30))
		}
	}
	t.Logf("vagrant-test: up %s, guest boot %s, FT protect %s, failover %s (tick %d on a → %d on b), %s, verify %s, total %s",
		up.Round(time.Second), boot.Round(time.Second), protect.Round(time.Second), failover.Round(time.Millisecond),
		tickA, tickB, m[0], verify.Round(time.Second), time.Since(start).Round(time.Second))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
