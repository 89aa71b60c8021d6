package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/test/testenv"
)

// systemdRootCache is a Debian 12 root with systemd and QEMU (what the
// package depends on), made once by mmdebstrap from Debian's packages.
const systemdRootCache = "/var/cache/ax/systemd-root/bookworm.tar"

// The package installs into a clean Debian 12 root, and its unit runs under
// a real systemd there (systemd-nspawn --boot): `systemctl start` returns
// only once axd serves its API (Type=notify), `systemctl restart` brings
// back the VMs axd knew, and neither restart nor stop kills what else runs
// in axd's cgroup (KillMode=process: a promoted replica's QEMU is axd's
// child, and must outlive it).
func TestIntegrationPackageUnderSystemd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireLong(t)
	testenv.RequireCommand(t, "systemd-nspawn", "apt-get install systemd-container")
	testenv.RequireCommand(t, "mmdebstrap", "apt-get install mmdebstrap")
	deb := builtDeb(t)

	tarball := systemdRoot(t)
	root := filepath.Join(t.TempDir(), "root")
	must(t, "mkdir", os.MkdirAll(root, 0o755))
	host(t, "tar", "-C", root, "-xf", tarball)

	// Install as an operator would: dpkg -i of the package, its
	// dependencies already there.
	must(t, "copy the package", os.WriteFile(filepath.Join(root, "tmp/ax.deb"), readFile(t, deb), 0o644))
	host(t, "chroot", root, "dpkg", "-i", "/tmp/ax.deb")
	debVersion := strings.TrimSpace(dpkgDeb(t, "--field", deb, "Version"))
	if out := host(t, "chroot", root, "/usr/sbin/axd", "--version"); strings.TrimSpace(out) != "axd "+debVersion {
		t.Errorf("axd --version = %q, want the package's version %s", out, debVersion)
	}
	// This host's flags, in the package's conffile; a lab key (PSK mode).
	host(t, "chroot", root, "axctl", "pki", "psk", "/etc/ax/psk")
	must(t, "write /etc/default/axd", os.WriteFile(filepath.Join(root, "etc/default/axd"),
		[]byte(`AXD_FLAGS="--host t1 --psk-file /etc/ax/psk --repl-listen 127.0.0.1:7400 --mgmt-listen 127.0.0.1:7401"`+"\n"), 0o644))

	c := bootContainer(t, root)
	in := func(args ...string) (string, error) { return c.exec(args...) }
	mustIn := func(args ...string) string {
		t.Helper()
		out, err := in(args...)
		if err != nil {
			t.Fatalf("in the container: %s: %v\n%s\n%s", strings.Join(args, " "), err, out, c.log())
		}
		return out
	}

	// Readiness: start returns once axd answers on its socket.
	mustIn("systemctl", "start", "axd")
	if out := mustIn("axctl", "status"); !strings.Contains(out, "t1") {
		t.Errorf("axctl status right after systemctl start:\n%s", out)
	}
	if st := mustIn("systemctl", "show", "-p", "Type,ActiveState,KillMode", "axd"); !strings.Contains(st, "Type=notify") ||
		!strings.Contains(st, "ActiveState=active") || !strings.Contains(st, "KillMode=process") {
		t.Errorf("axd.service: %s", st)
	}

	// A VM axd knows: a QEMU with a QMP socket (no guest: -machine none).
	mustIn("qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-daemonize",
		"-qmp", "unix:/run/vm1.qmp,server=on,wait=off", "-pidfile", "/run/vm1.pid")
	mustIn("truncate", "-s", "1M", "/run/vm1.ram")
	spec := `{"name":"vm1","guest":{"name":"vm1","ram_mib":1,"ram_file":"/run/vm1.ram","qmp":"/run/vm1.qmp"}}`
	must(t, "write the spec", os.WriteFile(filepath.Join(root, "root/vm1.json"), []byte(spec), 0o644))
	mustIn("axctl", "define", "/root/vm1.json")

	// A process in axd's cgroup stands for a replica's QEMU axd started.
	child := strings.TrimSpace(mustIn("sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $! >/sys/fs/cgroup/system.slice/axd.service/cgroup.procs && echo $!"))
	if _, err := strconv.Atoi(child); err != nil {
		t.Fatalf("child pid %q", child)
	}
	mainPID := func() string {
		return strings.TrimPrefix(strings.TrimSpace(mustIn("systemctl", "show", "-p", "MainPID", "axd")), "MainPID=")
	}
	before := mainPID()
	mustIn("systemctl", "restart", "axd")
	if after := mainPID(); after == before || after == "0" {
		t.Errorf("restart: main pid %s → %s", before, after)
	}
	var status string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if status = mustIn("axctl", "status"); strings.Contains(status, "vm1") {
			break
		}
	}
	if !strings.Contains(status, "vm1") {
		t.Errorf("after systemctl restart axd does not show vm1:\n%s\n%s", status, mustIn("axctl", "events"))
	}
	if _, err := in("sh", "-c", "kill -0 "+child); err != nil {
		t.Error("systemctl restart axd killed a process of axd's cgroup (KillMode=process must spare it)")
	}
	mustIn("systemctl", "stop", "axd")
	if st := mustIn("systemctl", "show", "-p", "ActiveState", "axd"); !strings.Contains(st, "ActiveState=inactive") {
		t.Errorf("after stop: %s", st)
	}
	if _, err := in("sh", "-c", "kill -0 "+child); err != nil {
		t.Error("systemctl stop axd killed a process of axd's cgroup")
	}
	if _, err := in("sh", "-c", "kill -0 $(cat /run/vm1.pid)"); err != nil {
		t.Error("the VM's QEMU did not outlive axd")
	}
}

