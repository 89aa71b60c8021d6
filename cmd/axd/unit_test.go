package main

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// builtDeb builds the package once for every test that needs it (make deb's
// script), and returns its path; it skips in -short mode or without the tools.
func builtDeb(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("short: building the package compiles three programs (about 20 s)")
	}
	for _, tool := range []string{"dpkg-deb", "git", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed: the package cannot be built here", tool)
		}
	}
	debBuild.once.Do(func() {
		if debBuild.dir, debBuild.err = os.MkdirTemp("", "ax-deb-"); debBuild.err != nil {
			return
		}
		built, err := exec.Command("sh", "../../package/build-deb.sh", debBuild.dir).Output()
		if err != nil {
			debBuild.err = fmt.Errorf("package/build-deb.sh: %v\n%s", err, stderrOf(err))
			return
		}
		debBuild.path = strings.TrimSpace(string(built))
	})
	if debBuild.err != nil {
		t.Fatal(debBuild.err)
	}
	deb := debBuild.path
	if filepath.Dir(deb) != debBuild.dir || !regexp.MustCompile(`^ax_[0-9][A-Za-z0-9.+~]*_[a-z0-9]+\.deb$`).MatchString(filepath.Base(deb)) {
		t.Fatalf("build-deb.sh made %q, want %s/ax_VERSION_ARCH.deb", deb, debBuild.dir)
	}
	return deb
}

var debBuild struct {
	once      sync.Once
	dir, path string
	err       error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if debBuild.dir != "" {
		os.RemoveAll(debBuild.dir)
	}
	os.Exit(code)
}

