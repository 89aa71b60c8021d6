package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/axproject/ax/nova-hook/nova/novatest"
)

// The README's Nova flags (--nova-cloud, --nova-clouds-file, --nova-host;
// or OS_CLOUD and OS_CLIENT_CONFIG_FILE as every OpenStack tool takes
// them): axd serves and asks Nova for its host's servers. What cannot be
// right is refused before anything starts.
func TestNovaFlags(t *testing.T) {
	cloud := novatest.New(t)
	dir := t.TempDir()
	clouds := cloud.CloudsYAML(t, dir)
	psk := filepath.Join(dir, "psk")
	os.WriteFile(psk, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	// serve runs axd until it asked Nova twice for novaHost's servers.
	serve := func(t *testing.T, novaHost string, args ...string) {
		t.Helper()
		asked := func(string) bool { return cloud.Count("GET", "/servers/detail?all_tenants=true&host="+novaHost) > 1 }
		sock, stop := runUntil(t, "asking Nova for host "+novaHost+"'s servers twice", asked,
			append([]string{"--host", "a", "--psk-file", psk, "--peer", "b=127.0.0.1:17400,127.0.0.1:17401"}, args...)...)
		if !serves(sock) {
			t.Errorf("axd %v does not serve", args)
		}
		stop()
	}
	hypervisors := func() int { return cloud.Count("GET", "/compute/v2.1/os-hypervisors/detail") }
	t.Run("flags", func(t *testing.T) {
		serve(t, "compute-1", "--nova-cloud", "ax-test", "--nova-clouds-file", clouds, "--nova-host", "compute-1", "--nova-poll", "1s")
		// The promises are held in Placement: it looked for its compute node.
		if hypervisors() == 0 {
			t.Error("axd did not look for its compute node's resource provider")
		}
	})
	t.Run("placement off", func(t *testing.T) {
		before := hypervisors()
		serve(t, "compute-2", "--nova-cloud", "ax-test", "--nova-clouds-file", clouds, "--nova-host", "compute-2", "--nova-poll", "1s", "--nova-placement=false")
		if n := hypervisors() - before; n != 0 {
			t.Errorf("with --nova-placement=false axd asked for its compute node %d times", n)
		}
	})
	t.Run("environment", func(t *testing.T) {
		t.Setenv("OS_CLOUD", "ax-test")
		t.Setenv("OS_CLIENT_CONFIG_FILE", clouds)
		serve(t, "a", "--nova-poll", "1s", "--nova-resync", "30s")
	})
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown cloud", []string{"--nova-cloud", "other", "--nova-clouds-file", clouds}, `"other" not found`},
		{"no clouds.yaml", []string{"--nova-cloud", "ax-test", "--nova-clouds-file", filepath.Join(dir, "missing.yaml")}, "missing.yaml"},
		{"file without a cloud", []string{"--nova-clouds-file", clouds}, "need --nova-cloud"},
		{"hostile Nova host", []string{"--nova-cloud", "ax-test", "--nova-clouds-file", clouds, "--nova-host", "a&all_tenants=0"}, "--nova-host"},
		{"poll too often", []string{"--nova-cloud", "ax-test", "--nova-clouds-file", clouds, "--nova-poll", "10ms"}, "--nova-poll"},
		{"resync under poll", []string{"--nova-cloud", "ax-test", "--nova-clouds-file", clouds, "--nova-resync", "1s"}, "--nova-resync"},
	} {
		err := run(context.Background(), append([]string{"--socket", filepath.Join(t.TempDir(), "s"), "--state-dir", t.TempDir(),
			"--host", "a", "--psk-file", psk}, tc.args...))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one saying %q", tc.name, err, tc.want)
		}
	}
}
