package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/test/openstack"
	"github.com/axproject/ax/test/testenv"
)

// requireOpenStack skips (fails under AX_REQUIRE_PRIVILEGED=1) without
// the lab's libvirt or the test cloud's packages (test/openstack/deps.sh,
// which also installs python3-libvirt for Nova's libvirt driver).
func requireOpenStack(t *testing.T) {
	t.Helper()
	requireLibvirt(t)
	testenv.RequireLong(t)
	for _, c := range append(openstack.Commands, "privsep-helper") {
		testenv.RequireCommand(t, c, "sh test/openstack/deps.sh (make deps)")
	}
	imports := "import " + strings.Join(append(openstack.PythonModules, openstack.LibvirtPythonModules...), ", ")
	if out, err := exec.Command("/usr/bin/python3", "-c", imports).CombinedOutput(); err != nil {
		why := fmt.Sprintf("python3: %s: %s (try: sh test/openstack/deps.sh)", imports, strings.TrimSpace(string(out)))
		if testenv.Privileged() {
			t.Fatalf("required but unavailable: %s", why)
		}
		t.Skip(why)
	}
}

// osLabPrefix is the lab of TestIntegrationOpenStackFT.
const osLabPrefix = "osl"

// osGuestCmdline is the lab guest's command line as a Glance property: no
// NIC (servers are created with networks "none"), no agent channel (Nova
// defines none), the console tick every 100 ms.
const osGuestCmdline = "console=ttyS0 quiet panic=-1 ax.dirty=0 ax.tick=100ms ax.agent=0"

