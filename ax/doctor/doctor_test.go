package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/netbuffer"
)

var errDenied = &fs.PathError{Op: "open", Path: "/x", Err: fs.ErrPermission}

// goodHost answers like a root-run host with everything AX wants.
func goodHost() *Host {
	return &Host{
		Root:          true,
		KernelRelease: func() (string, error) { return "6.18.4-amd64", nil },
		KernelConfig: func(string) (map[string]string, error) {
			return map[string]string{"CONFIG_BPF_SYSCALL": "y", "CONFIG_NET_SCH_INGRESS": "m", "CONFIG_NET_CLS_BPF": "m", "CONFIG_MEM_SOFT_DIRTY": "y", "CONFIG_VHOST_VSOCK": "m"}, nil
		},
		SoftDirty:     func() bool { return true },
		PagemapScan:   func() error { return nil },
		ChecksumKfunc: func() bool { return true },
		OpenDevice:    func(string) error { return nil },
		ReadFile: func(path string) ([]byte, error) {
			return []byte("processor\t: 0\nflags\t\t: fpu vme vmx sse\n"), nil
		},
		FSType:      func(string) (int64, error) { return unix.BPF_FS_MAGIC, nil },
		VsockSocket: func() error { return nil },
		LookPath:    func(name string) (string, error) { return "/usr/bin/" + name, nil },
		Output: func(_ context.Context, name string, _ ...string) ([]byte, error) {
			return []byte(filepath.Base(name) + " 9.0.0\nCopyright\n"), nil
		},
		QMPCommands: func(context.Context, string) ([]string, error) {
			return append([]string{"device_add"}, QMPNeeded...), nil
		},
		CheckPrivate: func(string) error { return nil },
		ReadKeyFile:  func(string) ([]byte, error) { return make([]byte, 32), nil },
		LoadIdentity: func(identity.Files) (*identity.Identity, error) { return nil, errors.New("no identity in this fake") },
		DialTCP:      func(context.Context, string) error { return nil },
		Now:          time.Now,
	}
}

// row finds the report's row whose What starts with prefix.
func row(t *testing.T, r Report, prefix string) Check {
	t.Helper()
	for _, c := range r.Checks {
		if strings.HasPrefix(c.What, prefix) {
			return c
		}
	}
	t.Fatalf("no row %q in %+v", prefix, r.Checks)
	return Check{}
}

// testPKI makes a CA and a host certificate valid for validFor.
func testPKI(t *testing.T, name string, validFor time.Duration) identity.Files {
	t.Helper()
	dir := t.TempDir()
	if err := identity.NewCA(dir, "test-ca", time.Hour*24*365); err != nil {
		t.Fatal(err)
	}
	if err := identity.Issue(dir, dir, name, identity.RoleHost, validFor); err != nil {
		t.Fatal(err)
	}
	return identity.Files{CA: identity.CAPath(dir), Cert: identity.CertPath(dir, name), Key: identity.KeyPath(dir, name)}
}

