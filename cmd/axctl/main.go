// Command axctl is the operator's command line for AX: it talks to the
// local axd, makes identities (axctl pki …) and, when built with the lab
// tag (make build), drives the single-machine lab (axctl lab …); the axctl
// a host installs is built without it and links no test code.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/axproject/ax/ax/ctl"
)

var usage = `usage: axctl [--socket PATH] <command> [flags]

` + ctl.Usage() + `
  lab up|down|status|demo|bench             the single-machine lab (see: axctl lab help)
  help                                      this text
global: --socket PATH (or AX_SOCKET; default /run/ax/axd.sock)`

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
	socket := os.Getenv("AX_SOCKET")
	for len(args) > 0 && strings.HasPrefix(args[0], "-") && args[0] != "-h" && args[0] != "--help" {
		name, val, hasVal := strings.Cut(strings.TrimLeft(args[0], "-"), "=")
		if name != "socket" && name != "s" {
			return fmt.Errorf("unknown flag %q\n%s", args[0], usage)
		}
		if !hasVal {
			if len(args) < 2 {
				return errors.New("--socket needs a path")
			}
			val, args = args[1], args[1:]
		}
		socket, args = val, args[1:]
	}
	if len(args) == 0 {
		return errors.New(usage)
	}
	switch args[0] {
	case "lab":
		return labMain(ctx, args[1:], out, log)
	case "help", "-h", "--help":
		fmt.Fprintln(out, usage)
		return nil
	}
	// Everything else is one of ctl's commands; ctl knows which exist.
	if err := ctl.Main(ctx, socket, args, out); err != nil {
		if errors.Is(err, ctl.ErrUnknownCommand) {
			return fmt.Errorf("%w\n%s", err, usage)
		}
		return err
	}
	return nil
}
