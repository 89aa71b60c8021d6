package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/test/openstack"
	"github.com/axproject/ax/test/testenv"
)

// requireOpenStack skips (fails under AX_REQUIRE_PRIVILEGED=1) without
// the lab's libvirt or the test cloud's packages (test/openstack/deps.sh,
// which also installs python3-libvirt for Nova's libvirt driver).
func requireOpenStack(t *testing.T) {
	t.Helper()
	requireLibvirt(t)
	testenv.RequireLong(t)
	for _, c := range append(openstack.Commands, "privsep-helper") {
		testenv.RequireCommand(t, c, "sh test/openstack/deps.sh (make deps)")
	}
	imports := "import " + strings.Join(append(openstack.PythonModules, openstack.LibvirtPythonModules...), ", ")
	if out, err := exec.Command("/usr/bin/python3", "-c", imports).CombinedOutput(); err != nil {
		why := fmt.Sprintf("python3: %s: %s (try: sh test/openstack/deps.sh)", imports, strings.TrimSpace(string(out)))
		if testenv.Privileged() {
			t.Fatalf("required but unavailable: %s", why)
		}
		t.Skip(why)
	}
}

// osLabPrefix is the lab of TestIntegrationOpenStackFT.
const osLabPrefix = "osl"

// osGuestCmdline is the lab guest's command line as a Glance property: no
// NIC (servers are created with networks "none"), no agent channel (Nova
// defines none), the console tick every 100 ms.
const osGuestCmdline = "console=ttyS0 quiet panic=-1 ax.dirty=0 ax.tick=100ms ax.agent=0"

// TestIntegrationOpenStackFT runs Nova's libvirt driver on the lab's
// hypervisor hosts: the test cloud (test/openstack: Keystone, Placement,
// Glance, Nova's control services on loopback) with a nova-compute per
// host against that host's lab libvirtd, file-backed guest RAM; the lab's
// guest image put into Glance as kernel, ramdisk and root image; a server
// created with openstack server create boots directly from the kernel
// and ticks on its console (Nova's console.log).
func TestIntegrationOpenStackFT(t *testing.T) {
	requireOpenStack(t)
	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	dir := t.TempDir()

	// The cloud starts (minutes of Python) while the lab comes up.
	type started struct {
		c   *openstack.Cloud
		err error
	}
	cloudUp := make(chan started, 1)
	go func() {
		c, err := openstack.StartWith(ctx, filepath.Join(dir, "cloud"), t.Logf, openstack.Options{NoFakeCompute: true})
		cloudUp <- started{c, err}
	}()
	var c *openstack.Cloud
	t.Cleanup(func() {
		if c == nil {
			if s := <-cloudUp; s.c != nil {
				s.c.Close()
			}
			return
		}
		if t.Failed() {
			osLogTails(t, filepath.Join(c.Dir, "log"))
		}
		c.Close()
	})

	l, err := Open(Config{Prefix: osLabPrefix})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx) // a leftover of an earlier crashed run
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, name := range []string{"axd-a", "axd-b", "libvirtd-a", "libvirtd-b"} {
				if data, err := os.ReadFile(filepath.Join(l.StateDir, name+".log")); err == nil {
					t.Logf("%s log (tail):\n%s", name, tail(string(data), 40))
				}
			}
		}
		state, _ := l.State()
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("down: %v", err)
		}
		if left := l.Leftovers(state); len(left) > 0 {
			t.Errorf("teardown left: %s", strings.Join(left, ", "))
		}
	})
	img := testImage(t)
	for _, h := range []string{HostA} {
		if err := l.StartLibvirtd(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	s := <-cloudUp
	c = s.c
	if s.err != nil {
		t.Fatal(s.err)
	}
	t.Logf("cloud and lab up %.0f s after the start", time.Since(began).Seconds())
	for _, h := range []string{HostA} {
		t0 := time.Now()
		if err := c.StartLibvirtCompute(ctx, openstack.LibvirtCompute{Host: h, URI: l.LibvirtURI(h), FileBackedMemoryMiB: 1024}); err != nil {
			t.Fatal(err)
		}
		t.Logf("nova-compute with the libvirt driver on %s mapped in %.1f s", h, time.Since(t0).Seconds())
	}
	imageID, err := c.KernelImage(ctx, "ax-lab-guest", img.Kernel, img.Initrd, osGuestCmdline, nil)
	if err != nil {
		t.Fatal(err)
	}
	osc := func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, "openstack", args...)
		cmd.Env = append(os.Environ(), "OS_CLOUD=ax", "OS_CLIENT_CONFIG_FILE="+c.CloudsYAML())
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("openstack %s: %v: %s", strings.Join(args, " "), err, stderr.Bytes())
		}
		return strings.TrimSpace(string(out))
	}
	osc("flavor", "create", "--ram", "256", "--disk", "1", "--vcpus", "1", "ax.lab")

	created := time.Now()
	id := osc("server", "create", "--os-compute-api-version", "2.37", "--flavor", "ax.lab", "--image", imageID,
		"--nic", "none", "--availability-zone", "nova:"+HostA, "--wait", "-f", "value", "-c", "id", "ax-ft")
	active := time.Since(created)
	console := filepath.Join(c.InstanceDir(HostA, id), "console.log")
	booted := waitConsole(t, console, "AXTICK", 3*time.Minute)
	t.Logf("openstack server create: %s ACTIVE after %.1f s, first tick on its console (%s) %.1f s after the create",
		id, active.Seconds(), console, booted.Sub(created).Seconds())
	t.Logf("total %.0f s", time.Since(began).Seconds())
}

// waitConsole waits until the file at path has the text want and returns
// when it was seen.
func waitConsole(t *testing.T, path, want string, within time.Duration) time.Time {
	t.Helper()
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if b, err := os.ReadFile(path); err == nil && bytes.Contains(b, []byte(want)) {
			return time.Now()
		}
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("%s: no %q within %s; it has:\n%s", path, want, within, tail(string(b), 2000))
	return time.Time{}
}

// osLogTails shows the end of every log of the cloud.
func osLogTails(t *testing.T, dir string) {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, n := range names {
		b, _ := os.ReadFile(n)
		t.Logf("--- %s:\n%s", filepath.Base(n), tail(string(b), 1500))
	}
}
