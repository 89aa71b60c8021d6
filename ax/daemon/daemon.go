// Package daemon is axd: per host, it keeps the registry of VMs and their
// levels, runs the FT loop for its primaries, holds replicas for its
// partners, and fails over when a partner dies.
package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv"
	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/ax/vm"
	"github.com/axproject/ax/ax/witness"
	"github.com/axproject/ax/monitor"
	"github.com/axproject/ax/monitor/agent"
	"github.com/axproject/ax/netbuffer"
	"github.com/axproject/ax/replication"
	"github.com/axproject/ax/replication/heartbeat"
	"github.com/axproject/ax/replication/nbd"
)

// Peer is a partner host's addresses: its replication address (TCP streams
// and UDP heartbeats on the dedicated link) and management address (UDP
// heartbeats).
type Peer struct {
	Repl string
	Mgmt string
}

// Config configures axd.
type Config struct {
	Host       string // this host's name, as partners know it
	Socket     string // local API (axctl)
	StateDir   string // replicas and runtime files; tmpfs recommended for replica RAM
	ReplListen string // host:port, TCP replication streams and UDP heartbeats
	MgmtListen string // host:port, UDP heartbeats on the management network
	Peers      map[string]Peer
	Witness    string // host:port of the witness; "" runs without one (never promotes)
	// Identity is this host's certificate (TLS mode: streams are TLS 1.3
	// with mutual certificates, heartbeats and witness requests are bound
	// to it). Without one, PSK is the lab's pre-shared key (PSK mode).
	Identity *identity.Identity
	PSK      []byte
	// WitnessName is the witness's certificate name (TLS mode).
	WitnessName string
	// EtcdTLS secures the connections to an etcd witness
	// (Witness "etcd://…"), with this host's client certificate; nil: plain.
	EtcdTLS *tls.Config
	// ImageDirs are where kernels and initrds a partner's spec names may
	// live on this host; Bridges the bridges replicas' taps may join, by
	// name or pattern (brq*; none: any Linux bridge of this host).
	ImageDirs []string
	Bridges   []string
	// DefineReplicas: a replica of a VM this host has no definition of
	// defines it from its primary's, checked (libvirt; axd
	// --define-replicas).
	DefineReplicas bool
	// MetricsListen serves /metrics; "" disables it.
	MetricsListen string
	// Epoch is the FT checkpoint interval.
	Epoch time.Duration
	// Tracker is the default dirty-page tracker mode (auto, hash, soft-dirty).
	Tracker string
	// SilenceTimeout: a path with no heartbeat for this long is down.
	SilenceTimeout time.Duration
	// FenceAfter: a primary that hears neither partner nor witness for this
	// long pauses its FT guests. PromoteAfter (longer) is how long a
	// secondary waits in silence before asking the witness.
	FenceAfter   time.Duration
	PromoteAfter time.Duration
	// StaleAfter: a secondary that, beyond SilenceTimeout, hears its
	// primary on the management network only for this long marks its
	// replica stale. A primary releases held output when unprotected only
	// after SilenceTimeout + 2×StaleAfter.
	StaleAfter time.Duration
	// LeaseTTL is the witness's lease length (used to judge our own lease).
	LeaseTTL time.Duration
	// AgentVsockPort is the AF_VSOCK port agents connect to (0: 7410).
	AgentVsockPort uint32
	// OutputCommit holds FT guests' network output until the checkpoint
	// covering it commits (the eBPF netbuffer). Turning it off loses the
	// guarantee that clients never see output a failover undoes; tests use
	// it as the control that shows their check can fail.
	OutputCommit bool
	// BPFDir is the bpffs directory where FT guests' output gates are
	// pinned, so that they keep holding while no axd runs (a restart, a
	// crash) and the next axd adopts them ("": /sys/fs/bpf/ax/HOST;
	// "none": not pinned — an axd that dies lets the output through).
	BPFDir string
	// Hypervisor runs and controls this host's VMs (nil: QEMU over QMP).
	Hypervisor hv.Driver
	// GuardExe is the program each primary's guard process runs (axd's own
	// binary, with --guard-pid): it stops the guest when axd stops renewing
	// the VM's lease. "" starts none.
	GuardExe string
	// RestartGrace is how long a partner waits for this axd to come back
	// from a stop before it may take this host's VMs over: a stopping axd
	// tells each partner so (it keeps the replica, the next axd resumes the
	// stream on it) and leaves each guard holding the guest until then.
	// 0: a stop ends protection — partners drop their replicas.
	RestartGrace time.Duration
	// HookSpool is where ax-nova-hook leaves the libvirt hook events axd
	// could not take; axd replays them at its start and every
	// hookSweep ("": StateDir/hook-spool, api.DefaultHookSpool by default).
	HookSpool string
	// Levels says at which level a domain Nova starts is protected (nil:
	// Nova's answer with Nova set, else MetadataLevels, its <ax:level>).
	Levels LevelSource
	// Nova, when set, is where this host's servers' levels come from:
	// polled, applied live, and what AX did written back (novalevels.go).
	Nova *NovaConfig
	// Store keeps each VM's protection state across axd's restarts (nil:
	// files in StateDir/state).
	Store vm.Store
	Log   *slog.Logger
}

