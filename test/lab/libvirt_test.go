package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
	"github.com/axproject/ax/test/testenv"
)

// domainDoc is what TestNovaDomainXML reads back of a domain's XML.
type domainDoc struct {
	Type     string `xml:"type,attr"`
	Name     string `xml:"name"`
	UUID     string `xml:"uuid"`
	Instance struct {
		XMLName xml.Name
		Name    string `xml:"name"`
		Flavor  struct {
			Name   string `xml:"name,attr"`
			Memory int    `xml:"memory"`
			VCPUs  int    `xml:"vcpus"`
		} `xml:"flavor"`
		Owner struct {
			User struct {
				UUID string `xml:"uuid,attr"`
			} `xml:"user"`
			Project struct {
				UUID string `xml:"uuid,attr"`
			} `xml:"project"`
		} `xml:"owner"`
		Root struct {
			UUID string `xml:"uuid,attr"`
		} `xml:"root"`
	} `xml:"metadata>instance"`
	Memory  int `xml:"memory"`
	Backing struct {
		Source struct {
			Type string `xml:"type,attr"`
		} `xml:"source"`
		Access struct {
			Mode string `xml:"mode,attr"`
		} `xml:"access"`
	} `xml:"memoryBacking"`
	OS struct {
		Type struct {
			Arch    string `xml:"arch,attr"`
			Machine string `xml:"machine,attr"`
			Value   string `xml:",chardata"`
		} `xml:"type"`
		Kernel  string `xml:"kernel"`
		Initrd  string `xml:"initrd"`
		Cmdline string `xml:"cmdline"`
	} `xml:"os"`
	Disks []struct {
		Driver struct {
			Type string `xml:"type,attr"`
		} `xml:"driver"`
		Source struct {
			File string `xml:"file,attr"`
		} `xml:"source"`
	} `xml:"devices>disk"`
	Interface struct {
		Type   string `xml:"type,attr"`
		Target struct {
			Dev     string `xml:"dev,attr"`
			Managed string `xml:"managed,attr"`
		} `xml:"target"`
		Model struct {
			Type string `xml:"type,attr"`
		} `xml:"model"`
	} `xml:"devices>interface"`
	Serial struct {
		Source struct {
			Path string `xml:"path,attr"`
		} `xml:"source"`
	} `xml:"devices>serial"`
	Channel struct {
		Source struct {
			Path string `xml:"path,attr"`
		} `xml:"source"`
		Target struct {
			Name string `xml:"name,attr"`
		} `xml:"target"`
	} `xml:"devices>channel"`
	QEMUArgs []struct {
		Value string `xml:"value,attr"`
	} `xml:"commandline>arg"`
}

