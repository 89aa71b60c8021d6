// Command ax-vagrant-stage stages what the Vagrant lab's provisioning
// installs (make vagrant-up runs it): see test/vagrant.Stage.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/axproject/ax/test/image"
	"github.com/axproject/ax/test/vagrant"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "ax-vagrant-stage:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("ax-vagrant-stage", flag.ContinueOnError)
	var cfg vagrant.StageConfig
	fs.StringVar(&cfg.Dir, "out", ".vagrant/ax", "the directory provisioning uploads (emptied first)")
	fs.StringVar(&cfg.CADir, "ca-dir", ".vagrant/ax-ca", "the lab's CA (stays on this host; made afresh)")
	fs.StringVar(&cfg.Deb, "deb", "", "the ax .deb (make deb)")
	fs.StringVar(&cfg.BinDir, "bin", "bin", "where make build put ax-workload and ax-agent")
	fs.StringVar(&cfg.CacheDir, "cache-dir", image.DefaultCacheDir, "the guest image cache")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	cfg.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	return vagrant.Stage(ctx, cfg)
}
