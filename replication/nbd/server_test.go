package nbd

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestAddExport(t *testing.T) {
	srv := NewServer(nil)
	mem := NewMemBackend(512)
	tests := []struct {
		name    string
		b       Backend
		wantErr string
	}{
		{"disk", mem, ""},
		{"disk", mem, `"disk": already exported`},
		{"", mem, ""},
		{"nil", nil, "nil backend"},
		{"a\x00b", mem, "contains NUL"},
		{strings.Repeat("x", 4097), mem, "longer than 4096"},
	}
	for _, tt := range tests {
		err := srv.AddExport(tt.name, tt.b)
		if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("AddExport(%.10q) = %v, want %q", tt.name, err, tt.wantErr)
		}
	}
	srv.RemoveExport("disk")
	srv.RemoveExport("disk") // twice is fine
	if err := srv.AddExport("disk", mem); err != nil {
		t.Errorf("AddExport after RemoveExport: %v", err)
	}
}

func TestRemoveExportClosesConnections(t *testing.T) {
	srv, _ := newTestServer(t, testSize)
	if err := srv.AddExport("other", NewMemBackend(4096)); err != nil {
		t.Fatal(err)
	}
	onDisk, doneDisk := pipe(t, srv)
	onDisk.connect("disk")
	onOther, doneOther := pipe(t, srv)
	onOther.connect("other")

	srv.RemoveExport("disk")
	if err := result(t, doneDisk); err != nil {
		t.Errorf("ServeConn after RemoveExport: %v, want nil", err)
	}
	if !onDisk.closed() {
		t.Error("connection to the removed export is open")
	}
	// The other export's connection is untouched, and the name is gone.
	if e, _ := onOther.do(cmdFlush, 0, 0, 0, nil); e != 0 {
		t.Errorf("other export: flush error %d", e)
	}
	onOther.disconnect()
	if err := result(t, doneOther); err != nil {
		t.Error(err)
	}
	c, done := pipe(t, srv)
	c.greet(flagCFixedNewstyle)
	c.option(optGo, infoData("disk"))
	if r := c.optReply(); r.typ != repErrUnknown {
		t.Errorf("go to removed export: reply %+v", r)
	}
	c.option(optAbort, nil)
	c.optReply()
	if err := result(t, done); err != nil {
		t.Error(err)
	}
}

// unixListener listens on a fresh socket path short enough for sun_path.
func unixListener(t testing.TB) (net.Listener, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "nbd.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	return ln, path
}

func TestServeStopsWithContext(t *testing.T) {
	srv, _ := newTestServer(t, testSize)
	ln, path := unixListener(t)
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()

	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	c := &testClient{t: t, nc: nc}
	c.connect("disk")
	if e, _ := c.do(cmdWrite, 0, 0, 512, pattern(512, 1)); e != 0 {
		t.Fatalf("write: error %d", e)
	}

	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if !c.closed() {
		t.Error("connection open after Serve returned")
	}
	if _, err := net.Dial("unix", path); err == nil {
		t.Error("listener still accepting after Serve returned")
	}
}

func TestServeListenerFailure(t *testing.T) {
	srv := NewServer(nil)
	ln, _ := unixListener(t)
	ln.Close()
	if err := srv.Serve(t.Context(), ln); err == nil {
		t.Error("Serve on a closed listener returned nil")
	}
}