func TestNovaDomainXML(t *testing.T) {
	d := NovaDomain{
		Type: "qemu", Name: LibvirtDomainName(1), UUID: labUUID("ax-lab-instance", "t", "vm1"),
		DisplayName: "vm<1>&co", RAMMiB: 256, Kernel: "/k/vmlinuz", Initrd: "/k/initrd.img",
		Cmdline: "console=ttyS0 ax.ip=10.77.0.10/24 x=<&'\">", Tap: "tap-vm1", MAC: "52:54:00:a7:00:01",
		Console: "/s/console.log", Agent: "/s/agent.sock", Disk: &api.Disk{Path: "/d/vm1.disk.qcow2", Format: "qcow2"},
		Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	text, err := d.XML()
	if err != nil {
		t.Fatal(err)
	}
	var doc domainDoc
	if err := xml.Unmarshal([]byte(text), &doc); err != nil {
		t.Fatalf("not XML: %v\n%s", err, text)
	}
	check := func(what, got, want string) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %q, want %q", what, got, want)
		}
	}
	check("type", doc.Type, "qemu")
	check("name", doc.Name, "instance-00000001")
	check("uuid", doc.UUID, d.UUID)
	check("nova namespace", doc.Instance.XMLName.Space, novaNamespace)
	check("nova:name", doc.Instance.Name, d.DisplayName)
	check("flavor", doc.Instance.Flavor.Name, "ax.lab")
	check("owner user", doc.Instance.Owner.User.UUID, novaUserID)
	check("owner project", doc.Instance.Owner.Project.UUID, novaProjectID)
	check("root image", doc.Instance.Root.UUID, novaImageUUID)
	if doc.Instance.Flavor.Memory != 256 || doc.Instance.Flavor.VCPUs != 1 || doc.Memory != 256*1024 {
		t.Errorf("flavor memory %d, vcpus %d, domain memory %d KiB", doc.Instance.Flavor.Memory, doc.Instance.Flavor.VCPUs, doc.Memory)
	}
	check("memory source", doc.Backing.Source.Type, "file")
	check("memory access", doc.Backing.Access.Mode, "shared")
	check("os type", doc.OS.Type.Arch+" "+doc.OS.Type.Machine+" "+doc.OS.Type.Value, "x86_64 pc hvm")
	check("kernel", doc.OS.Kernel, d.Kernel)
	check("initrd", doc.OS.Initrd, d.Initrd)
	check("cmdline", doc.OS.Cmdline, d.Cmdline)
	if len(doc.Disks) != 1 || doc.Disks[0].Source.File != d.Disk.Path || doc.Disks[0].Driver.Type != "qcow2" {
		t.Errorf("disks %+v", doc.Disks)
	}
	check("interface", doc.Interface.Type+" "+doc.Interface.Target.Dev+" managed="+doc.Interface.Target.Managed+" "+doc.Interface.Model.Type,
		"ethernet tap-vm1 managed=no virtio")
	check("console", doc.Serial.Source.Path, d.Console)
	check("agent", doc.Channel.Source.Path+" "+doc.Channel.Target.Name, d.Agent+" "+AgentPortName)
	if len(doc.QEMUArgs) != 0 {
		t.Errorf("a booting domain has QEMU arguments %v", doc.QEMUArgs)
	}

	d.Incoming, d.Disk = true, nil
	if text, err = d.XML(); err != nil {
		t.Fatal(err)
	}
	doc = domainDoc{}
	if err := xml.Unmarshal([]byte(text), &doc); err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, a := range doc.QEMUArgs {
		args = append(args, a.Value)
	}
	check("incoming arguments", strings.Join(args, " "), "-incoming defer -machine suppress-vmdesc=on -global migration.send-configuration=off")
	if len(doc.Disks) != 0 {
		t.Errorf("disks %+v without a disk", doc.Disks)
	}

	for _, bad := range []func(*NovaDomain){
		func(d *NovaDomain) { d.UUID = "" },
		func(d *NovaDomain) { d.RAMMiB = 0 },
		func(d *NovaDomain) { d.Type = "xen" },
		func(d *NovaDomain) { d.Tap = "" },
	} {
		d2 := d
		bad(&d2)
		if _, err := d2.XML(); err == nil {
			t.Errorf("%+v: no error", d2)
		}
	}
}

func TestLibvirtNames(t *testing.T) {
	if got := libvirtShortName(3, "instance-00000001"); got != "3-instance-00000001" {
		t.Errorf("short name %q", got)
	}
	if got := libvirtShortName(12, "a-domain-name-longer-than-twenty"); got != "12-a-domain-name-longer" {
		t.Errorf("short name %q", got)
	}
	l, _ := Open(Config{Prefix: "t1", StateRoot: "/tmp/x"})
	if got, want := l.LibvirtURI(HostA), "qemu+unix:///system?socket=/tmp/x/t1/libvirt-a/run/libvirt-sock"; got != want {
		t.Errorf("URI %q, want %q", got, want)
	}
	if got, want := l.LibvirtRAMFile(HostB, 2, "instance-00000001"), "/dev/shm/ax-lab-t1/libvirt-b/libvirt/qemu/2-instance-00000001/pc.ram"; got != want {
		t.Errorf("RAM file %q, want %q", got, want)
	}
	if a, b := labUUID("x", "a"), labUUID("x", "b"); a == b || len(a) != 36 || a != labUUID("x", "a") {
		t.Errorf("labUUID: %s %s", a, b)
	}
	if strings.Contains(l.libvirtdConf(HostA), labUUID("ax-lab-host", "t1", HostB)) {
		t.Error("host a's libvirtd has b's host UUID")
	}
}