// Each probe against fakes: present, absent, failing, and refused to a
// non-root user.
func TestProbes(t *testing.T) {
	year := testPKI(t, "a", 365*24*time.Hour)
	week := testPKI(t, "b", 7*24*time.Hour)
	pskDir := t.TempDir()
	goodPSK, loosePSK := filepath.Join(pskDir, "good.psk"), filepath.Join(pskDir, "loose.psk")
	os.WriteFile(goodPSK, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	os.WriteFile(loosePSK, []byte(strings.Repeat("ab", 32)+"\n"), 0o644)
	os.Chmod(loosePSK, 0o644) // whatever the umask

	for _, tc := range []struct {
		name   string
		change func(h *Host, cfg *Config)
		row    string
		want   Status
		why    string // a substring of the row's Why
		fix    string // a substring of its Fix
	}{
		{"soft-dirty works", nil, "soft-dirty", Yes, "bit is set", ""},
		{"soft-dirty off", func(h *Host, _ *Config) {
			h.SoftDirty = func() bool { return false }
			h.KernelConfig = func(string) (map[string]string, error) { return map[string]string{"CONFIG_MEM_SOFT_DIRTY": "n"}, nil }
		}, "soft-dirty", No, "CONFIG_MEM_SOFT_DIRTY is not set", "CONFIG_MEM_SOFT_DIRTY=y"},
		{"pagemap scan works", nil, "PAGEMAP_SCAN", Yes, "with the ioctl", ""},
		{"pagemap scan missing", func(h *Host, _ *Config) { h.PagemapScan = func() error { return unix.ENOTTY } }, "PAGEMAP_SCAN", No, "no PAGEMAP_SCAN ioctl", "6.7"},
		{"pagemap scan without soft-dirty category", func(h *Host, _ *Config) { h.PagemapScan = func() error { return unix.EINVAL } }, "PAGEMAP_SCAN", No, "no soft-dirty category", "newer kernel"},
		{"pagemap scan fails", func(h *Host, _ *Config) { h.PagemapScan = func() error { return unix.EFAULT } }, "PAGEMAP_SCAN", Unknown, "bad address", ""},
		{"pagemap scan without soft-dirty", func(h *Host, _ *Config) { h.SoftDirty = func() bool { return false } }, "PAGEMAP_SCAN", No, "tracks no soft-dirty bits", "CONFIG_MEM_SOFT_DIRTY"},
		{"tcx on 6.18", nil, "output gate attached with tcx", Yes, "6.18 ≥ 6.6", ""},
		{"tcx on 6.1", func(h *Host, _ *Config) {
			h.KernelRelease = func() (string, error) { return "6.1.0-28-cloud-amd64", nil }
		}, "output gate attached with tcx", No, "6.1 < 6.6", "clsact"},
		{"tcx on 6.6", func(h *Host, _ *Config) { h.KernelRelease = func() (string, error) { return "6.6", nil } }, "output gate attached with tcx", Yes, "6.6 ≥ 6.6", ""},
		{"tcx on an unreadable release", func(h *Host, _ *Config) { h.KernelRelease = func() (string, error) { return "linux", nil } }, "output gate attached with tcx", Unknown, `"linux"`, ""},
		{"tcx without bpf", func(h *Host, _ *Config) {
			h.KernelConfig = func(string) (map[string]string, error) { return map[string]string{}, nil }
		}, "output gate attached with tcx", No, "CONFIG_BPF_SYSCALL is not set", "CONFIG_BPF_SYSCALL=y"},
		{"clsact as modules", nil, "output gate attached with clsact", Yes, "CONFIG_NET_SCH_INGRESS=m", ""},
		{"clsact missing", func(h *Host, _ *Config) {
			h.KernelConfig = func(string) (map[string]string, error) {
				return map[string]string{"CONFIG_BPF_SYSCALL": "y", "CONFIG_NET_CLS_BPF": "y", "CONFIG_NET_SCH_INGRESS": "n"}, nil
			}
		}, "output gate attached with clsact", No, "CONFIG_NET_SCH_INGRESS=n", "CONFIG_NET_SCH_INGRESS"},
		{"clsact without a config", func(h *Host, _ *Config) {
			h.KernelConfig = func(string) (map[string]string, error) { return nil, fs.ErrNotExist }
		}, "output gate attached with clsact", Unknown, "no build config", ""},
		{"xdp live frames on 5.10", func(h *Host, _ *Config) { h.KernelRelease = func() (string, error) { return "5.10.0", nil } }, "release by XDP", No, "5.10 < 5.18", "5.18"},
		{"xdp live frames on 5.18", func(h *Host, _ *Config) { h.KernelRelease = func() (string, error) { return "5.18.1", nil } }, "release by XDP", Yes, "5.18 ≥ 5.18", ""},
		{"checksum kfunc", nil, "checksum completion", Yes, "bpf_cast_to_kern_ctx", ""},
		{"no checksum kfunc", func(h *Host, _ *Config) { h.ChecksumKfunc = func() bool { return false } }, "checksum completion", No, "must not offload", "csum=off"},
		{"bpffs", nil, "bpffs", Yes, "mounted", ""},
		{"bpffs is sysfs", func(h *Host, _ *Config) { h.FSType = func(string) (int64, error) { return unix.SYSFS_MAGIC, nil } }, "bpffs", No, "not a bpf file system", "mount -t bpf"},
		{"no /sys/fs/bpf", func(h *Host, _ *Config) { h.FSType = func(string) (int64, error) { return 0, fs.ErrNotExist } }, "bpffs", No, "not exist", "mount -t bpf"},
		{"vsock", nil, "vsock", Yes, "AF_VSOCK sockets work", ""},
		{"no vhost-vsock module loaded", func(h *Host, _ *Config) {
			h.OpenDevice = func(p string) error { return &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist} }
		}, "vsock", No, "no /dev/vhost-vsock", "modprobe vhost_vsock"},
		{"vhost-vsock not built", func(h *Host, _ *Config) {
			h.OpenDevice = func(p string) error { return &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist} }
			h.KernelConfig = func(string) (map[string]string, error) { return map[string]string{"CONFIG_VHOST_VSOCK": "n"}, nil }
		}, "vsock", No, "CONFIG_VHOST_VSOCK is not set", "a kernel with CONFIG_VHOST_VSOCK"},
		{"vhost-vsock refused to a user", func(h *Host, _ *Config) {
			h.Root, h.OpenDevice = false, func(string) error { return errDenied }
		}, "vsock", Unknown, "needs root", "as root"},
		{"vhost-vsock refused to root", func(h *Host, _ *Config) { h.OpenDevice = func(string) error { return errDenied } }, "vsock", No, "permission denied", "modprobe"},
		{"no AF_VSOCK", func(h *Host, _ *Config) { h.VsockSocket = func() error { return unix.EAFNOSUPPORT } }, "vsock", No, "AF_VSOCK socket does not", "modprobe vsock"},
		{"kvm", nil, "KVM", Yes, "vmx and /dev/kvm opens", ""},
		{"kvm on amd", func(h *Host, _ *Config) {
			h.ReadFile = func(string) ([]byte, error) { return []byte("flags\t: svm sse\n"), nil }
		}, "KVM", Yes, "svm", ""},
		{"kvm without vmx (nested, as here)", func(h *Host, _ *Config) {
			h.ReadFile = func(string) ([]byte, error) { return []byte("flags\t: fpu sse\nbugs\t: vmx\n"), nil }
		}, "KVM", No, "neither vmx nor svm", "nested"},
		{"no /dev/kvm", func(h *Host, _ *Config) {
			h.OpenDevice = func(p string) error { return &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist} }
		}, "KVM", No, "no /dev/kvm", "modprobe kvm_intel"},
		{"/dev/kvm refused to a user", func(h *Host, _ *Config) {
			h.Root, h.OpenDevice = false, func(string) error { return errDenied }
		}, "KVM", Unknown, "needs root", "as root"},
		{"no cpuinfo", func(h *Host, _ *Config) { h.ReadFile = func(string) ([]byte, error) { return nil, fs.ErrNotExist } }, "KVM", Unknown, "not exist", ""},
		{"qemu", nil, "QEMU (", Yes, "qemu-system-x86_64 9.0.0", ""},
		{"qemu elsewhere", func(_ *Host, cfg *Config) { cfg.QEMU = "qemu-kvm" }, "QEMU (qemu-kvm)", Yes, "/usr/bin/qemu-kvm: qemu-kvm 9.0.0", ""},
		{"no qemu", func(h *Host, _ *Config) {
			h.LookPath = func(n string) (string, error) { return "", &exec.Error{Name: n, Err: exec.ErrNotFound} }
		}, "QEMU (", No, "not found", "apt install qemu-system-x86"},
		{"no qemu, no qmp", func(h *Host, _ *Config) {
			h.LookPath = func(n string) (string, error) { return "", &exec.Error{Name: n, Err: exec.ErrNotFound} }
			h.QMPCommands = func(context.Context, string) ([]string, error) { panic("asked a QEMU that is not there") }
		}, "QMP commands", Unknown, "skipped: no QEMU", ""},
		{"qemu --version fails", func(h *Host, _ *Config) {
			h.Output = func(context.Context, string, ...string) ([]byte, error) { return nil, errors.New("exit status 1") }
		}, "QEMU (", No, "--version: exit status 1", "reinstall"},
		{"qmp complete", nil, "QMP commands", Yes, fmt.Sprintf("all %d present", len(QMPNeeded)), ""},
		{"qmp lacks commands", func(h *Host, _ *Config) {
			h.QMPCommands = func(context.Context, string) ([]string, error) {
				return []string{"stop", "cont", "migrate-incoming"}, nil
			}
		}, "QMP commands", No, "missing: xen-save-devices-state, migrate-set-capabilities, x-blockdev-change", "QEMU ≥ 7.2"},
		{"qmp fails", func(h *Host, _ *Config) {
			h.QMPCommands = func(context.Context, string) ([]string, error) {
				return nil, errors.New("qmp greeting: unexpected EOF")
			}
		}, "QMP commands", Unknown, "unexpected EOF", "-qmp stdio"},
		{"virsh", nil, "libvirt client", Yes, "/usr/bin/virsh: virsh 9.0.0", ""},
		{"no virsh", func(h *Host, _ *Config) {
			h.LookPath = func(n string) (string, error) {
				if n == "virsh" {
					return "", exec.ErrNotFound
				}
				return "/usr/sbin/" + n, nil
			}
		}, "libvirt client", No, "virsh not installed", "libvirt-clients"},
		{"virtqemud only", func(h *Host, _ *Config) {
			h.LookPath = func(n string) (string, error) {
				if n == "libvirtd" {
					return "", exec.ErrNotFound
				}
				return "/usr/sbin/" + n, nil
			}
		}, "libvirt daemon", Yes, "/usr/sbin/virtqemud", ""},
		{"no libvirt daemon", func(h *Host, _ *Config) {
			h.LookPath = func(n string) (string, error) { return "", exec.ErrNotFound }
		}, "libvirt daemon", No, "libvirtd or virtqemud not installed", "libvirt-daemon-system"},
		{"no identity given", nil, "identity", Unknown, "none given", "--psk-file"},
		{"psk", func(h *Host, cfg *Config) {
			cfg.PSKFile = goodPSK
			h.CheckPrivate, h.ReadKeyFile = identity.CheckPrivate, identity.ReadKeyFile
		}, "pre-shared key", Yes, "32 bytes of key", ""},
		{"psk readable by others", func(h *Host, cfg *Config) {
			cfg.PSKFile = loosePSK
			h.CheckPrivate, h.ReadKeyFile = identity.CheckPrivate, identity.ReadKeyFile
		}, "pre-shared key", No, "mode 0644", "chmod 600 " + loosePSK},
		{"psk missing", func(h *Host, cfg *Config) {
			cfg.PSKFile = filepath.Join(pskDir, "none")
			h.CheckPrivate, h.ReadKeyFile = identity.CheckPrivate, identity.ReadKeyFile
		}, "pre-shared key", No, "no such file", "axctl pki psk"},
		{"psk too short", func(h *Host, cfg *Config) {
			cfg.PSKFile = goodPSK
			h.ReadKeyFile = func(string) ([]byte, error) { return nil, errors.New("the pre-shared key has 4 bytes") }
		}, "pre-shared key", No, "4 bytes", "axctl pki psk"},
		{"psk refused to a user", func(h *Host, cfg *Config) {
			cfg.PSKFile, h.Root = goodPSK, false
			h.ReadKeyFile = func(string) ([]byte, error) { return nil, fmt.Errorf("identity: %w", errDenied) }
		}, "pre-shared key", Unknown, "needs root", "as root"},
		{"tls key", func(h *Host, cfg *Config) {
			cfg.Identity, h.CheckPrivate, h.LoadIdentity = year, identity.CheckPrivate, identity.Load
		}, "private key", Yes, "owner only", ""},
		{"tls key readable by others", func(h *Host, cfg *Config) {
			cfg.Identity, h.LoadIdentity = year, identity.Load
			h.CheckPrivate = func(p string) error { return fmt.Errorf("identity: %s has mode 0640", p) }
		}, "private key", No, "mode 0640", "chmod 600 " + year.Key},
		{"tls certificate", func(h *Host, cfg *Config) {
			cfg.Identity, h.CheckPrivate, h.LoadIdentity = year, identity.CheckPrivate, identity.Load
		}, "certificate", Yes, "ax-host a, chains to " + year.CA + ", valid until", ""},
		{"tls certificate expiring", func(h *Host, cfg *Config) {
			cfg.Identity, h.CheckPrivate, h.LoadIdentity = week, identity.CheckPrivate, identity.Load
		}, "certificate", Yes, "renew it now", "axctl pki issue --name b"},
		{"tls certificate from another CA", func(h *Host, cfg *Config) {
			cfg.Identity, h.CheckPrivate, h.LoadIdentity = year, identity.CheckPrivate, identity.Load
			cfg.Identity.CA = week.CA
		}, "certificate", No, "own certificate", "axctl pki issue"},
		{"tls certificate refused to a user", func(h *Host, cfg *Config) {
			cfg.Identity, h.Root = year, false
			h.LoadIdentity = func(identity.Files) (*identity.Identity, error) { return nil, fmt.Errorf("identity: %w", errDenied) }
		}, "certificate", Unknown, "needs root", "as root"},
		{"peer reachable", func(_ *Host, cfg *Config) {
			cfg.Peers = []Peer{{Name: "b", Repl: "10.0.1.2:7000", Mgmt: "10.0.0.2:7001"}}
		}, "peer b replication 10.0.1.2:7000 (TCP)", Yes, "opened", ""},
		{"peer unreachable", func(h *Host, cfg *Config) {
			cfg.Peers = []Peer{{Name: "b", Repl: "10.0.1.2:7000", Mgmt: "10.0.0.2:7001"}}
			h.DialTCP = func(_ context.Context, addr string) error { return fmt.Errorf("dial tcp %s: connection refused", addr) }
		}, "peer b replication", No, "connection refused", "--repl-listen 10.0.1.2:7000"},
		{"peer heartbeats", func(_ *Host, cfg *Config) {
			cfg.Peers = []Peer{{Name: "b", Repl: "10.0.1.2:7000", Mgmt: "10.0.0.2:7001"}}
		}, "peer b heartbeats 10.0.1.2:7000, 10.0.0.2:7001 (UDP)", Unknown, "cannot be probed without the partner's cooperation", "axctl status"},
		{"witness reachable", func(_ *Host, cfg *Config) { cfg.WitnessAddr = "10.0.0.9:7100" }, "witness 10.0.0.9:7100", Yes, "opened", ""},
		{"witness unreachable", func(h *Host, cfg *Config) {
			cfg.WitnessAddr = "10.0.0.9:7100"
			h.DialTCP = func(ctx context.Context, addr string) error {
				if _, ok := ctx.Deadline(); !ok {
					return errors.New("dial without a deadline")
				}
				return errors.New("i/o timeout")
			}
		}, "witness", No, "i/o timeout", "axd --witness"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, cfg := goodHost(), Config{}
			if tc.change != nil {
				tc.change(h, &cfg)
			}
			r := Run(context.Background(), cfg, h)
			c := row(t, r, tc.row)
			if c.Status != tc.want || !strings.Contains(c.Why, tc.why) || !strings.Contains(c.Fix, tc.fix) {
				t.Errorf("row %q = %s, why %q, fix %q; want %s, why with %q, fix with %q", c.What, c.Status, c.Why, c.Fix, tc.want, tc.why, tc.fix)
			}
			if c.Status == No && c.Fix == "" {
				t.Errorf("row %q says no without a fix", c.What)
			}
			if r.Yes+r.No+r.Unknown != len(r.Checks) {
				t.Errorf("counts %d+%d+%d for %d rows", r.Yes, r.No, r.Unknown, len(r.Checks))
			}
		})
	}
}

