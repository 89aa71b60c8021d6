package libvirt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
)

// fakeConn is a recording libvirtd: domains with a definition, a state
// and an ID, QMP answered by qmp, lifecycle events sent on events.
type fakeConn struct {
	t      *testing.T
	ramDir string // the memory backing dir where "QEMU" makes RAM files

	mu      sync.Mutex
	calls   []string
	doms    map[string]*fakeDomain
	nextID  int32
	qmp     func(cmd string) (string, error)
	events  chan golibvirt.DomainEventLifecycleMsg
	closed  bool
	created []string // the XML of each virDomainCreateXML
}

type fakeDomain struct {
	def   string // inactive XML
	state golibvirt.DomainState
	id    int32
}

func newFakeConn(t *testing.T) *fakeConn {
	return &fakeConn{t: t, ramDir: t.TempDir(), doms: map[string]*fakeDomain{}, nextID: 7,
		events: make(chan golibvirt.DomainEventLifecycleMsg)}
}

func (f *fakeConn) record(format string, args ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

// define adds an inactive domain named name, its memory 4 MiB.
func (f *fakeConn) define(name string, disks ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	for i, d := range disks {
		fmt.Fprintf(&b, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><backingStore type='file'><format type='raw'/><source file='/var/lib/nova/instances/_base/x'/></backingStore><target dev='vd%c' bus='virtio'/></disk>", d, 'a'+i)
	}
	f.doms[name] = &fakeDomain{state: golibvirt.DomainShutoff, def: fmt.Sprintf(`<domain type='kvm'>
  <name>%s</name>
  <uuid>5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00</uuid>
  <memory unit='MiB'>4</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>%s<disk type='file' device='cdrom'><source file='/var/lib/nova/instances/u/disk.config'/><target dev='hda' bus='ide'/></disk>
  <interface type='bridge'><mac address='fa:16:3e:4c:2a:91'/><source bridge='br0'/><target dev='tap0'/><model type='virtio'/></interface></devices>
</domain>`, name, b.String())}
}

func (f *fakeConn) setState(name string, st golibvirt.DomainState) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.doms[name].state = st
}

func (f *fakeConn) dom(name string) (*fakeDomain, error) {
	d, ok := f.doms[name]
	if !ok {
		return nil, golibvirt.Error{Code: uint32(golibvirt.ErrNoDomain), Message: "Domain not found: no domain with matching name '" + name + "'"}
	}
	return d, nil
}

func (f *fakeConn) DomainLookupByName(name string) (golibvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("lookup %s", name)
	d, err := f.dom(name)
	if err != nil {
		return golibvirt.Domain{}, err
	}
	return golibvirt.Domain{Name: name, ID: d.id}, nil
}

func (f *fakeConn) DomainGetXMLDesc(dom golibvirt.Domain, flags golibvirt.DomainXMLFlags) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("xml %s %d", dom.Name, flags)
	d, err := f.dom(dom.Name)
	if err != nil {
		return "", err
	}
	if flags&golibvirt.DomainXMLInactive != 0 || d.id == 0 {
		return d.def, nil
	}
	return strings.Replace(d.def, "<domain type='kvm'>", fmt.Sprintf("<domain type='kvm' id='%d'>", d.id), 1), nil
}

func (f *fakeConn) DomainGetState(dom golibvirt.Domain, flags uint32) (int32, int32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, err := f.dom(dom.Name)
	if err != nil {
		return 0, 0, err
	}
	return int32(d.state), 0, nil
}

// start runs a domain: it gets an ID, and "QEMU" its RAM file.
func (f *fakeConn) start(name string, d *fakeDomain, paused bool) golibvirt.Domain {
	d.id = f.nextID
	f.nextID++
	d.state = golibvirt.DomainRunning
	if paused {
		d.state = golibvirt.DomainPaused
	}
	dir := filepath.Join(f.ramDir, fmt.Sprintf("%d-%s", d.id, name[:min(len(name), 20)]))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		f.t.Error(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pc.ram"), make([]byte, 4<<20), 0o600); err != nil {
		f.t.Error(err)
	}
	return golibvirt.Domain{Name: name, ID: d.id}
}

func (f *fakeConn) DomainCreate(dom golibvirt.Domain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("create %s", dom.Name)
	d, err := f.dom(dom.Name)
	if err != nil {
		return err
	}
	f.start(dom.Name, d, false)
	return nil
}

func (f *fakeConn) DomainCreateXML(x string, flags golibvirt.DomainCreateFlags) (golibvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var found *fakeDomain
	name := ""
	for n, d := range f.doms {
		if strings.Contains(x, "<name>"+n+"</name>") {
			found, name = d, n
		}
	}
	f.record("create-xml %s %d", name, flags)
	f.created = append(f.created, x)
	if found == nil {
		return golibvirt.Domain{}, errors.New("fake: unknown domain")
	}
	return f.start(name, found, flags&golibvirt.DomainStartPaused != 0), nil
}

