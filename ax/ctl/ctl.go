// Package ctl is axctl's commands against a host's axd: status, define,
// protect, unprotect, failover, events.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/axproject/ax/ax/api"
)

// command is one of axctl's commands: the table below makes both the
// usage text and the dispatch, so the two cannot drift.
type command struct {
	name, args, help string
	// nargs is how many positional arguments it takes (-1: any), what
	// says what they are when the count is wrong.
	nargs int
	what  string
	// run is a command against axd, with the shared flags parsed.
	run func(ctx context.Context, e *env, pos []string) error
	// local is a command that needs no axd and parses its own arguments;
	// usage is then its help text, verbatim.
	local func(ctx context.Context, args []string, out io.Writer) error
	usage string
}

// env is what a command runs with: the API client, its output and flags.
type env struct {
	c                       *api.Client
	out                     io.Writer
	jsonOut, noWait, follow bool
	force                   bool
	level, peer, specFile   string
	since                   uint64
}

var commands = []command{
	{name: "status", args: "[--json]", help: "VMs, levels, roles, epochs, links, witness", nargs: 0, what: "no arguments",
		run: func(ctx context.Context, e *env, _ []string) error {
			st, err := e.c.Status(ctx)
			if err != nil {
				return err
			}
			if e.jsonOut {
				return writeJSON(e.out, st)
			}
			printStatus(e.out, st)
			return nil
		}},
	{name: "define", args: "SPEC.json", help: "register a VM (QMP socket, RAM file, tap) with axd", nargs: 1, what: "a spec file",
		run: func(ctx context.Context, e *env, pos []string) error { return define(ctx, e.c, pos[0]) }},
	{name: "protect", args: "VM --level ft|ha --peer HOST [--force] [--no-wait] [--spec SPEC.json]", help: "protect a VM; shows initial-sync progress",
		nargs: 1, what: "a VM name",
		run: func(ctx context.Context, e *env, pos []string) error {
			if e.level == "" || (e.peer == "" && e.level != api.LevelNone) {
				return errors.New("protect: give --level ft|ha|none and --peer HOST")
			}
			if e.specFile != "" {
				if err := define(ctx, e.c, e.specFile); err != nil {
					return err
				}
			}
			if err := e.c.Protect(ctx, pos[0], api.ProtectRequest{Level: e.level, Peer: e.peer, Force: e.force}); err != nil {
				return err
			}
			if e.noWait || e.level == api.LevelNone {
				return nil
			}
			return waitProtected(ctx, e.c, pos[0], e.level, e.out)
		}},
	{name: "level", args: "VM none|ha|ft [--peer HOST] [--force] [--no-wait]", help: "change a VM's level without restarting it",
		nargs: 2, what: "a VM name and a level (none, ha or ft)",
		run: func(ctx context.Context, e *env, pos []string) error {
			lv := pos[1]
			if lv != api.LevelNone && lv != api.LevelHA && lv != api.LevelFT {
				return fmt.Errorf("level: unknown level %q: use none, ha or ft", lv)
			}
			if err := e.c.Level(ctx, pos[0], api.ProtectRequest{Level: lv, Peer: e.peer, Force: e.force}); err != nil {
				return err
			}
			if e.noWait || lv == api.LevelNone {
				fmt.Fprintf(e.out, "%s: level %s\n", pos[0], lv)
				return nil
			}
			return waitProtected(ctx, e.c, pos[0], lv, e.out)
		}},
	{name: "unprotect", args: "VM", help: "stop protecting; the partner drops its replica", nargs: 1, what: "a VM name",
		run: func(ctx context.Context, e *env, pos []string) error { return e.c.Unprotect(ctx, pos[0]) }},
	{name: "failover", args: "VM", help: "planned switch of a protected VM to its partner", nargs: 1, what: "a VM name",
		run: func(ctx context.Context, e *env, pos []string) error { return e.c.Failover(ctx, pos[0]) }},
	{name: "events", args: "[--since N] [--follow] [--json]", help: "what axd did and saw", nargs: 0, what: "no arguments",
		run: func(ctx context.Context, e *env, _ []string) error {
			return events(ctx, e.c, e.since, e.follow, e.jsonOut, e.out)
		}},
	{name: "pki", usage: PKIUsage, local: func(_ context.Context, args []string, out io.Writer) error { return PKI(args, out) }},
	{name: "doctor", usage: DoctorUsage, local: Doctor},
	{name: "unpin-gates", usage: UnpinUsage, local: UnpinGates},
}