// The Debian package (package/build-deb.sh, which make deb runs) holds the
// programs, units, defaults and docs; its units pass systemd-analyze verify;
// it carries no key material and no test code; lintian finds no error.
func TestDebianPackage(t *testing.T) {
	deb := builtDeb(t)
	root := filepath.Join(t.TempDir(), "root")
	dpkgDeb(t, "-x", deb, root)

	t.Run("fields", func(t *testing.T) {
		info := dpkgDeb(t, "--info", deb)
		for _, want := range []*regexp.Regexp{
			regexp.MustCompile(`(?m)^ Package: ax$`),
			regexp.MustCompile(`(?m)^ Version: (0\.0~git[0-9]{8}\.[0-9a-f]+|[0-9][A-Za-z0-9.+~]*)$`),
			regexp.MustCompile(`(?m)^ Architecture: (amd64|arm64|i386)$`),
			regexp.MustCompile(`(?m)^ Depends: .*\bqemu-system-x86\b`),
			regexp.MustCompile(`(?m)^ Recommends: .*\blibvirt-daemon-system\b`),
			regexp.MustCompile(`(?m)^ Maintainer: .+ <.+@.+>$`),
			regexp.MustCompile(`(?m)^ Installed-Size: [1-9][0-9]*$`),
		} {
			if !want.MatchString(info) {
				t.Errorf("control has no line matching %s:\n%s", want, info)
			}
		}
		if conffiles := dpkgDeb(t, "--info", deb, "conffiles"); strings.TrimSpace(conffiles) != "/etc/default/axd" {
			t.Errorf("conffiles = %q, want /etc/default/axd only", conffiles)
		}
	})

	t.Run("contents", func(t *testing.T) {
		listing := dpkgDeb(t, "--contents", deb)
		for _, tc := range []struct{ path, mode string }{
			{"./usr/sbin/axd", "-rwxr-xr-x root/root"},
			{"./usr/bin/axctl", "-rwxr-xr-x root/root"},
			{"./usr/bin/ax-agent", "-rwxr-xr-x root/root"},
			{"./usr/libexec/ax/ax-nova-hook", "-rwxr-xr-x root/root"},
			{"./etc/libvirt/hooks/qemu.d/ax -> /usr/libexec/ax/ax-nova-hook", "lrwxrwxrwx root/root"},
			{"./lib/systemd/system/axd.service", "-rw-r--r-- root/root"},
			{"./lib/systemd/system/ax-witness.service", "-rw-r--r-- root/root"},
			{"./etc/default/axd", "-rw-r--r-- root/root"},
			{"./usr/share/doc/ax/README.md", "-rw-r--r-- root/root"},
			{"./usr/share/doc/ax/copyright", "-rw-r--r-- root/root"},
			{"./usr/share/doc/ax/changelog.gz", "-rw-r--r-- root/root"},
			{"./usr/share/ax/nova/ax_adopt.py", "-rw-r--r-- root/root"},
		} {
			line := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(tc.mode) + ` .* ` + regexp.QuoteMeta(tc.path) + `$`)
			if !line.MatchString(listing) {
				t.Errorf("no %s with %s in the package:\n%s", tc.path, tc.mode, listing)
			}
		}
		// The programs are static: ax-agent runs in guests without a libc.
		for _, prog := range []string{"usr/sbin/axd", "usr/bin/axctl", "usr/bin/ax-agent", "usr/libexec/ax/ax-nova-hook"} {
			elf := readFile(t, filepath.Join(root, prog))
			if bytes.Contains(elf, []byte("/lib64/ld-linux")) || bytes.Contains(elf, []byte("/lib/ld-linux")) {
				t.Errorf("%s asks for a dynamic loader: build it with CGO_ENABLED=0", prog)
			}
		}
	})

	t.Run("no key material", func(t *testing.T) {
		keyName := regexp.MustCompile(`(?i)(\.key|\.crt|\.pem|\.p12|psk)$`)
		pemBlock := regexp.MustCompile(`-----BEGIN [A-Z ]*(PRIVATE KEY|CERTIFICATE)-----`)
		files := 0
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			// A symlink (the libvirt hook's) points into the installed
			// system, not the extracted package: its target is walked.
			if err != nil || d.IsDir() || d.Type()&fs.ModeSymlink != 0 {
				return err
			}
			files++
			rel, _ := filepath.Rel(root, path)
			if keyName.MatchString(rel) {
				t.Errorf("the package holds %s: keys and certificates are made on the host (axctl pki)", rel)
			}
			// Go's crypto code names PEM types; only non-program files are scanned.
			if data := readFile(t, path); !bytes.HasPrefix(data, []byte("\x7fELF")) && pemBlock.Match(data) {
				t.Errorf("%s holds a PEM key or certificate", rel)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if files < 9 {
			t.Errorf("walked %d files of the extracted package, want at least 9", files)
		}
	})

	t.Run("axctl links no test code", func(t *testing.T) {
		axctl := filepath.Join(root, "usr/bin/axctl")
		// Function names stay in a stripped Go binary: a linked lab shows.
		if bytes.Contains(readFile(t, axctl), []byte("github.com/axproject/ax/test/")) {
			t.Error("the packaged axctl links github.com/axproject/ax/test/...: build it without -tags lab")
		}
		out, err := exec.Command(axctl, "lab", "up").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "built without") {
			t.Errorf("packaged axctl lab up: %v\n%s", err, out)
		}
		out, err = exec.Command(axctl, "help").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "usage: axctl") {
			t.Errorf("packaged axctl help: %v\n%s", err, out)
		}
	})

	t.Run("units", func(t *testing.T) {
		for _, tc := range []struct {
			unit string
			want []string
		}{
			{"axd.service", []string{
				"Type=notify", "After=libvirtd.service network-online.target", "KillMode=process",
				"EnvironmentFile=-/etc/default/axd", "ExecStart=/usr/sbin/axd --socket /run/ax/axd.sock --state-dir /var/lib/ax $AXD_FLAGS",
				"RuntimeDirectory=ax", "StateDirectory=ax",
			}},
			{"ax-witness.service", []string{
				"Type=notify", "EnvironmentFile=-/etc/default/axd",
				"ExecStart=/usr/sbin/axd --witness --witness-state /var/lib/ax-witness/witness.json $AXW_FLAGS",
				"StateDirectory=ax-witness",
			}},
		} {
			t.Run(tc.unit, func(t *testing.T) {
				text := string(readFile(t, filepath.Join(root, "lib/systemd/system", tc.unit)))
				for _, line := range tc.want {
					if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(line) + `$`).MatchString(text) {
						t.Errorf("%s has no line %q", tc.unit, line)
					}
				}
				if _, err := exec.LookPath("systemd-analyze"); err != nil {
					t.Skip("systemd-analyze is not installed (apt-get install systemd): units not verified")
				}
				// verify needs ExecStart's program to exist: point it at the
				// packaged one. A unit whose program is missing must fail,
				// or the check proves nothing.
				staged := strings.ReplaceAll(text, "ExecStart=/usr/sbin/axd", "ExecStart="+filepath.Join(root, "usr/sbin/axd"))
				if out, err := analyzeVerify(t, tc.unit, staged); err != nil || out != "" {
					t.Errorf("systemd-analyze verify %s: %v\n%s", tc.unit, err, out)
				}
				missing := strings.ReplaceAll(text, "ExecStart=/usr/sbin/axd", "ExecStart="+filepath.Join(root, "no/such/axd"))
				if _, err := analyzeVerify(t, tc.unit, missing); err == nil {
					t.Errorf("systemd-analyze verify passed %s with a missing program", tc.unit)
				}
			})
		}
	})

	t.Run("lintian", func(t *testing.T) {
		if _, err := exec.LookPath("lintian"); err != nil {
			t.Skip("lintian is not installed (apt-get install lintian): package not linted")
		}
		out, err := exec.Command("lintian", "--fail-on", "error", deb).CombinedOutput()
		if err != nil {
			t.Errorf("lintian: %v\n%s", err, out)
		}
		t.Logf("lintian:\n%s", out)
	})
}

// analyzeVerify runs systemd-analyze verify on text saved as unit; it returns
// what systemd-analyze printed (warnings such as unknown keys exit 0).
func analyzeVerify(t *testing.T, unit, text string) (string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), unit)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func dpkgDeb(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("dpkg-deb", args...).Output()
	if err != nil {
		t.Fatalf("dpkg-deb %s: %v\n%s", strings.Join(args, " "), err, stderrOf(err))
	}
	return string(out)
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func stderrOf(err error) []byte {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.Stderr
	}
	return nil
}