// Without peers or a witness nothing is dialled.
func TestNoDialsUnasked(t *testing.T) {
	h := goodHost()
	h.DialTCP = func(_ context.Context, addr string) error {
		t.Errorf("dialled %s unasked", addr)
		return nil
	}
	for _, c := range Run(context.Background(), Config{}, h).Checks {
		if c.Area == "network" {
			t.Errorf("unasked network row %+v", c)
		}
	}
}

func TestReport(t *testing.T) {
	h := goodHost()
	h.SoftDirty = func() bool { return false }
	h.Root = false
	r := Run(context.Background(), Config{WitnessAddr: "w:1"}, h)

	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(text.String(), "\n"), "\n")
	if !strings.HasPrefix(lines[0], "AREA") || !strings.Contains(lines[0], "HERE") {
		t.Errorf("header %q", lines[0])
	}
	want := fmt.Sprintf("summary: %d yes, %d no, %d unknown (kernel 6.18.4-amd64); not root", r.Yes, r.No, r.Unknown)
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, want) {
		t.Errorf("last line %q, want %q…", last, want)
	}
	fixes := 0
	for _, c := range r.Checks {
		if c.Fix != "" && c.Status != Yes {
			fixes++
		}
	}
	// A line per row, one per fix, the header and the summary.
	if len(lines) != len(r.Checks)+fixes+2 {
		t.Errorf("%d lines for %d rows and %d fixes:\n%s", len(lines), len(r.Checks), fixes, text.String())
	}
	// The soft-dirty row and its fix on the next line, aligned under WHY.
	for i, l := range lines {
		if strings.Contains(l, "soft-dirty page tracking") {
			f := strings.Fields(l)
			if f[0] != "kernel" || !strings.Contains(l, "  no  ") {
				t.Errorf("row %q", l)
			}
			why := strings.Index(lines[0], "WHY")
			if strings.Index(lines[i+1], "fix: ") != why || strings.TrimSpace(lines[i+1][:why]) != "" {
				t.Errorf("fix line %q not under WHY (column %d)", lines[i+1], why)
			}
		}
	}
	if r.Yes == 0 || r.No == 0 {
		t.Errorf("report %+v", r)
	}

	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back struct {
		Report
		Summary string `json:"summary"`
	}
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if back.Summary != r.Summary() || back.Kernel != r.Kernel || back.No != r.No || len(back.Checks) != len(r.Checks) {
		t.Errorf("JSON round trip: %+v, want %+v", back, r)
	}
	for i := range r.Checks {
		if back.Checks[i] != r.Checks[i] {
			t.Errorf("JSON row %d: %+v, want %+v", i, back.Checks[i], r.Checks[i])
		}
	}
	if !strings.Contains(js.String(), `"status": "no"`) {
		t.Errorf("JSON statuses are not words:\n%s", js.String())
	}
}

