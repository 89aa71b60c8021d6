package nova_test

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/nova-hook/nova/novatest"
)

const (
	web = "6f2d1c1e-6a3b-4c55-9d1e-0a7e2b9f4c11"
	db  = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
	far = "9a8b7c6d-5e4f-4031-9213-f4e5d6c7b8a9"
	img = "2e3f4a5b-6c7d-4e8f-9012-3a4b5c6d7e8f"
)

// cloud is a fake cloud with a server on host a (image-backed, with a
// flavor asking ft), one volume-backed on a, and one on host b.
func cloud(t *testing.T) (*novatest.Cloud, *nova.Client) {
	t.Helper()
	c := novatest.New(t)
	c.AddImage(img, map[string]string{"ax_level": "ha", "hw_disk_bus": "virtio"})
	c.AddServer(novatest.Server{ID: web, Name: "web-1", InstanceName: "instance-0000002a", Host: "a", Flavor: "m1.ft",
		FlavorSpecs: map[string]string{"ax:level": "ft"}, ImageID: img, Metadata: map[string]string{"owner": "ops"}})
	c.AddServer(novatest.Server{ID: db, Name: "db-1", InstanceName: "instance-0000002b", Host: "a", Flavor: "m1.small"})
	c.AddServer(novatest.Server{ID: far, Name: "far", InstanceName: "instance-0000002c", Host: "b", Flavor: "m1.small"})
	cl, err := nova.New(nova.Config{Cloud: "ax-test", CloudsFile: c.CloudsYAML(t, t.TempDir()), Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c, cl
}

// The servers of one host, as gophercloud reads them through Keystone's
// catalog at microversion 2.47: instance name, embedded flavor's extra
// specs, image id, metadata.
func TestServersOfHost(t *testing.T) {
	c, cl := cloud(t)
	ctx := context.Background()
	got, err := cl.Servers(ctx, "a", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].ID != db || got[1].ID != web {
		t.Fatalf("servers of a: %+v", got)
	}
	s := got[1]
	if s.InstanceName != "instance-0000002a" || s.Host != "a" || s.Status != "ACTIVE" || s.Flavor != "m1.ft" ||
		s.FlavorSpecs["ax:level"] != "ft" || s.ImageID != img || s.Metadata["owner"] != "ops" || s.Updated.IsZero() {
		t.Errorf("server %+v", s)
	}
	if got[0].ImageID != "" {
		t.Errorf("volume-backed server with image %q", got[0].ImageID)
	}
	for _, r := range []string{"POST /identity/v3/auth/tokens", "GET /compute/v2.1/servers/detail?all_tenants=true&host=a"} {
		if c.Count(strings.Fields(r)[0], strings.Fields(r)[1]) != 1 {
			t.Errorf("no request %q in %q", r, c.Requests())
		}
	}
	lvl, err := cl.ImageLevel(ctx, img)
	if err != nil || lvl != "ha" {
		t.Errorf("image level %q %v", lvl, err)
	}
	if _, err := cl.ImageLevel(ctx, "7e3f4a5b-6c7d-4e8f-9012-3a4b5c6d7e8f"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("missing image: %v", err)
	}
	one, err := cl.Server(ctx, web)
	if err != nil || one.InstanceName != "instance-0000002a" || one.FlavorSpecs["ax:level"] != "ft" {
		t.Errorf("server %s: %+v %v", web, one, err)
	}
}

// changes-since: only what changed at or after the time given, deleted
// servers included.
func TestServersChangedSince(t *testing.T) {
	c, cl := cloud(t)
	ctx := context.Background()
	time.Sleep(1100 * time.Millisecond) // Nova keeps whole seconds
	since := time.Now().UTC().Truncate(time.Second)
	got, err := cl.Servers(ctx, "a", since)
	if err != nil || len(got) != 0 {
		t.Fatalf("nothing changed: %+v %v", got, err)
	}
	c.SetMetadata(web, "ax:level", "ha")
	c.Update(db, func(s *novatest.Server) { s.Deleted = true })
	got, err = cl.Servers(ctx, "a", since)
	if err != nil || len(got) != 2 || got[0].Status != "DELETED" || got[1].Metadata["ax:level"] != "ha" {
		t.Fatalf("changed: %+v %v", got, err)
	}
	if c.Count("GET", "changes-since="+url.QueryEscape(since.Format("2006-01-02T15:04:05Z"))) != 2 {
		t.Errorf("requests %q", c.Requests())
	}
}

// ax:status is written alone (PUT of one key): the server's other
// metadata stays; a long text is cut to what Nova takes.
func TestSetStatus(t *testing.T) {
	c, cl := cloud(t)
	ctx := context.Background()
	if err := cl.SetStatus(ctx, web, "protected at ft towards b"); err != nil {
		t.Fatal(err)
	}
	m := c.Metadata(web)
	if m["ax:status"] != "protected at ft towards b" || m["owner"] != "ops" || len(m) != 2 {
		t.Errorf("metadata %v", m)
	}
	if err := cl.SetStatus(ctx, web, strings.Repeat("é", 200)); err != nil {
		t.Fatalf("long status: %v", err)
	}
	if m := c.Metadata(web); len(m["ax:status"]) > nova.MaxValue || !strings.HasPrefix(m["ax:status"], "éé") {
		t.Errorf("long status stored as %d bytes", len(m["ax:status"]))
	}
	if c.Count("PUT", "/servers/"+web+"/metadata/ax:status") != 2 {
		t.Errorf("requests %q", c.Requests())
	}
}

// Ids Nova or a caller hands AX go into URL paths: what is not a UUID is
// refused before any request.
func TestRefusesHostileIDs(t *testing.T) {
	c, cl := cloud(t)
	ctx := context.Background()
	for _, id := range []string{"../../v3/users", "", "6f2d1c1e?x=1", strings.Repeat("a", 65)} {
		if err := cl.SetStatus(ctx, id, "x"); err == nil || !strings.Contains(err.Error(), "not a UUID") {
			t.Errorf("SetStatus(%q): %v", id, err)
		}
		if _, err := cl.ImageLevel(ctx, id); err == nil {
			t.Errorf("ImageLevel(%q) accepted", id)
		}
	}
	if n := len(c.Requests()); n != 0 {
		t.Errorf("%d requests made: %q", n, c.Requests())
	}
}

// An outage is an error; once the cloud is back, the client works
// again, and an expired token is renewed by itself.
func TestOutageAndReauth(t *testing.T) {
	c, cl := cloud(t)
	ctx := context.Background()
	c.SetDown(true)
	if _, err := cl.Servers(ctx, "a", time.Time{}); err == nil {
		t.Fatal("no error while Keystone is down")
	}
	c.SetDown(false)
	if _, err := cl.Servers(ctx, "a", time.Time{}); err != nil {
		t.Fatalf("after the outage: %v", err)
	}
	c.FailNext(1, 503)
	if _, err := cl.Servers(ctx, "a", time.Time{}); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("Nova 503: %v", err)
	}
	c.ExpireToken()
	if _, err := cl.Servers(ctx, "a", time.Time{}); err != nil {
		t.Fatalf("expired token: %v", err)
	}
	if n := c.Count("POST", "/auth/tokens"); n != 2 {
		t.Errorf("%d token requests, want 2 (the first, and after expiry)", n)
	}
}

// clouds.yaml problems are found before axd serves, with where it looked.
func TestNewRefuses(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "clouds.yaml")
	os.WriteFile(good, []byte("clouds:\n  one:\n    auth:\n      auth_url: http://127.0.0.1:1/v3\n"), 0o600)
	noURL := filepath.Join(dir, "nourl.yaml")
	os.WriteFile(noURL, []byte("clouds:\n  one:\n    auth:\n      username: x\n"), 0o600)
	for _, c := range []struct {
		cfg  nova.Config
		want string
	}{
		{nova.Config{}, "no cloud named"},
		{nova.Config{Cloud: "two", CloudsFile: good}, `"two" not found`},
		{nova.Config{Cloud: "one", CloudsFile: filepath.Join(dir, "missing.yaml")}, "missing.yaml"},
		{nova.Config{Cloud: "one", CloudsFile: noURL}, "no auth_url"},
	} {
		if _, err := nova.New(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
	if _, err := nova.New(nova.Config{Cloud: "one", CloudsFile: good}); err != nil {
		t.Errorf("good clouds.yaml: %v", err)
	}
}

// Glance down keeps no server's metadata or flavor level from being read:
// only the image property waits for it.
func TestGlanceDown(t *testing.T) {
	c, cl := cloud(t)
	ctx := context.Background()
	c.SetGlanceDown(true)
	got, err := cl.Servers(ctx, "a", time.Time{})
	if err != nil || len(got) != 2 {
		t.Fatalf("servers while Glance is down: %+v %v", got, err)
	}
	if err := cl.SetStatus(ctx, web, "x"); err != nil {
		t.Errorf("ax:status while Glance is down: %v", err)
	}
	if _, err := cl.ImageLevel(ctx, img); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("image level while Glance is down: %v", err)
	}
	c.SetGlanceDown(false)
	if lvl, err := cl.ImageLevel(ctx, img); err != nil || lvl != "ha" {
		t.Errorf("image level once Glance is back: %q %v", lvl, err)
	}
}