func (c *Config) defaults() error {
	if c.Host == "" {
		return errors.New("axd: --host is required (this host's name as partners know it)")
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.StateDir == "" {
		c.StateDir = "/var/lib/ax"
	}
	if err := names.Check("host", c.Host); err != nil {
		return fmt.Errorf("axd: --host: %w", err)
	}
	if c.HookSpool == "" {
		c.HookSpool = filepath.Join(c.StateDir, "hook-spool")
	}
	if c.BPFDir == "" {
		c.BPFDir = filepath.Join("/sys/fs/bpf/ax", c.Host)
	}
	switch {
	case c.Identity != nil && len(c.PSK) > 0:
		return errors.New("axd: give a certificate (--cert, --key, --ca) or a pre-shared key (--psk-file), not both")
	case c.Identity != nil:
		if c.Identity.Name() != c.Host || c.Identity.Role() != identity.RoleHost {
			return fmt.Errorf("axd: this host is %q but its certificate is %s %q (issue one with: axctl pki issue --name %s)", c.Host, c.Identity.Role(), c.Identity.Name(), c.Host)
		}
		if c.Witness != "" && c.WitnessName == "" {
			return errors.New("axd: --witness-name is needed with a certificate: the name on the witness's certificate")
		}
	case len(c.PSK) < identity.MinKeySize:
		return fmt.Errorf("axd: no certificate and no pre-shared key of at least %d bytes (production: --cert/--key/--ca from axctl pki; lab: --psk-file from axctl pki psk)", identity.MinKeySize)
	}
	for p := range c.Peers {
		if err := names.Check("host", p); err != nil {
			return fmt.Errorf("axd: --peer: %w", err)
		}
	}
	for _, b := range c.Bridges {
		// A name, or a pattern of one (brq*): checked as a name with its
		// wildcards taken for letters.
		if _, err := path.Match(b, ""); err != nil {
			return fmt.Errorf("axd: --bridge %q: %w", b, err)
		}
		if err := names.CheckInterface("bridge", strings.NewReplacer("*", "x", "?", "x").Replace(b)); err != nil {
			return fmt.Errorf("axd: --bridge: %w", err)
		}
	}
	for _, dir := range c.ImageDirs {
		if err := names.CheckPath("image directory", dir); err != nil {
			return fmt.Errorf("axd: --image-dir: %w", err)
		}
	}
	if c.Epoch <= 0 {
		c.Epoch = 50 * time.Millisecond
	}
	if c.Tracker == "" {
		c.Tracker = "auto"
	}
	if c.SilenceTimeout <= 0 {
		c.SilenceTimeout = 400 * time.Millisecond
	}
	if c.FenceAfter <= 0 {
		c.FenceAfter = 500 * time.Millisecond
	}
	if c.PromoteAfter <= 0 {
		c.PromoteAfter = 800 * time.Millisecond
	}
	if c.StaleAfter <= 0 {
		c.StaleAfter = 300 * time.Millisecond
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = time.Second
	}
	if c.RestartGrace < 0 || c.RestartGrace > replication.MaxRestartGrace {
		return fmt.Errorf("axd: --restart-grace %s out of range [0, %s]", c.RestartGrace, replication.MaxRestartGrace)
	}
	if c.Nova != nil && c.Nova.Cloud == nil {
		return errors.New("axd: Nova levels without a cloud to ask")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Hypervisor == nil {
		c.Hypervisor = &hv.QMP{}
	}
	return nil
}

// Daemon is one host's axd.
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	metrics *monitor.Metrics
	reg     *prometheus.Registry

	agentMetrics *agent.Metrics
	hb           *heartbeat.Detector
	repl         *replication.Server
	wit          witness.Leases   // nil without a witness
	nova         *novaLevels      // nil without Config.Nova
	nbd          *nbd.Server      // primaries' disk mirrors write here
	book         *reserve.Book    // capacity promised to partners' VMs
	place        *placementMirror // the book held in Placement (nil: not on Nova)
	store        vm.Store         // written at every change of a VM's state
	pinGates     bool             // FT output gates are pinned in cfg.BPFDir
	// leaving: axd stops, and its partners were told to wait for it until
	// this CLOCK_MONOTONIC moment (ns; 0: not stopping, or without a grace).
	leaving atomic.Int64

	mu  sync.Mutex
	vms map[string]*vmState
	// restoring: the VMs the state store kept, while axd decides about
	// them after its start; a partner's stream for one waits for that.
	restoring map[string]bool
	// seeds: the VMs whose replica seed is being made (seed.go).
	seeds   map[string]chan struct{}
	events  []api.Event
	seq     uint64
	witOK   bool
	witSeen time.Time
	// witHealth: the witness as last probed (nil before the first probe).
	witHealth *api.WitnessHealth

	wg  sync.WaitGroup
	ctx context.Context
}

// New checks cfg and prepares the daemon; Run starts it.
func New(cfg Config) (*Daemon, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	d := &Daemon{cfg: cfg, log: cfg.Log, reg: reg, metrics: monitor.NewMetrics(reg), agentMetrics: agent.NewMetrics(reg), vms: map[string]*vmState{}}
	hb, err := heartbeat.New(cfg.Host, heartbeat.Security{Identity: cfg.Identity, PSK: cfg.PSK}, cfg.SilenceTimeout, cfg.Log)
	if err != nil {
		return nil, err
	}
	d.hb = hb
	if d.store = cfg.Store; d.store == nil {
		if d.store, err = vm.NewFileStore(filepath.Join(cfg.StateDir, "state")); err != nil {
			return nil, fmt.Errorf("axd: %w", err)
		}
	}
	for name, p := range cfg.Peers {
		if err := hb.AddPeer(name, heartbeat.PeerAddrs{Repl: p.Repl, Mgmt: p.Mgmt}); err != nil {
			return nil, fmt.Errorf("axd: peer %s: %w", name, err)
		}
	}
	if strings.HasPrefix(cfg.Witness, witness.EtcdScheme) {
		eps, err := witness.ParseEtcdAddr(cfg.Witness)
		if err != nil {
			return nil, fmt.Errorf("axd: --witness-addr: %w", err)
		}
		e, err := witness.NewEtcd(witness.EtcdConfig{Endpoints: eps, Host: cfg.Host, TTL: cfg.LeaseTTL, TLS: cfg.EtcdTLS,
			Timeout: 300 * time.Millisecond, Log: cfg.Log})
		if err != nil {
			return nil, fmt.Errorf("axd: witness: %w", err)
		}
		// etcd counts leases in whole seconds: fencing and the guards go
		// by the lease etcd grants.
		d.wit, d.cfg.LeaseTTL = e, e.TTL()
	} else if cfg.Witness != "" {
		wc := witness.ClientConfig{Addr: cfg.Witness, Identity: cfg.Identity, Witness: cfg.WitnessName, Timeout: 300 * time.Millisecond,
			LeaseTTL: cfg.LeaseTTL}
		if cfg.Identity == nil {
			wc.PSK, wc.Holder = cfg.PSK, cfg.Host
		}
		if d.wit, err = witness.NewClient(wc); err != nil {
			return nil, fmt.Errorf("axd: witness: %w", err)
		}
	}
	partners := make([]string, 0, len(cfg.Peers))
	for name := range cfg.Peers {
		partners = append(partners, name)
	}
	d.repl = replication.NewServer(d.security(), partners, replication.Handler{
		Open: d.openReplica, Synced: d.replicaSynced, Committed: d.replicaCommitted, Ended: d.streamEnded,
		Disks: d.replicaDiskSink, Level: d.replicaLevel,
	}, cfg.Log)
	d.nbd = nbd.NewServer(cfg.Log)
	if cfg.Nova != nil {
		d.nova = newNovaLevels(d, *cfg.Nova)
		if d.cfg.Levels == nil {
			d.cfg.Levels = d.nova
		}
		if pc, ok := cfg.Nova.Cloud.(PlacementCloud); ok && !cfg.Nova.NoPlacement {
			d.place = newPlacementMirror(d, pc, d.nova.host, d.nova.sync)
		}
	}
	return d, nil
}

// Run serves until ctx ends. ready is called once every listener is up.
func (d *Daemon) Run(ctx context.Context, ready func()) error {
	if err := os.MkdirAll(d.cfg.StateDir, 0o755); err != nil {
		return fmt.Errorf("axd: state directory: %w", err)
	}
	// What this host's VMs were doing before axd started; a record axd
	// cannot read stops it rather than let it guess.
	recs, err := d.store.Load()
	if err != nil {
		return fmt.Errorf("axd: %w", err)
	}
	host, err := reserve.HostCapacity(d.cfg.StateDir)
	if err != nil {
		return fmt.Errorf("axd: measuring this host's capacity: %w", err)
	}
	if d.book, err = reserve.OpenBook(filepath.Join(d.cfg.StateDir, "reservations.json"), host, nil); err != nil {
		return fmt.Errorf("axd: %w", err)
	}
	os.Remove(d.nbdSocket())
	nbdLn, err := net.Listen("unix", d.nbdSocket())
	if err != nil {
		return fmt.Errorf("axd: listen for disk mirrors on %s: %w", d.nbdSocket(), err)
	}
	defer os.Remove(d.nbdSocket())
	defer nbdLn.Close() // Serve closes it too; this covers the early returns
	// Connectable by all from the start: a QEMU of libvirt's user whose
	// quorum child reconnects after axd restarted must not be refused
	// before its VM's stream has been opened again. The server admits a
	// client of another user only to the exports added for its own pid
	// (nbd.Server.AddExportFor), and the state directory is not listable.
	if err := os.Chmod(d.nbdSocket(), 0o666); err != nil {
		return fmt.Errorf("axd: %w", err)
	}
	os.Remove(d.cfg.Socket)
	if err := os.MkdirAll(filepath.Dir(d.cfg.Socket), 0o755); err != nil {
		return fmt.Errorf("axd: socket directory: %w", err)
	}
	apiLn, err := net.Listen("unix", d.cfg.Socket)
	if err != nil {
		return fmt.Errorf("axd: listen on %s: %w", d.cfg.Socket, err)
	}
	os.Chmod(d.cfg.Socket, 0o600)
	defer os.Remove(d.cfg.Socket)
	var replLn net.Listener
	if d.cfg.ReplListen != "" {
		if replLn, err = net.Listen("tcp", d.cfg.ReplListen); err != nil {
			apiLn.Close()
			return fmt.Errorf("axd: listen for replication on %s: %w", d.cfg.ReplListen, err)
		}
	}
	var metricsLn net.Listener
	if d.cfg.MetricsListen != "" {
		if metricsLn, err = net.Listen("tcp", d.cfg.MetricsListen); err != nil {
			apiLn.Close()
			if replLn != nil {
				replLn.Close()
			}
			return fmt.Errorf("axd: listen for metrics on %s: %w", d.cfg.MetricsListen, err)
		}
	}
	// Ends with Run however it ends, so what lives as long as axd (a fence
	// being retried, say) stops before Run waits for it — and only once
	// axd knows it is leaving: what ends with it (each primary's stream
	// and guard) does what a stop asks (leave).
	parent := ctx
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	defer context.AfterFunc(parent, func() { d.leave(); cancel() })()
	d.ctx = ctx
	errc := make(chan error, 4)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.nbd.Serve(ctx, nbdLn)
	}()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := d.hb.Run(ctx, d.cfg.ReplListen, d.cfg.MgmtListen); err != nil {
			errc <- err
		}
	}()
	if replLn != nil {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := d.repl.Serve(ctx, replLn); err != nil {
				errc <- err
			}
		}()
	}
	apiSrv := &http.Server{Handler: d.apiHandler(), ReadHeaderTimeout: 5 * time.Second}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := apiSrv.Serve(apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	var metricsSrv *http.Server
	if metricsLn != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
		// Whoever reaches the metrics address is not trusted: bounded
		// connections, each with deadlines, so idle or slow clients cannot
		// pile up.
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
			WriteTimeout: 30 * time.Second, IdleTimeout: 30 * time.Second, MaxHeaderBytes: 8 << 10}
		metricsLn = limitListener(metricsLn, maxMetricsConns)
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := metricsSrv.Serve(metricsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	d.wg.Add(2)
	go func() {
		defer d.wg.Done()
		d.watch(ctx)
	}()
	if d.wit != nil {
		d.wg.Go(func() { d.watchWitness(ctx) })
	}
	if w, ok := d.cfg.Hypervisor.(hv.Watcher); ok {
		d.wg.Go(func() { d.watchStops(ctx, w) })
	}
	go func() {
		defer d.wg.Done()
		port := d.cfg.AgentVsockPort
		if port == 0 {
			port = 7410
		}
		d.serveVsockAgents(ctx, port)
	}()
	d.event("", "start", fmt.Sprintf("axd on %s started (epoch %s, tracker %s, witness %q)", d.cfg.Host, d.cfg.Epoch, d.cfg.Tracker, d.cfg.Witness))
	if d.cfg.OutputCommit && d.cfg.BPFDir != "none" {
		if err := netbuffer.EnsureBPFFS(d.cfg.BPFDir); err != nil {
			d.event("", "alarm", fmt.Sprintf("FT output gates are not pinned (%v): should axd stop or crash, an FT guest's output passes unheld until it is back", err))
		} else {
			d.pinGates = true
		}
	}
	d.restore(recs)
	d.replayHooks()
	if d.nova != nil {
		d.wg.Go(func() { d.nova.run(ctx) })
	}
	if d.place != nil {
		d.wg.Go(func() { d.place.run(ctx) })
	}
	if ready != nil {
		ready()
	}
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	d.leave()
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer scancel()
	apiSrv.Shutdown(sctx)
	if metricsSrv != nil {
		metricsSrv.Shutdown(sctx)
	}
	d.stopAll()
	d.wg.Wait()
	if d.wit != nil {
		d.wit.Close()
	}
	return runErr
}

