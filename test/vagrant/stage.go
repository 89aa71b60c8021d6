package vagrant

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/axproject/ax/ax/ctl"
	"github.com/axproject/ax/test/image"
)

// StageConfig says where the staged files come from.
type StageConfig struct {
	Dir      string // what provisioning uploads (the Vagrantfile's .vagrant/ax)
	CADir    string // the lab's CA, kept on this host (its key is never uploaded)
	Deb      string // the ax package (make deb)
	BinDir   string // ax-workload and ax-agent (make build)
	CacheDir string // the guest image cache (default image.DefaultCacheDir)
	Log      *slog.Logger
}

// Hosts that get an identity: the hypervisors and the witness.
var identities = []struct{ name, role string }{{"a", "host"}, {"b", "host"}, {"w", "witness"}}

// Stage fills cfg.Dir with what provision.sh installs: the .deb, a fresh
// CA's certificates for a, b and w (made here, at lab bring-up: none ships
// in the package, and each lab gets its own), the lab guest's kernel and
// initrd, and the ledger client. Dir is emptied first.
func Stage(ctx context.Context, cfg StageConfig) error {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Dir == "" || cfg.CADir == "" || cfg.Deb == "" || cfg.BinDir == "" {
		return fmt.Errorf("stage: want the stage and CA directories, the .deb and the bin directory")
	}
	for _, d := range []string{cfg.Dir, cfg.CADir} {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("stage: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "guest"), 0o755); err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	if err := copyFile(cfg.Deb, filepath.Join(cfg.Dir, filepath.Base(cfg.Deb)), 0o644); err != nil {
		return err
	}
	if err := copyFile(filepath.Join(cfg.BinDir, "ax-workload"), filepath.Join(cfg.Dir, "ax-workload"), 0o755); err != nil {
		return fmt.Errorf("%w (make build makes it)", err)
	}

	// The identities, made as an operator would: axctl pki.
	var out bytes.Buffer
	if err := ctl.PKI([]string{"init", "--dir", cfg.CADir, "--name", "ax-vagrant-lab"}, &out); err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	pki := filepath.Join(cfg.Dir, "pki")
	for _, id := range identities {
		if err := ctl.PKI([]string{"issue", "--dir", cfg.CADir, "--out", pki, "--name", id.name, "--role", id.role}, &out); err != nil {
			return fmt.Errorf("stage: %w", err)
		}
	}
	if err := copyFile(filepath.Join(cfg.CADir, "ca.crt"), filepath.Join(pki, "ca.crt"), 0o644); err != nil {
		return err
	}

	img, err := image.Build(ctx, image.Config{
		CacheDir: cfg.CacheDir,
		Binaries: []string{filepath.Join(cfg.BinDir, "ax-workload"), filepath.Join(cfg.BinDir, "ax-agent")},
		Files:    map[string][]byte{"/etc/ax/agent.json": []byte(image.LabAgentConfig)},
		Log:      cfg.Log,
	})
	if err != nil {
		return fmt.Errorf("stage: guest image: %w", err)
	}
	if err := copyFile(img.Kernel, filepath.Join(cfg.Dir, "guest", "vmlinuz"), 0o644); err != nil {
		return err
	}
	return copyFile(img.Initrd, filepath.Join(cfg.Dir, "guest", "initrd"), 0o644)
}

func copyFile(from, to string, mode os.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	o, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	if _, err := io.Copy(o, in); err != nil {
		o.Close()
		return fmt.Errorf("stage: copy %s: %w", from, err)
	}
	return o.Close()
}
