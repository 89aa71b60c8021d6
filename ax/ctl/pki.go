package ctl

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/axproject/ax/ax/identity"
)

// PKIUsage lists the identity commands (they need no axd); `axctl pki help`
// prints it.
const PKIUsage = `  pki init [--dir DIR] [--name CA] [--days N]
                                            make the CA that signs AX identities (DIR default /etc/ax/pki)
  pki issue --name NAME [--role host|witness] [--dir DIR] [--out DIR] [--days N]
                                            sign a host's or the witness's certificate and key
  pki psk FILE                              write a fresh pre-shared key (the lab's PSK mode), mode 0600`

// DefaultPKIDir is where axctl pki keeps the CA.
const DefaultPKIDir = "/etc/ax/pki"

// PKI runs `axctl pki …`.
func PKI(args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("pki: want init, issue or psk\n" + PKIUsage)
	}
	fs := flag.NewFlagSet("pki "+args[0], flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("dir", DefaultPKIDir, "the CA's directory")
	outDir := fs.String("out", "", "where to write the certificate and key (default: the CA's directory)")
	name := fs.String("name", "", "name of the host or witness (its --host)")
	role := fs.String("role", "host", "host or witness")
	days := fs.Int("days", 0, "validity in days")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("pki %s: %v", args[0], err)
	}
	valid := func(def int) time.Duration {
		if *days > 0 {
			def = *days
		}
		return time.Duration(def) * 24 * time.Hour
	}
	switch args[0] {
	case "init":
		if fs.NArg() != 0 {
			return fmt.Errorf("pki init: unexpected %q", fs.Arg(0))
		}
		ca := *name
		if ca == "" {
			ca = "ax-ca"
		}
		if err := identity.NewCA(*dir, ca, valid(3650)); err != nil {
			return err
		}
		fmt.Fprintf(out, "CA %s in %s (keep ca.key offline once hosts are issued)\n", ca, *dir)
		return nil
	case "issue":
		if fs.NArg() != 0 || *name == "" {
			return errors.New("pki issue: want --name NAME")
		}
		r := identity.RoleHost
		switch *role {
		case "host":
		case "witness":
			r = identity.RoleWitness
		default:
			return fmt.Errorf("pki issue: role %q, want host or witness", *role)
		}
		o := *outDir
		if o == "" {
			o = *dir
		}
		if err := identity.Issue(*dir, o, *name, r, valid(825)); err != nil {
			return err
		}
		fmt.Fprintf(out, "%s %s: %s, %s\n", *role, *name, identity.CertPath(o, *name), identity.KeyPath(o, *name))
		return nil
	case "psk":
		if fs.NArg() != 1 {
			return errors.New("pki psk: want the key file to write")
		}
		return writePSK(fs.Arg(0))
	}
	return fmt.Errorf("pki: unknown command %q\n%s", args[0], PKIUsage)
}

func writePSK(path string) error {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	// Its directory, if new, is as private as the key (/etc/ax on a fresh host).
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("pki psk: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("pki psk: %w (an existing key is never overwritten)", err)
	}
	if _, err := fmt.Fprintln(f, hex.EncodeToString(key)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
