package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/daemon"
	"github.com/axproject/ax/nova-hook/spool"
)

// The test binary is the hook when AX_NOVA_HOOK_BE_HOOK is set: tests run
// it as libvirt does, and see its exit status and its stdout.
func TestMain(m *testing.M) {
	if os.Getenv("AX_NOVA_HOOK_BE_HOOK") == "1" {
		main()
	}
	os.Exit(m.Run())
}

// hookRun is one run of the hook.
type hookRun struct {
	code           int
	stdout, stderr string
	took           time.Duration
}

// runHook runs the hook as libvirt does: args, the XML on stdin, axd's
// socket and the spool where the test says.
func runHook(t *testing.T, socket, spoolDir string, xml string, args ...string) hookRun {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "AX_NOVA_HOOK_BE_HOOK=1", "AX_NOVA_HOOK_NO_SYSLOG=1", "AX_NOVA_HOOK_SOCKET="+socket, "AX_NOVA_HOOK_SPOOL="+spoolDir)
	cmd.Stdin = strings.NewReader(xml)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := hookRun{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatal(err)
		}
		r.code = ee.ExitCode()
	}
	return r
}

// libvirtArgs are the arguments libvirt gives the hook for op.
func libvirtArgs(dom, op string) []string {
	sub := "begin"
	if op == "stopped" || op == "release" {
		sub = "end"
	}
	return []string{dom, op, sub, "-"}
}

func novaXML(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile("../ax/hv/libvirt/testdata/nova-domain.xml")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const novaDomain = "instance-0000002a"

// fakeAxd serves POST /v1/hooks/libvirt on a Unix socket, answering as
// answer says, and records what it was handed.
type fakeAxd struct {
	socket string
	mu     sync.Mutex
	got    []api.HookEvent
}

func startFakeAxd(t *testing.T, answer func(w http.ResponseWriter, ev api.HookEvent)) *fakeAxd {
	t.Helper()
	f := &fakeAxd{socket: filepath.Join(t.TempDir(), "axd.sock")}
	ln, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/hooks/libvirt", func(w http.ResponseWriter, r *http.Request) {
		var ev api.HookEvent
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
			t.Errorf("fake axd: %v", err)
		}
		f.mu.Lock()
		f.got = append(f.got, ev)
		f.mu.Unlock()
		answer(w, ev)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return f
}

func (f *fakeAxd) events() []api.HookEvent {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.HookEvent(nil), f.got...)
}

func ok(w http.ResponseWriter, _ api.HookEvent) { w.Write([]byte("{}")) }

// spooled returns the events in dir, taking them.
func spooled(t *testing.T, dir string) []api.HookEvent {
	t.Helper()
	var evs []api.HookEvent
	if _, errs := spool.Replay(dir, func(ev api.HookEvent) error { evs = append(evs, ev); return nil }); len(errs) != 0 {
		t.Fatal(errs)
	}
	return evs
}

// Every operation of libvirt's qemu hook is handed to axd whole, with
// nothing on stdout and exit status 0.
func TestEveryOperation(t *testing.T) {
	axd := startFakeAxd(t, ok)
	spoolDir := filepath.Join(t.TempDir(), "spool")
	xml := novaXML(t)
	for _, op := range api.HookOperations {
		r := runHook(t, axd.socket, spoolDir, xml, libvirtArgs(novaDomain, op)...)
		if r.code != 0 || r.stdout != "" || r.stderr != "" {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", op, r.code, r.stdout, r.stderr)
		}
	}
	got := axd.events()
	if len(got) != len(api.HookOperations) {
		t.Fatalf("axd was handed %d events, want %d", len(got), len(api.HookOperations))
	}
	for i, ev := range got {
		want := libvirtArgs(novaDomain, api.HookOperations[i])
		if ev.Domain != want[0] || ev.Operation != want[1] || ev.SubOperation != want[2] || ev.Extra != want[3] || ev.XML != xml || time.Since(ev.Time) > time.Minute {
			t.Errorf("event %d: %+v, want %v and the XML", i, ev, want)
		}
	}
	if evs := spooled(t, spoolDir); len(evs) != 0 {
		t.Errorf("spooled with axd up: %d", len(evs))
	}
}

// axd down, or too slow: every event is spooled, exit 0, in time.
func TestAxdDown(t *testing.T) {
	spoolDir := filepath.Join(t.TempDir(), "spool")
	missing := filepath.Join(t.TempDir(), "axd.sock")
	for _, op := range api.HookOperations {
		r := runHook(t, missing, spoolDir, novaXML(t), libvirtArgs(novaDomain, op)...)
		if r.code != 0 || r.stdout != "" || !strings.Contains(r.stderr, "spooled for axd to replay") {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", op, r.code, r.stdout, r.stderr)
		}
	}
	evs := spooled(t, spoolDir)
	if len(evs) != len(api.HookOperations) {
		t.Fatalf("%d events spooled", len(evs))
	}
	for i, ev := range evs {
		if ev.Operation != api.HookOperations[i] || ev.Domain != novaDomain {
			t.Errorf("spooled %d: %s %s", i, ev.Domain, ev.Operation)
		}
	}

	slow := startFakeAxd(t, func(w http.ResponseWriter, ev api.HookEvent) { time.Sleep(5 * time.Second); ok(w, ev) })
	r := runHook(t, slow.socket, spoolDir, novaXML(t), libvirtArgs(novaDomain, "started")...)
	if r.code != 0 || r.stdout != "" || r.took > 3*time.Second || !strings.Contains(r.stderr, "spooled") {
		t.Errorf("slow axd: exit %d after %s, stdout %q, stderr %q", r.code, r.took, r.stdout, r.stderr)
	}
	if evs := spooled(t, spoolDir); len(evs) != 1 {
		t.Errorf("slow axd: %d spooled", len(evs))
	}
	broken := startFakeAxd(t, func(w http.ResponseWriter, ev api.HookEvent) { http.Error(w, "{}", http.StatusInternalServerError) })
	if r := runHook(t, broken.socket, spoolDir, novaXML(t), libvirtArgs(novaDomain, "started")...); r.code != 0 || r.stdout != "" {
		t.Errorf("failing axd: %+v", r)
	}
	if evs := spooled(t, spoolDir); len(evs) != 1 {
		t.Errorf("failing axd: %d spooled", len(evs))
	}
}