// usageOf is a command's help text.
func (c command) usageOf() string {
	if c.usage != "" {
		return c.usage
	}
	line := c.name
	if c.args != "" {
		line += " " + c.args
	}
	if len(line) <= 41 {
		return fmt.Sprintf("  %-41s %s", line, c.help)
	}
	return fmt.Sprintf("  %s\n  %-41s %s", line, "", c.help)
}

// isHelp: the argument asks for a command's help.
func isHelp(arg string) bool { return arg == "help" || arg == "-h" || arg == "--help" }

// Usage lists the commands, from the table.
func Usage() string {
	var b strings.Builder
	for _, c := range commands {
		b.WriteString(c.usageOf() + "\n")
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// Commands are the names of the commands, in usage order.
func Commands() []string {
	names := make([]string, len(commands))
	for i, c := range commands {
		names[i] = c.name
	}
	return names
}

// Main runs one command (against the axd at socket, for those that need it).
func Main(ctx context.Context, socket string, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("no command")
	}
	name, rest := args[0], args[1:]
	i := slices.IndexFunc(commands, func(c command) bool { return c.name == name })
	if i < 0 {
		return fmt.Errorf("%w %q", ErrUnknownCommand, name)
	}
	cmd := commands[i]
	if len(rest) > 0 && isHelp(rest[0]) {
		fmt.Fprintln(out, cmd.usageOf())
		return nil
	}
	if cmd.local != nil {
		return cmd.local(ctx, rest, out)
	}
	e := &env{c: api.NewClient(socket), out: out}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.BoolVar(&e.jsonOut, "json", false, "machine-readable output")
	fs.StringVar(&e.level, "level", "", "availability level: ft, ha or none")
	fs.StringVar(&e.peer, "peer", "", "partner host")
	fs.BoolVar(&e.noWait, "no-wait", false, "return at once")
	fs.StringVar(&e.specFile, "spec", "", "VM spec file to define first")
	fs.Uint64Var(&e.since, "since", 0, "events after this sequence number")
	fs.BoolVar(&e.follow, "follow", false, "keep printing new events")
	fs.BoolVar(&e.force, "force", false, "let the partner promise capacity it does not have free")
	// Flags may follow the VM name: parse around positional arguments.
	var pos []string
	for len(rest) > 0 {
		if err := fs.Parse(rest); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		rest = fs.Args()
		if len(rest) > 0 {
			pos = append(pos, rest[0])
			rest = rest[1:]
		}
	}
	if cmd.nargs >= 0 && len(pos) != cmd.nargs {
		return fmt.Errorf("%s: want %s", name, cmd.what)
	}
	return cmd.run(ctx, e, pos)
}

// ErrUnknownCommand: the command is not one of axctl's.
var ErrUnknownCommand = errors.New("unknown command")

func define(ctx context.Context, c *api.Client, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("define: %w", err)
	}
	var spec api.VMSpec
	if err := json.Unmarshal(data, &spec); err != nil {
		return fmt.Errorf("define: %s is not a VM spec: %w", path, err)
	}
	return c.Define(ctx, spec)
}

func writeJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStatus(out io.Writer, st *api.Status) {
	fmt.Fprintf(out, "host %s, witness %s\n", st.Host, st.Witness)
	printWitness(out, st.WitnessHealth)
	for _, p := range st.Peers {
		fmt.Fprintf(out, "peer %s: replication %s, management %s\n", p.Name, heard(p.ReplHeard, p.ReplAgeMS), heard(p.MgmtHeard, p.MgmtAgeMS))
	}
	if len(st.VMs) == 0 {
		fmt.Fprintln(out, "no VMs")
		if r := st.Reservation; r != nil {
			printPlacement(out, r.Placement, len(r.Promises))
		}
		return
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tLEVEL\tROLE\tPEER\tSTATE\tLEASE\tEPOCH\tCOMMIT AGE\tPAUSE p50\tDIRTY\tRATE\tLINK\tTRACKER\tOUTPUT\tAPPS")
	for _, v := range st.VMs {
		age := "-"
		if !v.LastCommit.IsZero() {
			age = fmt.Sprintf("%.0f ms", v.CommitAgeMS)
		}
		output := v.Output
		if v.Output == "held" {
			output = fmt.Sprintf("held (%d)", v.HeldFrames)
		}
		var apps []string
		for _, a := range v.Apps {
			apps = append(apps, a.Check+"="+a.Health)
		}
		if len(apps) == 0 {
			apps = []string{"agent " + v.Agent}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%.1f ms\t%d\t%s/s\t%s\t%s\t%s\t%s\n", v.Name, v.Level, v.Role, dash(v.Peer), v.State,
			leaseLeft(v), v.Epoch, age, v.PauseP50MS, v.DirtyPages, sizeText(v.BytesPerSec), dash(v.Link), dash(v.Tracker), output, strings.Join(apps, " "))
	}
	tw.Flush()
	for _, v := range st.VMs {
		switch {
		case v.Disks > 0 && v.Role == api.RolePrimary:
			fmt.Fprintf(out, "disks %s: %d replicated (%s), %s sent, %d writes unacknowledged\n", v.Name, v.Disks, dash(v.DiskMode), sizeText(float64(v.DiskBytes)), v.DiskLag)
			if v.DiskResyncCompared > 0 {
				fmt.Fprintf(out, "disks %s: resync on the partner's replica sent %s of %s compared\n", v.Name,
					sizeText(float64(v.DiskResyncSent)), sizeText(float64(v.DiskResyncCompared)))
			}
		case v.Role == api.RoleSecondary && (v.JournalWrites > 0 || v.Level == api.LevelFT):
			fmt.Fprintf(out, "journal %s: %d writes (%s) wait for their checkpoint\n", v.Name, v.JournalWrites, sizeText(float64(v.JournalBytes)))
		}
	}
	if r := st.Reservation; r != nil && len(r.Promises) > 0 {
		fmt.Fprintf(out, "promised to partners' VMs: %d of %d vCPUs, %s of %s memory, %s of %s disk",
			r.Reserved.VCPUs, r.Host.VCPUs, sizeText(float64(r.Reserved.MemoryBytes)), sizeText(float64(r.Host.MemoryBytes)),
			sizeText(float64(r.Reserved.DiskBytes)), sizeText(float64(r.Host.DiskBytes)))
		if len(r.Forced) > 0 {
			fmt.Fprintf(out, " (forced beyond capacity: %s)", strings.Join(r.Forced, ", "))
		}
		fmt.Fprintln(out)
	}
	if r := st.Reservation; r != nil {
		printPlacement(out, r.Placement, len(r.Promises))
	}
	for _, v := range st.VMs {
		if v.Alarm != "" {
			fmt.Fprintf(out, "ALARM %s: %s\n", v.Name, v.Alarm)
		}
		if v.UnprotectedS > 0 && v.Declared != "" && v.Declared != api.LevelNone {
			fmt.Fprintf(out, "UNPROTECTED %s: declared %s, not protected for %.1f s; axd protects it again by itself when %s (or another partner) can take the replica\n",
				v.Name, v.Declared, v.UnprotectedS, dash(v.DeclaredPeer))
		}
	}
}

// printPlacement writes how Placement holds the promises: one line, one
// more per promise it does not hold.
func printPlacement(out io.Writer, p *api.PlacementHold, promised int) {
	if p == nil || promised == 0 && p.Error == "" {
		return
	}
	if p.Error != "" {
		fmt.Fprintf(out, "PLACEMENT: the promises to partners' VMs are not all held in Placement: %s\n", p.Error)
	} else {
		fmt.Fprintf(out, "placement: %d of %d promises held on resource provider %s\n", len(p.Held), promised, p.Provider)
	}
	for _, vm := range slices.Sorted(maps.Keys(p.Failed)) {
		fmt.Fprintf(out, "PLACEMENT %s: not held: %s\n", vm, p.Failed[vm])
	}
}

// printWitness writes the witness as axd last probed it: one line, one
// more for each member that did not answer, and the alarm without quorum.
func printWitness(out io.Writer, w *api.WitnessHealth) {
	if w == nil {
		return
	}
	quorum := "quorum"
	if !w.Quorum {
		quorum = "NO QUORUM"
	}
	ttl := time.Duration(w.LeaseTTLMS * float64(time.Millisecond))
	fmt.Fprintf(out, "witness: %s %d/%d members reachable, %s, lease TTL %s\n", w.Kind, w.Reachable, len(w.Members), quorum, ttl)
	for _, m := range w.Members {
		if m.Reachable {
			continue
		}
		name := m.Endpoint
		if m.Name != "" {
			name = fmt.Sprintf("%s (%s)", m.Name, dash(m.Endpoint))
		}
		fmt.Fprintf(out, "witness member %s: unreachable: %s\n", name, dash(m.Error))
	}
	if w.Alarm != "" {
		fmt.Fprintf(out, "ALARM witness: %s\n", w.Alarm)
	}
}

// leaseLeft is the time left of the lease this host (the primary) holds
// for v, where it holds one.
func leaseLeft(v api.VMStatus) string {
	switch {
	case v.LeaseExpires.IsZero():
		return "-"
	case v.LeaseLeftMS <= 0:
		return "EXPIRED"
	}
	return fmt.Sprintf("%.1f s", v.LeaseLeftMS/1000)
}

func heard(ok bool, ageMS float64) string {
	if ok {
		return "up"
	}
	if ageMS >= 3.6e6 {
		return "never heard"
	}
	return fmt.Sprintf("DOWN (silent %.1f s)", ageMS/1000)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func sizeText(b float64) string {
	switch {
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	}
	return fmt.Sprintf("%.0f B", b)
}

// waitProtected shows the initial synchronisation as a progress bar until
// the first checkpoint commits.
func waitProtected(ctx context.Context, c *api.Client, vm, level string, out io.Writer) error {
	tty := isTerminal(out)
	deadline := time.Now().Add(10 * time.Minute)
	last := ""
	for time.Now().Before(deadline) {
		st, err := c.Status(ctx)
		if err != nil {
			return err
		}
		for _, v := range st.VMs {
			if v.Name != vm {
				continue
			}
			switch {
			case v.State == "protected" && v.Level == level && level == api.LevelFT:
				fmt.Fprintf(out, "%s%s is protected (ft, replica on %s, epoch %d committed)\n", clearLine(tty), vm, v.Peer, v.Committed)
				return nil
			case v.State == "protected" && v.Level == level:
				fmt.Fprintf(out, "%s%s is protected (%s, %d disks replicated on %s)\n", clearLine(tty), vm, v.Level, v.Disks, v.Peer)
				return nil
			case v.Role == api.RoleLocal && v.Alarm == "":
				return fmt.Errorf("%s is not protected", vm)
			case v.State == "fenced":
				return fmt.Errorf("%s was fenced: %s", vm, v.Alarm)
			}
			line := fmt.Sprintf("%s: %s", vm, v.State)
			if v.DiskSyncTotal > 0 && v.DiskSyncDone < v.DiskSyncTotal {
				frac := float64(v.DiskSyncDone) / float64(v.DiskSyncTotal)
				n := int(frac * 30)
				line = fmt.Sprintf("%s: disk sync [%s%s] %3.0f%% (%s of %s)", vm, strings.Repeat("#", n), strings.Repeat(".", 30-n), frac*100,
					sizeText(float64(v.DiskSyncDone)), sizeText(float64(v.DiskSyncTotal)))
			} else if v.SyncTotal > 0 {
				frac := float64(v.SyncSent) / float64(v.SyncTotal)
				n := int(frac * 30)
				line = fmt.Sprintf("%s: initial sync [%s%s] %3.0f%% (%d/%d pages)", vm, strings.Repeat("#", n), strings.Repeat(".", 30-n), frac*100, v.SyncSent, v.SyncTotal)
			}
			if v.Alarm != "" {
				line += " — " + v.Alarm
			}
			if tty {
				fmt.Fprintf(out, "\r%s", line)
			} else if line != last {
				fmt.Fprintln(out, line)
			}
			last = line
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s: not protected after 10 minutes", vm)
}

func clearLine(tty bool) string {
	if tty {
		return "\r\033[K"
	}
	return ""
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func events(ctx context.Context, c *api.Client, since uint64, follow, jsonOut bool, out io.Writer) error {
	for {
		evs, err := c.Events(ctx, since)
		if err != nil {
			return err
		}
		for _, e := range evs {
			if jsonOut {
				b, _ := json.Marshal(e)
				fmt.Fprintln(out, string(b))
			} else {
				fmt.Fprintf(out, "%d %s %-10s %-6s %s\n", e.Seq, e.Time.Format("15:04:05.000"), e.Kind, dash(e.VM), e.Text)
			}
			since = e.Seq
		}
		if !follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(300 * time.Millisecond):
		}
	}
}
