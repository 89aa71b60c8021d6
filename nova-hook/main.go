package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"log/syslog"
	"os"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/nova-hook/spool"
)

// Budget is how long the hook may take in all; handing the event to axd
// gets all of it but spoolTime.
const (
	budget    = 2 * time.Second
	spoolTime = 300 * time.Millisecond
)

// config is where axd and the spool are.
type config struct {
	Socket string
	Spool  string
	Log    *slog.Logger
}

func main() {
	log := slog.New(slog.NewTextHandler(logOutput(), nil))
	defer func() {
		// Whatever happens, libvirt sees success: a failing hook stops
		// the domain from starting.
		if p := recover(); p != nil {
			log.Error("ax-nova-hook failed", "panic", p)
		}
		os.Exit(0)
	}()
	cfg := config{Socket: api.DefaultSocket, Spool: api.DefaultHookSpool, Log: log}
	if s := os.Getenv("AX_NOVA_HOOK_SOCKET"); s != "" {
		cfg.Socket = s
	}
	if s := os.Getenv("AX_NOVA_HOOK_SPOOL"); s != "" {
		cfg.Spool = s
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	if err := run(ctx, cfg, os.Args[1:], os.Stdin); err != nil {
		log.Error("ax-nova-hook: " + err.Error())
	}
}

// logOutput is stderr, and syslog when there is one: libvirt may not keep
// what a successful hook writes on stderr.
func logOutput() io.Writer {
	if os.Getenv("AX_NOVA_HOOK_NO_SYSLOG") == "1" {
		return os.Stderr
	}
	w, err := syslog.New(syslog.LOG_WARNING|syslog.LOG_DAEMON, "ax-nova-hook")
	if err != nil {
		return os.Stderr
	}
	return io.MultiWriter(os.Stderr, w)
}

// run hands one hook event to axd, or spools it when axd cannot take it.
// It returns what went wrong; the hook exits 0 regardless.
func run(ctx context.Context, cfg config, args []string, stdin io.Reader) error {
	ev, err := readEvent(ctx, args, stdin, time.Now())
	if err != nil {
		return err
	}
	send, cancel := context.WithDeadline(ctx, deadline(ctx).Add(-spoolTime))
	defer cancel()
	err = api.NewClient(cfg.Socket).LibvirtHook(send, ev)
	var refused *api.RequestError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &refused) && refused.Status/100 == 4:
		// axd read it and said no: spooling it would only repeat that.
		return fmt.Errorf("domain %s %s: axd refused the event: %w", ev.Domain, ev.Operation, err)
	}
	dropped, serr := spool.Put(cfg.Spool, ev)
	for _, name := range dropped {
		cfg.Log.Warn("ax-nova-hook: the spool is full: its oldest event was dropped", "dropped", name, "spool", cfg.Spool)
	}
	if serr != nil {
		return fmt.Errorf("domain %s %s: axd could not take the event (%v), and spooling it failed: %w — the event is lost", ev.Domain, ev.Operation, err, serr)
	}
	cfg.Log.Warn("ax-nova-hook: axd could not take the event: spooled for axd to replay", "domain", ev.Domain, "operation", ev.Operation, "err", err, "spool", cfg.Spool)
	return nil
}

func deadline(ctx context.Context) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return time.Now().Add(budget)
}

// readEvent is the event libvirt's arguments (DOMAIN OPERATION
// SUBOPERATION EXTRA) and the domain XML on stdin make. The XML is read
// whole, or the event refused; stdin is read to its end either way (or to
// ctx's end), so libvirt's write of it never fails.
func readEvent(ctx context.Context, args []string, stdin io.Reader, now time.Time) (api.HookEvent, error) {
	if len(args) < 2 || len(args) > 4 {
		io.Copy(io.Discard, bounded(ctx, stdin))
		return api.HookEvent{}, fmt.Errorf("libvirt runs this hook with DOMAIN OPERATION SUBOPERATION EXTRA; got %d arguments", len(args))
	}
	ev := api.HookEvent{Domain: args[0], Operation: args[1], Time: now}
	if len(args) > 2 {
		ev.SubOperation = args[2]
	}
	if len(args) > 3 {
		ev.Extra = args[3]
	}
	xml, err := io.ReadAll(io.LimitReader(bounded(ctx, stdin), api.MaxHookXML+1))
	if len(xml) > api.MaxHookXML {
		io.Copy(io.Discard, bounded(ctx, stdin))
	}
	switch {
	case names.Check("vm", ev.Domain) != nil:
		return api.HookEvent{}, fmt.Errorf("domain name: %w: event not handed to axd", names.Check("vm", ev.Domain))
	case !api.KnownHookOperation(ev.Operation):
		return api.HookEvent{}, fmt.Errorf("domain %s: operation %.32q is not one AX takes (%v): ignored", ev.Domain, ev.Operation, api.HookOperations)
	case len(ev.SubOperation) > 64 || len(ev.Extra) > 256:
		return api.HookEvent{}, fmt.Errorf("domain %s %s: sub-operation or extra argument too long: event not handed to axd", ev.Domain, ev.Operation)
	case err != nil:
		return api.HookEvent{}, fmt.Errorf("domain %s %s: reading the domain XML: %w", ev.Domain, ev.Operation, err)
	case len(xml) > api.MaxHookXML:
		return api.HookEvent{}, fmt.Errorf("domain %s %s: domain XML over %d bytes: event not handed to axd", ev.Domain, ev.Operation, api.MaxHookXML)
	}
	ev.XML = string(xml)
	return ev, nil
}

// bounded is r, ending with ctx: reading stdin cannot outlast the hook's
// budget (a file supports deadlines when it is a pipe, as libvirt's is).
func bounded(ctx context.Context, r io.Reader) io.Reader {
	if f, ok := r.(*os.File); ok {
		f.SetReadDeadline(deadline(ctx))
	}
	return r
}
