package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/ctl"
)

// fakeAxd answers the local API as axd would, records each request, and
// reports vm1 protected at the last level asked for.
type fakeAxd struct {
	mu    sync.Mutex
	calls []string
	level string
}

func (f *fakeAxd) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, r.Method+" "+r.URL.Path)
	var req api.ProtectRequest
	json.NewDecoder(r.Body).Decode(&req)
	if req.Level != "" {
		f.level = req.Level
	}
	switch r.URL.Path {
	case "/v1/status":
		json.NewEncoder(w).Encode(api.Status{Host: "a", VMs: []api.VMStatus{{Name: "vm1", Level: f.level, Role: api.RolePrimary, State: "protected", Peer: "b"}}})
	case "/v1/events":
		json.NewEncoder(w).Encode([]api.Event{{Seq: 1, Kind: "start", Text: "axd started"}})
	default:
		w.Write([]byte("{}"))
	}
}

func (f *fakeAxd) last() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.calls) == 0 {
		return ""
	}
	return f.calls[len(f.calls)-1]
}

// Every command line axctl's help documents (against axd) reaches the API
// call it names — a command the help lists but the dispatch forgot
// ("level") fails here.
func TestEveryDocumentedCommandDispatches(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "axd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeAxd{level: "none"}
	srv := &http.Server{Handler: fake}
	go srv.Serve(ln)
	defer srv.Close()
	spec := filepath.Join(dir, "vm1.json")
	os.WriteFile(spec, []byte(`{"name":"vm1","guest":{"qmp":"/run/vm1.qmp"}}`), 0o600)

	var tested []string
	for _, tc := range []struct {
		line string
		call string
	}{
		{"status", "GET /v1/status"},
		{"status --json", "GET /v1/status"},
		{"define " + spec, "POST /v1/vms"},
		{"protect vm1 --level ft --peer b", "GET /v1/status"},
		{"protect vm1 --level ha --peer b --force --no-wait --spec " + spec, "POST /v1/vms/vm1/protect"},
		{"level vm1 ha", "GET /v1/status"},
		{"level vm1 none --no-wait", "POST /v1/vms/vm1/level"},
		{"level vm1 ft --peer b --force --no-wait", "POST /v1/vms/vm1/level"},
		{"unprotect vm1", "POST /v1/vms/vm1/unprotect"},
		{"failover vm1", "POST /v1/vms/vm1/failover"},
		{"events", "GET /v1/events"},
		{"events --since 3 --json", "GET /v1/events"},
	} {
		tested = append(tested, tc.line)
		var out bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := run(ctx, append([]string{"--socket", sock}, strings.Fields(tc.line)...), &out, &out)
		cancel()
		if err != nil {
			t.Errorf("axctl %s: %v", tc.line, err)
			continue
		}
		if got := fake.last(); got != tc.call {
			t.Errorf("axctl %s: last API call %q, want %q", tc.line, got, tc.call)
		}
	}
	// The commands that need no axd, through the same dispatch.
	pkiDir := t.TempDir()
	for _, line := range []string{
		"pki init --dir " + pkiDir,
		"pki issue --dir " + pkiDir + " --name a",
		"pki psk " + filepath.Join(pkiDir, "psk"),
		"doctor",
		"unpin-gates --bpf-dir " + filepath.Join(pkiDir, "no-gates"),
	} {
		tested = append(tested, line)
		var out bytes.Buffer
		if err := run(context.Background(), strings.Fields(line), &out, &out); err != nil {
			t.Errorf("axctl %s: %v\n%s", line, err, out.String())
		}
	}
	if _, err := os.Stat(filepath.Join(pkiDir, "a.crt")); err != nil {
		t.Errorf("axctl pki issue made no certificate: %v", err)
	}
	// Every command of the table has a line above.
	for _, name := range ctl.Commands() {
		found := false
		for _, tc := range tested {
			found = found || strings.Fields(tc)[0] == name
		}
		if !found {
			t.Errorf("command %q is not exercised here", name)
		}
	}
	// Each command axctl help names is one of the lines above (or lab/pki/help).
	var help bytes.Buffer
	if err := run(context.Background(), []string{"help"}, &help, &help); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(help.String(), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(line, "  ") || strings.HasPrefix(line, "   ") {
			continue
		}
		if !slices.Contains(ctl.Commands(), f[0]) && f[0] != "lab" && f[0] != "help" {
			t.Errorf("help documents %q, which is not a command", f[0])
			continue
		}
		// Every command the help lists answers its own help, none says
		// it is unknown.
		var h bytes.Buffer
		err := run(context.Background(), []string{f[0], "--help"}, &h, &h)
		if f[0] == "lab" {
			continue // this test binary is built without the lab
		}
		if err != nil || !strings.Contains(h.String(), f[0]) {
			t.Errorf("axctl %s --help: %v\n%s", f[0], err, h.String())
		}
	}
	for _, sub := range [][]string{{"pki", "help"}, {"pki", "-h"}, {"status", "help"}} {
		var h bytes.Buffer
		if err := run(context.Background(), sub, &h, &h); err != nil || strings.Contains(h.String(), "unknown") {
			t.Errorf("axctl %v: %v\n%s", sub, err, h.String())
		}
	}

	// doctor needs no axd and no root: what it cannot probe it reports unknown.
	if doc := new(bytes.Buffer); run(context.Background(), []string{"doctor"}, doc, doc) != nil || !strings.Contains(doc.String(), "summary:") {
		t.Errorf("axctl doctor printed no table:\n%s", doc)
	}
	if doc := new(bytes.Buffer); run(context.Background(), []string{"doctor", "--json"}, doc, doc) != nil || !json.Valid(doc.Bytes()) {
		t.Errorf("axctl doctor --json printed no JSON report:\n%s", doc)
	}

	for _, bad := range []string{"doctor --peer b", "levels vm1 ha", "level vm1 max", "level vm1", "protect vm1", "frobnicate"} {
		if err := run(context.Background(), append([]string{"--socket", sock}, strings.Fields(bad)...), &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
			t.Errorf("axctl %s succeeded", bad)
		}
	}
}
