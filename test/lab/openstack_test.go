package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/test/openstack"
	"github.com/axproject/ax/test/testenv"
	"github.com/axproject/ax/test/workload"
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
	imports := "import " + strings.Join(append(append(openstack.PythonModules, openstack.LibvirtPythonModules...), openstack.NeutronPythonModules...), ", ")
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

// osPhysnet is the Neutron physical network of the lab's public segment:
// each host's Linux bridge agent maps it to osProvider, the host's
// provider interface, a veth whose peer is in the host's public bridge.
const osPhysnet, osProvider = "public", "nprov"

// providerInterface gives host h a provider interface for Neutron: a veth
// pair, osProvider for the Linux bridge agent to put into the networks'
// bridges (brq<network>), its peer in h's public bridge, which the lab's
// public segment reaches.
func providerInterface(ctx context.Context, t *testing.T, l *Lab, h string) {
	t.Helper()
	ns := l.Netns(h)
	for _, args := range [][]string{
		{"-n", ns, "link", "add", osProvider, "type", "veth", "peer", "name", osProvider + "-pub"},
		{"-n", ns, "link", "set", osProvider + "-pub", "master", PublicBridge, "up"},
		{"-n", ns, "link", "set", osProvider, "up"},
	} {
		if err := ip(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
}

// osGuestCmdline is the lab guest's command line as a Glance property: its
// address on the public segment (the fixed IP of its Neutron port), its
// NIC's offloads off (Nova's QEMU offers them; output commit cannot
// re-inject offloaded frames), no agent channel (Nova defines none), the
// console tick every 100 ms.
const osGuestCmdline = "console=ttyS0 quiet panic=-1 ax.ip=" + GuestIP + "/24 virtio_net.csum=0 ax.dirty=0 ax.tick=100ms ax.agent=0"

// TestIntegrationOpenStackFT runs Nova's libvirt driver on the lab's
// hypervisor hosts: the test cloud (test/openstack: Keystone, Placement,
// Glance, Nova's control services on loopback) with a nova-compute per
// host against that host's lab libvirtd, file-backed guest RAM, AX's
// adopting driver (ax_adopt.LibvirtAdoptDriver) over Nova's libvirt
// driver, periodic tasks every 10 s; the lab's guest image put into
// Glance as kernel, ramdisk and root image; a server created with
// openstack server create --property ax:level=ft boots directly from the
// kernel and ticks on its console (Nova's console.log). ax-nova-hook, in
// each libvirtd's hooks directory, hands the start to axd, which takes
// the level from Nova; once the guest has a NIC it is protected at FT
// towards b and ax:status says so. Then host a is killed: b resumes the
// guest, its tick going on, and axd on b makes Nova follow by itself —
// within 60 s openstack server show says b, ACTIVE, b's nova-compute
// adopted the domain (no spawn). a comes back (libvirtd, axd, then its
// nova-compute, which completes the evacuation); axd on b clears
// forced_down and protects the VM back towards a. Then, for
// AX_OPENSTACK_STAY (default 1m), Nova keeps saying b, ACTIVE while both
// nova-computes run their periodic tasks, and the guest keeps ticking
// without a reboot.
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
		c, err := openstack.StartWith(ctx, filepath.Join(dir, "cloud"), t.Logf, openstack.Options{NoFakeCompute: true, Neutron: true})
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
					// The first failures, then the end: a failure repeated
					// many times would hide its cause from the tail.
					var first []string
					for _, line := range strings.Split(string(data), "\n") {
						if len(first) < 10 && (strings.Contains(line, "failed") || strings.Contains(line, "error")) {
							first = append(first, line)
						}
					}
					t.Logf("%s log, first failures:\n%s\n(tail):\n%s", name, strings.Join(first, "\n"), tail(string(data), 40))
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
	// Each nova-compute runs AX's adopting driver over Nova's libvirt
	// driver, its adopt_dir the one its host's axd is given; the
	// periodic tasks run every 10 s, so that several meet the evacuated
	// server while the test watches.
	adoptDir := func(h string) string { return filepath.Join(l.AxdStateDir(h), "nova-adopt") }
	dcfg.HostExtra = map[string][]string{}
	for _, h := range []string{HostA, HostB} {
		// nova-compute, Neutron's Linux bridge agent and axd run in h's
		// network namespace, where its bridges and taps are: the cloud's
		// loopback endpoints (Keystone's catalog, RabbitMQ) are forwarded
		// there.
		forwardLoopback(t, l, h, c.Keystone, c.Nova, c.Glance, c.Placement, c.Neutron, c.Rabbit)
		t0 := time.Now()
		providerInterface(ctx, t, l, h)
		if err := c.StartNeutronAgent(ctx, openstack.NeutronAgent{Host: h, Netns: l.Netns(h), Mappings: osPhysnet + ":" + osProvider}); err != nil {
			t.Fatal(err)
		}
		t.Logf("Neutron's Linux bridge agent on %s alive in %.1f s", h, time.Since(t0).Seconds())
		// Replicas' taps join Neutron's network bridges (brq<network>).
		dcfg.HostExtra[h] = []string{"--nova-adopt-dir", adoptDir(h), "--bridge", "brq*"}
	}
	// Both nova-computes start side by side (a minute or more each).
	mapped := make(chan error, 2)
	for _, h := range []string{HostA, HostB} {
		go func() {
			t0 := time.Now()
			err := c.StartLibvirtCompute(ctx, openstack.LibvirtCompute{Host: h, URI: l.LibvirtURI(h), FileBackedMemoryMiB: 1024, Netns: l.Netns(h),
				AdoptDriver: "../../nova-hook/driver/ax_adopt.py", AdoptDir: adoptDir(h), Periodic: 10 * time.Second})
			if err == nil {
				t.Logf("nova-compute with the libvirt driver on %s mapped in %.1f s", h, time.Since(t0).Seconds())
			}
			mapped <- err
		}()
	}
	if err := errors.Join(<-mapped, <-mapped); err != nil {
		t.Fatal(err)
	}
	// axd takes levels from Nova (its --host is the compute host's name
	// in Nova, so --nova-host is the same); Nova's instance directories
	// hold the domains' files. Failed levels are retried every 10 s.
	// --define-replicas: a partner without a definition of a server's
	// domain (Nova defines it only on the host it records) defines it from
	// the primary's, checked.
	dcfg.Extra = []string{"--nova-cloud", "ax", "--nova-clouds-file", c.CloudsYAML(), "--nova-resync", "10s", "--libvirt-dir", c.Dir, "--define-replicas"}
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
	// Neutron: a flat provider network on the lab's public segment (no
	// DHCP: the guest takes its address from its command line) and the
	// guest's port, its fixed IP that address, without port security
	// (the agents' firewall is noop).
	osc("network", "create", "--share", "--provider-network-type", "flat", "--provider-physical-network", osPhysnet, "public")
	osc("subnet", "create", "--network", "public", "--subnet-range", "10.77.0.0/24", "--no-dhcp", "--gateway", "none", "public-v4")
	port := osc("port", "create", "--network", "public", "--fixed-ip", "ip-address="+GuestIP, "--disable-port-security", "--no-security-group", "-f", "value", "-c", "id", "ax-ft")
	// The partner needs the network's bridge before a failover plugs the
	// guest's tap into it there: Neutron's agent makes brq<network> on a
	// host only once a port of the network is bound to it. The lab makes
	// it on b as the agent would (the bridge, the provider interface in
	// it).
	netID := osc("network", "show", "public", "-f", "value", "-c", "id")
	brq := ("brq" + netID)[:14] // Nova's and the agent's name: 14 characters
	for _, args := range [][]string{
		{"-n", l.Netns(HostB), "link", "add", brq, "type", "bridge"},
		{"-n", l.Netns(HostB), "link", "set", osProvider, "master", brq},
		{"-n", l.Netns(HostB), "link", "set", brq, "up"},
	} {
		if err := ip(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}

	// M1: the server boots on a from Glance's kernel with its Neutron
	// port, and ticks.
	created := time.Now()
	id := osc("server", "create", "--os-compute-api-version", "2.37", "--flavor", "ax.lab", "--image", imageID,
		"--nic", "port-id="+port, "--availability-zone", "nova:"+HostA, "--property", "ax:level=ft", "-f", "value", "-c", "id", "ax-ft")
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
	// AX never defines a domain from a peer's XML: the lab defines Nova's
	// domain on b as soon as Nova has defined it on a, as an operator's
	// tooling would. The instance directories are shared between a and
	// b, as Nova's instances_path on shared storage is (the domain
	// defined on b uses a's files): a's nova-compute, completing the
	// evacuation, then keeps the files b's guest runs on (Nova's
	// shared-storage check).
	var domain string
	for deadline := created.Add(3 * time.Minute); domain == ""; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			show()
			t.Fatalf("server %s: %s, no domain on a within 3 min", id, server.Status)
		}
		out, err := l.Virsh(ctx, HostA, "list", "--all", "--name")
		if err != nil || !strings.Contains(out, "instance-") {
			continue
		}
		domain = strings.TrimSpace(out)
		// b's instance directory is a's, as on shared storage.
		if err := os.Symlink(c.InstanceDir(HostA, id), c.InstanceDir(HostB, id)); err != nil {
			t.Fatal(err)
		}
	}
	definedA := time.Since(created)
	for show(); server.Status != "ACTIVE"; show() {
		if server.Status == "ERROR" || time.Since(created) > 3*time.Minute {
			t.Fatalf("server %s: %s", id, server.Status)
		}
		time.Sleep(500 * time.Millisecond)
	}
	active := time.Since(created)
	if server.Instance != domain {
		t.Fatalf("Nova's instance is %q, the domain defined on a %q", server.Instance, domain)
	}
	console := filepath.Join(c.InstanceDir(HostA, id), "console.log")
	booted := waitConsole(t, console, "AXTICK", 3*time.Minute)
	t.Logf("openstack server create: %s (%s) on %s, defined on a %.1f s after the create, ACTIVE by %.1f s, first tick on its console %.1f s after the create (TCG boot)",
		id, domain, server.Host, definedA.Seconds(), active.Seconds(), booted.Sub(created).Seconds())
	// Nova plugged the port's tap into brq<network> (os-vif), and
	// Neutron's Linux bridge agent on a put a's provider interface there.
	xml, err := l.Virsh(ctx, HostA, "dumpxml", domain)
	if err != nil {
		t.Fatal(err)
	}
	tap := regexp.MustCompile(`<target dev='(tap[0-9a-f-]+)'/>`).FindStringSubmatch(xml)
	if tap == nil {
		t.Fatalf("no Neutron tap in the domain's XML:\n%s", xml)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		out, err := exec.CommandContext(ctx, "ip", "-n", l.Netns(HostA), "-o", "link", "show", tap[1]).CombinedOutput()
		prov, perr := exec.CommandContext(ctx, "ip", "-n", l.Netns(HostA), "-o", "link", "show", osProvider).CombinedOutput()
		if err == nil && perr == nil && strings.Contains(string(out), " master "+brq+" ") && strings.Contains(string(prov), " master "+brq+" ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's tap %s and the provider interface are not both in a's %s 30 s after ACTIVE (Nova, Neutron's agent): %v %s; %v %s", tap[1], brq, err, out, perr, prov)
		}
	}

	// M2: the hook told axd on a of the start, axd asked Nova: ft towards
	// b, protected within seconds of the boot, with its output held on
	// the tap Nova plugged into Neutron's network.
	vs := waitVM(t, l, l.Client(HostA), domain, 90*time.Second, "FT on a", func(s api.VMStatus) bool {
		return s.Level == api.LevelFT && s.State == "protected"
	})
	protected := time.Since(created)
	// Nothing but axd on b defined the domain there: from a's definition.
	if ev := kindEvent(t, l, HostB, domain, "define", "defined here from a's definition"); ev == "" {
		t.Fatalf("axd on b did not define %s from a's definition", domain)
	} else {
		t.Logf("axd on b: %s", ev)
	}
	st := osStatus(t, osc, id, 30*time.Second, func(s string) bool { return strings.HasPrefix(s, "ft towards b: protected") })
	t.Logf("FT protected %.1f s after the create (%.1f s after ACTIVE); ax:status in Nova %.1f s after the create: %q; axd on a: %s %s %s towards %s, epoch %d, pause p50 %.1f ms",
		protected.Seconds(), (protected - active).Seconds(), time.Since(created).Seconds(), st, vs.Name, vs.Level, vs.State, vs.Peer, vs.Epoch, vs.PauseP50MS)

	// The ledger client on c appends to the guest's ledger through
	// Neutron's network from now on: through the level changes and the
	// kill of a, no acknowledged record may be lost.
	addr := fmt.Sprintf("%s:%d", GuestIP, LedgerPort)
	record := filepath.Join(l.StateDir, "openstack.rec")
	client, err := l.StartClient(ctx, filepath.Join(guestBinaries(t), "ax-workload"), addr, 20, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()

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

	// Levels changed in Nova apply live to the running guest: ha, none,
	// ft again — one boot, its ticks never reset.
	bootTick := firstTick(mustReadFile(t, console))
	for _, step := range []struct {
		level, status string
	}{
		{api.LevelHA, "ha towards b: protected"},
		{api.LevelNone, "none: not protected"},
		{api.LevelFT, "ft towards b: protected"},
	} {
		t0 := time.Now()
		osc("server", "set", "--property", "ax:level="+step.level, id)
		vs := waitVM(t, l, l.Client(HostA), domain, 2*time.Minute, "level "+step.level+" from Nova", func(s api.VMStatus) bool {
			return s.Level == step.level && (step.level == api.LevelNone || s.State == "protected")
		})
		applied := time.Since(t0)
		st := osStatus(t, osc, id, time.Minute, func(s string) bool { return strings.HasPrefix(s, step.status) })
		now := mustReadFile(t, console)
		t.Logf("openstack server set --property ax:level=%s: axd on a %s %s after %.1f s, ax:status %q after %.1f s, tick %d", step.level, vs.Level, vs.State, applied.Seconds(), st, time.Since(t0).Seconds(), lastTick(now))
		if f := firstTick(now); f != bootTick {
			t.Fatalf("at %s: the console's first tick is %d, was %d: the guest booted again", step.level, f, bootTick)
		}
	}

	// b, the partner, holds its promise to the server in Placement
	// against its compute node: Nova's scheduler counts it.
	cl, err := nova.New(nova.Config{Cloud: "ax", CloudsFile: c.CloudsYAML()})
	if err != nil {
		t.Fatal(err)
	}
	rpA, rpB := computeNode(ctx, t, cl, HostA), computeNode(ctx, t, cl, HostB)
	reservationB := nova.ReservationConsumer(rpB, domain)
	held := waitAllocation(ctx, t, cl, rpB, reservationB, true)
	t.Logf("axd on b holds its promise to %s in Placement: %v on b's provider %s (consumer %s)", domain, held, rpB, reservationB)

	// M3: host a dies (QEMU, libvirtd, axd; links cut; and its
	// nova-compute): b resumes the guest from the last checkpoint, and
	// axd on b makes Nova follow by itself (force a down, evacuate to b,
	// where the adopting driver adopts the running domain).
	blog := filepath.Join(c.Dir, "log", openstack.ComputeName(HostB)+".log")
	alog := filepath.Join(c.Dir, "log", openstack.ComputeName(HostA)+".log")
	time.Sleep(10 * time.Second)
	pre, _ := os.ReadFile(console)
	killed := time.Now()
	if err := l.KillHost(ctx, HostA); err != nil {
		t.Fatal(err)
	}
	// KillHost killed every process in a's namespace: its nova-compute
	// and Neutron agent too; the cloud keeps them for Restart.
	for _, name := range []string{openstack.ComputeName(HostA), openstack.AgentName(HostA)} {
		if err := c.Kill(name); err != nil {
			t.Fatal(err)
		}
	}
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
	// No acknowledged record is lost: the client, through Neutron's
	// network, reaches the guest on b, and the ledger there holds every
	// record acknowledged before the kill (through the level changes
	// too).
	time.Sleep(3 * time.Second)
	summary := client.Stop()
	acks, err := workload.ReadRecord(record)
	if err != nil {
		t.Fatal(err)
	}
	recs := ledgerRecords(t, l, addr)
	acked := 0
	for _, a := range acks {
		if a.Time.Before(killed) {
			acked++
		}
	}
	v := workload.Verify(acks, recs)
	t.Logf("ledger: %d records acknowledged before the kill (%d in all), %d in the ledger on b, %d lost; client: %s", acked, len(acks), len(recs), len(v.Missing), summary)
	if acked == 0 || len(v.Missing) > 0 {
		t.Errorf("acked %d before the kill, %d acknowledged records missing on b: %v", acked, len(v.Missing), v.Missing)
	}
	// Within a minute of the kill, openstack server show says b, ACTIVE.
	for show(); server.Host != HostB || server.Status != "ACTIVE"; show() {
		if time.Since(killed) > time.Minute {
			t.Fatalf("Nova 60 s after the kill: server %s host %s, %s (want %s, ACTIVE); ax:status %q; axd on b's events:%s",
				id, server.Host, server.Status, HostB, server.Props["ax:status"], recentEvents(l, HostB))
		}
		time.Sleep(time.Second)
	}
	moved := time.Since(killed)
	t.Logf("openstack server show: host %s, %s %.1f s after the kill; ax:status %q", server.Host, server.Status, moved.Seconds(), server.Props["ax:status"])
	if adopted := instanceLines(blog, 0, id, "AX: adopted the running domain"); len(adopted) == 0 {
		t.Errorf("nova-compute on b did not log the adoption of %s", id)
	} else {
		t.Logf("nova-compute on b: %s", adopted[0])
	}
	if spawn := instanceLines(blog, 0, id, "Creating image", "Instance spawned successfully"); len(spawn) > 0 {
		t.Errorf("nova-compute on b spawned %s instead of adopting it:\n%s", id, strings.Join(spawn, "\n"))
	}
	// Neutron's port binding followed the evacuation: b's agent plugged
	// the port, which is ACTIVE on b.
	var portShown struct {
		Status string `json:"status"`
		Host   string `json:"binding_host_id"`
	}
	for {
		if err := json.Unmarshal([]byte(osc("port", "show", port, "-f", "json", "-c", "status", "-c", "binding_host_id")), &portShown); err != nil {
			t.Fatal(err)
		}
		if portShown.Host == HostB && portShown.Status == "ACTIVE" {
			break
		}
		if time.Since(killed) > 2*time.Minute {
			t.Fatalf("Neutron 2 min after the kill: port %s bound to %q, %s; want %s, ACTIVE", port, portShown.Host, portShown.Status, HostB)
		}
		time.Sleep(time.Second)
	}
	t.Logf("openstack port show: bound to %s, %s %.1f s after the kill", portShown.Host, portShown.Status, time.Since(killed).Seconds())
	// b's reservation was given back to the evacuation: the server's own
	// allocation is on b now.
	waitAllocation(ctx, t, cl, rpB, reservationB, false)
	if allocs, err := cl.Allocations(ctx, rpB); err != nil || len(allocs[id]) == 0 {
		t.Errorf("b's provider after the evacuation: %v, %v; want the server %s's allocation", allocs, err, id)
	} else {
		t.Logf("b's provider after the evacuation: the server's allocation %v, AX's reservation gone", allocs[id])
	}
	if svc, err := cl.ComputeService(ctx, HostA); err != nil || !svc.ForcedDown {
		t.Errorf("a's compute service after the evacuation: %+v, %v; want forced down", svc, err)
	}

	// M4: host a comes back (links, libvirtd, axd) and its nova-compute
	// starts again: it completes the evacuation (destroys a's stale
	// domain), then axd on b clears forced_down and protects the VM back
	// towards a.
	if err := l.RecoverHost(ctx, HostA, dcfg); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	for _, name := range []string{openstack.AgentName(HostA), openstack.ComputeName(HostA)} {
		if err := c.Restart(name); err != nil {
			t.Fatal(err)
		}
	}
	var completedAt, clearedAt time.Time
	for deadline := time.Now().Add(3 * time.Minute); completedAt.IsZero() || clearedAt.IsZero(); time.Sleep(time.Second) {
		if time.Now().After(deadline) {
			t.Fatalf("within 3 min of a's nova-compute starting again: evacuation completed %v, forced_down cleared %v; axd on b's events:%s",
				!completedAt.IsZero(), !clearedAt.IsZero(), recentEvents(l, HostB))
		}
		if ms, err := cl.Evacuations(ctx, id); err == nil && len(ms) == 1 && ms[0].Status == "completed" && completedAt.IsZero() {
			completedAt = time.Now()
		}
		if svc, err := cl.ComputeService(ctx, HostA); err == nil && !svc.ForcedDown && !completedAt.IsZero() && clearedAt.IsZero() {
			clearedAt = time.Now()
		}
	}
	t.Logf("a's nova-compute started again: the evacuation completed %.1f s later, forced_down cleared %.1f s later",
		completedAt.Sub(restarted).Seconds(), clearedAt.Sub(restarted).Seconds())
	for _, line := range instanceLines(alog, 0, id, "evacuated from this host") {
		t.Logf("nova-compute on a: %s", line)
	}
	// a's nova-compute destroyed and undefined its stale copy of the
	// domain; axd on a defines it again from b's definition when b
	// protects the VM towards it (its event is checked below).
	vs = waitVM(t, l, l.Client(HostB), domain, 2*time.Minute, "FT protection from b towards a again", func(s api.VMStatus) bool {
		return s.Level == api.LevelFT && s.Peer == HostA && s.State == "protected"
	})
	t.Logf("FT protected again from b towards a %.1f s after forced_down was cleared (%.1f s after a's nova-compute started again), epoch %d",
		time.Since(clearedAt).Seconds(), time.Since(restarted).Seconds(), vs.Epoch)
	if ev := kindEvent(t, l, HostA, domain, "define", "defined here from b's definition"); ev == "" {
		t.Errorf("axd on a did not define %s from b's definition", domain)
	} else {
		t.Logf("axd on a: %s", ev)
	}
	held = waitAllocation(ctx, t, cl, rpA, nova.ReservationConsumer(rpA, domain), true)
	t.Logf("axd on a, the partner now, holds its promise to %s in Placement: %v on a's provider %s", domain, held, rpA)

	// M5: the stay. Both nova-computes run their periodic tasks; Nova
	// keeps saying b, ACTIVE; the guest keeps ticking on b, never
	// rebooted (its console would start again from tick 1).
	stay := time.Minute
	if v := os.Getenv("AX_OPENSTACK_STAY"); v != "" {
		if stay, err = time.ParseDuration(v); err != nil {
			t.Fatalf("AX_OPENSTACK_STAY=%q: %v", v, err)
		}
	}
	aOff, bOff := fileSize(alog), fileSize(blog)
	stayed := time.Now()
	// The real CLI every 10 s through the stay (a run takes seconds of
	// both cores; back to back they slowed nova-api's one worker until a
	// read timed out); Nova's API through AX's client every 2 s. A read
	// that fails says nothing against b, ACTIVE: those are counted, and
	// must stay few.
	type shown struct {
		at           time.Time
		host, status string
		err          error
	}
	cli := make(chan []shown, 1)
	go func() {
		var all []shown
		for time.Since(stayed) < stay {
			cmd := exec.CommandContext(ctx, "openstack", "server", "show", id, "-f", "json", "-c", "status", "-c", "OS-EXT-SRV-ATTR:host")
			cmd.Env = append(os.Environ(), "OS_CLOUD=ax", "OS_CLIENT_CONFIG_FILE="+c.CloudsYAML())
			out, err := cmd.Output()
			var s struct {
				Status string `json:"status"`
				Host   string `json:"OS-EXT-SRV-ATTR:host"`
			}
			if err == nil {
				err = json.Unmarshal(out, &s)
			}
			all = append(all, shown{time.Now(), s.Host, s.Status, err})
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Second):
			}
		}
		cli <- all
	}()
	checks, unread, lastSeen := 0, 0, first
	for time.Since(stayed) < stay {
		time.Sleep(2 * time.Second)
		checks++
		switch s, err := cl.Server(ctx, id); {
		case err != nil:
			unread++
			t.Logf("%.0f s into the stay: reading server %s: %v", time.Since(stayed).Seconds(), id, err)
		case s.Host != HostB || s.Status != "ACTIVE":
			t.Errorf("%.0f s into the stay: server %s: %+v", time.Since(stayed).Seconds(), id, s)
		}
		now, _ := os.ReadFile(console)
		if f, last := firstTick(now), lastTick(now); f != first || last <= lastSeen {
			t.Errorf("%.0f s into the stay: the console's ticks %d…%d (first on b was %d, last seen %d): the guest rebooted or stopped", time.Since(stayed).Seconds(), f, last, first, lastSeen)
		} else {
			lastSeen = last
		}
	}
	shows := <-cli
	cliUnread := 0
	for _, s := range shows {
		switch {
		case s.err != nil:
			cliUnread++
			t.Logf("%.0f s into the stay: openstack server show: %v", s.at.Sub(stayed).Seconds(), s.err)
		case s.host != HostB || s.status != "ACTIVE":
			t.Errorf("%.0f s into the stay: openstack server show: host %q, %q", s.at.Sub(stayed).Seconds(), s.host, s.status)
		}
	}
	if unread > max(1, checks/10) || cliUnread > max(1, len(shows)/10) || len(shows)-cliUnread == 0 {
		t.Errorf("the stay: %d of %d reads of the server through Nova's API and %d of %d openstack server show failed: too many to say Nova kept saying b, ACTIVE",
			unread, checks, cliUnread, len(shows))
	}
	const sync = "Running periodic task ComputeManager._sync_power_states"
	syncs := map[string]int{HostA: countFrom(alog, aOff, sync), HostB: countFrom(blog, bOff, sync)}
	for h, f := range map[string]string{HostA: alog, HostB: blog} {
		off := aOff
		if h == HostB {
			off = bOff
		}
		if bad := instanceLines(f, off, id, "Stopping instance", "Rebooting instance", "Instance destroyed", "Terminating instance",
			"Instance shutdown by itself", "Deleting instance files", "Creating image", "power_off", "Instance spawned"); len(bad) > 0 {
			t.Errorf("nova-compute on %s during the stay:\n%s", h, strings.Join(bad, "\n"))
		}
		// FT pauses the guest for each checkpoint; the adopting driver
		// keeps pauses shorter than [ax] pause_grace (2 s) from Nova. Only
		// a checkpoint that paused longer may reach it (without the
		// filter: hundreds in a minute).
		if paused := instanceLines(f, off, id, "VM Paused (Lifecycle Event)"); len(paused) > 2 {
			t.Errorf("nova-compute on %s was told of %d pauses during the stay (FT's checkpoints reach Nova):\n%s", h, len(paused), strings.Join(paused[:3], "\n"))
		}
		if syncs[h] < 2 {
			t.Errorf("nova-compute on %s ran %d power-state syncs during the %s stay; want several", h, syncs[h], stay)
		}
	}
	if vs, err := l.vmStatus(ctx, l.Client(HostB), domain); err != nil || vs.Peer != HostA || vs.State != "protected" {
		t.Errorf("axd on b after the stay: %+v, %v", vs, err)
	}
	t.Logf("the stay: %s, %d runs of openstack server show (%d failed) and %d reads of Nova's API every 2 s (%d failed), host b, ACTIVE each time read unless said above; ticks %d…%d on b; power-state syncs: a %d, b %d",
		time.Since(stayed).Round(time.Second), len(shows), cliUnread, checks, unread, first, lastSeen, syncs[HostA], syncs[HostB])
	t.Logf("total %.0f s", time.Since(began).Seconds())
}

