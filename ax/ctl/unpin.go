package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/axproject/ax/netbuffer"
)

// UnpinUsage is `axctl unpin-gates`'s line of the help (it needs no axd).
const UnpinUsage = `  unpin-gates [--bpf-dir DIR] [VM ...]     remove the FT output gates an axd that is gone left pinned
                                            (DIR/HOST/VM; default /sys/fs/bpf/ax): their guests' output
                                            then passes unheld; a gate a running axd holds is left`

// UnpinGates removes the output gates pinned under --bpf-dir (one directory
// per host, one per VM in it), all or those of the VMs named: what a
// stopped or crashed axd left holding, for an operator taking AX off a host
// or cleaning up by hand after unprotecting. A gate that a running axd holds
// (netbuffer.ErrInUse) is left and said so.
func UnpinGates(_ context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("unpin-gates", flag.ContinueOnError)
	fs.SetOutput(out)
	root := fs.String("bpf-dir", "/sys/fs/bpf/ax", "where axd pins its gates (axd --bpf-dir is ROOT/HOST)")
	fs.Usage = func() { fmt.Fprintln(out, "usage: axctl"+UnpinUsage[1:]) }
	if err := fs.Parse(args); err != nil {
		return err
	}
	vms := fs.Args()
	hosts, err := os.ReadDir(*root)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(out, "no gates pinned under %s\n", *root)
		return nil
	}
	if err != nil {
		return fmt.Errorf("unpin-gates: %w", err)
	}
	var errs []error
	removed := 0
	for _, h := range hosts {
		if !h.IsDir() {
			continue
		}
		gates, err := os.ReadDir(filepath.Join(*root, h.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, g := range gates {
			if !g.IsDir() || (len(vms) > 0 && !slices.Contains(vms, g.Name())) {
				continue
			}
			dir := filepath.Join(*root, h.Name(), g.Name())
			switch err := netbuffer.Unpin(dir); {
			case errors.Is(err, netbuffer.ErrInUse):
				fmt.Fprintf(out, "%s: held by a running axd, left (unprotect the VM instead)\n", dir)
			case err != nil:
				errs = append(errs, err)
			default:
				fmt.Fprintf(out, "%s: removed; the guest's output passes unheld\n", dir)
				removed++
			}
		}
	}
	if removed == 0 && len(errs) == 0 {
		fmt.Fprintf(out, "no gates to remove under %s\n", *root)
	}
	return errors.Join(errs...)
}
