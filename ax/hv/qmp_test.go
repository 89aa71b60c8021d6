package hv

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

// qmpServer is a QEMU's QMP socket as far as Control needs one: it greets
// (unless mute), answers every command with an empty return, and records
// the commands.
type qmpServer struct {
	ln   net.Listener
	mute bool
	wg   sync.WaitGroup

	mu   sync.Mutex
	cmds []string
}

func startQMPServer(t *testing.T, path string, mute bool) *qmpServer {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := &qmpServer{ln: ln, mute: mute}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
	})
	return s
}

func (s *qmpServer) serve(c net.Conn) {
	defer c.Close()
	if s.mute {
		// Another client holds QEMU's one QMP connection: no greeting.
		buf := make([]byte, 1)
		c.Read(buf)
		return
	}
	c.Write([]byte(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}}, "capabilities": []}}` + "\n"))
	// QMP is a stream of JSON values, not lines.
	dec := json.NewDecoder(c)
	for {
		var cmd struct {
			Execute string `json:"execute"`
		}
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		s.mu.Lock()
		s.cmds = append(s.cmds, cmd.Execute)
		s.mu.Unlock()
		reply := `{"return": {}}`
		if cmd.Execute == "query-status" {
			reply = `{"return": {"status": "paused", "running": false}}`
		}
		c.Write([]byte(reply + "\n"))
	}
}

func (s *qmpServer) commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.cmds...)
}

func TestQMPControl(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "qmp.sock")
	srv := startQMPServer(t, sock, false)
	dom := (&QMP{}).Domain(api.Guest{Name: "vm1", QEMU: api.QEMU{QMP: sock}})
	if dom.Name() != "vm1" {
		t.Errorf("name %q", dom.Name())
	}
	mon, err := dom.Control(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := mon.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := mon.Status(ctx)
	if err != nil || st != "paused" {
		t.Fatalf("status %q, %v", st, err)
	}
	if err := mon.DeleteNode(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	if err := mon.Close(); err != nil {
		t.Fatal(err)
	}
	mon.Close() // twice is fine
	want := []string{"qmp_capabilities", "stop", "query-status", "blockdev-del"}
	if got := srv.commands(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("QEMU was asked %v, want %v", got, want)
	}
}

func TestQMPControlFails(t *testing.T) {
	dir := t.TempDir()
	mute := filepath.Join(dir, "mute.sock")
	startQMPServer(t, mute, true)
	cases := []struct {
		name string
		g    api.Guest
		want string
	}{
		{"no socket in the spec", api.Guest{Name: "vm1"}, "no QMP socket"},
		{"no QEMU listening", api.Guest{Name: "vm1", QEMU: api.QEMU{QMP: filepath.Join(dir, "none.sock")}}, "none.sock"},
		// The dial succeeds; the greeting never comes.
		{"QMP held by another client", api.Guest{Name: "vm1", QEMU: api.QEMU{QMP: mute}}, "no greeting"},
	}
	for _, c := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		mon, err := (&QMP{}).Domain(c.g).Control(ctx)
		cancel()
		if err == nil {
			mon.Close()
			t.Errorf("%s: connected", c.name)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want it to say %q", c.name, err, c.want)
		}
	}
}

// fakeQEMU writes a script standing in for QEMU.
func fakeQEMU(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func TestQMPStartAndKill(t *testing.T) {
	drv := &QMP{Binary: fakeQEMU(t, `exec sleep 1000`)}
	dir := t.TempDir()
	g := api.Guest{Name: "vm1", RAMMiB: 1, QEMU: api.QEMU{QMP: filepath.Join(dir, "qmp.sock"), Accel: "tcg"}}
	logPath := filepath.Join(dir, "qemu.log")
	p, err := drv.Domain(g).Start(context.Background(), logPath)
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	if pid <= 0 || !alive(pid) {
		t.Fatalf("pid %d not running", pid)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	default:
		t.Error("Kill returned before the process was gone")
	}
	if alive(pid) {
		t.Errorf("pid %d still there after Kill", pid)
	}
	if err := p.Kill(); err != nil {
		t.Errorf("second Kill: %v", err)
	}
}

func TestQMPStartedProcessEnds(t *testing.T) {
	drv := &QMP{Binary: fakeQEMU(t, `echo "started with $*"; exit 3`)}
	dir := t.TempDir()
	g := api.Guest{Name: "vm1", RAMMiB: 1, QEMU: api.QEMU{QMP: filepath.Join(dir, "qmp.sock"), Accel: "tcg"}}
	dom := drv.Domain(g)
	cases := []struct {
		name     string
		start    func(context.Context, string) (Process, error)
		incoming bool
	}{
		{"boot", dom.Start, false},
		{"replica", dom.StartIncoming, true},
	}
	for _, c := range cases {
		logPath := filepath.Join(dir, c.name+".log")
		p, err := c.start(context.Background(), logPath)
		if err != nil {
			t.Fatal(err)
		}
		<-p.Done()
		if err := p.Kill(); err != nil {
			t.Errorf("%s: Kill of a process that ended: %v", c.name, err)
		}
		// Its command line is QEMU's for g, its output in the log; only a
		// replica waits for device state.
		out, err := os.ReadFile(logPath)
		if err != nil || !strings.Contains(string(out), "-qmp unix:"+g.QMP) {
			t.Errorf("%s: log %q, %v", c.name, out, err)
		}
		if got := strings.Contains(string(out), "-incoming defer"); got != c.incoming {
			t.Errorf("%s: -incoming defer on the command line: %v, want %v (%q)", c.name, got, c.incoming, out)
		}
	}
}

func TestQMPStartFails(t *testing.T) {
	cases := []struct {
		name    string
		binary  string
		logPath string
		want    string
	}{
		{"no such emulator", filepath.Join(t.TempDir(), "missing"), filepath.Join(t.TempDir(), "log"), "start"},
		{"log not writable", fakeQEMU(t, "exit 0"), filepath.Join(t.TempDir(), "no", "dir", "log"), "QEMU log"},
	}
	for _, c := range cases {
		_, err := (&QMP{Binary: c.binary}).Domain(api.Guest{Name: "vm1"}).Start(context.Background(), c.logPath)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := (&QMP{}).Domain(api.Guest{Name: "vm1"}).Start(ctx, filepath.Join(t.TempDir(), "log")); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled start: %v", err)
	}
}
