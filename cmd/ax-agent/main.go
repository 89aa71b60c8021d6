// Command ax-agent runs inside a protected guest: it checks the guest's
// applications as its configuration file says and reports their health to
// the host's axd over vsock (virtio-serial where vsock is missing).
//
//	ax-agent [-config /etc/ax/agent.json] [-check] [-v]
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/axproject/ax/monitor/agent/guest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ax-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	path := flag.String("config", guest.DefaultConfigPath, "configuration file (JSON)")
	check := flag.Bool("check", false, "validate the configuration and exit")
	verbose := flag.Bool("v", false, "log debug messages")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (see -h)", flag.Arg(0))
	}
	cfg, err := guest.LoadConfig(*path)
	if err != nil {
		return err
	}
	if *check {
		fmt.Printf("%s: ok, %d checks\n", *path, len(cfg.Checks))
		return nil
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := guest.New(cfg, log)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