// An error with newlines or tabs stays on its row.
func TestWriteTextOneLinePerRow(t *testing.T) {
	r := Report{Checks: []Check{{Area: "qemu", What: "x", Status: Unknown, Why: "a\n\tb", Fix: "c\nd"}}, Unknown: 1}
	var b bytes.Buffer
	r.WriteText(&b)
	if got := strings.Count(b.String(), "\n"); got != 4 {
		t.Errorf("%d lines:\n%s", got, b.String())
	}
	if !strings.Contains(b.String(), "a b") || !strings.Contains(b.String(), "fix: c d") {
		t.Errorf("%s", b.String())
	}
}

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		in           string
		major, minor int
		err          bool
	}{
		{in: "6.18.44-fc-v1045", major: 6, minor: 18},
		{in: "6.1.0-28-cloud-amd64", major: 6, minor: 1},
		{in: "5.18", major: 5, minor: 18},
		{in: "6.7-rc1", major: 6, minor: 7},
		{in: "6", err: true},
		{in: "x.y", err: true},
		{in: "", err: true},
	} {
		major, minor, err := parseVersion(tc.in)
		if (err != nil) != tc.err || major != tc.major || minor != tc.minor {
			t.Errorf("parseVersion(%q) = %d, %d, %v", tc.in, major, minor, err)
		}
	}
}

