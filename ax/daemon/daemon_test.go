package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

func TestCheckSpecRefusesUnsharedRAM(t *testing.T) {
	dir := t.TempDir()
	ram := filepath.Join(dir, "ram")
	os.WriteFile(ram, make([]byte, 1<<20), 0o644)
	cases := []struct {
		name string
		spec api.VMSpec
		want []string
	}{
		{"no RAM file", api.VMSpec{Name: "vm", Guest: api.Guest{RAMMiB: 1, QEMU: api.QEMU{QMP: "/q"}}},
			[]string{"not a shared named file", "memory-backend-file", "share=on", "<memoryBacking>", "file_backed_memory"}},
		{"RAM file missing", api.VMSpec{Name: "vm", Guest: api.Guest{RAMMiB: 1, RAMFile: filepath.Join(dir, "none"), QEMU: api.QEMU{QMP: "/q"}}},
			[]string{"not a regular file", "share=on"}},
		{"wrong size", api.VMSpec{Name: "vm", Guest: api.Guest{RAMMiB: 2, RAMFile: ram, QEMU: api.QEMU{QMP: "/q"}}},
			[]string{"1048576 bytes but the VM has 2 MiB"}},
		{"no QMP", api.VMSpec{Name: "vm", Guest: api.Guest{RAMMiB: 1, RAMFile: ram}}, []string{"no QMP socket"}},
		{"no name", api.VMSpec{Guest: api.Guest{RAMMiB: 1, RAMFile: ram, QEMU: api.QEMU{QMP: "/q"}}}, []string{"needs a name"}},
		// This test process does not map the file: QEMU with share=off would not either.
		{"not mapped shared", api.VMSpec{Name: "vm", PID: os.Getpid(), Guest: api.Guest{RAMMiB: 1, RAMFile: ram, QEMU: api.QEMU{QMP: "/q"}}},
			[]string{"share=on"}},
	}
	for _, c := range cases {
		err := checkSpec(c.spec, api.LevelFT, true)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not say %q", c.name, err, w)
			}
		}
	}
	if err := checkSpec(api.VMSpec{Name: "vm", Guest: api.Guest{RAMMiB: 1, RAMFile: ram, QEMU: api.QEMU{QMP: "/q"}}}, api.LevelFT, true); err != nil {
		t.Errorf("good spec refused: %v", err)
	}
}

func TestDaemonAPI(t *testing.T) {
	dir := t.TempDir()
	ram := filepath.Join(dir, "ram")
	os.WriteFile(ram, make([]byte, 1<<20), 0o644)
	sock := filepath.Join(dir, "axd.sock")
	d, err := New(Config{Host: "a", Socket: sock, StateDir: filepath.Join(dir, "state"), PSK: []byte("0123456789abcdef0123456789abcdef"),
		Peers: map[string]Peer{"b": {Repl: "127.0.0.1:1", Mgmt: "127.0.0.1:1"}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error)
	go func() { done <- d.Run(ctx, func() { close(ready) }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	case <-time.After(5 * time.Second):
		t.Fatal("not ready")
	}
	// The API socket is axd's only; the NBD socket is for every QEMU,
	// whatever its user (a reconnect after axd restarted is not refused).
	for path, want := range map[string]os.FileMode{sock: 0o600, filepath.Join(dir, "state", "nbd.sock"): 0o666} {
		if st, err := os.Stat(path); err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: %v, want mode %v", path, st, want)
		}
	}
	c := api.NewClient(sock)
	spec := api.VMSpec{Name: "vm1", Guest: api.Guest{RAMMiB: 1, RAMFile: ram, QEMU: api.QEMU{QMP: filepath.Join(dir, "qmp")}}}
	if err := c.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil || len(st.VMs) != 1 || st.VMs[0].Role != api.RoleLocal || st.VMs[0].Level != api.LevelNone {
		t.Fatalf("status %+v %v", st, err)
	}
	for _, c2 := range []struct {
		vm   string
		req  api.ProtectRequest
		want string
	}{
		{"vm1", api.ProtectRequest{Level: "ft", Peer: "zz"}, "unknown peer"},
		{"vm1", api.ProtectRequest{Level: "gold", Peer: "b"}, "unknown level"},
		{"nope", api.ProtectRequest{Level: "ft", Peer: "b"}, "no VM nope"},
	} {
		if err := c.Protect(ctx, c2.vm, c2.req); err == nil || !strings.Contains(err.Error(), c2.want) {
			t.Errorf("protect %s %+v: err = %v, want %q", c2.vm, c2.req, err, c2.want)
		}
	}
	for _, c2 := range []struct {
		req  api.ProtectRequest
		want string
	}{
		{api.ProtectRequest{Level: "gold"}, "unknown level"},
		{api.ProtectRequest{Level: "ha"}, "name the partner"},
		{api.ProtectRequest{Level: "ft", Peer: "zz"}, "unknown peer"},
	} {
		if err := c.Level(ctx, "vm1", c2.req); err == nil || !strings.Contains(err.Error(), c2.want) {
			t.Errorf("level vm1 %+v: err = %v, want %q", c2.req, err, c2.want)
		}
	}
	if err := c.Level(ctx, "vm1", api.ProtectRequest{Level: "none"}); err != nil {
		t.Errorf("level none of an unprotected VM: %v", err)
	}
	if err := c.Failover(ctx, "vm1"); err == nil || !strings.Contains(err.Error(), "not a protected primary") {
		t.Errorf("failover of an unprotected VM: %v", err)
	}
	evs, err := c.Events(ctx, 0)
	defined := false
	for _, e := range evs {
		defined = defined || (e.Kind == "define" && e.VM == "vm1")
	}
	if err != nil || !defined {
		t.Fatalf("events %+v %v", evs, err)
	}
	if err := api.NewClient(filepath.Join(dir, "missing.sock")).Define(ctx, spec); err == nil || !strings.Contains(err.Error(), "axd is not running") {
		t.Errorf("no daemon: %v", err)
	}
}