// requireLibvirt skips (or fails under AX_REQUIRE_PRIVILEGED=1) unless
// the lab can run libvirtd here.
func requireLibvirt(t *testing.T) {
	t.Helper()
	requireLab(t)
	testenv.RequireCommand(t, LibvirtdBinary, "make deps")
	testenv.RequireCommand(t, VirshBinary, "make deps")
	if err := checkLibvirtPrereqs(); err != nil {
		if testenv.Privileged() {
			t.Fatalf("required but unavailable: %v", err)
		}
		t.Skip(err)
	}
}

// virshIncoming is the one call of qemu.Monitor that LoadDeviceStateFile
// makes, through libvirt; the embedded Monitor is nil.
type virshIncoming struct {
	qemu.Monitor
	l            *Lab
	host, domain string
}

func (m virshIncoming) LoadIncoming(ctx context.Context, uri string) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
	if _, err := m.l.LibvirtQMP(ctx, m.host, m.domain, "migrate-set-capabilities", caps); err != nil {
		return err
	}
	if _, err := m.l.LibvirtQMP(ctx, m.host, m.domain, "migrate-incoming", map[string]any{"uri": uri}); err != nil {
		return err
	}
	for {
		st, err := m.status(ctx)
		if err != nil || st != "inmigrate" {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (m virshIncoming) status(ctx context.Context) (string, error) {
	return qmpStatus(ctx, m.l, m.host, m.domain)
}

func qmpStatus(ctx context.Context, l *Lab, h, domain string) (string, error) {
	out, err := l.LibvirtQMP(ctx, h, domain, "query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	err = json.Unmarshal(out, &st)
	return st.Status, err
}

// TestIntegrationLibvirtd runs a libvirtd on each hypervisor host, boots a
// Nova-shaped domain on a and checks what libvirt made of it (running,
// booted, QMP through libvirt, the RAM file where LIBVIRT.md says), then
// resumes the guest on b from a checkpoint as AX fails over (device state
// saved on a, RAM copied into the RAM file of a domain b's libvirtd started
// paused with -incoming defer, device state fed to it, resumed): its tick
// must go on from the checkpoint, and survive a restart of b's libvirtd.
// lab down must leave no libvirtd, QEMU or directory behind.
func TestIntegrationLibvirtd(t *testing.T) {
	requireLibvirt(t)
	ctx := context.Background()
	l, err := Open(Config{Prefix: "itlv", Log: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx) // a leftover from an earlier crashed run of this test
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		state, _ := l.State()
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("down: %v", err)
		}
		if left := l.Leftovers(state); len(left) > 0 {
			t.Errorf("teardown left: %s", strings.Join(left, ", "))
		}
		if state == nil {
			return
		}
		for _, vm := range state.VMs {
			if vm.PID > 0 && !isZombie(vm.PID) {
				t.Errorf("teardown left %s's QEMU (pid %d) on %s", vm.Domain, vm.PID, vm.Host)
			}
		}
	})
	img := testImage(t)

	for _, h := range []string{HostA, HostB} {
		start := time.Now()
		if err := l.StartLibvirtd(ctx, h); err != nil {
			t.Fatal(err)
		}
		t.Logf("libvirtd on %s serving after %.1fs", h, time.Since(start).Seconds())
	}
	if err := l.StartLibvirtd(ctx, HostA); err == nil || !strings.Contains(err.Error(), "already runs") {
		t.Errorf("second libvirtd on a: err = %v", err)
	}
	for _, h := range []string{HostA, HostB} {
		pid, _ := l.libvirtdPID(h)
		mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range libvirtFixedDirs {
			if !bytes.Contains(mounts, []byte(" "+d.path+" ")) {
				t.Errorf("libvirtd on %s: nothing mounted over %s", h, d.path)
			}
		}
	}

	cfg := GuestConfig{Host: HostA, Kernel: img.Kernel, Initrd: img.Initrd, DiskMiB: 16}
	vm, err := l.DefineLibvirtGuest(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := l.StartLibvirtGuest(ctx, vm, false); err != nil {
		t.Fatal(err)
	}
	if out, err := l.Virsh(ctx, HostA, "list"); err != nil || !strings.Contains(out, vm.Domain) || !strings.Contains(out, "running") {
		t.Fatalf("virsh list on a: %q, %v", out, err)
	}
	if out, err := l.Virsh(ctx, HostB, "list", "--all", "--name"); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("b's libvirtd has domains %q (%v): the two daemons share state", out, err)
	}
	if err := l.WaitServing(ctx, vm, 120*time.Second); err != nil {
		t.Fatal(err)
	}
	if tick, err := LastTick(vm.Console); err != nil || tick == 0 {
		t.Fatalf("no tick on the console: %v; %s", err, consoleTail(vm.Console, 10))
	}
	t.Logf("domain %s serving %.1fs after virsh start (pid %d)", vm.Domain, time.Since(start).Seconds(), vm.PID)

	lpid, _ := l.libvirtdPID(HostA)
	qns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", vm.PID))
	lns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", lpid))
	t.Logf("QEMU's mount namespace %s, its libvirtd's %s (libvirt's qemu.conf namespaces: a private /dev per QEMU)", qns, lns)
	if st, err := qmpStatus(ctx, l, HostA, vm.Domain); err != nil || st != "running" {
		t.Fatalf("query-status through libvirt: %q, %v", st, err)
	}
	nodes, err := l.LibvirtQMP(ctx, HostA, vm.Domain, "query-named-block-nodes", map[string]any{"flat": true})
	if err != nil || !bytes.Contains(nodes, []byte(`"node-name":"libvirt-1-format"`)) {
		t.Errorf("the disk is not block node libvirt-1-format: %v", err)
	}
	if st, err := os.Stat(vm.RAMFile); err != nil || st.Size() != int64(vm.RAMMiB)<<20 {
		t.Fatalf("RAM file %s: %v", vm.RAMFile, err)
	}
	if maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", vm.PID)); err != nil || !bytes.Contains(maps, []byte(vm.RAMFile)) {
		t.Errorf("QEMU (pid %d) does not map %s: %v", vm.PID, vm.RAMFile, err)
	}
	qlog, err := os.ReadFile(l.LibvirtQEMULog(HostA, vm.Domain))
	if err != nil || !bytes.Contains(qlog, []byte(`"mem-path":"`+vm.RAMFile+`","share":true`)) {
		t.Errorf("libvirt's QEMU log does not show the shared RAM file: %v", err)
	}
	if x, err := l.Virsh(ctx, HostA, "dumpxml", vm.Domain); err != nil || !strings.Contains(x, novaNamespace) {
		t.Errorf("the running domain lost Nova's metadata: %v", err)
	}

	failoverLibvirt(t, l, vm, cfg)
}