// TestIntegrationOpenStackFT runs Nova's libvirt driver on the lab's
// hypervisor hosts: the test cloud (test/openstack: Keystone, Placement,
// Glance, Nova's control services on loopback) with a nova-compute per
// host against that host's lab libvirtd, file-backed guest RAM; the lab's
// guest image put into Glance as kernel, ramdisk and root image; a server
// created with openstack server create --property ax:level=ft boots
// directly from the kernel and ticks on its console (Nova's console.log).
// ax-nova-hook, in each libvirtd's hooks directory, hands the start to
// axd, which takes the level from Nova; once the guest has a NIC it is
// protected at FT towards b and ax:status says so. Then host a is killed
// and b resumes the guest, its tick going on; Nova's view after it is
// logged as it is (nothing moves Nova's record yet).
func TestIntegrationOpenStackFT(t *testing.T) {
	requireOpenStack(t)
	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	dir := t.TempDir()

	// The cloud starts (minutes of Python) while the lab comes up.
	type started struct {
		c   *openstack.Cloud
		err error
	}
	cloudUp := make(chan started, 1)
	go func() {
		c, err := openstack.StartWith(ctx, filepath.Join(dir, "cloud"), t.Logf, openstack.Options{NoFakeCompute: true})
		cloudUp <- started{c, err}
	}()
	var c *openstack.Cloud
	t.Cleanup(func() {
		if c == nil {
			if s := <-cloudUp; s.c != nil {
				s.c.Close()
			}
			return
		}
		if t.Failed() {
			osLogTails(t, filepath.Join(c.Dir, "log"))
		}
		c.Close()
	})

	l, err := Open(Config{Prefix: osLabPrefix})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx) // a leftover of an earlier crashed run
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, name := range []string{"axd-a", "axd-b", "libvirtd-a", "libvirtd-b"} {
				if data, err := os.ReadFile(filepath.Join(l.StateDir, name+".log")); err == nil {
					t.Logf("%s log (tail):\n%s", name, tail(string(data), 40))
				}
			}
		}
		state, _ := l.State()
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("down: %v", err)
		}
		if left := l.Leftovers(state); len(left) > 0 {
			t.Errorf("teardown left: %s", strings.Join(left, ", "))
		}
	})
	img := testImage(t)
	hook := novaHookBinary(t)
	dcfg := DaemonConfig{Axd: axdBinary(t), Libvirt: true}
	// Each host's libvirtd runs the hook, which hands its events to that
	// host's axd; libvirtd looks for hooks when it starts.
	l.LibvirtHostnames = true
	for _, h := range []string{HostA, HostB} {
		installNovaHook(t, l, h, hook)
		if err := l.StartLibvirtd(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	s := <-cloudUp
	c = s.c
	if s.err != nil {
		t.Fatal(s.err)
	}
	t.Logf("cloud and lab up %.0f s after the start", time.Since(began).Seconds())
	for _, h := range []string{HostA, HostB} {
		t0 := time.Now()
		if err := c.StartLibvirtCompute(ctx, openstack.LibvirtCompute{Host: h, URI: l.LibvirtURI(h), FileBackedMemoryMiB: 1024}); err != nil {
			t.Fatal(err)
		}
		t.Logf("nova-compute with the libvirt driver on %s mapped in %.1f s", h, time.Since(t0).Seconds())
		// axd runs in h's network namespace: the cloud's loopback
		// endpoints (the ones in Keystone's catalog) are forwarded there.
		forwardLoopback(t, l, h, c.Keystone, c.Nova, c.Glance)
	}
	// axd takes levels from Nova (its --host is the compute host's name
	// in Nova, so --nova-host is the same); Nova's instance directories
	// hold the domains' files. Failed levels are retried every 10 s.
	dcfg.Extra = []string{"--nova-cloud", "ax", "--nova-clouds-file", c.CloudsYAML(), "--nova-resync", "10s", "--libvirt-dir", c.Dir}
	if err := l.StartDaemons(ctx, dcfg); err != nil {
		t.Fatal(err)
	}
	imageID, err := c.KernelImage(ctx, "ax-lab-guest", img.Kernel, img.Initrd, osGuestCmdline, nil)
	if err != nil {
		t.Fatal(err)
	}
	osc := func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, "openstack", args...)
		cmd.Env = append(os.Environ(), "OS_CLOUD=ax", "OS_CLIENT_CONFIG_FILE="+c.CloudsYAML())
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("openstack %s: %v: %s", strings.Join(args, " "), err, stderr.Bytes())
		}
		return strings.TrimSpace(string(out))
	}
	osc("flavor", "create", "--ram", "256", "--disk", "1", "--vcpus", "1", "ax.lab")

	// M1: the server boots on a from Glance's kernel and ticks.
	created := time.Now()
	id := osc("server", "create", "--os-compute-api-version", "2.37", "--flavor", "ax.lab", "--image", imageID,
		"--nic", "none", "--availability-zone", "nova:"+HostA, "--property", "ax:level=ft", "-f", "value", "-c", "id", "ax-ft")
	console := filepath.Join(c.InstanceDir(HostA, id), "console.log")
	booted := waitConsole(t, console, "AXTICK", 3*time.Minute)
	var server struct {
		Status   string            `json:"status"`
		Instance string            `json:"OS-EXT-SRV-ATTR:instance_name"`
		Host     string            `json:"OS-EXT-SRV-ATTR:host"`
		Props    map[string]string `json:"properties"`
	}
	show := func() {
		t.Helper()
		if err := json.Unmarshal([]byte(osc("server", "show", id, "-f", "json")), &server); err != nil {
			t.Fatal(err)
		}
	}
	for show(); server.Status != "ACTIVE"; show() {
		if server.Status == "ERROR" || time.Since(created) > 3*time.Minute {
			t.Fatalf("server %s: %s", id, server.Status)
		}
		time.Sleep(500 * time.Millisecond)
	}
	domain := server.Instance
	t.Logf("openstack server create: %s (%s) on %s, first tick on its console %.1f s after the create (TCG boot), ACTIVE by %.1f s",
		id, domain, server.Host, booted.Sub(created).Seconds(), time.Since(created).Seconds())

	// M2: the hook told axd on a of the start, axd asked Nova: ft towards
	// b. Without Neutron Nova gives the guest no NIC, and AX holds an FT
	// guest's output on its tap: the lab plugs one as Neutron's agent
	// would (a tap on a's public bridge, attached live), and defines the
	// domain on b, as AX never defines one from a peer's XML.
	st := osStatus(t, osc, id, 30*time.Second, func(s string) bool { return s != "" })
	t.Logf("ax:status before the guest has a NIC: %q", st)
	tap := "tap-os1"
	if err := l.addTap(ctx, HostA, tap); err != nil {
		t.Fatal(err)
	}
	nic := filepath.Join(l.StateDir, "nic.xml")
	if err := os.WriteFile(nic, []byte("<interface type='ethernet'><mac address='52:54:00:a7:00:31'/><target dev='"+tap+"' managed='no'/><model type='virtio'/><driver><host csum='off'/></driver></interface>\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Virsh(ctx, HostA, "attach-device", domain, nic, "--live", "--config"); err != nil {
		t.Fatal(err)
	}
	def, err := l.Virsh(ctx, HostA, "dumpxml", "--inactive", domain)
	if err != nil {
		t.Fatal(err)
	}
	defPath := filepath.Join(l.StateDir, domain+"-b.xml")
	if err := os.WriteFile(defPath, []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Virsh(ctx, HostB, "define", defPath); err != nil {
		t.Fatal(err)
	}
	plugged := time.Now()
	vs := waitVM(t, l, l.Client(HostA), domain, 90*time.Second, "FT on a", func(s api.VMStatus) bool {
		return s.Level == api.LevelFT && s.State == "protected"
	})
	protected := time.Since(plugged)
	st = osStatus(t, osc, id, 30*time.Second, func(s string) bool { return strings.HasPrefix(s, "ft towards b: protected") })
	t.Logf("FT protected %.1f s after the NIC was plugged (axd status; %.1f s after the create); ax:status in Nova %.1f s after the plug: %q; axd on a: %s %s %s towards %s, epoch %d, pause p50 %.1f ms",
		protected.Seconds(), plugged.Add(protected).Sub(created).Seconds(), time.Since(plugged).Seconds(), st, vs.Name, vs.Level, vs.State, vs.Peer, vs.Epoch, vs.PauseP50MS)

	// The hook handed a's start of the domain to axd on a, and axctl
	// status says FT.
	if ev := hookEvent(t, l, HostA, domain, " started ("); ev == "" {
		t.Errorf("axd on a recorded no hook event of %s's start: the hook is not in the loop", domain)
	} else {
		t.Logf("axd on a, hook event: %s", ev)
	}
	axctl := exec.CommandContext(ctx, buildInto(t, "axctl", "github.com/axproject/ax/cmd/axctl"), "--socket", l.Socket(HostA), "status")
	if out, err := axctl.CombinedOutput(); err != nil || !strings.Contains(string(out), domain) || !strings.Contains(string(out), "ft") {
		t.Errorf("axctl status on a: %v:\n%s", err, out)
	} else {
		t.Logf("axctl status on a:\n%s", out)
	}

	// M3: host a dies (QEMU, libvirtd, axd; links cut; and its
	// nova-compute): b resumes the guest from the last checkpoint.
	time.Sleep(10 * time.Second)
	pre, _ := os.ReadFile(console)
	killed := time.Now()
	if err := l.KillHost(ctx, HostA); err != nil {
		t.Fatal(err)
	}
	c.Kill(openstack.ComputeName(HostA))
	vs = waitVM(t, l, l.Client(HostB), domain, 2*time.Minute, "the guest running on b", func(s api.VMStatus) bool {
		return s.Role == api.RoleLocal || s.Role == api.RolePrimary
	})
	promoted := time.Since(killed)
	out, err := l.Virsh(ctx, HostB, "domstate", domain)
	t.Logf("host a killed: %s runs on b (%s, %s) %.2f s after the kill, virsh domstate on b: %q %v", domain, vs.Role, vs.State, promoted.Seconds(), strings.TrimSpace(out), err)
	// b's QEMU logs the same pty to the same console.log (Nova's XML,
	// append='off'): the file starts again with b's first tick.
	lastPre, firstPre := lastTick(pre), firstTick(pre)
	var first uint64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		post, _ := os.ReadFile(console)
		if first = firstTick(post); first != 0 && first != firstPre {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no tick of b on the console (%s) within 30 s; last before the kill %d", console, lastPre)
		}
	}
	resumed := time.Since(killed)
	t.Logf("tick %d last on the console before the kill (read just before it), %d first on b, seen %.2f s after the kill", lastPre, first, resumed.Seconds())
	if first > lastPre+1 || first+50 < lastPre {
		t.Errorf("the guest's tick did not go on: %d before the kill, %d after", lastPre, first)
	}
	if ev := hookEvent(t, l, HostB, domain, " started ("); ev != "" {
		t.Logf("axd on b, hook event: %s", ev)
	}
	// Nova's view after the failover, as it is (nothing moves the record).
	show()
	t.Logf("Nova after the failover: server %s status %s host %s ax:status %q; compute services:\n%s", id, server.Status, server.Host, server.Props["ax:status"],
		osc("compute", "service", "list", "--service", "nova-compute", "-c", "Host", "-c", "State", "-c", "Updated At", "-f", "value"))
	t.Logf("total %.0f s", time.Since(began).Seconds())
}

