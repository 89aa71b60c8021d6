package workload

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"
)

const usage = `usage: ax-workload <command> [flags]

in the guest:
  ledger  --listen :7000 [--disk /dev/vda]
                                         serve the ledger; with a disk, an APPEND is
                                         acknowledged once on it, and the records on
                                         it are loaded at start
  dirty   --size 64 --rate 4             dirty SIZE MiB of memory at RATE MiB/s
  tick    --interval 100ms               print AXTICK <n> lines
  app     --listen :7001                 the monitored application (PING → PONG, EXIT ends it)
  flood   --path /dev/virtio-ports/…     a hostile agent: garbage into the agent port
on a client:
  client  --addr IP:7000 --rate 20 --count 100 --record FILE
  verify  --addr IP:7000 --record FILE [--timeout 10s]
                                         check every acknowledged record is in the ledger
  check   --addr IP:7000                 check the ledger's disk holds exactly its records`

// Main runs one ax-workload command; out receives machine-readable results.
func Main(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	parse := func() error {
		if err := fs.Parse(args[1:]); err != nil {
			return fmt.Errorf("%s: %w (see ax-workload help)", args[0], err)
		}
		if fs.NArg() > 0 {
			return fmt.Errorf("%s: unexpected argument %q", args[0], fs.Arg(0))
		}
		return nil
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	switch args[0] {
	case "ledger":
		listen := fs.String("listen", fmt.Sprintf(":%d", DefaultLedgerPort), "listen address")
		disk := fs.String("disk", "", "disk the records are kept on (default: memory only)")
		if err := parse(); err != nil {
			return err
		}
		l := new(Ledger)
		if *disk != "" {
			var err error
			if l, err = OpenLedger(*disk, log); err != nil {
				return err
			}
			defer l.Close()
			fmt.Fprintf(out, "ledger: loaded %d records from %s\n", len(l.Snapshot()), *disk)
		}
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			return fmt.Errorf("ledger: %w", err)
		}
		fmt.Fprintf(out, "AXLEDGER listening %s\n", ln.Addr())
		return l.Serve(ctx, ln, log)
	case "dirty":
		size := fs.Int("size", 64, "MiB of memory to dirty")
		rate := fs.Float64("rate", 4, "MiB/s to dirty")
		if err := parse(); err != nil {
			return err
		}
		_, err := Dirty(ctx, *size, *rate)
		return err
	case "tick":
		interval := fs.Duration("interval", 100*time.Millisecond, "time between ticks")
		if err := parse(); err != nil {
			return err
		}
		return Tick(ctx, out, *interval)
	case "app":
		listen := fs.String("listen", ":7001", "listen address")
		if err := parse(); err != nil {
			return err
		}
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			return fmt.Errorf("app: %w", err)
		}
		fmt.Fprintf(out, "AXAPP listening %s\n", ln.Addr())
		return App(ctx, ln, func() { os.Exit(3) })
	case "flood":
		path := fs.String("path", "/dev/virtio-ports/org.axproject.agent.0", "agent port to flood")
		if err := parse(); err != nil {
			return err
		}
		return Flood(ctx, *path)
	case "client":
		var cfg ClientConfig
		fs.StringVar(&cfg.Addr, "addr", "", "ledger address host:port")
		fs.Float64Var(&cfg.Rate, "rate", 20, "appends per second")
		fs.IntVar(&cfg.Count, "count", 0, "stop after this many acks (0: no limit)")
		fs.DurationVar(&cfg.For, "for", 0, "stop after this long (0: no limit)")
		fs.StringVar(&cfg.Record, "record", "", "file the acknowledged records are appended to")
		fs.StringVar(&cfg.Tag, "tag", "", "prefix of record texts")
		if err := parse(); err != nil {
			return err
		}
		res, err := RunClient(ctx, cfg)
		fmt.Fprintf(out, "acked=%d failed=%d reconnects=%d\n", res.Acked, res.Failed, res.Reconnects)
		return err
	case "verify":
		addr := fs.String("addr", "", "ledger address host:port")
		record := fs.String("record", "", "the client's record file")
		timeout := fs.Duration("timeout", 10*time.Second, "how long the ledger may take to list its records (a nested TCG guest needs longer)")
		if err := parse(); err != nil {
			return err
		}
		acks, err := ReadRecord(*record)
		if err != nil {
			return err
		}
		recs, err := List(ctx, *addr, *timeout)
		if err != nil {
			return err
		}
		v := Verify(acks, recs)
		fmt.Fprintf(out, "acked=%d verified=%d records=%d missing=%d\n", v.Acked, v.Verified, v.Records, len(v.Missing))
		if len(v.Missing) > 0 {
			return fmt.Errorf("verify: %d acknowledged records missing from the ledger, first %s", len(v.Missing), firstN(v.Missing, 10))
		}
		return nil
	case "check":
		addr := fs.String("addr", "", "ledger address host:port")
		if err := parse(); err != nil {
			return err
		}
		n, err := Check(ctx, *addr, 60*time.Second)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "records=%d\n", n)
		return nil
	case "help", "-h", "--help":
		fmt.Fprintln(out, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q\n%s", args[0], usage)
}

func firstN(seqs []uint64, n int) string {
	var b strings.Builder
	for i, s := range seqs {
		if i == n {
			b.WriteString(" …")
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprint(&b, s)
	}
	return b.String()
}