// Input the hook refuses: a clear error on stderr, exit 0, nothing on
// stdout, nothing handed to axd, nothing spooled.
func TestHostileInput(t *testing.T) {
	axd := startFakeAxd(t, ok)
	spoolDir := filepath.Join(t.TempDir(), "spool")
	xml := novaXML(t)
	for _, c := range []struct {
		name string
		args []string
		xml  string
		want string
	}{
		{"path as name", libvirtArgs("../../etc/passwd", "started"), xml, "vm name"},
		{"shell in name", libvirtArgs("a;reboot", "started"), xml, "vm name"},
		{"empty name", libvirtArgs("", "started"), xml, "vm name"},
		{"long name", libvirtArgs(strings.Repeat("a", 300), "started"), xml, "vm name"},
		{"unknown operation", libvirtArgs(novaDomain, "explode"), xml, "not one AX takes"},
		{"no arguments", nil, xml, "got 0 arguments"},
		{"too many arguments", append(libvirtArgs(novaDomain, "started"), "x"), xml, "got 5 arguments"},
		{"oversize XML", libvirtArgs(novaDomain, "started"), xml + strings.Repeat(" ", api.MaxHookXML), "over 1048576 bytes"},
	} {
		r := runHook(t, axd.socket, spoolDir, c.xml, c.args...)
		if r.code != 0 || r.stdout != "" || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q (want it to say %q)", c.name, r.code, r.stdout, r.stderr, c.want)
		}
	}
	if got := axd.events(); len(got) != 0 {
		t.Errorf("handed to axd: %+v", got)
	}
	if evs := spooled(t, spoolDir); len(evs) != 0 {
		t.Errorf("spooled %d", len(evs))
	}
}

// With the real axd: what it refuses (malformed XML) is said and not
// spooled; a non-Nova domain is left alone; what the hook spooled while
// axd was down is replayed when it starts.
func TestWithAxd(t *testing.T) {
	dir := t.TempDir()
	sock, spoolDir := filepath.Join(dir, "axd.sock"), filepath.Join(dir, "spool")
	// axd down: spooled.
	noLevel := strings.Replace(novaXML(t), `<ax:level xmlns:ax="https://axproject.github.io/xmlns/ax/1" peer="compute-2">ft</ax:level>`, "", 1)
	for _, op := range []string{"prepare", "start", "started"} {
		if r := runHook(t, sock, spoolDir, noLevel, libvirtArgs(novaDomain, op)...); r.code != 0 || r.stdout != "" {
			t.Fatalf("%s: %+v", op, r)
		}
	}
	d, err := daemon.New(daemon.Config{Host: "a", Socket: sock, StateDir: filepath.Join(dir, "state"), HookSpool: spoolDir,
		PSK: []byte("0123456789abcdef0123456789abcdef"), Peers: map[string]daemon.Peer{"b": {Repl: "127.0.0.1:1", Mgmt: "127.0.0.1:1"}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() { done <- d.Run(ctx, func() { close(ready) }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("axd: %v", err)
		}
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	plain := "<domain type='kvm' id='4'><name>web</name></domain>"
	if r := runHook(t, sock, spoolDir, plain, libvirtArgs("web", "started")...); r.code != 0 || r.stdout != "" || r.stderr != "" {
		t.Errorf("non-Nova domain: %+v", r)
	}
	r := runHook(t, sock, spoolDir, "<domain><name>web", libvirtArgs("web", "started")...)
	if r.code != 0 || r.stdout != "" || !strings.Contains(r.stderr, "axd refused the event") || !strings.Contains(r.stderr, "unreadable domain XML") {
		t.Errorf("malformed XML: %+v", r)
	}
	want := []string{
		"libvirt hook (replayed, of ", "domain instance-0000002a prepare (Nova instance web-1, project demo): nothing to do",
		"domain instance-0000002a started (Nova instance web-1, project demo): its level is applied",
		"3 spooled events replayed",
		"domain instance-0000002a: no level asked (no <ax:level> in its metadata): left alone",
		"libvirt hook: domain web started: not a Nova instance: left alone",
	}
	c := api.NewClient(sock)
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs, err := c.Events(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		var texts []string
		for _, e := range evs {
			if e.Kind == "hook" {
				texts = append(texts, e.Text)
			}
		}
		all := strings.Join(texts, "\n")
		missing := ""
		for _, w := range want {
			if !strings.Contains(all, w) {
				missing = w
			}
		}
		if missing == "" {
			if strings.Contains(all, "<domain><name>web") || strings.Count(all, "web started") != 1 {
				t.Errorf("the refused event was recorded:\n%s", all)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("axd's events say nothing of %q:\n%s", missing, all)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if evs := spooled(t, spoolDir); len(evs) != 0 {
		t.Errorf("%d events left in the spool", len(evs))
	}
}