// osStatus waits for server id's ax:status to satisfy ok.
func osStatus(t *testing.T, osc func(...string) string, id string, within time.Duration, ok func(string) bool) string {
	t.Helper()
	var last string
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(time.Second) {
		var p struct {
			Props map[string]string `json:"properties"`
		}
		if json.Unmarshal([]byte(osc("server", "show", id, "-c", "properties", "-f", "json")), &p) == nil {
			last = p.Props["ax:status"]
			if ok(last) {
				return last
			}
		}
	}
	t.Fatalf("server %s: ax:status not as wanted within %s; last %q", id, within, last)
	return ""
}

// lastTick and firstTick are the last and first "AXTICK n" of a console.
func lastTick(b []byte) uint64 {
	var n uint64
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := tickOf(line); ok {
			n = v
		}
	}
	return n
}

func firstTick(b []byte) uint64 {
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := tickOf(line); ok {
			return v
		}
	}
	return 0
}

// hookEvent is the last hook event axd on h recorded for domain whose
// text has the operation op, or "".
func hookEvent(t *testing.T, l *Lab, h, domain, op string) string {
	t.Helper()
	evs, err := l.Client(h).Events(context.Background(), 0)
	if err != nil {
		t.Errorf("events of axd on %s: %v", h, err)
		return ""
	}
	last := ""
	for _, e := range evs {
		if e.Kind == "hook" && e.VM == domain && strings.Contains(e.Text, op) {
			last = e.Text
		}
	}
	return last
}