func TestParseKernelConfig(t *testing.T) {
	cfg, err := parseKernelConfig(strings.NewReader(`#
# Automatically generated file; DO NOT EDIT.
CONFIG_BPF_SYSCALL=y
CONFIG_NET_SCH_INGRESS=m
# CONFIG_MEM_SOFT_DIRTY is not set
CONFIG_LOCALVERSION=""
# a comment that is not set
`))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"CONFIG_BPF_SYSCALL": "y", "CONFIG_NET_SCH_INGRESS": "m", "CONFIG_MEM_SOFT_DIRTY": "n", "CONFIG_LOCALVERSION": `""`}
	if fmt.Sprint(cfg) != fmt.Sprint(want) {
		t.Errorf("config %v, want %v", cfg, want)
	}
	k := kernelFacts{config: cfg}
	for name, v := range map[string]string{"CONFIG_BPF_SYSCALL": "y", "CONFIG_MEM_SOFT_DIRTY": "n", "CONFIG_VHOST_VSOCK": "n"} {
		if got := k.option(name); got != v {
			t.Errorf("option %s = %q, want %q", name, got, v)
		}
	}
	if got := (kernelFacts{configErr: fs.ErrNotExist}).option("CONFIG_BPF_SYSCALL"); got != "" {
		t.Errorf("option without a config = %q", got)
	}
}

