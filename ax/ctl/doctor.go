package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/doctor"
)

// DoctorUsage is `axctl doctor`'s line of the help (it needs no axd).
const DoctorUsage = `  doctor [--json] [--peer NAME=REPL:PORT,MGMT:PORT ...] [--witness-addr ADDR]
         [--psk-file F | --cert F --key F --ca F] [--qemu BINARY]
                                            what AX can do on this host, why not, and the fix`

// Doctor runs `axctl doctor …` on this machine. It fails only on bad
// flags: missing capabilities are what it reports.
func Doctor(ctx context.Context, args []string, out io.Writer) error {
	return doctorOn(ctx, args, out, nil)
}

// doctorOn is Doctor against host (nil: this machine).
func doctorOn(ctx context.Context, args []string, out io.Writer, host *doctor.Host) error {
	cfg, jsonOut, err := parseDoctor(args)
	if err != nil {
		return err
	}
	r := doctor.Run(ctx, cfg, host)
	if jsonOut {
		return r.WriteJSON(out)
	}
	return r.WriteText(out)
}

// peerFlags is the repeatable --peer.
type peerFlags []doctor.Peer

func (p *peerFlags) String() string { return fmt.Sprint(*p) }
func (p *peerFlags) Set(s string) error {
	peer, err := api.ParsePeer(s)
	if err != nil {
		return err
	}
	*p = append(*p, peer)
	return nil
}

func parseDoctor(args []string) (doctor.Config, bool, error) {
	var cfg doctor.Config
	var peers peerFlags
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	jsonOut := fs.Bool("json", false, "print the report as JSON")
	fs.Var(&peers, "peer", "a partner host, as axd's --peer (repeatable)")
	fs.StringVar(&cfg.WitnessAddr, "witness-addr", "", "the witness's address")
	fs.StringVar(&cfg.PSKFile, "psk-file", "", "PSK mode: the pre-shared key file")
	fs.StringVar(&cfg.Identity.Cert, "cert", "", "TLS mode: this host's certificate")
	fs.StringVar(&cfg.Identity.Key, "key", "", "TLS mode: its private key")
	fs.StringVar(&cfg.Identity.CA, "ca", DefaultPKIDir+"/ca.crt", "TLS mode: the AX CA's certificate")
	fs.StringVar(&cfg.QEMU, "qemu", doctor.DefaultQEMU, "the QEMU binary axd starts")
	if err := fs.Parse(args); err != nil {
		return cfg, false, fmt.Errorf("doctor: %w\n%s", err, DoctorUsage)
	}
	if fs.NArg() > 0 {
		return cfg, false, fmt.Errorf("doctor: unexpected argument %q\n%s", fs.Arg(0), DoctorUsage)
	}
	tls := cfg.Identity.Cert != "" || cfg.Identity.Key != ""
	switch {
	case tls && cfg.PSKFile != "":
		return cfg, false, errors.New("doctor: give --cert/--key (TLS mode) or --psk-file (PSK mode), not both")
	case tls && (cfg.Identity.Cert == "" || cfg.Identity.Key == ""):
		return cfg, false, errors.New("doctor: TLS mode needs both --cert and --key")
	case cfg.WitnessAddr != "":
		if err := api.CheckAddr(cfg.WitnessAddr); err != nil {
			return cfg, false, fmt.Errorf("doctor: --witness-addr: %w", err)
		}
	}
	cfg.Peers = peers
	return cfg, *jsonOut, nil
}
