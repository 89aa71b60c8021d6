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
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/axproject/ax/ax/api"
)

// Usage lists the commands.
const Usage = `  status [--json]                           VMs, levels, roles, epochs, links, witness
  define SPEC.json                          register a VM (QMP socket, RAM file, tap) with axd
  protect VM --level ft|ha --peer HOST [--force] [--no-wait] [--spec SPEC.json]
                                            protect a VM; shows initial-sync progress
  level VM none|ha|ft [--peer HOST] [--force] [--no-wait]
                                            change a VM's level without restarting it
  unprotect VM                              stop protecting; the partner drops its replica
  failover VM                               planned switch of a protected VM to its partner
  events [--since N] [--follow] [--json]    what axd did and saw
global: --socket PATH (or AX_SOCKET; default /run/ax/axd.sock)`

// Main runs one command against the axd at socket.
func Main(ctx context.Context, socket string, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("no command")
	}
	c := api.NewClient(socket)
	cmd, rest := args[0], args[1:]
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	jsonOut := fs.Bool("json", false, "machine-readable output")
	level := fs.String("level", "", "availability level: ft, ha or none")
	peer := fs.String("peer", "", "partner host")
	noWait := fs.Bool("no-wait", false, "return at once")
	specFile := fs.String("spec", "", "VM spec file to define first")
	since := fs.Uint64("since", 0, "events after this sequence number")
	follow := fs.Bool("follow", false, "keep printing new events")
	force := fs.Bool("force", false, "let the partner promise capacity it does not have free")
	// Flags may follow the VM name: parse around positional arguments.
	var pos []string
	for len(rest) > 0 {
		if err := fs.Parse(rest); err != nil {
			return fmt.Errorf("%s: %v", cmd, err)
		}
		rest = fs.Args()
		if len(rest) > 0 {
			pos = append(pos, rest[0])
			rest = rest[1:]
		}
	}
	need := func(n int, what string) error {
		if len(pos) != n {
			return fmt.Errorf("%s: want %s", cmd, what)
		}
		return nil
	}
	switch cmd {
	case "status":
		if err := need(0, "no arguments"); err != nil {
			return err
		}
		st, err := c.Status(ctx)
		if err != nil {
			return err
		}
		if *jsonOut {
			return writeJSON(out, st)
		}
		printStatus(out, st)
		return nil
	case "define":
		if err := need(1, "a spec file"); err != nil {
			return err
		}
		return define(ctx, c, pos[0])
	case "protect":
		if err := need(1, "a VM name"); err != nil {
			return err
		}
		if *level == "" || (*peer == "" && *level != api.LevelNone) {
			return errors.New("protect: give --level ft|ha|none and --peer HOST")
		}
		if *specFile != "" {
			if err := define(ctx, c, *specFile); err != nil {
				return err
			}
		}
		if err := c.Protect(ctx, pos[0], api.ProtectRequest{Level: *level, Peer: *peer, Force: *force}); err != nil {
			return err
		}
		if *noWait || *level == api.LevelNone {
			return nil
		}
		return waitProtected(ctx, c, pos[0], *level, out)
	case "level":
		if err := need(2, "a VM name and a level (none, ha or ft)"); err != nil {
			return err
		}
		lv := pos[1]
		if lv != api.LevelNone && lv != api.LevelHA && lv != api.LevelFT {
			return fmt.Errorf("level: unknown level %q: use none, ha or ft", lv)
		}
		if err := c.Level(ctx, pos[0], api.ProtectRequest{Level: lv, Peer: *peer, Force: *force}); err != nil {
			return err
		}
		if *noWait || lv == api.LevelNone {
			fmt.Fprintf(out, "%s: level %s\n", pos[0], lv)
			return nil
		}
		return waitProtected(ctx, c, pos[0], lv, out)
	case "unprotect":
		if err := need(1, "a VM name"); err != nil {
			return err
		}
		return c.Unprotect(ctx, pos[0])
	case "failover":
		if err := need(1, "a VM name"); err != nil {
			return err
		}
		return c.Failover(ctx, pos[0])
	case "events":
		return events(ctx, c, *since, *follow, *jsonOut, out)
	}
	return fmt.Errorf("%w %q", ErrUnknownCommand, cmd)
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
	for _, p := range st.Peers {
		fmt.Fprintf(out, "peer %s: replication %s, management %s\n", p.Name, heard(p.ReplHeard, p.ReplAgeMS), heard(p.MgmtHeard, p.MgmtAgeMS))
	}
	if len(st.VMs) == 0 {
		fmt.Fprintln(out, "no VMs")
		return
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tLEVEL\tROLE\tPEER\tSTATE\tEPOCH\tCOMMIT AGE\tPAUSE p50\tDIRTY\tRATE\tLINK\tTRACKER\tOUTPUT\tAPPS")
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
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%.1f ms\t%d\t%s/s\t%s\t%s\t%s\t%s\n", v.Name, v.Level, v.Role, dash(v.Peer), v.State,
			v.Epoch, age, v.PauseP50MS, v.DirtyPages, sizeText(v.BytesPerSec), dash(v.Link), dash(v.Tracker), output, strings.Join(apps, " "))
	}
	tw.Flush()
	for _, v := range st.VMs {
		switch {
		case v.Disks > 0 && v.Role == api.RolePrimary:
			fmt.Fprintf(out, "disks %s: %d replicated (%s), %s sent, %d writes unacknowledged\n", v.Name, v.Disks, dash(v.DiskMode), sizeText(float64(v.DiskBytes)), v.DiskLag)
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
	for _, v := range st.VMs {
		if v.Alarm != "" {
			fmt.Fprintf(out, "ALARM %s: %s\n", v.Name, v.Alarm)
		}
	}
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
