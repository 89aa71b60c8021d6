package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/qemu"
)

// Config is how the driver reaches libvirtd and where this host keeps
// what domains name. The zero value is the system libvirtd's defaults.
type Config struct {
	// URI is the libvirt connection URI (default DefaultURI).
	URI string
	// Socket is libvirtd's unix socket (default DefaultSocket): a lab
	// host's libvirtd has its own.
	Socket string
	// Discover says where the memory backing directory is and which
	// directories a domain's files may be in.
	Discover Options
	// PIDDir is where libvirt writes each QEMU's pid file, NAME.pid
	// (default /run/libvirt/qemu).
	PIDDir string
	// Poll is how often a started domain's Process asks libvirt whether
	// it still runs (default 250 ms).
	Poll time.Duration
	// KillTimeout bounds how long Process.Kill waits for the domain to
	// stop after virDomainDestroy (default 10 s).
	KillTimeout time.Duration
	// Log gets the driver's few messages (default: discarded).
	Log *slog.Logger
}

func (c *Config) fill() {
	if c.URI == "" {
		c.URI = DefaultURI
	}
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.PIDDir == "" {
		c.PIDDir = "/run/libvirt/qemu"
	}
	if c.Poll <= 0 {
		c.Poll = 250 * time.Millisecond
	}
	if c.KillTimeout <= 0 {
		c.KillTimeout = 10 * time.Second
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// Driver runs AX's VMs as libvirt domains: a VM's api.Guest name is its
// domain's name. It holds one connection to libvirtd for every domain, and
// dials again when libvirtd dropped it (a restart of libvirtd: an upgrade,
// `systemctl restart libvirtd`), at the next call that needs it.
type Driver struct {
	connMu sync.Mutex
	conn   Conn
	// redial opens a new connection (Dial's; nil: the connection given
	// to New is the only one).
	redial  func(ctx context.Context) (Conn, error)
	dialErr string // the last failed redial's error, logged once
	redials int    // connections dialled again
	cfg     Config
	// tapExists checks a tap libvirt made (hv.TapExists; tests fake it).
	tapExists func(string) (bool, error)
	// plugTap makes a tap in a bridge before a domain starts
	// (hv.PlugTap; tests fake it).
	plugTap func(ctx context.Context, tap, bridge string) error
	// tapBridge says which bridge a running domain's tap is in
	// (hv.TapBridge; tests fake it).
	tapBridge func(tap string) (string, error)
	// bridgeExists says why a bridge is missing (hv.BridgeExists; tests
	// fake it).
	bridgeExists func(bridge string) error

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

var _ hv.Discoverer = (*Driver)(nil)

// Dial connects to libvirtd as cfg says; ctx bounds the connection.
func Dial(ctx context.Context, cfg Config) (*Driver, error) {
	cfg.fill()
	l, err := dialConn(ctx, cfg.Socket, cfg.URI)
	if err != nil {
		return nil, err
	}
	d := New(l, cfg)
	d.redial = func(ctx context.Context) (Conn, error) { return dialConn(ctx, cfg.Socket, cfg.URI) }
	return d, nil
}

// redialTimeout bounds dialling libvirtd again.
const redialTimeout = 5 * time.Second

// c is the connection to libvirtd. One libvirtd dropped (it restarted, or
// is down) is dialled again first; if that fails, the dropped one is
// returned and the call fails with its error, to be tried again later.
func (d *Driver) c() Conn {
	d.connMu.Lock()
	defer d.connMu.Unlock()
	if d.redial == nil || connected(d.conn) || d.ctx.Err() != nil {
		return d.conn
	}
	ctx, cancel := context.WithTimeout(d.ctx, redialTimeout)
	defer cancel()
	c, err := d.redial(ctx)
	if err != nil {
		// Logged when the reason changes, not at each of the calls (a
		// started domain's watcher asks every Poll).
		if msg := err.Error(); msg != d.dialErr {
			d.dialErr = msg
			d.cfg.Log.Warn("libvirt: the connection to libvirtd was lost and dialling it again failed; tried again at the next call", "socket", d.cfg.Socket, "err", err)
		}
		return d.conn
	}
	d.conn.Disconnect()
	d.conn, d.dialErr = c, ""
	d.redials++
	d.cfg.Log.Info("libvirt: the connection to libvirtd was lost (libvirtd restarted?) and is open again", "socket", d.cfg.Socket)
	return c
}

// Redials is how many times the driver dialled libvirtd again after
// losing its connection.
func (d *Driver) Redials() int {
	d.connMu.Lock()
	defer d.connMu.Unlock()
	return d.redials
}

// connected says whether c is still open (go-libvirt's IsConnected); a
// Conn that cannot tell is taken to be.
func connected(c Conn) bool {
	if cc, ok := c.(interface{ IsConnected() bool }); ok {
		return cc.IsConnected()
	}
	return true
}

// New is a driver over conn, a connection already open (Dial's, or a
// fake's). The driver owns conn: Close disconnects it.
func New(conn Conn, cfg Config) *Driver {
	cfg.fill()
	ctx, cancel := context.WithCancel(context.Background())
	return &Driver{conn: conn, cfg: cfg, tapExists: hv.TapExists, plugTap: hv.PlugTap, tapBridge: hv.TapBridge, bridgeExists: hv.BridgeExists, ctx: ctx, cancel: cancel}
}

// Close stops what the driver watches (event streams, started domains'
// Done), waits for it, and disconnects from libvirtd. The domains go on
// running. Safe to call twice.
func (d *Driver) Close() error {
	var err error
	d.once.Do(func() {
		d.cancel()
		d.connMu.Lock()
		err = d.conn.Disconnect()
		d.connMu.Unlock()
		d.wg.Wait()
	})
	return err
}

// Domain returns the libvirt domain named g.Name.
func (d *Driver) Domain(g api.Guest) hv.Domain { return &domain{drv: d, g: g} }

// Discover looks up the running domain name and inspects its live XML.
func (d *Driver) Discover(ctx context.Context, name string) (*Discovered, error) {
	x, err := d.liveXML(ctx, name)
	if err != nil {
		return nil, err
	}
	found, err := Inspect(x, &d.cfg.Discover)
	if err != nil {
		return nil, err
	}
	found.PID = d.pid(name)
	if found.Guest.Tap != "" {
		// The bridge the tap is in now, over the one the XML names:
		// Neutron's Linux bridge agent moves a tap Nova plugged into
		// brq<network> into the bridge mapped to the network's physnet,
		// and libvirt's XML keeps brq….
		br, err := d.tapBridge(found.Guest.Tap)
		switch {
		case err == nil && br != "":
			found.Bridge = br
		case err != nil && found.Bridge == "":
			return nil, fmt.Errorf("libvirt domain %s: %w", name, err)
		}
	}
	return found, nil
}

// Identify reads who domain name is, running or only defined: its UUID
// (Nova's instance UUID) and Nova's and AX's metadata.
func (d *Driver) Identify(ctx context.Context, name string) (*Identity, error) {
	x, err := d.liveXML(ctx, name)
	if err != nil {
		return nil, err
	}
	return Identify(x)
}

// liveXML is domain name's XML as libvirt describes it now (the live one
// while it runs).
func (d *Driver) liveXML(ctx context.Context, name string) ([]byte, error) {
	return d.xmlDesc(ctx, name, 0)
}

// xmlDesc is domain name's XML with flags (virDomainGetXMLDesc).
func (d *Driver) xmlDesc(ctx context.Context, name string, flags golibvirt.DomainXMLFlags) ([]byte, error) {
	if err := names.Check("vm", name); err != nil {
		return nil, err
	}
	dom, err := d.lookup(ctx, name)
	if err != nil {
		return nil, err
	}
	x, err := call(ctx, func() (string, error) { return d.c().DomainGetXMLDesc(dom, flags) })
	if err != nil {
		return nil, fmt.Errorf("libvirt domain %s: XML: %w", name, err)
	}
	return []byte(x), nil
}

// DiscoverSpec is Discover as axd asks it (hv.Discoverer): the spec of
// the running domain name.
func (d *Driver) DiscoverSpec(ctx context.Context, name string) (api.VMSpec, error) {
	found, err := d.Discover(ctx, name)
	if err != nil {
		return api.VMSpec{}, err
	}
	return api.VMSpec{Name: name, PID: found.PID, Guest: found.Guest, Bridge: found.Bridge}, nil
}

// pid is the QEMU process ID in libvirt's pid file of the running domain
// name, 0 if it cannot be read.
func (d *Driver) pid(name string) int {
	path, err := names.Join(d.cfg.PIDDir, "vm", name+".pid")
	if err != nil {
		return 0
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid < 1 {
		return 0
	}
	return pid
}

// Defined checks that domain name is defined on this host: a failover
// here resumes the replica as this host's definition of the domain (made
// by the operator, or from the primary's, checked, with axd
// --define-replicas: DefineFromPeer). Only libvirt's "domain not found" is
// the definition's absence; another error is returned as it is.
func (d *Driver) Defined(ctx context.Context, name string) error {
	if err := names.Check("vm", name); err != nil {
		return err
	}
	if _, err := d.lookup(ctx, name); err != nil {
		if isNoDomain(err) {
			return fmt.Errorf("%w: a failover could not resume it here (define the domain on this host first: virsh define with the primary's XML, or axd --define-replicas)", err)
		}
		return err
	}
	return nil
}

// Definition is the persistent definition of domain name on this host
// (virsh dumpxml --inactive), which its partner may define from
// (DefineFromPeer).
func (d *Driver) Definition(ctx context.Context, name string) ([]byte, error) {
	return d.xmlDesc(ctx, name, golibvirt.DomainXMLInactive)
}

// DefineFromPeer defines domain name on this host from def, the primary's
// definition, once CheckPeerDefinition took it (its files within the
// driver's directories, its bridges among bridges). A domain defined here
// already is left as it is: false, nil.
func (d *Driver) DefineFromPeer(ctx context.Context, name string, def []byte, bridges []string) (bool, error) {
	if err := names.Check("vm", name); err != nil {
		return false, err
	}
	_, err := d.lookup(ctx, name)
	switch {
	case err == nil:
		return false, nil
	case !isNoDomain(err):
		return false, err
	}
	clean, err := CheckPeerDefinition(def, name, PeerPolicy{Dirs: d.cfg.Discover.dirs(), Bridges: bridges})
	if err != nil {
		return false, err
	}
	if _, err := call(ctx, func() (golibvirt.Domain, error) {
		return d.c().DomainDefineXMLFlags(string(clean), golibvirt.DomainDefineValidate)
	}); err != nil {
		return false, fmt.Errorf("libvirt: defining %s from the primary's definition: %w", name, err)
	}
	return true, nil
}

// BridgeReady says why a replica's tap could not join bridge here at a
// failover (nil: it could): the bridge must exist before the failover
// needs it. Neutron's Linux bridge agent makes a network's brq<network>
// only on a host a port of that network is bound to.
func (d *Driver) BridgeReady(bridge string) error {
	if err := d.bridgeExists(bridge); err != nil {
		return fmt.Errorf("%w: a failover could not plug the VM's tap here (with Neutron's Linux bridge agent: a port of the network bound to this host, or the bridge made as the agent would, with the provider interface in it)", err)
	}
	return nil
}

// Paused says whether domain name is paused (by anyone: Nova starts an
// instance paused until its network is plugged).
func (d *Driver) Paused(ctx context.Context, name string) (bool, error) {
	if err := names.Check("vm", name); err != nil {
		return false, err
	}
	dom, err := d.lookup(ctx, name)
	if err != nil {
		return false, err
	}
	st, err := d.state(ctx, dom)
	if err != nil {
		return false, err
	}
	return st == golibvirt.DomainPaused, nil
}

// DefinedTap is the tap the definition of domain name on this host gives
// its NIC (<target dev=…/>; "" when it names none): a replica of it here
// is plugged under that name, the one this host's network agents (Nova's
// os-vif, Neutron's) know the port by. The definition is this host's
// own, or made from the primary's after CheckPeerDefinition took it.
func (d *Driver) DefinedTap(ctx context.Context, name string) (string, error) {
	if err := names.Check("vm", name); err != nil {
		return "", err
	}
	dom, err := d.lookup(ctx, name)
	if err != nil {
		return "", err
	}
	x, err := call(ctx, func() (string, error) { return d.c().DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive) })
	if err != nil {
		return "", fmt.Errorf("libvirt domain %s: XML: %w", name, err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(x); err != nil {
		return "", fmt.Errorf("libvirt domain %s: XML: %w", name, err)
	}
	if def.Devices == nil || len(def.Devices.Interfaces) != 1 {
		return "", nil
	}
	t := def.Devices.Interfaces[0].Target
	if t == nil || t.Dev == "" {
		return "", nil
	}
	if err := names.CheckInterface("tap", t.Dev); err != nil {
		return "", fmt.Errorf("libvirt domain %s: its definition here: %w", name, err)
	}
	return t.Dev, nil
}

func (d *Driver) lookup(ctx context.Context, name string) (golibvirt.Domain, error) {
	dom, err := call(ctx, func() (golibvirt.Domain, error) { return d.c().DomainLookupByName(name) })
	if err != nil {
		return golibvirt.Domain{}, fmt.Errorf("libvirt domain %s: %w", name, err)
	}
	return dom, nil
}

// state is a domain's libvirt state (golibvirt.DomainRunning, …).
func (d *Driver) state(ctx context.Context, dom golibvirt.Domain) (golibvirt.DomainState, error) {
	st, err := call(ctx, func() (int32, error) {
		st, _, err := d.c().DomainGetState(dom, 0)
		return st, err
	})
	if err != nil {
		return 0, fmt.Errorf("libvirt domain %s: state: %w", dom.Name, err)
	}
	return golibvirt.DomainState(st), nil
}

// active says whether a state is a domain with a QEMU.
func active(st golibvirt.DomainState) bool {
	switch st {
	case golibvirt.DomainRunning, golibvirt.DomainBlocked, golibvirt.DomainPaused, golibvirt.DomainPmsuspended:
		return true
	}
	return false
}

// domain is one VM libvirt runs, or will.
type domain struct {
	drv *Driver
	g   api.Guest
}

func (m *domain) Name() string { return m.g.Name }

// Control passes QMP through libvirt to the running domain's QEMU.
func (m *domain) Control(ctx context.Context) (hv.Control, error) {
	if err := names.Check("vm", m.g.Name); err != nil {
		return nil, err
	}
	dom, err := m.drv.lookup(ctx, m.g.Name)
	if err != nil {
		if isNoDomain(err) {
			return nil, fmt.Errorf("%w (%w)", err, hv.ErrNotRunning)
		}
		return nil, err
	}
	st, err := m.drv.state(ctx, dom)
	if err != nil {
		return nil, err
	}
	if !active(st) {
		return nil, fmt.Errorf("libvirt domain %s is not running (%s): %w", m.g.Name, stateName(st), hv.ErrNotRunning)
	}
	mon, err := qemu.New(newMonitor(m.drv.c(), dom))
	if err != nil {
		return nil, err
	}
	return mon, nil
}

// Start boots the domain defined on this host (virDomainCreate). When the
// guest's disks are not the definition's — a replica's disks, which
// promotion moves into a directory of axd's — it starts the definition
// with those disks instead (virDomainCreateXML), leaving the definition
// as it is. QEMU's log is libvirt's (/var/log/libvirt/qemu/NAME.log), not
// logPath.
func (m *domain) Start(ctx context.Context, logPath string) (hv.Process, error) {
	return m.start(ctx, false)
}

// StartIncoming starts the domain defined on this host paused, its QEMU
// waiting for device state (-incoming defer, passed as <qemu:commandline>
// arguments), then fills libvirt's RAM file of it with the replica's
// memory (g.RAMFile): libvirt names the file after the domain ID it gives
// at start, so the replica cannot be that file beforehand. FAILOVER.md
// says why this route and what was verified.
func (m *domain) StartIncoming(ctx context.Context, logPath string) (hv.Process, error) {
	return m.start(ctx, true)
}

func (m *domain) start(ctx context.Context, incoming bool) (proc hv.Process, err error) {
	name := m.g.Name
	if err := names.Check("vm", name); err != nil {
		return nil, err
	}
	c := m.drv.c()
	dom, err := m.drv.lookup(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("%w (define the domain on this host first: virsh define with the primary's XML)", err)
	}
	st, err := m.drv.state(ctx, dom)
	if err != nil {
		return nil, err
	}
	if active(st) {
		return nil, fmt.Errorf("libvirt domain %s already runs here (%s)", name, stateName(st))
	}
	def, err := call(ctx, func() (string, error) {
		return c.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive|golibvirt.DomainXMLSecure)
	})
	if err != nil {
		return nil, fmt.Errorf("libvirt domain %s: definition: %w", name, err)
	}
	// A tap that exists already (PlugTap made it, in the bridge) is
	// used as it is; otherwise libvirt creates it.
	plugged := false
	if m.g.Tap != "" {
		if plugged, err = m.drv.tapExists(m.g.Tap); err != nil {
			return nil, fmt.Errorf("libvirt domain %s: %w", name, err)
		}
	}
	x, same, err := launchXML(def, m.g, incoming, plugged)
	if err != nil {
		return nil, fmt.Errorf("libvirt domain %s: %w", name, err)
	}
	if same && !incoming {
		if _, err := call(ctx, func() (struct{}, error) { return struct{}{}, c.DomainCreate(dom) }); err != nil {
			return nil, fmt.Errorf("libvirt domain %s: start: %w", name, err)
		}
	} else {
		flags := golibvirt.DomainCreateFlags(0)
		if incoming {
			flags = golibvirt.DomainStartPaused
		}
		if dom, err = call(ctx, func() (golibvirt.Domain, error) { return c.DomainCreateXML(x, flags) }); err != nil {
			return nil, fmt.Errorf("libvirt domain %s: start: %w", name, err)
		}
	}
	p := m.drv.watch(dom)
	defer func() {
		if err != nil {
			// A half-started replica would hold the tap and the disks.
			if kerr := p.Kill(); kerr != nil {
				err = fmt.Errorf("%w; and stopping it failed: %v", err, kerr)
			}
		}
	}()
	if incoming {
		if err := m.fillRAM(ctx, dom); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// fillRAM copies the replica's memory into libvirt's RAM file of the
// domain just started paused and waiting for its device state.
func (m *domain) fillRAM(ctx context.Context, dom golibvirt.Domain) error {
	if m.g.RAMFile == "" {
		return fmt.Errorf("libvirt domain %s: no replica RAM file to resume from", m.g.Name)
	}
	x, err := call(ctx, func() (string, error) { return m.drv.c().DomainGetXMLDesc(dom, 0) })
	if err != nil {
		return fmt.Errorf("libvirt domain %s: live XML: %w", m.g.Name, err)
	}
	var live libvirtxml.Domain
	if err := unmarshal([]byte(x), &live); err != nil {
		return fmt.Errorf("libvirt domain %s: live XML: %w", m.g.Name, err)
	}
	to, err := ramFile(&live, m.drv.cfg.Discover.memoryBackingDir())
	if err != nil {
		return err
	}
	if err := copyRAM(ctx, m.g.RAMFile, to); err != nil {
		return fmt.Errorf("libvirt domain %s: replica RAM into %s: %w", m.g.Name, to, err)
	}
	return nil
}

// copyRAM writes the replica's memory over QEMU's RAM file, which QEMU
// maps shared: what is written is the guest's memory when it resumes.
// The file is QEMU's, of the guest's size; it is neither truncated nor
// replaced, only overwritten.
func copyRAM(ctx context.Context, from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer dst.Close()
	si, err := src.Stat()
	if err != nil {
		return err
	}
	di, err := dst.Stat()
	if err != nil {
		return err
	}
	if !si.Mode().IsRegular() || !di.Mode().IsRegular() || si.Size() != di.Size() {
		return fmt.Errorf("replica %s (%d bytes) and the guest's RAM file (%d bytes) differ in kind or size", from, si.Size(), di.Size())
	}
	// Chunks, so that a promotion given up stops copying.
	const chunk = 64 << 20
	for off := int64(0); off < si.Size(); off += chunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(dst, off), io.NewSectionReader(src, off, min(chunk, si.Size()-off))); err != nil {
			return err
		}
	}
	return dst.Close()
}

// launchXML is the definition def made to run g: its writable disks, in
// order, are g.Disks (a replica's raw images after promotion), its tap is
// g.Tap (plugged: it exists already, libvirt is to use it as it is, not
// create it), its serial console file g.Console and its agent socket
// g.Agent (a replica's are in axd's directory of it); incoming adds
// QEMU's arguments to wait for device state as axd's own QEMU does
// (qemu.Guest.Args). same says def already is what runs g.
func launchXML(def string, g api.Guest, incoming, plugged bool) (x string, same bool, err error) {
	var dom libvirtxml.Domain
	if err := unmarshal([]byte(def), &dom); err != nil {
		return "", false, fmt.Errorf("definition: %w", err)
	}
	if dom.Name != g.Name {
		return "", false, fmt.Errorf("definition is of domain %s, not %s", printable(dom.Name), printable(g.Name))
	}
	same = true
	i := 0
	for k := range devices(&dom).Disks {
		dk := &dom.Devices.Disks[k]
		if dk.Device != "" && dk.Device != "disk" || dk.Source == nil || dk.Source.File == nil {
			continue
		}
		if i >= len(g.Disks) {
			return "", false, fmt.Errorf("definition has more disks than the %d AX replicates", len(g.Disks))
		}
		want := g.Disks[i]
		i++
		if err := names.CheckPath("disk", want.Path); err != nil {
			return "", false, err
		}
		format := want.Format
		if format == "" {
			format = "raw"
		}
		if dk.Source.File.File == want.Path && dk.Driver != nil && dk.Driver.Type == format {
			continue
		}
		same = false
		dk.Source.File.File = want.Path
		if dk.Driver == nil {
			dk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
		}
		dk.Driver.Type = format
		// A replica is one flat image: the primary's backing chain
		// is in it.
		dk.BackingStore = nil
	}
	if i != len(g.Disks) {
		return "", false, fmt.Errorf("definition has %d disks, AX replicates %d", i, len(g.Disks))
	}
	if g.Tap != "" {
		// The tap is the one this host's axd named (a replica's is
		// derived from the VM's name): libvirt creates it by that name.
		if err := names.CheckInterface("tap", g.Tap); err != nil {
			return "", false, err
		}
		taps := 0
		for k := range devices(&dom).Interfaces {
			ifc := &dom.Devices.Interfaces[k]
			switch interfaceType(ifc.Source) {
			case "bridge", "ethernet", "network":
			default:
				continue
			}
			if taps++; taps > 1 {
				return "", false, errors.New("definition has several NICs, AX holds the output of one")
			}
			managed := ""
			if plugged {
				managed = "no"
				if ifc.Source.Ethernet == nil {
					// The tap axd made is in its bridge already (as
					// os-vif's are): libvirt opens it as an ethernet
					// interface, the only type it takes an unmanaged
					// tap for.
					if ifc.VirtualPort != nil {
						return "", false, errors.New("definition's NIC is a port of a virtual switch (<virtualport>): AX plugs taps into Linux bridges")
					}
					same = false
					ifc.Source = &libvirtxml.DomainInterfaceSource{Ethernet: &libvirtxml.DomainInterfaceSourceEthernet{}}
				}
			}
			if ifc.Target == nil || ifc.Target.Dev != g.Tap || ifc.Target.Managed != managed {
				same = false
				ifc.Target = &libvirtxml.DomainInterfaceTarget{Dev: g.Tap, Managed: managed}
			}
		}
		if taps == 0 {
			return "", false, errors.New("definition has no tap")
		}
	}
	if redirectFiles(&dom, g) {
		same = false
	}
	if incoming {
		same = false
		if dom.QEMUCommandline == nil {
			dom.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{}
		}
		for _, a := range incomingArgs {
			dom.QEMUCommandline.Args = append(dom.QEMUCommandline.Args, libvirtxml.DomainQEMUCommandlineArg{Value: a})
		}
	}
	if same {
		return def, true, nil
	}
	x, err = dom.Marshal()
	if err != nil {
		return "", false, fmt.Errorf("definition: %w", err)
	}
	return x, false, nil
}

// redirectFiles points the domain's file serial at g.Console and its
// agent channel at g.Agent, where they differ (paths axd chose, never a
// peer), and says whether it changed anything.
func redirectFiles(dom *libvirtxml.Domain, g api.Guest) bool {
	changed := false
	if g.Console != "" {
		for k := range devices(dom).Serials {
			s := &dom.Devices.Serials[k]
			if s.Source == nil || s.Source.File == nil {
				continue
			}
			if s.Source.File.Path != g.Console {
				s.Source.File.Path, changed = g.Console, true
			}
			break
		}
	}
	if g.Agent != "" {
		for k := range dom.Devices.Channels {
			ch := &dom.Devices.Channels[k]
			if ch.Target == nil || ch.Target.VirtIO == nil || ch.Target.VirtIO.Name != qemu.AgentPortName || ch.Source == nil || ch.Source.UNIX == nil {
				continue
			}
			if ch.Source.UNIX.Path != g.Agent {
				ch.Source.UNIX.Path, changed = g.Agent, true
			}
		}
	}
	return changed
}

// devices is dom's device list, empty if it has none.
func devices(dom *libvirtxml.Domain) *libvirtxml.DomainDeviceList {
	if dom.Devices == nil {
		dom.Devices = &libvirtxml.DomainDeviceList{}
	}
	return dom.Devices
}

// incomingArgs make libvirt's QEMU wait for a replica's device state, as
// qemu.Guest.Args does with Incoming.
var incomingArgs = []string{"-incoming", "defer", "-global", "migration.send-configuration=off", "-machine", "suppress-vmdesc=on"}

// PlugTap checks the domain's tap: libvirt creates and plugs a domain's
// taps itself when it starts it, so a running domain's tap must exist and
// be a tap, and before start there is nothing to do.
func (m *domain) PlugTap(ctx context.Context, bridge string) error {
	if m.g.Tap == "" {
		return nil
	}
	if err := names.CheckInterface("tap", m.g.Tap); err != nil {
		return err
	}
	dom, err := m.drv.lookup(ctx, m.g.Name)
	if err != nil {
		return err
	}
	st, err := m.drv.state(ctx, dom)
	if err != nil {
		return err
	}
	if !active(st) {
		// As os-vif does for Nova: the tap exists, in the bridge, before
		// the domain starts, and libvirt uses it (managed='no').
		return m.drv.plugTap(ctx, m.g.Tap, bridge)
	}
	ok, err := m.drv.tapExists(m.g.Tap)
	if err != nil {
		return fmt.Errorf("libvirt domain %s: %w", m.g.Name, err)
	}
	if !ok {
		return fmt.Errorf("libvirt domain %s runs without its tap %s (its XML names another <target dev=…/>?)", m.g.Name, m.g.Tap)
	}
	return nil
}

// process is a domain the driver started, watched until it stops.
type process struct {
	drv  *Driver
	dom  golibvirt.Domain
	pid  int
	done chan struct{}

	once   sync.Once
	err    error
	killed bool
}

// watch returns the Process of a domain just started: its QEMU's pid
// from libvirt's pid file, and a Done closed once libvirt says the
// domain is no more (shut off, or gone if it was transient).
func (d *Driver) watch(dom golibvirt.Domain) *process {
	p := &process{drv: d, dom: dom, pid: d.pid(dom.Name), done: make(chan struct{})}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		t := time.NewTicker(d.cfg.Poll)
		defer t.Stop()
		for {
			select {
			case <-d.ctx.Done():
				return
			case <-t.C:
			}
			st, _, err := d.c().DomainGetState(dom, 0)
			if err != nil && isNoDomain(err) || err == nil && !active(golibvirt.DomainState(st)) {
				close(p.done)
				return
			}
		}
	}()
	return p
}

// isNoDomain says whether err is libvirt's "domain not found".
func isNoDomain(err error) bool {
	var e golibvirt.Error
	return errors.As(err, &e) && e.Code == uint32(golibvirt.ErrNoDomain)
}

func (p *process) PID() int              { return p.pid }
func (p *process) Done() <-chan struct{} { return p.done }

// Kill destroys the domain (virDomainDestroy) once; every call waits for
// libvirt to say it is gone.
func (p *process) Kill() error {
	p.once.Do(func() {
		select {
		case <-p.done:
			return
		default:
		}
		if err := p.drv.c().DomainDestroy(p.dom); err != nil && !isNoDomain(err) && !isNotRunning(err) {
			p.err = fmt.Errorf("libvirt domain %s: destroy: %w", p.dom.Name, err)
		}
	})
	if p.err != nil {
		return p.err
	}
	select {
	case <-p.done:
		return nil
	case <-p.drv.ctx.Done():
		return fmt.Errorf("libvirt domain %s: the driver closed before the domain stopped", p.dom.Name)
	case <-time.After(p.drv.cfg.KillTimeout):
		return fmt.Errorf("libvirt domain %s still runs %s after virDomainDestroy (virsh domstate %s)", p.dom.Name, p.drv.cfg.KillTimeout, p.dom.Name)
	}
}

// isNotRunning says whether err is libvirt's "domain is not running".
func isNotRunning(err error) bool {
	var e golibvirt.Error
	return errors.As(err, &e) && e.Code == uint32(golibvirt.ErrOperationInvalid)
}

// stateName is a libvirt domain state as virsh domstate says it.
func stateName(st golibvirt.DomainState) string {
	switch st {
	case golibvirt.DomainRunning:
		return "running"
	case golibvirt.DomainBlocked:
		return "blocked"
	case golibvirt.DomainPaused:
		return "paused"
	case golibvirt.DomainShutdown:
		return "in shutdown"
	case golibvirt.DomainShutoff:
		return "shut off"
	case golibvirt.DomainCrashed:
		return "crashed"
	case golibvirt.DomainPmsuspended:
		return "pmsuspended"
	}
	return "no state"
}
