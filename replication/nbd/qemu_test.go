package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/test/testenv"
)

// qemuServer serves export "disk" (a recorder over size bytes) on a Unix
// socket until the test ends and returns the nbd URI QEMU opens it by.
func qemuServer(t *testing.T, size int) (string, *Server, *recorder) {
	t.Helper()
	uri, srv, rec, _ := qemuServerNamed(t, "disk", size)
	return uri, srv, rec
}

// qemuServerNamed is qemuServer with the export called name; it also
// returns the socket path.
func qemuServerNamed(t *testing.T, name string, size int) (uri string, srv *Server, rec *recorder, sock string) {
	t.Helper()
	testenv.RequireCommand(t, "qemu-io", "apt-get install qemu-utils")
	testenv.RequireCommand(t, "qemu-img", "apt-get install qemu-utils")
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv = NewServer(log)
	rec = newRecorder(size)
	if err := srv.AddExport(name, rec); err != nil {
		t.Fatal(err)
	}
	ln, path := unixListener(t)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return "nbd+unix:///" + name + "?socket=" + path, srv, rec, path
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func runQEMU(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestIntegrationQEMUIO(t *testing.T) {
	const size = 8 << 20
	uri, srv, rec := qemuServer(t, size)

	out := runQEMU(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0xab 0 1M",
		"-c", "flush",
		"-c", "read -P 0xab 0 1M",
		"-c", "write -f -P 0xcd 1M 64k", // FUA
		"-c", "write -z 2M 1M",
		"-c", "discard 4M 1M",
		"-c", "write -P 0xef 8388096 512", // the last sector
	)
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io reported a failure:\n%s", out)
	}
	t.Logf("qemu-io:\n%s", out)

	got := rec.mem.Bytes()
	want := make([]byte, size)
	copy(want, bytes.Repeat([]byte{0xab}, 1<<20))
	copy(want[1<<20:], bytes.Repeat([]byte{0xcd}, 64<<10))
	copy(want[size-512:], bytes.Repeat([]byte{0xef}, 512))
	if !bytes.Equal(got, want) {
		t.Errorf("export content differs from what qemu-io wrote")
	}

	var sawFUA, sawFlush, sawZeroes, sawTrim bool
	for _, c := range rec.Calls() {
		switch {
		case c.op == "write" && c.off == 1<<20:
			sawFUA = c.fua
		case c.op == "flush":
			sawFlush = true
		case c.op == "zeroes" && c.off == 2<<20:
			sawZeroes = true
		case c.op == "trim" && c.off == 4<<20:
			sawTrim = true
		}
	}
	if !sawFUA || !sawFlush || !sawZeroes || !sawTrim {
		t.Errorf("backend calls: FUA write %v, flush %v, write zeroes %v, trim %v; want all\n%v", sawFUA, sawFlush, sawZeroes, sawTrim, rec.Calls())
	}
	if s := srv.Stats(); s.WriteRequests < 3 || s.BytesWritten != 1<<20+64<<10+512 || s.Rejected != 0 || s.ProtocolErrors != 0 {
		t.Errorf("Stats() = %+v", s)
	}
}

// qemu-img writes an image through the server and compares it back.
func TestIntegrationQEMUImg(t *testing.T) {
	const size = 16 << 20
	uri, _, rec := qemuServer(t, size)

	src := make([]byte, size)
	rand.Read(src[:5<<20])
	clear(src[1<<20 : 2<<20]) // a hole for qemu-img to zero or skip
	rand.Read(src[9<<20 : 9<<20+12345])
	path := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(path, src, 0o600); err != nil {
		t.Fatal(err)
	}
	runQEMU(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", path, uri)
	if !bytes.Equal(rec.mem.Bytes(), src) {
		t.Fatal("export differs from the converted image")
	}
	out := runQEMU(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", path, uri)
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare: %s", out)
	}

	// Another export name fails cleanly with the server's message.
	bad := strings.Replace(uri, "///disk", "///nope", 1)
	out2, err := exec.CommandContext(t.Context(), "qemu-io", "-f", "raw", bad, "-c", "read 0 512").CombinedOutput()
	if err == nil || !strings.Contains(string(out2), "nope") {
		t.Errorf("qemu-io on an unknown export: err %v, output %s", err, out2)
	}
}

// qemu-nbd --list uses NBD_OPT_LIST and NBD_OPT_INFO.
func TestIntegrationQEMUNBDList(t *testing.T) {
	testenv.RequireCommand(t, "qemu-nbd", "apt-get install qemu-utils")
	_, _, _, sock := qemuServerNamed(t, "disk", 1<<20)
	out := runQEMU(t, "qemu-nbd", "--list", "-k", sock)
	t.Logf("qemu-nbd --list:\n%s", out)
	for _, want := range []string{"export: 'disk'", "size:  1048576", "min block: 1", "opt block: 4096", "max block: 33554432", "flush", "fua", "trim", "zeroes"} {
		if !strings.Contains(out, want) {
			t.Errorf("qemu-nbd --list output lacks %q", want)
		}
	}
}

// An export is its process's: a client of another user than root (QEMU as
// libvirt runs it) reaches only the export added for its own pid, and to
// it the others do not exist, in NBD_OPT_LIST too. Root reaches them all.
func TestIntegrationExportForProcess(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "qemu-img", "apt-get install qemu-utils")
	srv := NewServer(nil)
	if err := srv.AddExport("anyone", NewMemBackend(1<<20)); err != nil {
		t.Fatal(err)
	}
	ln, sock := unixListener(t)
	// What axd does for a QEMU of another user: its socket is open to
	// connect, and the directory above it to search.
	for _, p := range []string{sock, filepath.Dir(sock)} {
		if err := os.Chmod(p, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	defer func() { cancel(); <-served }()

	// qemu-img as nobody, started first so that its pid is known, and
	// told to go once its export exists.
	const nobody = 65534
	qemuImg := func(uid uint32, export string) *exec.Cmd {
		cmd := exec.Command("sh", "-c", `read go; exec qemu-img info --image-opts "driver=nbd,path=$1,export=$2"`, "sh", sock, export)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		return cmd
	}
	run := func(cmd *exec.Cmd, addFor string, size int) (string, error) {
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if addFor != "" {
			if err := srv.AddExportFor(addFor, NewMemBackend(size), cmd.Process.Pid); err != nil {
				t.Fatal(err)
			}
		}
		in.Write([]byte("go\n"))
		in.Close()
		err = cmd.Wait()
		return out.String(), err
	}
	if out, err := run(qemuImg(nobody, "vm1/disk"), "vm1/disk", 2<<20); err != nil || !strings.Contains(out, "virtual size: 2 MiB") {
		t.Errorf("nobody's qemu-img on its own export: %v\n%s", err, out)
	}
	for _, other := range []string{"vm1/disk", "anyone"} {
		if out, err := run(qemuImg(nobody, other), "", 0); err == nil {
			t.Errorf("nobody's qemu-img opened %s, another process's export:\n%s", other, out)
		}
	}
	if out, err := run(qemuImg(nobody, "vm2/disk"), "vm2/disk", 3<<20); err != nil || !strings.Contains(out, "virtual size: 3 MiB") {
		t.Errorf("nobody's qemu-img on its own export: %v\n%s", err, out)
	}
	// Root's client reaches every export, vm1's too.
	for _, name := range []string{"vm1/disk", "anyone"} {
		if out, err := run(qemuImg(0, name), "", 0); err != nil {
			t.Errorf("root's qemu-img on %s: %v\n%s", name, err, out)
		}
	}
}
