// Command axctl is the operator's command line for AX. This version drives
// the single-machine lab: axctl lab up|down|status|demo.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/axproject/ax/test/lab"
)

const usage = `usage: axctl <command> [flags]

  lab up|down|status|demo   the single-machine lab (see: axctl lab help)
  help                      this text`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "axctl:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, out, errOut io.Writer) error {
	log := slog.New(slog.NewTextHandler(errOut, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if len(args) == 0 {
		return errors.New(usage)
	}
	switch args[0] {
	case "lab":
		return lab.Main(ctx, args[1:], out, log)
	case "help", "-h", "--help":
		fmt.Fprintln(out, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q\n%s", args[0], usage)
}