// mustReadFile is the file at path.
func mustReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fromOffset is the file at path past its first off bytes.
func fromOffset(path string, off int64) []byte {
	b, _ := os.ReadFile(path)
	if off < 0 || off > int64(len(b)) {
		return b
	}
	return b[off:]
}

// countFrom counts the lines with text past off in the file at path.
func countFrom(path string, off int64, text string) int {
	n := 0
	for _, line := range bytes.Split(fromOffset(path, off), []byte("\n")) {
		if bytes.Contains(line, []byte(text)) {
			n++
		}
	}
	return n
}

// instanceLines are the lines past off in the log at path about instance
// id that have one of texts.
func instanceLines(path string, off int64, id string, texts ...string) []string {
	var found []string
	for _, line := range strings.Split(string(fromOffset(path, off)), "\n") {
		if !strings.Contains(line, id) {
			continue
		}
		for _, text := range texts {
			if strings.Contains(line, text) {
				found = append(found, line)
				break
			}
		}
	}
	return found
}

// recentEvents are axd on h's last events, as text.
func recentEvents(l *Lab, h string) string {
	evs, err := l.Client(h).Events(context.Background(), 0)
	if err != nil {
		return " " + err.Error()
	}
	if len(evs) > 15 {
		evs = evs[len(evs)-15:]
	}
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "\n  %s %s %s %s", e.Time.Format("15:04:05.000"), e.Kind, e.VM, e.Text)
	}
	return b.String()
}

