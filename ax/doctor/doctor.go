// Package doctor probes a host for what AX can do on it — kernel features,
// QEMU, libvirt, the identity, the partners' reachability — and says why
// not and how to fix it (axctl doctor).
package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/identity"
)

// Status is a capability's answer on this host.
type Status string

// The answers. Unknown is for what a probe could not find out (no root,
// no QEMU to ask, a path that cannot be probed from one side).
const (
	Yes     Status = "yes"
	No      Status = "no"
	Unknown Status = "unknown"
)

// Check is one row of the report: a capability, whether this host has it,
// why, and what to do when it has not.
type Check struct {
	Area   string `json:"area"` // kernel, qemu, libvirt, identity, network
	What   string `json:"what"`
	Status Status `json:"status"`
	Why    string `json:"why"`
	Fix    string `json:"fix,omitempty"`
}

// Report is what Run found.
type Report struct {
	Kernel  string  `json:"kernel"` // the kernel release, or "" when unknown
	Root    bool    `json:"root"`   // whether the probes ran as root
	Checks  []Check `json:"checks"`
	Yes     int     `json:"yes"`
	No      int     `json:"no"`
	Unknown int     `json:"unknown"`
}

// Peer is a partner host to probe.
type Peer = api.Peer

// Config says what to probe beyond the host itself.
type Config struct {
	Peers       []Peer
	WitnessAddr string         // TCP HOST:PORT of the witness, or ""
	PSKFile     string         // PSK mode: the pre-shared key file, or ""
	Identity    identity.Files // TLS mode: Cert and Key set, or zero
	QEMU        string         // the QEMU binary; default qemu-system-x86_64
	// QEMUTimeout bounds asking QEMU its version and commands; default 10 s.
	QEMUTimeout time.Duration
	// DialTimeout bounds each TCP connect; default 1 s.
	DialTimeout time.Duration
}

// DefaultQEMU is the QEMU binary asked when Config.QEMU is empty.
const DefaultQEMU = "qemu-system-x86_64"

func (c *Config) defaults() {
	if c.QEMU == "" {
		c.QEMU = DefaultQEMU
	}
	if c.QEMUTimeout <= 0 {
		c.QEMUTimeout = 10 * time.Second
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = time.Second
	}
}

// Run asks h everything cfg and AX need and reports it. A nil h is this
// machine (Real()).
func Run(ctx context.Context, cfg Config, h *Host) Report {
	if h == nil {
		h = Real()
	}
	cfg.defaults()
	k := probeKernelFacts(h)
	r := Report{Kernel: k.release, Root: h.Root}
	for _, probe := range []func() []Check{
		func() []Check { return kernelChecks(h, k) },
		func() []Check { return qemuChecks(ctx, h, cfg) },
		func() []Check { return libvirtChecks(ctx, h) },
		func() []Check { return identityChecks(h, cfg) },
		func() []Check { return reachChecks(ctx, h, cfg) },
	} {
		r.Checks = append(r.Checks, probe()...)
	}
	for _, c := range r.Checks {
		switch c.Status {
		case Yes:
			r.Yes++
		case No:
			r.No++
		default:
			r.Unknown++
		}
	}
	return r
}

// Summary is the report's last line.
func (r Report) Summary() string {
	kernel := r.Kernel
	if kernel == "" {
		kernel = "unknown"
	}
	s := fmt.Sprintf("summary: %d yes, %d no, %d unknown (kernel %s)", r.Yes, r.No, r.Unknown, kernel)
	if !r.Root {
		s += "; not root: run as root to answer what needs it"
	}
	return s
}

// WriteText prints the report as a table, the fix under each row that has
// one, then the summary.
func (r Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "AREA\tCAPABILITY\tHERE\tWHY")
	for _, c := range r.Checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Area, c.What, c.Status, oneLine(c.Why))
		if c.Fix != "" && c.Status != Yes {
			fmt.Fprintf(tw, "\t\t\tfix: %s\n", oneLine(c.Fix))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w, r.Summary())
	return err
}

// WriteJSON prints the report as one JSON object, the summary included.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		Report
		Summary string `json:"summary"`
	}{r, r.Summary()})
}

// oneLine keeps a row on one line whatever an error message holds, and
// keeps tabs from breaking the table's columns.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