func (f *fakeConn) DomainDefineXMLFlags(x string, flags golibvirt.DomainDefineFlags) (golibvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return golibvirt.Domain{}, golibvirt.Error{Code: uint32(golibvirt.ErrXMLError), Message: err.Error()}
	}
	f.record("define %s %d", dom.Name, flags)
	f.doms[dom.Name] = &fakeDomain{state: golibvirt.DomainShutoff, def: x}
	return golibvirt.Domain{Name: dom.Name}, nil
}

func (f *fakeConn) DomainDestroy(dom golibvirt.Domain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("destroy %s", dom.Name)
	d, err := f.dom(dom.Name)
	if err != nil {
		return err
	}
	if d.state == golibvirt.DomainShutoff {
		return golibvirt.Error{Code: uint32(golibvirt.ErrOperationInvalid), Message: "domain is not running"}
	}
	d.state, d.id = golibvirt.DomainShutoff, 0
	return nil
}

func (f *fakeConn) QEMUDomainMonitorCommand(dom golibvirt.Domain, cmd string, flags uint32) (string, error) {
	f.mu.Lock()
	f.record("qmp %s %s", dom.Name, cmd)
	answer := f.qmp
	f.mu.Unlock()
	if answer == nil {
		return `{"return":{},"id":"libvirt-1"}`, nil
	}
	return answer(cmd)
}

func (f *fakeConn) LifecycleEvents(ctx context.Context) (<-chan golibvirt.DomainEventLifecycleMsg, error) {
	out := make(chan golibvirt.DomainEventLifecycleMsg)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-f.events:
				select {
				case out <- m:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

func (f *fakeConn) Disconnect() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("disconnect")
	f.closed = true
	return nil
}

func (f *fakeConn) callLog() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(f.calls, "\n")
}

func newTestDriver(t *testing.T) (*Driver, *fakeConn) {
	f := newFakeConn(t)
	d := New(f, Config{Discover: Options{MemoryBackingDir: f.ramDir}, Poll: time.Millisecond, KillTimeout: 2 * time.Second, PIDDir: t.TempDir()})
	d.tapExists = func(string) (bool, error) { return false, nil }
	d.plugTap = func(context.Context, string, string) error { return nil }
	d.tapBridge = func(string) (string, error) { return "br0", nil }
	d.bridgeExists = func(string) error { return nil }
	t.Cleanup(func() { d.Close() })
	return d, f
}

