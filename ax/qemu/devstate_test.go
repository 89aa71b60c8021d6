package qemu

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// incomingFake is a Monitor whose LoadIncoming serves a unix: URI the way
// QEMU does (it listens, the source connects) and records what it got.
type incomingFake struct {
	Monitor
	uri  string
	got  []byte
	fail error
}

func (f *incomingFake) LoadIncoming(ctx context.Context, uri string) error {
	f.uri = uri
	if f.fail != nil {
		return f.fail
	}
	path, ok := strings.CutPrefix(uri, "unix:")
	if !ok {
		return errors.New("not a unix: URI")
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	defer ln.Close()
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	f.got, err = io.ReadAll(c)
	return err
}

func TestLoadDeviceStateFileFeedsASocketNotAShell(t *testing.T) {
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev;touch pwned")
	want := bytes.Repeat([]byte("QEVM device state "), 10000)
	if err := os.WriteFile(dev, want, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := &incomingFake{}
	sock := filepath.Join(dir, "incoming.sock")
	if err := LoadDeviceStateFile(ctx, f, dev, sock); err != nil {
		t.Fatal(err)
	}
	if f.uri != "unix:"+sock || strings.Contains(f.uri, "exec:") {
		t.Errorf("uri %q", f.uri)
	}
	if !bytes.Equal(f.got, want) {
		t.Errorf("QEMU got %d bytes, want the file's %d", len(f.got), len(want))
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "pwned")); !os.IsNotExist(err) {
		t.Error("a shell ran the file name")
	}

	// QEMU refuses: the error comes back and nothing hangs.
	f = &incomingFake{fail: errors.New("qmp migrate-incoming: refused")}
	if err := LoadDeviceStateFile(ctx, f, dev, sock); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("err = %v", err)
	}
	if err := LoadDeviceStateFile(ctx, &incomingFake{}, filepath.Join(dir, "missing"), sock); err == nil {
		t.Error("a missing device state file was fed")
	}
}

func TestHardwareVirt(t *testing.T) {
	for _, tc := range []struct{ cpuinfo, want string }{
		{"processor\t: 0\nflags\t\t: fpu vme vmx sse2\n", "vmx"},
		{"flags\t\t: fpu svm lm\n", "svm"},
		{"flags\t\t: fpu sse2 hypervisor\nflags\t\t: vmx\n", ""}, // only the first CPU's line counts
		{"model name\t: vmx-like\nflags\t\t: fpu\n", ""},
		{"", ""},
	} {
		if got := HardwareVirt([]byte(tc.cpuinfo)); got != tc.want {
			t.Errorf("HardwareVirt(%q) = %q, want %q", tc.cpuinfo, got, tc.want)
		}
	}
}
