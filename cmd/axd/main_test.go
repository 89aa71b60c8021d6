package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/identity/identitytest"
	"github.com/axproject/ax/ax/witness"
)

func pki(t *testing.T) string {
	dir, _ := identitytest.PKI(t, "a", "b", "w")
	return dir
}

// The README's axd command lines (TLS mode and PSK mode) start and serve;
// identities that cannot be right are refused before anything starts.
func TestIdentityFlags(t *testing.T) {
	dir := pki(t)
	ca, crt, key := identity.CAPath(dir), identity.CertPath(dir, "a"), identity.KeyPath(dir, "a")
	psk := filepath.Join(dir, "psk")
	os.WriteFile(psk, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	loose := filepath.Join(dir, "loose-psk")
	os.WriteFile(loose, []byte(strings.Repeat("ab", 32)+"\n"), 0o644)
	short := filepath.Join(dir, "short-psk")
	os.WriteFile(short, []byte("0123456789abcdef\n"), 0o600)

	serve := func(t *testing.T, args ...string) {
		t.Helper()
		_, stop := runUntil(t, "serving", serves, args...)
		stop()
	}
	t.Run("tls", func(t *testing.T) {
		serve(t, "--host", "a", "--cert", crt, "--key", key, "--ca", ca, "--witness-name", "w", "--peer", "b=127.0.0.1:17400,127.0.0.1:17401")
	})
	t.Run("tls host from certificate", func(t *testing.T) { serve(t, "--cert", crt, "--key", key, "--ca", ca) })
	t.Run("psk", func(t *testing.T) { serve(t, "--host", "a", "--psk-file", psk) })
	t.Run("witness", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, []string{"--witness", "--listen", addr, "--witness-state", filepath.Join(t.TempDir(), "witness.json"),
				"--cert", identity.CertPath(dir, "w"), "--key", identity.KeyPath(dir, "w"), "--ca", ca})
		}()
		// A host's client gets a signed answer from it.
		id, err := identity.Load(identity.Files{CA: ca, Cert: crt, Key: key})
		if err != nil {
			t.Fatal(err)
		}
		c, err := witness.NewClient(witness.ClientConfig{Addr: addr, Identity: id, Witness: "w", Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		deadline := time.Now().Add(20 * time.Second)
		for {
			if _, err = c.Renew(ctx, "vm1"); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the witness did not grant a lease: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("witness: %v", err)
		}
	})

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no identity", []string{"--host", "a"}, "no identity"},
		{"both modes", []string{"--host", "a", "--cert", crt, "--key", key, "--ca", ca, "--psk-file", psk}, "not both"},
		{"cert without key", []string{"--host", "a", "--cert", crt, "--ca", ca}, "--key"},
		{"another host's certificate", []string{"--host", "b", "--cert", crt, "--key", key, "--ca", ca}, "axctl pki issue"},
		{"witness with a host certificate", []string{"--witness", "--listen", "127.0.0.1:0", "--cert", crt, "--key", key, "--ca", ca}, "witness certificate"},
		{"host with the witness certificate", []string{"--host", "w", "--cert", identity.CertPath(dir, "w"), "--key", identity.KeyPath(dir, "w"), "--ca", ca}, "axctl pki issue"},
		{"TLS witness without its name", []string{"--host", "a", "--cert", crt, "--key", key, "--ca", ca, "--witness-addr", "127.0.0.1:1"}, "--witness-name"},
		{"key file readable by others", []string{"--host", "a", "--psk-file", loose}, "chmod 600"},
		{"key of 8 bytes written as hex", []string{"--host", "a", "--psk-file", short}, "at least 32"},
		{"unsafe host name", []string{"--host", "a;b", "--psk-file", psk}, "host name"},
		{"unsafe peer name", []string{"--host", "a", "--psk-file", psk, "--peer", "../b=127.0.0.1:1,127.0.0.1:2"}, "host name"},
		{"unsafe bridge", []string{"--host", "a", "--psk-file", psk, "--bridge", "br pub"}, "bridge"},
		{"unsafe bridge pattern", []string{"--host", "a", "--psk-file", psk, "--bridge", "brq*/.."}, "bridge"},
		{"malformed bridge pattern", []string{"--host", "a", "--psk-file", psk, "--bridge", "brq["}, "syntax error in pattern"},
		{"relative image directory", []string{"--host", "a", "--psk-file", psk, "--image-dir", "images"}, "image directory"},
	} {
		err := run(context.Background(), append([]string{"--socket", filepath.Join(t.TempDir(), "s"), "--state-dir", t.TempDir()}, tc.args...))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one saying %q", tc.name, err, tc.want)
		}
	}
	os.Chmod(key, 0o640)
	if err := run(context.Background(), []string{"--host", "a", "--cert", crt, "--key", key, "--ca", ca}); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a group-readable certificate key: %v", err)
	}
}

// TestLibvirtFlag: axd --libvirt connects to libvirtd before it serves,
// and says how to fix a libvirtd it cannot reach.
func TestLibvirtFlag(t *testing.T) {
	dir := t.TempDir()
	psk := filepath.Join(dir, "psk")
	os.WriteFile(psk, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	err := run(context.Background(), []string{"--socket", filepath.Join(dir, "axd.sock"), "--state-dir", dir, "--host", "a", "--psk-file", psk,
		"--libvirt", "qemu:///system", "--libvirt-socket", filepath.Join(dir, "libvirt-sock")})
	if err == nil || !strings.Contains(err.Error(), "--libvirt") || !strings.Contains(err.Error(), "is libvirtd running?") {
		t.Errorf("no libvirtd: %v", err)
	}
}

// serves says whether an axd answers on sock.
func serves(sock string) bool {
	_, err := api.NewClient(sock).Status(context.Background())
	return err == nil
}

// runUntil starts axd (run) with args and a socket and state directory of
// its own, and waits until ready(sock) — failing the test if axd ends first
// or 20 s pass. stop ends axd and checks it ended cleanly.
func runUntil(t *testing.T, what string, ready func(sock string) bool, args ...string) (sock string, stop func()) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "axd.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"--socket", sock, "--state-dir", t.TempDir()}, args...))
	}()
	for deadline := time.Now().Add(20 * time.Second); !ready(sock); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-done:
			cancel()
			t.Fatalf("axd %v ended: %v", args, err)
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("axd %v: %s: not within 20 s", args, what)
		}
	}
	return sock, func() {
		t.Helper()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("axd %v: %v", args, err)
		}
	}
}