// security is how this host's streams are protected.
func (d *Daemon) security() replication.Security {
	if d.cfg.Identity != nil {
		return replication.Security{Identity: d.cfg.Identity}
	}
	return replication.Security{PSK: d.cfg.PSK}
}

// nbdSocket is where the local QEMUs' disk mirrors connect.
func (d *Daemon) nbdSocket() string { return filepath.Join(d.cfg.StateDir, "nbd.sock") }

// event records something axd did or saw, for axctl events and the log.
func (d *Daemon) event(vm, kind, text string) {
	d.mu.Lock()
	d.seq++
	d.events = append(d.events, api.Event{Seq: d.seq, Time: time.Now(), VM: vm, Kind: kind, Text: text})
	if len(d.events) > 1000 {
		d.events = d.events[len(d.events)-1000:]
	}
	d.mu.Unlock()
	d.log.Info(text, "vm", vm, "event", kind)
}

func (d *Daemon) eventsSince(seq uint64) []api.Event {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []api.Event{}
	for _, e := range d.events {
		if e.Seq > seq {
			out = append(out, e)
		}
	}
	return out
}

// status returns the host's view.
func (d *Daemon) status() api.Status {
	st := api.Status{Host: d.cfg.Host, Now: time.Now(), Witness: d.witnessState(), WitnessHealth: d.witnessHealth(), Reservation: d.reservation()}
	names := make([]string, 0, len(d.cfg.Peers))
	for n := range d.cfg.Peers {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		v := d.hb.View(n)
		st.Peers = append(st.Peers, api.PeerStatus{Name: n, ReplHeard: v.ReplHeard, MgmtHeard: v.MgmtHeard,
			ReplAgeMS: ms(v.ReplAge), MgmtAgeMS: ms(v.MgmtAge), ReplTarget: d.cfg.Peers[n].Repl})
	}
	d.mu.Lock()
	vms := make([]*vmState, 0, len(d.vms))
	for _, v := range d.vms {
		vms = append(vms, v)
	}
	d.mu.Unlock()
	sort.Slice(vms, func(i, j int) bool { return vms[i].name < vms[j].name })
	for _, v := range vms {
		s := v.status()
		if s.Peer != "" {
			pv := d.hb.View(s.Peer)
			s.Link = "down"
			if pv.ReplHeard {
				s.Link = "up"
			}
		}
		s.Witness = st.Witness
		st.VMs = append(st.VMs, s)
	}
	return st
}

