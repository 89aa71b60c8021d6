package openstack

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// make openstack-up and openstack-down run up.sh and down.sh around
// ax-openstack (whose cloud is openstack.Start, which TestOpenStackLevels
// runs). Here a stand-in that says it is up and waits for SIGTERM, as
// ax-openstack does, checks the scripts: up waits for "up:", a second up
// refuses, down stops it by its pid, a second down has nothing to stop.
func TestOpenStackUpDown(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "ax-openstack")
	stand := "#!/bin/sh\n[ -d \"$1\" ] || exit 2\ntrap 'echo stopping; exit 0' TERM\necho \"2026/12/06 13:00:00 up: OS_CLOUD=ax\"\nwhile :; do sleep 0.1; done\n"
	if err := os.WriteFile(bin, []byte(stand), 0o755); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	script := func(name string, args ...string) (string, error) {
		out, err := exec.Command("sh", append([]string{name}, args...)...).CombinedOutput()
		return string(out), err
	}
	out, err := script("up.sh", bin, state)
	if err != nil || !strings.Contains(out, "openstack-up: OS_CLOUD=ax") {
		t.Fatalf("up.sh: %v\n%s", err, out)
	}
	pid, err := os.ReadFile(filepath.Join(state, "pid"))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := script("up.sh", bin, state); err == nil || !strings.Contains(out, "already running") {
		t.Errorf("a second up.sh: %v\n%s", err, out)
	}
	if out, err := script("down.sh", state); err != nil || !strings.Contains(out, "openstack-down: stopped") {
		t.Fatalf("down.sh: %v\n%s", err, out)
	}
	if _, err := os.Stat("/proc/" + strings.TrimSpace(string(pid))); err == nil {
		if st, _ := os.ReadFile("/proc/" + strings.TrimSpace(string(pid)) + "/stat"); !strings.Contains(string(st), ") Z ") {
			t.Errorf("pid %s still runs after down.sh", strings.TrimSpace(string(pid)))
		}
	}
	if out, err := script("down.sh", state); err != nil || !strings.Contains(out, "nothing to stop") {
		t.Errorf("a second down.sh: %v\n%s", err, out)
	}
	// ax-openstack that ends before it is up: up.sh fails with its log.
	if err := os.WriteFile(bin, []byte("#!/bin/sh\necho 'ax-openstack: mariadb: no datadir'\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := script("up.sh", bin, state); err == nil || !strings.Contains(out, "mariadb: no datadir") {
		t.Errorf("up.sh of a cloud that failed: %v\n%s", err, out)
	}
}