func TestControlPassesQMPThroughLibvirt(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	f.setState("vm1", golibvirt.DomainRunning)
	f.qmp = func(cmd string) (string, error) {
		switch {
		case strings.Contains(cmd, "query-status"):
			return `{"return":{"status":"running","singlestep":false,"running":true},"id":"libvirt-410"}`, nil
		case strings.Contains(cmd, "query-named-block-nodes"):
			return `{"return":[{"node-name":"libvirt-2-format","drv":"qcow2","image":{"virtual-size":1073741824}}],"id":"libvirt-411"}`, nil
		case strings.Contains(cmd, `"stop"`):
			return `{"id":"libvirt-412","error":{"class":"GenericError","desc":"no stopping today"}}`, nil
		}
		return `{"return":{},"id":"libvirt-413"}`, nil
	}
	ctx := context.Background()
	mon, err := drv.Domain(api.Guest{Name: "vm1"}).Control(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if st, err := mon.Status(ctx); err != nil || st != "running" {
		t.Errorf("status %q, %v", st, err)
	}
	if n, err := mon.NodeSize(ctx, "libvirt-2-format"); err != nil || n != 1<<30 {
		t.Errorf("node size %d, %v", n, err)
	}
	if err := mon.Stop(ctx); err == nil || !strings.Contains(err.Error(), "no stopping today") {
		t.Errorf("a QMP error reply: %v", err)
	}
	if err := mon.SaveDeviceState(ctx, "/run/ax/vm1/dev"); err != nil {
		t.Error(err)
	}
	want := `qmp vm1 {"execute":"xen-save-devices-state","arguments":{"filename":"/run/ax/vm1/dev","live":false}}`
	if log := f.callLog(); !strings.Contains(log, want) {
		t.Errorf("calls:\n%s\nwant %s", log, want)
	}
}

func TestDefined(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	ctx := context.Background()
	if err := drv.Defined(ctx, "vm1"); err != nil {
		t.Errorf("a defined domain: %v", err)
	}
	if err := drv.Defined(ctx, "nosuch"); !isNoDomain(err) || !strings.Contains(err.Error(), "define the domain on this host first") {
		t.Errorf("an undefined domain: %v", err)
	}
	if err := drv.Defined(ctx, "a b"); err == nil || strings.Contains(f.callLog(), "a b") {
		t.Errorf("a hostile name: %v; calls:\n%s", err, f.callLog())
	}
}

// A partner without a definition of a domain defines it from the
// primary's once it is checked (validated by libvirt too); one it has is
// left alone; a refused one defines nothing. The primary's is its
// inactive XML.
func TestDefineFromPeer(t *testing.T) {
	primary, pf := newTestDriver(t)
	pf.define("vm1", "/var/lib/nova/instances/u/disk")
	ctx := context.Background()
	def, err := primary.Definition(ctx, "vm1")
	if err != nil || !strings.Contains(pf.callLog(), fmt.Sprintf("xml vm1 %d", golibvirt.DomainXMLInactive)) {
		t.Fatalf("the primary's definition: %v\n%s", err, pf.callLog())
	}
	drv, f := newTestDriver(t)
	if ok, err := drv.DefineFromPeer(ctx, "vm1", def, []string{"br*"}); err != nil || !ok {
		t.Fatalf("defining vm1 from the primary's: %v, %v", ok, err)
	}
	if !strings.Contains(f.callLog(), fmt.Sprintf("define vm1 %d", golibvirt.DomainDefineValidate)) {
		t.Errorf("not defined (validated):\n%s", f.callLog())
	}
	if err := drv.Defined(ctx, "vm1"); err != nil {
		t.Errorf("defined, then: %v", err)
	}
	if tap, err := drv.DefinedTap(ctx, "vm1"); err != nil || tap != "tap0" {
		t.Errorf("its tap here: %q, %v", tap, err)
	}
	// Defined already: left alone.
	if ok, err := drv.DefineFromPeer(ctx, "vm1", def, []string{"br*"}); err != nil || ok {
		t.Errorf("defining it again: %v, %v; want it left alone", ok, err)
	}
	// Refused: nothing defined.
	hostile := strings.Replace(string(def), "/var/lib/nova/instances/u/disk'", "/etc/shadow'", 1)
	if ok, err := drv.DefineFromPeer(ctx, "vm2", []byte(strings.ReplaceAll(hostile, "vm1", "vm2")), []string{"br*"}); ok || err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("a definition with /etc/shadow as a disk: %v, %v", ok, err)
	}
	if _, err := drv.DefineFromPeer(ctx, "vm3", []byte(strings.ReplaceAll(string(def), "vm1", "vm3")), []string{"brq*"}); err == nil || !strings.Contains(err.Error(), "bridge br0") {
		t.Errorf("a bridge this host does not take: %v", err)
	}
	if strings.Contains(f.callLog(), "define vm2") || strings.Contains(f.callLog(), "define vm3") {
		t.Errorf("a refused definition was defined:\n%s", f.callLog())
	}
}

// TestDefinedTap: the tap this host's definition of a domain names, read
// from the inactive XML; none for a domain without exactly one NIC; a
// hostile name in it is refused.
func TestDefinedTap(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	ctx := context.Background()
	if tap, err := drv.DefinedTap(ctx, "vm1"); err != nil || tap != "tap0" {
		t.Errorf("vm1: %q, %v; want tap0", tap, err)
	}
	if !strings.Contains(f.callLog(), fmt.Sprintf("xml vm1 %d", golibvirt.DomainXMLInactive)) {
		t.Errorf("not the inactive XML:\n%s", f.callLog())
	}
	f.mu.Lock()
	def := f.doms["vm1"].def
	f.doms["vm1"].def = edit(t, def, "<target dev='tap0'/>", "<target dev='../x'/>")
	f.mu.Unlock()
	if tap, err := drv.DefinedTap(ctx, "vm1"); err == nil {
		t.Errorf("a hostile tap name: %q", tap)
	}
	f.mu.Lock()
	f.doms["vm1"].def = edit(t, def, "<target dev='tap0'/>", "")
	f.mu.Unlock()
	if tap, err := drv.DefinedTap(ctx, "vm1"); err != nil || tap != "" {
		t.Errorf("no target dev: %q, %v", tap, err)
	}
	if _, err := drv.DefinedTap(ctx, "nosuch"); !isNoDomain(err) {
		t.Errorf("an undefined domain: %v", err)
	}
}

// TestPaused: a domain paused by anyone (Nova, waiting for its network)
// says so; a running one does not.
func TestPaused(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	ctx := context.Background()
	f.setState("vm1", golibvirt.DomainPaused)
	if p, err := drv.Paused(ctx, "vm1"); err != nil || !p {
		t.Errorf("paused: %v, %v", p, err)
	}
	f.setState("vm1", golibvirt.DomainRunning)
	if p, err := drv.Paused(ctx, "vm1"); err != nil || p {
		t.Errorf("running: %v, %v", p, err)
	}
	if _, err := drv.Paused(ctx, "nosuch"); !isNoDomain(err) {
		t.Errorf("an undefined domain: %v", err)
	}
}