// watch updates peer and per-VM metrics every 50 ms (the witness is probed
// beside it, watchWitness). The decisions are per VM: guardPrimary (fence?)
// and watchReplica (promote?).
func (d *Daemon) watch(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	var gatesRead, seedsSwept time.Time
	hooksSwept := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if time.Since(seedsSwept) > time.Minute {
			seedsSwept = time.Now()
			d.dropUnusedSeeds()
		}
		if time.Since(hooksSwept) > hookSweep {
			hooksSwept = time.Now()
			d.replayHooks()
		}
		for n := range d.cfg.Peers {
			v := d.hb.View(n)
			d.metrics.SetPeer(n, v.ReplHeard, v.MgmtHeard)
		}
		d.mu.Lock()
		vms := make([]*vmState, 0, len(d.vms))
		for _, v := range d.vms {
			vms = append(vms, v)
		}
		d.mu.Unlock()
		// Gate counters come from BPF maps: once a second is enough for metrics.
		readGates := time.Since(gatesRead) >= time.Second
		if readGates {
			gatesRead = time.Now()
		}
		for _, v := range vms {
			switch v.role() {
			case api.RoleSecondary:
				// Each replica decides in its own watcher (watchReplica):
				// one slow witness call holds up no other VM.
				if readGates {
					d.journalMetrics(v)
				}
			case api.RolePrimary:
				if readGates {
					d.gateMetrics(v)
					d.diskMetrics(v)
					d.intentMetrics(v)
				}
			case api.RoleLocal:
				d.reprotect(v)
				if readGates {
					d.intentMetrics(v)
				}
			}
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// diskMetrics exports what a primary's disk replication sent and what the
// partner has not yet acknowledged, at any level.
func (d *Daemon) diskMetrics(v *vmState) {
	var delta, pending uint64
	v.set(func(v *vmState) {
		if v.disks == nil {
			return // between streams nothing is sent or waited for
		}
		sent := v.disks.sender.DiskBytesSent()
		delta, v.diskBytesSeen = sent-v.diskBytesSeen, sent
		pending = v.disks.lag()
	})
	d.metrics.DiskBytes.WithLabelValues(v.name).Add(float64(delta))
	d.metrics.DiskLag.WithLabelValues(v.name).Set(float64(pending))
}

// gateMetrics exports what a primary's output gate holds and dropped.
func (d *Daemon) gateMetrics(v *vmState) {
	var g *netbuffer.Gate
	v.set(func(v *vmState) { g = v.gate })
	if g == nil {
		return
	}
	st := g.Stats()
	d.metrics.HeldFrames.WithLabelValues(v.name).Set(float64(st.HeldFrames))
	d.metrics.HeldBytes.WithLabelValues(v.name).Set(float64(st.HeldBytes))
	for reason, n := range st.Dropped {
		d.metrics.OutputDrops.WithLabelValues(v.name, string(reason)).Set(float64(n))
	}
}
