// Command axd is AX's host daemon (one per KVM host, beside libvirtd), or,
// with --witness, the third-party arbiter that grants leases.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/daemon"
	"github.com/axproject/ax/ax/guard"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/witness"
)

// version is set by the package build (-X main.version=...).
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "axd:", err)
		os.Exit(1)
	}
}

type peerFlag map[string]daemon.Peer

func (p peerFlag) String() string { return fmt.Sprint(map[string]daemon.Peer(p)) }
func (p peerFlag) Set(s string) error {
	peer, err := api.ParsePeer(s)
	if err != nil {
		return err
	}
	p[peer.Name] = daemon.Peer{Repl: peer.Repl, Mgmt: peer.Mgmt}
	return nil
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("axd", flag.ContinueOnError)
	var cfg daemon.Config
	peers := peerFlag{}
	witnessMode := fs.Bool("witness", false, "run as the witness (lease arbiter) instead of a host daemon")
	listen := fs.String("listen", "", "witness: address to serve leases on")
	ttl := fs.Duration("lease-ttl", time.Second, "witness: lease length; hosts use the same value")
	pskFile := fs.String("psk-file", "", "PSK mode (the lab): file holding the pre-shared key shared by partners and the witness (mode 0600; axctl pki psk FILE makes one)")
	var files identity.Files
	fs.StringVar(&files.CA, "ca", "/etc/ax/pki/ca.crt", "TLS mode: the AX CA's certificate")
	fs.StringVar(&files.Cert, "cert", "", "TLS mode: this host's (or the witness's) certificate, from axctl pki issue")
	fs.StringVar(&files.Key, "key", "", "TLS mode: its private key (mode 0600)")
	witnessState := fs.String("witness-state", "/var/lib/ax/witness.json", "witness: file keeping leases and replay protection across restarts")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	fs.StringVar(&cfg.Host, "host", "", "this host's name, as its partners know it (TLS mode: default the certificate's name)")
	fs.StringVar(&cfg.Socket, "socket", "/run/ax/axd.sock", "local API socket for axctl")
	fs.StringVar(&cfg.StateDir, "state-dir", "/var/lib/ax", "replicas and runtime files (tmpfs recommended)")
	fs.StringVar(&cfg.ReplListen, "repl-listen", "", "address on the dedicated replication link (TCP streams, UDP heartbeats)")
	fs.StringVar(&cfg.MgmtListen, "mgmt-listen", "", "address on the management network (UDP heartbeats)")
	fs.Var(peers, "peer", "a partner host: NAME=REPL_HOST:PORT,MGMT_HOST:PORT (repeatable)")
	fs.StringVar(&cfg.Witness, "witness-addr", "", "the witness's address, HOST:PORT of axd --witness or etcd://HOST:PORT[,HOST:PORT...] of an etcd cluster (without one, replicas never promote)")
	etcdCA := fs.String("etcd-ca", "", "etcd witness: the CA of the etcd members' certificates (TLS; without it, plain connections)")
	etcdCert := fs.String("etcd-cert", "", "etcd witness: this host's client certificate for etcd")
	etcdKey := fs.String("etcd-key", "", "etcd witness: its private key")
	fs.StringVar(&cfg.WitnessName, "witness-name", "", "TLS mode: the name on the witness's certificate")
	fs.Var((*listFlag)(&cfg.ImageDirs), "image-dir", "a directory kernels and initrds named by partners' VM specs may come from (repeatable)")
	fs.BoolVar(&cfg.DefineReplicas, "define-replicas", false, "with --libvirt: a replica of a domain not defined on this host defines it from its primary's definition, checked as hostile (its files within --libvirt-dir's directories, its bridges among --bridge, no host devices, scripts or QEMU arguments): Nova defines a server's domain only on its own host")
	fs.Var((*listFlag)(&cfg.Bridges), "bridge", "a bridge replicas' taps may join, by name or pattern (brq*: Neutron's Linux bridges; repeatable; none: any bridge of this host)")
	fs.StringVar(&cfg.MetricsListen, "metrics", "", "address to serve Prometheus /metrics on")
	fs.DurationVar(&cfg.Epoch, "epoch", 50*time.Millisecond, "FT checkpoint interval")
	fs.StringVar(&cfg.Tracker, "tracker", "auto", "dirty-page tracker: auto, hash or soft-dirty")
	showVersion := fs.Bool("version", false, "print axd's version and exit")
	guardPID := fs.Int("guard-pid", 0, "run as the guard of a primary's QEMU of this pid (axd starts its guards itself; lines on stdin)")
	guardMargin := fs.Duration("guard-margin", 50*time.Millisecond, "guard: stop the guest this long before the deadline axd gave")
	fs.StringVar(&cfg.BPFDir, "bpf-dir", "", "bpffs directory where FT output gates are pinned so they hold while axd restarts or after it crashed (default /sys/fs/bpf/ax/HOST; none: not pinned)")
	fs.DurationVar(&cfg.RestartGrace, "restart-grace", 15*time.Second, "how long partners wait for this axd to come back from a stop (systemctl restart) before they may take its VMs over; 0: a stop ends protection and partners drop their replicas")
	libvirtURI := fs.String("libvirt", "", "run this host's VMs as libvirt domains through libvirtd at this URI (qemu:///system), reached by name and discovered by axctl protect DOMAIN; default: axd runs QEMU itself, over QMP")
	libvirtSocket := fs.String("libvirt-socket", libvirt.DefaultSocket, "with --libvirt: libvirtd's unix socket")
	libvirtRAMDir := fs.String("libvirt-ram-dir", libvirt.DefaultMemoryBackingDir, "with --libvirt: where libvirt puts file-backed guest RAM (DIR/libvirt/qemu when qemu.conf sets memory_backing_dir = DIR)")
	libvirtPIDDir := fs.String("libvirt-pid-dir", "/run/libvirt/qemu", "with --libvirt: where libvirtd writes each QEMU's pid file, DOMAIN.pid (the guard and dirty tracking need QEMU's pid)")
	var libvirtDirs listFlag
	fs.Var(&libvirtDirs, "libvirt-dir", "with --libvirt: a directory a domain's disks, console and agent socket may be in (repeatable; default "+strings.Join(libvirt.DefaultDirs, ", ")+")")
	fs.StringVar(&cfg.HookSpool, "hook-spool", "", "where ax-nova-hook (libvirt's qemu hook) leaves the events axd could not take, replayed at start and every 30 s (default STATE-DIR/hook-spool, "+api.DefaultHookSpool+" for the package's axd)")
	var novaFlags novaFlags
	novaFlags.add(fs)
	fs.BoolVar(&cfg.OutputCommit, "output-commit", true, "hold FT guests' network output until its checkpoint commits (off only for tests: clients may then see output a failover undoes)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *showVersion {
		fmt.Println("axd", version)
		return nil
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *guardPID > 0 {
		// Not ended by axd's signals: only by axd's word, or the guest's end.
		signal.Ignore(os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
		// SIGUSR1: a restarted axd guards the guest now (guard.Dismiss).
		return guard.Run(os.Stdin, *guardPID, *guardMargin, guard.Dismissals(), log)
	}
	var psk []byte
	var id *identity.Identity
	switch {
	case files.Cert != "" && *pskFile != "":
		return errors.New("give --cert/--key (TLS mode) or --psk-file (PSK mode), not both")
	case files.Cert != "":
		if files.Key == "" {
			return errors.New("--cert needs --key")
		}
		var err error
		if id, err = identity.Load(files); err != nil {
			return err
		}
	case *pskFile != "":
		var err error
		if psk, err = identity.ReadKeyFile(*pskFile); err != nil {
			return err
		}
	default:
		return errors.New("no identity: give --cert, --key and --ca (make them with axctl pki init / axctl pki issue), or --psk-file for the lab's PSK mode")
	}
	if *witnessMode {
		if *listen == "" {
			return errors.New("--witness needs --listen ADDR")
		}
		if id != nil && id.Role() != identity.RoleWitness {
			return fmt.Errorf("--witness needs a witness certificate; %s is a %s's (issue one with: axctl pki issue --role witness --name NAME)", files.Cert, id.Role())
		}
		srv, err := witness.NewServer(witness.ServerConfig{Identity: id, PSK: psk, LeaseTTL: *ttl, StateFile: *witnessState, Log: log})
		if err != nil {
			return err
		}
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			return err
		}
		log.Info("witness serving leases", "addr", ln.Addr(), "ttl", *ttl)
		notifyReady()
		return srv.Serve(ctx, ln)
	}
	cfg.Peers, cfg.PSK, cfg.Identity, cfg.LeaseTTL, cfg.Log = peers, psk, id, *ttl, log
	var err error
	if cfg.EtcdTLS, err = etcdTLS(*etcdCA, *etcdCert, *etcdKey); err != nil {
		return err
	}
	if exe, err := os.Executable(); err == nil {
		cfg.GuardExe = exe // each primary's guard is this binary with --guard-pid
	}
	if cfg.Host == "" && id != nil {
		cfg.Host = id.Name()
	}
	if *libvirtURI != "" {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		drv, err := libvirt.Dial(lctx, libvirt.Config{URI: *libvirtURI, Socket: *libvirtSocket, PIDDir: *libvirtPIDDir,
			Discover: libvirt.Options{MemoryBackingDir: *libvirtRAMDir, Dirs: libvirtDirs}, Log: log.With("subsystem", "libvirt")})
		cancel()
		if err != nil {
			return fmt.Errorf("--libvirt: %w", err)
		}
		defer drv.Close()
		cfg.Hypervisor = drv
	}
	if cfg.Nova, err = novaFlags.config(); err != nil {
		return err
	}
	d, err := daemon.New(cfg)
	if err != nil {
		return err
	}
	return d.Run(ctx, notifyReady)
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// notifyReady tells systemd (Type=notify) that axd serves.
func notifyReady() {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	if strings.HasPrefix(sock, "@") {
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte("READY=1"))
}

// etcdTLS is the TLS configuration for an etcd witness: nil without a CA.
func etcdTLS(ca, cert, key string) (*tls.Config, error) {
	if ca == "" {
		if cert != "" || key != "" {
			return nil, errors.New("--etcd-cert and --etcd-key need --etcd-ca")
		}
		return nil, nil
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, fmt.Errorf("--etcd-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--etcd-ca: no certificate in %s", ca)
	}
	c := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if cert != "" || key != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c, nil
}
