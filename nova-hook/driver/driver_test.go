package driver

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// python is Debian's python3, the one Nova's packages install into.
const python = "/usr/bin/python3"

// The adopting mixin's Python unit tests, against the installed Nova's
// task states and exceptions.
func TestAdoptMixinPython(t *testing.T) {
	if out, err := exec.Command(python, "-c", "import nova.virt.libvirt.driver").CombinedOutput(); err != nil {
		msg := "no Nova to test the adopting driver against (" + strings.TrimSpace(lastLine(string(out))) + "): make deps installs it (test/openstack/deps.sh)"
		if os.Getenv("AX_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	cmd := exec.Command(python, "-m", "unittest", "-v", "test_ax_adopt")
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("python3 -m unittest test_ax_adopt: %v", err)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
