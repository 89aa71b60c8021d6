package guest

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/monitor/agent"
)

func probe(t *testing.T, ch Check) error {
	t.Helper()
	if ch.Name == "" {
		ch.Name = "t"
	}
	ch.Interval, ch.Timeout, ch.Threshold = Duration(time.Second), Duration(500*time.Millisecond), 1
	if ch.Kind == agent.KindHTTP && ch.ExpectStatus == 0 {
		ch.ExpectStatus = 200
	}
	if err := ch.validate(); err != nil {
		t.Fatalf("test check invalid: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(ch.Timeout))
	defer cancel()
	return newProber(&ch)(ctx)
}

func TestProcessCheck(t *testing.T) {
	root := t.TempDir()
	mk := func(pid int, comm, cmdline, state string) {
		dir := filepath.Join(root, strconv.Itoa(pid))
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "comm"), []byte(comm+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "cmdline"), []byte(cmdline), 0o644)
		os.WriteFile(filepath.Join(dir, "stat"), []byte(strconv.Itoa(pid)+" ("+comm+") "+state+" 1 1 1"), 0o644)
	}
	mk(1, "init", "/sbin/init\x00", "S")
	mk(10, "sshd", "/usr/sbin/sshd\x00-D\x00", "S")
	mk(11, "a-very-long-pro", "/opt/bin/a-very-long-process-name\x00", "R")
	mk(12, "dead (odd) name", "", "Z")
	os.MkdirAll(filepath.Join(root, "self"), 0o755)
	old := procRoot
	procRoot = root
	t.Cleanup(func() { procRoot = old })

	tests := []struct {
		name, process string
		ok            bool
	}{
		{"by comm", "sshd", true},
		{"by argv0 past comm's 15 bytes", "a-very-long-process-name", true},
		{"absent", "nginx", false},
		{"zombie does not count", "dead (odd) name", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := processAlive(tt.process)
			if (err == nil) != tt.ok {
				t.Fatalf("processAlive(%q) = %v, want ok=%v", tt.process, err, tt.ok)
			}
		})
	}

	pidfile := filepath.Join(root, "x.pid")
	for _, tt := range []struct {
		content string
		ok      bool
	}{{"10\n", true}, {"12", false}, {"99", false}, {"junk", false}} {
		os.WriteFile(pidfile, []byte(tt.content), 0o644)
		if err := pidfileAlive(pidfile); (err == nil) != tt.ok {
			t.Errorf("pidfile %q: %v, want ok=%v", tt.content, err, tt.ok)
		}
	}
	if err := pidfileAlive(filepath.Join(root, "none.pid")); err == nil {
		t.Error("a missing pidfile is healthy")
	}
}

func TestProcessCheckOnRealProc(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if err := probe(t, Check{Kind: agent.KindProcess, Process: filepath.Base(self)}); err != nil {
		t.Errorf("this test binary is not alive: %v", err)
	}
	pidfile := filepath.Join(t.TempDir(), "self.pid")
	os.WriteFile(pidfile, []byte(strconv.Itoa(os.Getpid())), 0o644)
	if err := probe(t, Check{Kind: agent.KindProcess, Pidfile: pidfile}); err != nil {
		t.Errorf("pidfile of this process: %v", err)
	}
}

func TestTCPCheck(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := probe(t, Check{Kind: agent.KindTCP, Address: addr}); err != nil {
		t.Errorf("open port: %v", err)
	}
	ln.Close()
	err = probe(t, Check{Kind: agent.KindTCP, Address: addr})
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("closed port: %v, want connection refused", err)
	}
}

func TestHTTPCheck(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
		case "/down":
			w.WriteHeader(http.StatusServiceUnavailable)
		case "/moved":
			http.Redirect(w, r, "/ok", http.StatusFound)
		case "/slow":
			time.Sleep(time.Second)
		}
	}))
	defer srv.Close()
	tests := []struct {
		path   string
		status int
		ok     bool
	}{
		{"/ok", 0, true},
		{"/down", 0, false},
		{"/down", 503, true},
		{"/moved", 0, false}, // the redirect is judged, not followed
		{"/moved", 302, true},
		{"/slow", 0, false},
	}
	for _, tt := range tests {
		err := probe(t, Check{Kind: agent.KindHTTP, URL: srv.URL + tt.path, ExpectStatus: tt.status})
		if (err == nil) != tt.ok {
			t.Errorf("GET %s expecting %d: %v, want ok=%v", tt.path, tt.status, err, tt.ok)
		}
	}
}

func TestCommandCheck(t *testing.T) {
	tests := []struct {
		name   string
		script string
		expect int
		ok     bool
		detail string
	}{
		{"exit 0", "exit 0", 0, true, ""},
		{"expected code", "exit 3", 3, true, ""},
		{"failure explains itself", "echo disk full; exit 1", 0, false, "sh exited 1, want 0: disk full"},
		{"timeout kills it", "sleep 5", 0, false, "timed out"},
		{"timeout kills its children", "sleep 5 & wait", 0, false, "timed out"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			err := probe(t, Check{Kind: agent.KindCommand, Command: []string{"/bin/sh", "-c", tt.script}, ExpectExit: tt.expect})
			if (err == nil) != tt.ok {
				t.Fatalf("%v, want ok=%v", err, tt.ok)
			}
			if err != nil && !strings.Contains(err.Error(), tt.detail) {
				t.Errorf("error %q, want it to contain %q", err, tt.detail)
			}
			if el := time.Since(start); el > 3*time.Second {
				t.Errorf("took %v; the 500 ms timeout did not stop it", el)
			}
		})
	}
	if err := probe(t, Check{Kind: agent.KindCommand, Command: []string{"/nonexistent/program"}}); err == nil {
		t.Error("a missing program is healthy")
	}
}

func TestBoundedOutput(t *testing.T) {
	out, code, err := execBounded(context.Background(), []string{"/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; exit 7"})
	if err != nil || code != 7 {
		t.Fatalf("code %d err %v", code, err)
	}
	if len(out) != agent.MaxDetail {
		t.Errorf("kept %d bytes of output, want %d", len(out), agent.MaxDetail)
	}
}