// QMP conversations as QEMU holds them, and as a broken one would.
func TestConverseQMP(t *testing.T) {
	const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}` + "\n"
	for _, tc := range []struct {
		name, from string
		want       []string
		err        string
	}{
		{name: "qemu", from: greeting + `{"return": {}}` + "\n" + `{"return": [{"name": "stop"}, {"name": "cont"}]}` + "\n", want: []string{"stop", "cont"}},
		{name: "an event between", from: greeting + `{"return": {}}` + "\n" + `{"event": "RESUME", "timestamp": {}}` + "\n" + `{"return": [{"name": "quit"}]}` + "\n", want: []string{"quit"}},
		{name: "no greeting", from: `{"return": {}}` + "\n", err: "did not greet"},
		{name: "refused", from: greeting + `{"error": {"class": "CommandNotFound", "desc": "nope"}}` + "\n", err: "qmp qmp_capabilities: CommandNotFound: nope"},
		{name: "garbage", from: greeting + "QEMU 7.2 monitor\n", err: "not a QMP message"},
		{name: "eof", from: greeting + `{"return": {}}` + "\n", err: "qmp query-commands: unexpected EOF"},
		{name: "silent", from: "", err: "qmp greeting: unexpected EOF"},
		{name: "bad list", from: greeting + `{"return": {}}` + "\n" + `{"return": {"name": "stop"}}` + "\n", err: "qmp query-commands: json"},
		{name: "line too long", from: greeting + `{"return": "` + strings.Repeat("x", maxQMPLine) + `"}` + "\n", err: "too long"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var sent bytes.Buffer
			got, err := converseQMP(strings.NewReader(tc.from), &sent)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one with %q", err, tc.err)
				}
				return
			}
			if err != nil || fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("commands %v, %v; want %v", got, err, tc.want)
			}
			want := `{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"query-commands"}` + "\n" + `{"execute":"quit"}` + "\n"
			if sent.String() != want {
				t.Errorf("sent %q, want %q", sent.String(), want)
			}
		})
	}
}

// The real probes on this machine agree with what the packages that use
// the features detect themselves.
func TestRealMachine(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU when present")
	}
	r := Run(context.Background(), Config{}, nil)
	if r.Root != (os.Geteuid() == 0) {
		t.Errorf("root %v", r.Root)
	}
	for _, c := range r.Checks {
		if c.Status != Yes && c.Status != No && c.Status != Unknown || c.Why == "" {
			t.Errorf("row %+v", c)
		}
	}
	yesNo := func(b bool) Status {
		if b {
			return Yes
		}
		return No
	}
	if c := row(t, r, "soft-dirty"); c.Status != yesNo(dirty.SoftDirtyAvailable()) {
		t.Errorf("soft-dirty row %+v, ax/dirty says %v", c, dirty.SoftDirtyAvailable())
	}
	if !dirty.SoftDirtyAvailable() {
		if c := row(t, r, "PAGEMAP_SCAN"); c.Status != No {
			t.Errorf("PAGEMAP_SCAN without soft-dirty: %+v", c)
		}
	}
	if c := row(t, r, "checksum completion"); c.Status != yesNo(netbuffer.CompletesChecksums()) {
		t.Errorf("checksum row %+v, netbuffer says %v", c, netbuffer.CompletesChecksums())
	}
	var u unix.Utsname
	unix.Uname(&u)
	if r.Kernel != unix.ByteSliceToString(u.Release[:]) {
		t.Errorf("kernel %q", r.Kernel)
	}
	if _, err := os.Stat("/dev/vhost-vsock"); errors.Is(err, fs.ErrNotExist) {
		if c := row(t, r, "vsock"); c.Status != No {
			t.Errorf("vsock row %+v without /dev/vhost-vsock", c)
		}
	}
	qemu := row(t, r, "QEMU (")
	qmp := row(t, r, "QMP commands")
	if _, err := exec.LookPath(DefaultQEMU); err != nil {
		if qemu.Status != No || qmp.Status != Unknown {
			t.Errorf("without QEMU: %+v, %+v", qemu, qmp)
		}
	} else if qemu.Status != Yes || !strings.Contains(qemu.Why, "QEMU emulator version") || qmp.Status == Unknown {
		t.Errorf("with QEMU: %+v, %+v", qemu, qmp)
	}
}

// The PAGEMAP_SCAN probe agrees with the kernel's version: the ioctl came
// in 6.7.
func TestPagemapScanProbe(t *testing.T) {
	rel, err := kernelRelease()
	if err != nil {
		t.Fatal(err)
	}
	k := kernelFacts{}
	if k.major, k.minor, err = parseVersion(rel); err != nil {
		t.Skip(err)
	}
	err = dirty.PagemapScanProbe()
	if k.atLeast(6, 7) && errors.Is(err, unix.ENOTTY) || !k.atLeast(6, 7) && !errors.Is(err, unix.ENOTTY) {
		t.Errorf("PAGEMAP_SCAN on %s: %v", rel, err)
	}
}