// TestBridgeReady: a bridge missing here refuses, saying what a failover
// could not do and how Neutron's bridges come to be.
func TestBridgeReady(t *testing.T) {
	drv, _ := newTestDriver(t)
	if err := drv.BridgeReady("br-pub"); err != nil {
		t.Errorf("an existing bridge: %v", err)
	}
	drv.bridgeExists = func(b string) error { return fmt.Errorf("bridge %s: Link not found", b) }
	if err := drv.BridgeReady("brqa71967f9-9a"); err == nil || !strings.Contains(err.Error(), "Link not found") || !strings.Contains(err.Error(), "a failover could not plug") {
		t.Errorf("a missing bridge: %v", err)
	}
}

func TestControlRefuses(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	ctx := context.Background()
	if _, err := drv.Domain(api.Guest{Name: "vm1"}).Control(ctx); err == nil || !strings.Contains(err.Error(), "not running (shut off)") {
		t.Errorf("a shut off domain: %v", err)
	}
	if _, err := drv.Domain(api.Guest{Name: "nosuch"}).Control(ctx); !isNoDomain(err) {
		t.Errorf("an unknown domain: %v", err)
	}
	if _, err := drv.Domain(api.Guest{Name: "a b"}).Control(ctx); err == nil {
		t.Error("a hostile name was looked up")
	}
	if log := f.callLog(); strings.Contains(log, "a b") {
		t.Errorf("calls:\n%s", log)
	}
}

// TestControlHungQEMU: a command libvirt does not answer ends with its
// context, as one on a QMP socket does.
func TestControlHungQEMU(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	f.setState("vm1", golibvirt.DomainRunning)
	hang := make(chan struct{})
	defer close(hang)
	f.qmp = func(string) (string, error) {
		<-hang
		return "", errors.New("gone")
	}
	mon, err := drv.Domain(api.Guest{Name: "vm1"}).Control(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	if err := mon.Stop(ctx); !errors.Is(err, qemu.ErrTimeout) {
		t.Errorf("err %v, want qemu.ErrTimeout", err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("took %v", d)
	}
	if _, err := mon.Status(context.Background()); err == nil {
		t.Error("the monitor answered after it was closed")
	}
}

// TestControlCancelledKeepsMonitor: a command whose caller gives up (its
// context cancelled: protection ending mid-checkpoint) does not close the
// domain's monitor — the guest's resume and the disk mirror's teardown
// that follow go through it.
func TestControlCancelledKeepsMonitor(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	f.setState("vm1", golibvirt.DomainRunning)
	slow := make(chan struct{})
	var mu sync.Mutex
	var ran []string
	f.qmp = func(cmd string) (string, error) {
		if strings.Contains(cmd, `"stop"`) {
			<-slow
		}
		mu.Lock()
		ran = append(ran, cmd)
		mu.Unlock()
		return `{"return":{}}`, nil
	}
	mon, err := drv.Domain(api.Guest{Name: "vm1"}).Control(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- mon.Stop(ctx) }()
	time.Sleep(10 * time.Millisecond)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled stop: %v, want context.Canceled", err)
	}
	close(slow)
	// The abandoned stop still reaches QEMU, in its own time: the cont is
	// sent once it has, so the order below is the monitor's, not chance's.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		mu.Lock()
		n := len(ran)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the abandoned stop never reached QEMU")
		}
	}
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer ccancel()
	if err := mon.Cont(cctx); err != nil {
		t.Fatalf("cont after a cancelled stop: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ran) == 0 || !strings.Contains(ran[len(ran)-1], `"cont"`) {
		t.Errorf("libvirt passed %q, want the cont to reach QEMU", ran)
	}
}

func TestStartDefined(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1", "/var/lib/nova/instances/u/disk")
	g := api.Guest{Name: "vm1", Tap: "tap0", Disks: []api.Disk{{Node: "libvirt-2-format", Path: "/var/lib/nova/instances/u/disk", Format: "qcow2", Plain: true}}}
	ctx := context.Background()
	p, err := drv.Domain(g).Start(ctx, "/ignored.log")
	if err != nil {
		t.Fatal(err)
	}
	if log := f.callLog(); !strings.Contains(log, "create vm1") || strings.Contains(log, "create-xml") {
		t.Errorf("want virDomainCreate of the definition; calls:\n%s", log)
	}
	if _, err := drv.Domain(g).Start(ctx, ""); err == nil || !strings.Contains(err.Error(), "already runs") {
		t.Errorf("starting twice: %v", err)
	}
	select {
	case <-p.Done():
		t.Fatal("done while running")
	case <-time.After(20 * time.Millisecond):
	}
	f.setState("vm1", golibvirt.DomainShutoff) // the guest powered off
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed once the domain shut off")
	}
	if err := p.Kill(); err != nil {
		t.Errorf("kill of an ended domain: %v", err)
	}
}

