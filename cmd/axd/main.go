// Command axd is AX's host daemon (one per KVM host, beside libvirtd), or,
// with --witness, the third-party arbiter that grants leases.
package main

import (
	"context"
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

	"github.com/axproject/ax/ax/daemon"
	"github.com/axproject/ax/ax/witness"
)

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
	name, addrs, ok := strings.Cut(s, "=")
	repl, mgmt, ok2 := strings.Cut(addrs, ",")
	if !ok || !ok2 || name == "" || repl == "" || mgmt == "" {
		return errors.New("want NAME=REPL_HOST:PORT,MGMT_HOST:PORT")
	}
	p[name] = daemon.Peer{Repl: repl, Mgmt: mgmt}
	return nil
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("axd", flag.ContinueOnError)
	var cfg daemon.Config
	peers := peerFlag{}
	witnessMode := fs.Bool("witness", false, "run as the witness (lease arbiter) instead of a host daemon")
	listen := fs.String("listen", "", "witness: address to serve leases on")
	ttl := fs.Duration("lease-ttl", time.Second, "witness: lease length; hosts use the same value")
	pskFile := fs.String("psk-file", "/etc/ax/psk", "file holding the pre-shared key shared by partners and the witness")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	fs.StringVar(&cfg.Host, "host", "", "this host's name, as its partners know it")
	fs.StringVar(&cfg.Socket, "socket", "/run/ax/axd.sock", "local API socket for axctl")
	fs.StringVar(&cfg.StateDir, "state-dir", "/var/lib/ax", "replicas and runtime files (tmpfs recommended)")
	fs.StringVar(&cfg.ReplListen, "repl-listen", "", "address on the dedicated replication link (TCP streams, UDP heartbeats)")
	fs.StringVar(&cfg.MgmtListen, "mgmt-listen", "", "address on the management network (UDP heartbeats)")
	fs.Var(peers, "peer", "a partner host: NAME=REPL_HOST:PORT,MGMT_HOST:PORT (repeatable)")
	fs.StringVar(&cfg.Witness, "witness-addr", "", "the witness's address (without one, replicas never promote)")
	fs.StringVar(&cfg.MetricsListen, "metrics", "", "address to serve Prometheus /metrics on")
	fs.DurationVar(&cfg.Epoch, "epoch", 50*time.Millisecond, "FT checkpoint interval")
	fs.StringVar(&cfg.Tracker, "tracker", "auto", "dirty-page tracker: auto, hash or soft-dirty")
	fs.BoolVar(&cfg.OutputCommit, "output-commit", true, "hold FT guests' network output until its checkpoint commits (off only for tests: clients may then see output a failover undoes)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	psk, err := readPSK(*pskFile)
	if err != nil {
		return err
	}
	if *witnessMode {
		if *listen == "" {
			return errors.New("--witness needs --listen ADDR")
		}
		srv, err := witness.NewServer(psk, *ttl, time.Now, log)
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
	cfg.Peers, cfg.PSK, cfg.LeaseTTL, cfg.Log = peers, psk, *ttl, log
	d, err := daemon.New(cfg)
	if err != nil {
		return err
	}
	return d.Run(ctx, notifyReady)
}

// readPSK reads a key file: hex (as written by the lab and the docs) or raw.
func readPSK(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pre-shared key: %w (make one with: head -c 32 /dev/urandom | xxd -p -c 64 > %s)", err, path)
	}
	return []byte(strings.TrimSpace(string(data))), nil
}

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