// failoverLibvirt resumes vm, running on a, in a domain of b's libvirtd
// the way AX fails over (DESIGN.md): the device state of a paused guest,
// its RAM copied into the new domain's RAM file, x-ignore-shared.
func failoverLibvirt(t *testing.T, l *Lab, vm *VM, cfg GuestConfig) {
	ctx := context.Background()
	dev := filepath.Join(l.StateDir, "checkpoint.dev")
	t0 := time.Now()
	if _, err := l.LibvirtQMP(ctx, HostA, vm.Domain, "stop", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := l.LibvirtQMP(ctx, HostA, vm.Domain, "xen-save-devices-state", map[string]any{"filename": dev, "live": false}); err != nil {
		t.Fatal(err)
	}
	pre, err := os.ReadFile(vm.Console)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint on a in %s (device state %d bytes)", time.Since(t0).Round(time.Millisecond), fileSize(dev))

	cfg.Host, cfg.Incoming = HostB, true
	vmB, err := l.DefineLibvirtGuest(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	// The disk as it was at the checkpoint (a's guest is paused, its
	// writes drained by stop).
	if err := copyInto(vmB.Spec.Disks[0].Path, vm.Spec.Disks[0].Path); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	if err := l.StartLibvirtGuest(ctx, vmB, true); err != nil {
		t.Fatal(err)
	}
	if st, err := qmpStatus(ctx, l, HostB, vmB.Domain); err != nil || st != "inmigrate" {
		t.Fatalf("b's domain started paused with -incoming defer: status %q, %v", st, err)
	}
	t2 := time.Now()
	if err := copyInto(vmB.RAMFile, vm.RAMFile); err != nil {
		t.Fatal(err)
	}
	t3 := time.Now()
	if err := qemu.LoadDeviceStateFile(ctx, virshIncoming{l: l, host: HostB, domain: vmB.Domain}, dev, filepath.Join(l.StateDir, "incoming.sock")); err != nil {
		t.Fatalf("feeding the device state through libvirt: %v", err)
	}
	t4 := time.Now()
	// The old primary goes (as fencing would have it) before the new one runs.
	if _, err := l.Virsh(ctx, HostA, "destroy", vm.Domain); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(vm.RAMFile)); !os.IsNotExist(err) {
		t.Errorf("libvirt kept the destroyed domain's RAM directory: %v", err)
	}
	t5 := time.Now()
	if _, err := l.Virsh(ctx, HostB, "resume", vmB.Domain); err != nil {
		t.Fatal(err)
	}
	ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	t.Logf("on b: domain started paused in %s, RAM copied in %s, device state loaded in %s, resumed in %s (a's domain destroyed in %s)",
		ms(t2.Sub(t1)), ms(t3.Sub(t2)), ms(t4.Sub(t3)), ms(time.Since(t5)), ms(t5.Sub(t4)))
	if st, err := qmpStatus(ctx, l, HostB, vmB.Domain); err != nil || st != "running" {
		t.Fatalf("b's domain after resume: status %q, %v", st, err)
	}
	if out, err := l.Virsh(ctx, HostB, "domstate", vmB.Domain); err != nil || strings.TrimSpace(out) != "running" {
		t.Errorf("libvirt on b says the domain is %q (%v)", out, err)
	}
	l.LibvirtQMP(ctx, HostB, vmB.Domain, "announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 5, "step": 100})
	if err := l.WaitServing(ctx, vmB, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	var post []byte
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if post, err = os.ReadFile(vmB.Console); err == nil && bytes.Count(post, []byte("AXTICK")) >= 3 {
			break
		}
	}
	atCommit, first, err := TickContinuity(pre, post)
	if err != nil {
		t.Fatalf("%v; %s", err, consoleTail(vmB.Console, 10))
	}
	t.Logf("guest resumed on b: tick %d at the checkpoint, %d first after it", atCommit, first)
	for _, f := range KernelFaults {
		if bytes.Contains(post, []byte(f)) {
			t.Errorf("the resumed guest's console shows %q: %s", f, consoleTail(vmB.Console, 20))
		}
	}

	// libvirtd stops and starts again under its guest, as on a real host.
	if err := l.StopLibvirtd(HostB); err != nil {
		t.Fatal(err)
	}
	if isZombie(vmB.PID) {
		t.Fatal("the guest's QEMU died with its libvirtd")
	}
	if err := l.StartLibvirtd(ctx, HostB); err != nil {
		t.Fatal(err)
	}
	if st, err := qmpStatus(ctx, l, HostB, vmB.Domain); err != nil || st != "running" {
		t.Fatalf("after libvirtd restarted on b: status %q, %v", st, err)
	}
	if err := l.WaitServing(ctx, vmB, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// copyInto writes src's content over dst's without truncating dst: dst is
// a RAM file a paused QEMU has mapped, or a disk image.
func copyInto(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s into %s: %w", src, dst, err)
	}
	return out.Close()
}

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return -1
	}
	return st.Size()
}