// TestStartReplicaDisks: after an HA promotion the guest's disks are the
// replica's raw images; the definition starts with them, unchanged.
func TestStartReplicaDisks(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1", "/var/lib/nova/instances/u/disk")
	def := f.doms["vm1"].def
	g := api.Guest{Name: "vm1", Tap: "axr0123456789ab", Disks: []api.Disk{{Node: "libvirt-2-format", Path: "/var/lib/ax/vm1/disk0.raw", Format: "raw", Plain: true}}}
	p, err := drv.Domain(g).Start(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(f.created) != 1 {
		t.Fatalf("calls:\n%s", f.callLog())
	}
	x := f.created[0]
	for _, want := range []string{"<source file=\"/var/lib/ax/vm1/disk0.raw\"", "type=\"raw\"", "disk.config", "<target dev=\"axr0123456789ab\""} {
		if !strings.Contains(x, want) {
			t.Errorf("started XML has no %s:\n%s", want, x)
		}
	}
	if strings.Contains(x, "_base") || strings.Contains(x, "commandline") {
		t.Errorf("started XML keeps the backing chain or has QEMU arguments:\n%s", x)
	}
	if f.doms["vm1"].def != def {
		t.Error("the definition changed")
	}
	if err := p.Kill(); err != nil {
		t.Error(err)
	}
	if err := p.Kill(); err != nil {
		t.Errorf("second kill: %v", err)
	}
	if n := strings.Count(f.callLog(), "destroy vm1"); n != 1 {
		t.Errorf("%d destroys, want 1", n)
	}
	g.Disks = append(g.Disks, api.Disk{Node: "x", Path: "/var/lib/ax/vm1/disk1.raw"})
	if _, err := drv.Domain(g).Start(context.Background(), ""); err == nil || !strings.Contains(err.Error(), "1 disks, AX replicates 2") {
		t.Errorf("disks that do not match the definition: %v", err)
	}
}

func TestStartIncoming(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("instance-0000002a-with-a-long-name")
	replica := filepath.Join(t.TempDir(), "ram")
	want := bytes.Repeat([]byte("AXRAM..."), (4<<20)/8)
	if err := os.WriteFile(replica, want, 0o600); err != nil {
		t.Fatal(err)
	}
	g := api.Guest{Name: "instance-0000002a-with-a-long-name", RAMMiB: 4, RAMFile: replica}
	p, err := drv.Domain(g).StartIncoming(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	if log := f.callLog(); !strings.Contains(log, fmt.Sprintf("create-xml %s %d", g.Name, golibvirt.DomainStartPaused)) {
		t.Errorf("want a paused virDomainCreateXML; calls:\n%s", log)
	}
	x := strings.Join(strings.Fields(f.created[0]), "")
	args := `<commandlinexmlns="http://libvirt.org/schemas/domain/qemu/1.0"><argvalue="-incoming"></arg><argvalue="defer"></arg><argvalue="-global"></arg><argvalue="migration.send-configuration=off"></arg><argvalue="-machine"></arg><argvalue="suppress-vmdesc=on"></arg></commandline>`
	if !strings.Contains(x, args) {
		t.Errorf("started XML lacks the incoming arguments:\n%s", x)
	}
	got, err := os.ReadFile(filepath.Join(f.ramDir, "7-instance-0000002a-wi", "pc.ram"))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("libvirt's RAM file does not hold the replica (%v)", err)
	}
}

// TestStartIncomingFails: a replica that cannot be resumed leaves no
// domain running.
func TestStartIncomingFails(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	replica := filepath.Join(t.TempDir(), "ram")
	if err := os.WriteFile(replica, make([]byte, 2<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := drv.Domain(api.Guest{Name: "vm1", RAMFile: replica}).StartIncoming(context.Background(), "")
	if err == nil || !strings.Contains(err.Error(), "differ in kind or size") {
		t.Errorf("a replica of another size: %v", err)
	}
	if st := f.doms["vm1"].state; st != golibvirt.DomainShutoff {
		t.Errorf("the failed replica's domain is %s", stateName(st))
	}
	if _, err := drv.Domain(api.Guest{Name: "nosuch"}).StartIncoming(context.Background(), ""); err == nil || !strings.Contains(err.Error(), "virsh define") {
		t.Errorf("an undefined domain: %v", err)
	}
}

func TestPlugTapChecksLibvirtsTap(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	var asked []string
	exists := false
	drv.tapExists = func(tap string) (bool, error) {
		asked = append(asked, tap)
		return exists, nil
	}
	var plugged []string
	drv.plugTap = func(_ context.Context, tap, bridge string) error {
		plugged = append(plugged, tap+"@"+bridge)
		return nil
	}
	dom := drv.Domain(api.Guest{Name: "vm1", Tap: "tap0"})
	ctx := context.Background()
	if err := dom.PlugTap(ctx, "br0"); err != nil || len(asked) != 0 || len(plugged) != 1 || plugged[0] != "tap0@br0" {
		t.Errorf("before start: %v, asked %q, plugged %q (the tap is made in the bridge before start, as os-vif does)", err, asked, plugged)
	}
	f.setState("vm1", golibvirt.DomainRunning)
	if err := dom.PlugTap(ctx, "br0"); err == nil || !strings.Contains(err.Error(), "without its tap tap0") {
		t.Errorf("a running domain without its tap: %v", err)
	}
	exists = true
	if err := dom.PlugTap(ctx, "br0"); err != nil {
		t.Error(err)
	}
	if err := drv.Domain(api.Guest{Name: "vm1", Tap: "tap;x"}).PlugTap(ctx, ""); err == nil {
		t.Error("a hostile tap name was accepted")
	}
}

func TestEvents(t *testing.T) {
	drv, f := newTestDriver(t)
	ctx, cancel := context.WithCancel(context.Background())
	events, err := drv.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dom := golibvirt.Domain{Name: "vm1", UUID: golibvirt.UUID{0x5b, 0x9f, 0x0c, 0x3e, 0x2d, 0x1a, 0x4f, 0x7b, 0x9a, 0x8e, 0x6c, 0x4d, 0x3b, 0x2a, 0x1f, 0x00}}
	for _, tc := range []struct {
		event, detail int32
		kind          EventKind
		reason        string
	}{
		{int32(golibvirt.DomainEventStarted), 0, Started, "booted"},
		{int32(golibvirt.DomainEventSuspended), 0, Paused, "paused"},
		{int32(golibvirt.DomainEventResumed), 0, Resumed, "unpaused"},
		{int32(golibvirt.DomainEventShutdown), 1, ShuttingDown, "guest"},
		{int32(golibvirt.DomainEventStopped), 0, Stopped, "shutdown"},
		{int32(golibvirt.DomainEventStopped), 1, Destroyed, "destroyed"},
		{int32(golibvirt.DomainEventStopped), 2, Crashed, "crashed"},
		{int32(golibvirt.DomainEventStopped), 5, Crashed, "failed"},
		{int32(golibvirt.DomainEventStopped), 3, Stopped, "migrated"},
		{int32(golibvirt.DomainEventCrashed), 0, Crashed, "panicked"},
		{int32(golibvirt.DomainEventDefined), 9, Defined, "detail 9"},
		{42, 1, "event-42", "detail 1"},
	} {
		f.events <- golibvirt.DomainEventLifecycleMsg{Dom: dom, Event: tc.event, Detail: tc.detail}
		e := <-events
		want := Event{Domain: "vm1", UUID: "5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00", Kind: tc.kind, Reason: tc.reason}
		if e != want {
			t.Errorf("event %d/%d: %+v, want %+v", tc.event, tc.detail, e, want)
		}
	}
	cancel()
	for range events {
	}
	// Close ends the streams it started, and is safe twice.
	events, err = drv.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := drv.Close(); err != nil {
		t.Error(err)
	}
	if _, ok := <-events; ok {
		t.Error("event stream open after Close")
	}
	drv.Close()
	if n := strings.Count(f.callLog(), "disconnect"); n != 1 {
		t.Errorf("%d disconnects", n)
	}
}

func TestDriverDiscover(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	ctx := context.Background()
	if _, err := drv.Discover(ctx, "vm1"); !isRefusal(err, "state") {
		t.Errorf("a shut off domain: %v", err)
	}
	f.mu.Lock()
	f.start("vm1", f.doms["vm1"], false)
	f.mu.Unlock()
	d, err := drv.Discover(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(f.ramDir, "7-vm1", "pc.ram"); d.Guest.RAMFile != want || d.Guest.Tap != "tap0" || d.PID != 0 {
		t.Errorf("discovered %+v, pid %d", d.Guest, d.PID)
	}
	if err := os.WriteFile(filepath.Join(drv.cfg.PIDDir, "vm1.pid"), []byte("4242\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if d, err = drv.Discover(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if d.PID != 4242 {
		t.Errorf("pid %d, want libvirt's pid file's", d.PID)
	}
	if spec, err := drv.DiscoverSpec(ctx, "vm1"); err != nil || spec.Bridge != "br0" || spec.PID != 4242 {
		t.Errorf("spec %+v, %v; want bridge br0 (the <interface type='bridge'>'s)", spec, err)
	}
	// Neutron's Linux bridge agent moved the tap into the bridge mapped
	// to its physnet: the spec says where the tap is, not the XML's
	// brq<network>; a tap in no bridge keeps the XML's.
	drv.tapBridge = func(string) (string, error) { return "br-pub", nil }
	if spec, err := drv.DiscoverSpec(ctx, "vm1"); err != nil || spec.Bridge != "br-pub" {
		t.Errorf("a tap moved to br-pub: spec %+v, %v; want bridge br-pub", spec, err)
	}
	drv.tapBridge = func(string) (string, error) { return "", nil }
	if spec, err := drv.DiscoverSpec(ctx, "vm1"); err != nil || spec.Bridge != "br0" {
		t.Errorf("a tap in no bridge: spec %+v, %v; want the XML's br0", spec, err)
	}
	drv.tapBridge = func(string) (string, error) { return "", errors.New("interface tap0: Link not found") }
	if spec, err := drv.DiscoverSpec(ctx, "vm1"); err != nil || spec.Bridge != "br0" {
		t.Errorf("a tap netlink cannot read: spec %+v, %v; want the XML's br0", spec, err)
	}
	// An 'ethernet' tap (os-vif's): the bridge is the one it is in here.
	f.mu.Lock()
	f.doms["vm1"].def = edit(t, f.doms["vm1"].def, "<interface type='bridge'><mac address='fa:16:3e:4c:2a:91'/><source bridge='br0'/>", "<interface type='ethernet'><mac address='fa:16:3e:4c:2a:91'/>")
	f.mu.Unlock()
	drv.tapBridge = func(tap string) (string, error) { return "br-" + tap, nil }
	if spec, err := drv.DiscoverSpec(ctx, "vm1"); err != nil || spec.Bridge != "br-tap0" {
		t.Errorf("ethernet tap: spec %+v, %v; want bridge br-tap0", spec, err)
	}
}

// TestLaunchXMLReplica: a replica's domain uses the tap axd plugged
// (managed='no'), and its console and agent socket in axd's directory.
func TestLaunchXMLReplica(t *testing.T) {
	def := `<domain type='kvm'><name>vm1</name><devices>
<interface type='ethernet'><mac address='fa:16:3e:4c:2a:91'/><target dev='tap0' managed='no'/><model type='virtio'/></interface>
<serial type='file'><source path='/var/lib/nova/instances/u/console.log'/><target port='0'/></serial>
<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/agent.sock'/><target type='virtio' name='org.axproject.agent.0'/></channel>
</devices></domain>`
	g := api.Guest{Name: "vm1", Tap: "axr0", Console: "/run/ax/vms/vm1/console.log", Agent: "/run/ax/vms/vm1/agent.sock"}
	for _, plugged := range []bool{false, true} {
		x, same, err := launchXML(def, g, true, plugged)
		if err != nil || same {
			t.Fatalf("plugged %v: same %v, %v", plugged, same, err)
		}
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(x); err != nil {
			t.Fatal(err)
		}
		ifc := dom.Devices.Interfaces[0]
		if want := map[bool]string{true: "no"}[plugged]; ifc.Target.Dev != "axr0" || ifc.Target.Managed != want {
			t.Errorf("plugged %v: target %+v, want axr0 managed %q", plugged, *ifc.Target, want)
		}
		if p := dom.Devices.Serials[0].Source.File.Path; p != g.Console {
			t.Errorf("console %s, want %s", p, g.Console)
		}
		if p := dom.Devices.Channels[0].Source.UNIX.Path; p != g.Agent {
			t.Errorf("agent socket %s, want %s", p, g.Agent)
		}
		if dom.QEMUCommandline == nil || len(dom.QEMUCommandline.Args) != len(incomingArgs) {
			t.Errorf("incoming arguments %+v", dom.QEMUCommandline)
		}
	}
	// Nova's NIC with Neutron's Linux bridge agent: <interface
	// type='bridge'> on brq<network>. Plugged by axd, the tap is opened as
	// an ethernet interface (libvirt takes an unmanaged tap for no
	// other type); unplugged, libvirt plugs it into the bridge itself.
	bridged := strings.Replace(strings.Replace(def, "<interface type='ethernet'>", "<interface type='bridge'><source bridge='brqa71967f9-9a'/>", 1), " managed='no'", "", 1)
	for _, plugged := range []bool{false, true} {
		x, _, err := launchXML(bridged, g, true, plugged)
		if err != nil {
			t.Fatalf("bridge, plugged %v: %v", plugged, err)
		}
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(x); err != nil {
			t.Fatal(err)
		}
		ifc := dom.Devices.Interfaces[0]
		if plugged && (ifc.Source.Ethernet == nil || ifc.Source.Bridge != nil || ifc.Target.Managed != "no" || ifc.Target.Dev != "axr0") {
			t.Errorf("bridge, plugged: %s", x)
		}
		if !plugged && (ifc.Source.Bridge == nil || ifc.Source.Bridge.Bridge != "brqa71967f9-9a" || ifc.Target.Managed != "" || ifc.Target.Dev != "axr0") {
			t.Errorf("bridge, not plugged: %s", x)
		}
	}
	ovs := strings.Replace(bridged, "<target dev=", "<virtualport type='openvswitch'/><target dev=", 1)
	if _, _, err := launchXML(ovs, g, true, true); err == nil || !strings.Contains(err.Error(), "virtual switch") {
		t.Errorf("an Open vSwitch port: %v", err)
	}
}

func TestLaunchXMLRefuses(t *testing.T) {
	f := newFakeConn(t)
	f.define("vm1")
	def := f.doms["vm1"].def
	const iface = "<interface type='bridge'><mac address='fa:16:3e:4c:2a:91'/><source bridge='br0'/><target dev='tap0'/><model type='virtio'/></interface>"
	for _, tc := range []struct {
		name, def string
		g         api.Guest
		want      string
	}{
		{"another domain", def, api.Guest{Name: "vm2"}, "definition is of domain vm1, not vm2"},
		{"no tap", edit(t, def, iface, ""), api.Guest{Name: "vm1", Tap: "axr0"}, "no tap"},
		{"two NICs", edit(t, def, iface, iface+iface), api.Guest{Name: "vm1", Tap: "axr0"}, "several NICs"},
		{"hostile tap", def, api.Guest{Name: "vm1", Tap: "eth0;x"}, "tap"},
		{"hostile disk", def, api.Guest{Name: "vm1", Disks: []api.Disk{{Path: "a,b"}}}, "disks"},
		{"no devices", "<domain type='kvm'><name>vm1</name></domain>", api.Guest{Name: "vm1", Tap: "axr0"}, "no tap"},
	} {
		if _, _, err := launchXML(tc.def, tc.g, false, false); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

// droppable is a fakeConn libvirtd can drop (IsConnected false), as a
// restart of libvirtd does to the driver's connection.
type droppable struct {
	*fakeConn
	dropped atomic.Bool
}

func (c *droppable) IsConnected() bool { return !c.dropped.Load() }

// A connection libvirtd dropped is dialled again at the next call, which
// goes to the new one; a failed dial leaves the call failing on the old
// connection and is tried again at the next.
func TestDriverRedialsALostConnection(t *testing.T) {
	first := &droppable{fakeConn: newFakeConn(t)}
	first.define("vm1")
	first.setState("vm1", golibvirt.DomainRunning)
	d := New(first, Config{Discover: Options{MemoryBackingDir: first.ramDir}})
	t.Cleanup(func() { d.Close() })
	second := &droppable{fakeConn: newFakeConn(t)}
	second.define("vm1")
	second.setState("vm1", golibvirt.DomainRunning)
	dials := 0
	down := true
	d.redial = func(context.Context) (Conn, error) {
		dials++
		if down {
			return nil, errors.New("dial unix /run/libvirt/libvirt-sock: connect: connection refused")
		}
		return second, nil
	}
	ctx := context.Background()
	if _, err := d.lookup(ctx, "vm1"); err != nil || dials != 0 {
		t.Fatalf("lookup on a live connection: %v, %d dials", err, dials)
	}
	first.dropped.Store(true)
	d.lookup(ctx, "vm1") // libvirtd still down: the old connection answers
	if dials != 1 || d.Redials() != 0 {
		t.Fatalf("with libvirtd down: %d dials, %d redials; want 1, 0", dials, d.Redials())
	}
	down = false
	if _, err := d.lookup(ctx, "vm1"); err != nil {
		t.Fatalf("lookup once libvirtd is back: %v", err)
	}
	if dials != 2 || d.Redials() != 1 {
		t.Fatalf("libvirtd back: %d dials, %d redials; want 2, 1", dials, d.Redials())
	}
	if !strings.Contains(first.callLog(), "disconnect") {
		t.Error("the lost connection was not closed")
	}
	if !strings.Contains(second.callLog(), "lookup vm1") {
		t.Errorf("the call after the redial did not go to the new connection: %q", second.callLog())
	}
	d.lookup(ctx, "vm1")
	if dials != 2 {
		t.Errorf("%d dials with the new connection up, want 2", dials)
	}
}

// Identify tells a defined domain's UUID whether it runs or not.
func TestDriverIdentify(t *testing.T) {
	drv, f := newTestDriver(t)
	f.define("vm1")
	id, err := drv.Identify(context.Background(), "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if id.Name != "vm1" || id.UUID != "5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00" || id.Nova != nil {
		t.Errorf("identity %+v", id)
	}
	if _, err := drv.Identify(context.Background(), "nope"); err == nil {
		t.Error("an unknown domain identified")
	}
}