// systemdRoot returns the cached root tarball, making it if needed.
func systemdRoot(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(systemdRootCache); err == nil {
		return systemdRootCache
	}
	must(t, "cache directory", os.MkdirAll(filepath.Dir(systemdRootCache), 0o755))
	// mmdebstrap picks the format from the name: a tarball.
	tmp := strings.TrimSuffix(systemdRootCache, ".tar") + ".tmp.tar"
	host(t, "mmdebstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus,qemu-system-x86", "bookworm", tmp)
	must(t, "cache the root", os.Rename(tmp, systemdRootCache))
	return systemdRootCache
}

// container is a Debian root booted with systemd as its PID 1.
type container struct {
	t       *testing.T
	leader  int // its PID 1, as this host sees it
	logPath string
}

func bootContainer(t *testing.T, root string) *container {
	t.Helper()
	c := &container{t: t, logPath: filepath.Join(t.TempDir(), "boot.log")}
	logf, err := os.Create(c.logPath)
	must(t, "boot log", err)
	// No machined and no host systemd here: the container's own cgroup
	// tree (unified), no registration, its own network namespace.
	cmd := exec.Command("systemd-nspawn", "--quiet", "--keep-unit", "--register=no", "--private-network", "--boot",
		"-D", root, "--machine", fmt.Sprintf("axsd%d", os.Getpid()))
	cmd.Env = append(os.Environ(), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	must(t, "systemd-nspawn", cmd.Start())
	exited := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(exited) }()
	t.Cleanup(func() {
		c.exec("systemctl", "poweroff", "--no-block")
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	// The container's PID 1 is nspawn's child.
	for deadline := time.Now().Add(20 * time.Second); c.leader == 0; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("systemd-nspawn started no container:\n%s", c.log())
		}
		select {
		case <-exited:
			t.Fatalf("systemd-nspawn ended:\n%s", c.log())
		default:
		}
		kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
		if f := strings.Fields(string(kids)); len(f) > 0 {
			c.leader, _ = strconv.Atoi(f[0])
		}
	}
	// Booted: systemd says running (or degraded: units this root does not
	// need, such as getty on a console it has not got, may fail).
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		out, _ := c.exec("systemctl", "is-system-running")
		if s := strings.TrimSpace(out); s == "running" || s == "degraded" {
			return c
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("systemd in the container did not finish booting:\n%s", c.log())
	return nil
}

// exec runs a command inside the container (all its namespaces).
func (c *container) exec(args ...string) (string, error) {
	full := append([]string{"-t", strconv.Itoa(c.leader), "-a", "--"}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (c *container) log() string {
	b, _ := os.ReadFile(c.logPath)
	return "boot log:\n" + regexp.MustCompile(`\x1b\[[0-9;]*m`).ReplaceAllString(string(b), "")
}

func host(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}
