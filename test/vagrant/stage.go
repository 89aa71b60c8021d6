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

// The lab's machines by host name, and what each one gets: an identity
// (hypervisors and the witness), the package, the guest image
// (hypervisors), the ledger client (the client).
var machines = []struct {
	host, role           string
	deb, guest, workload bool
}{
	{"a", "host", true, true, false},
	{"b", "host", true, true, false},
	{"w", "witness", true, false, false},
	{"c", "", false, false, true},
}

// Stage fills cfg.Dir with one directory per machine (a, b, w, c) of what
// provision.sh installs there, so that each machine receives only its own:
// the .deb, the CA certificate and the machine's own certificate and key
// (a fresh CA made here, at lab bring-up: none ships in the package, each
// lab gets its own, and its key stays on this host), the lab guest's kernel
// and initrd, the ledger client. Dir is emptied first.
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
	img, err := image.Build(ctx, image.Config{
		CacheDir: cfg.CacheDir,
		Binaries: []string{filepath.Join(cfg.BinDir, "ax-workload"), filepath.Join(cfg.BinDir, "ax-agent")},
		Files:    map[string][]byte{"/etc/ax/agent.json": []byte(image.LabAgentConfig)},
		Log:      cfg.Log,
	})
	if err != nil {
		return fmt.Errorf("stage: guest image: %w", err)
	}
	// The identities, made as an operator would: axctl pki.
	var out bytes.Buffer
	if err := ctl.PKI([]string{"init", "--dir", cfg.CADir, "--name", "ax-vagrant-lab"}, &out); err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	for _, m := range machines {
		dir := filepath.Join(cfg.Dir, m.host)
		files := map[string]string{filepath.Join(cfg.CADir, "ca.crt"): filepath.Join(dir, "pki", "ca.crt")}
		if m.role != "" {
			if err := ctl.PKI([]string{"issue", "--dir", cfg.CADir, "--out", filepath.Join(dir, "pki"), "--name", m.host, "--role", m.role}, &out); err != nil {
				return fmt.Errorf("stage: %w", err)
			}
		}
		if m.deb {
			files[cfg.Deb] = filepath.Join(dir, filepath.Base(cfg.Deb))
		}
		if m.guest {
			files[img.Kernel] = filepath.Join(dir, "guest", "vmlinuz")
			files[img.Initrd] = filepath.Join(dir, "guest", "initrd")
		}
		if m.workload {
			files[filepath.Join(cfg.BinDir, "ax-workload")] = filepath.Join(dir, "ax-workload")
		}
		for from, to := range files {
			if err := copyFile(from, to, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
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