// osStatus waits for server id's ax:status to satisfy ok.
// computeNode is host's compute node (its resource provider) in Nova.
func computeNode(ctx context.Context, t *testing.T, cl *nova.Client, host string) string {
	t.Helper()
	rp, err := cl.ComputeNode(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	return rp
}

// waitAllocation waits up to 30 s for consumer's allocation on provider
// rp to be there (present) or gone, and returns it.
func waitAllocation(ctx context.Context, t *testing.T, cl *nova.Client, rp, consumer string, present bool) nova.Resources {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		allocs, err := cl.Allocations(ctx, rp)
		if err == nil && (len(allocs[consumer]) > 0) == present {
			return allocs[consumer]
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumer %s on provider %s: want present %v within 30 s; allocations %v, %v", consumer, rp, present, allocs, err)
		}
		time.Sleep(time.Second)
	}
}

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
	return kindEvent(t, l, h, domain, "hook", op)
}

// kindEvent is the text of the last event of kind of domain on host h
// that says text ("" for none).
func kindEvent(t *testing.T, l *Lab, h, domain, kind, text string) string {
	t.Helper()
	evs, err := l.Client(h).Events(context.Background(), 0)
	if err != nil {
		t.Errorf("events of axd on %s: %v", h, err)
		return ""
	}
	last := ""
	for _, e := range evs {
		if e.Kind == kind && e.VM == domain && strings.Contains(e.Text, text) {
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