// buildInto builds package pkg as program name once per test binary.
func buildInto(t *testing.T, name, pkg string) string {
	t.Helper()
	p := filepath.Join(guestBinaries(t), name)
	if _, err := os.Stat(p); err == nil {
		return p
	}
	cmd := exec.Command("go", "build", "-o", p, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v %s", name, err, out)
	}
	return p
}

// novaHookBinary builds ax-nova-hook.
func novaHookBinary(t *testing.T) string {
	return buildInto(t, "ax-nova-hook", "github.com/axproject/ax/nova-hook")
}

// installNovaHook puts ax-nova-hook in host h's libvirtd's hooks
// directory (/etc/libvirt/hooks/qemu.d in its mount namespace), pointed
// at h's axd and spool, as the package's symlink does on a compute host.
func installNovaHook(t *testing.T, l *Lab, h, bin string) {
	t.Helper()
	dir := filepath.Join(l.LibvirtDir(h), "etc", "hooks", "qemu.d")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf("#!/bin/sh\n# ax-nova-hook for lab %s host %s (TestIntegrationOpenStackFT)\nAX_NOVA_HOOK_SOCKET=%s AX_NOVA_HOOK_SPOOL=%s AX_NOVA_HOOK_NO_SYSLOG=1 exec %s \"$@\"\n",
		l.Prefix, h, l.Socket(h), filepath.Join(l.AxdStateDir(h), "hook-spool"), bin)
	if err := os.WriteFile(filepath.Join(dir, "ax"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
}

// forwardLoopback makes 127.0.0.1:PORT inside host h's network namespace
// reach 127.0.0.1:PORT of the machine (the test cloud's endpoints), until
// the test ends.
func forwardLoopback(t *testing.T, l *Lab, h string, ports ...int) {
	t.Helper()
	for _, p := range ports {
		addr := fmt.Sprintf("127.0.0.1:%d", p)
		var ln net.Listener
		if err := l.InNetns(h, func() error {
			var err error
			ln, err = net.Listen("tcp", addr)
			return err
		}); err != nil {
			t.Fatalf("forwarding %s into %s: %v", addr, h, err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				in, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer in.Close()
					out, err := net.Dial("tcp", addr)
					if err != nil {
						return
					}
					defer out.Close()
					go func() { io.Copy(out, in); out.(*net.TCPConn).CloseWrite() }()
					io.Copy(in, out)
				}()
			}
		}()
	}
}

// waitConsole waits until the file at path has the text want and returns
// when it was seen.
func waitConsole(t *testing.T, path, want string, within time.Duration) time.Time {
	t.Helper()
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if b, err := os.ReadFile(path); err == nil && bytes.Contains(b, []byte(want)) {
			return time.Now()
		}
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("%s: no %q within %s; it has:\n%s", path, want, within, tail(string(b), 2000))
	return time.Time{}
}

// osLogTails shows the end of every log of the cloud.
func osLogTails(t *testing.T, dir string) {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, n := range names {
		b, _ := os.ReadFile(n)
		t.Logf("--- %s:\n%s", filepath.Base(n), tail(string(b), 1500))
	}
}
