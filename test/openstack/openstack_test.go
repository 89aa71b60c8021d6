package openstack

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack"
	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/flavors"
	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/servers"
	"github.com/gophercloud/gophercloud/v2/openstack/image/v2/imagedata"
	"github.com/gophercloud/gophercloud/v2/openstack/image/v2/images"

	"github.com/axproject/ax/nova-hook/nova"
	"github.com/axproject/ax/test/testenv"
)

// requireCloud skips (fails under AX_REQUIRE_PRIVILEGED=1) without root
// or without what deps.sh installs.
func requireCloud(t *testing.T) {
	t.Helper()
	testenv.RequireLong(t)
	testenv.RequireRoot(t)
	for _, c := range Commands {
		testenv.RequireCommand(t, c, "sh test/openstack/deps.sh (make deps)")
	}
	for _, c := range []string{"libvirtd", "virsh", "unshare"} {
		testenv.RequireCommand(t, c, "make deps")
	}
	imports := "import " + strings.Join(PythonModules, ", ")
	if out, err := exec.Command("/usr/bin/python3", "-c", imports).CombinedOutput(); err != nil {
		why := fmt.Sprintf("python3: %s: %s (try: sh test/openstack/deps.sh)", imports, strings.TrimSpace(string(out)))
		if testenv.Privileged() {
			t.Fatalf("required but unavailable: %s", why)
		}
		t.Skip(why)
	}
}

// startCloud starts the test cloud in dir, stopped at the test's end; the
// services' logs are shown when the start or the test fails.
func startCloud(ctx context.Context, t *testing.T, dir string) *Cloud {
	t.Helper()
	start := time.Now()
	c, err := Start(ctx, dir, t.Logf)
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	if err != nil {
		logTails(t, filepath.Join(dir, "log"))
		t.Fatal(err)
	}
	t.Logf("cloud up in %s", time.Since(start).Round(time.Second))
	t.Cleanup(func() {
		if t.Failed() {
			logTails(t, filepath.Join(c.Dir, "log"))
		}
	})
	return c
}

// adminClients are the cloud's compute (microversion 2.37: networks
// "none", no Neutron) and image clients, as admin.
func adminClients(ctx context.Context, t *testing.T, c *Cloud) (compute, image *gophercloud.ServiceClient) {
	t.Helper()
	pc, err := c.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if compute, err = openstack.NewComputeV2(pc, gophercloud.EndpointOpts{}); err != nil {
		t.Fatal(err)
	}
	compute.Microversion = "2.37"
	if image, err = openstack.NewImageV2(pc, gophercloud.EndpointOpts{}); err != nil {
		t.Fatal(err)
	}
	return compute, image
}

// TestOpenStackLevels runs AX's Nova client and axd against a real
// Keystone, Nova, Glance and Placement (Debian 12's OpenStack Zed, Nova's
// fake compute driver on host "a"): the three places a level is read
// from, changes-since, ax:status written; then axd with --nova-cloud on
// servers created, changed and refused with the openstack commands the
// README documents.
func TestOpenStackLevels(t *testing.T) {
	requireCloud(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir := t.TempDir()
	axd := filepath.Join(dir, "axd")
	built := make(chan error, 1)
	go func() {
		cmd := exec.Command("go", "build", "-tags", "lab", "-o", axd, "github.com/axproject/ax/cmd/axd")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			err = fmt.Errorf("building axd: %w: %s", err, out)
		}
		built <- err
	}()
	c := startCloud(ctx, t, filepath.Join(dir, "cloud"))
	t.Cleanup(func() { t.Logf("what Nova asked the stand-in for Neutron: %v", c.NeutronAsked()) })
	if err := <-built; err != nil {
		t.Fatal(err)
	}

	compute, image := adminClients(ctx, t, c)
	plain := makeFlavor(ctx, t, compute, "ax.plain", nil)
	haFlavor := makeFlavor(ctx, t, compute, "ax.ha", map[string]string{nova.LevelKey: "ha"})
	plainImage := makeImage(ctx, t, image, "ax-plain", nil)
	ftImage := makeImage(ctx, t, image, "ax-ft", map[string]string{nova.ImageLevelKey: "ft"})

	cl, err := nova.New(nova.Config{Cloud: "ax", CloudsFile: c.CloudsYAML()})
	if err != nil {
		t.Fatal(err)
	}
	// Server metadata wins over the flavor, which wins over the image.
	byMeta := makeServer(ctx, t, compute, "by-metadata", haFlavor, ftImage, map[string]string{nova.LevelKey: "none"})
	byFlavor := makeServer(ctx, t, compute, "by-flavor", haFlavor, ftImage, nil)
	byImage := makeServer(ctx, t, compute, "by-image", plain, ftImage, nil)
	asksNothing := makeServer(ctx, t, compute, "asks-nothing", plain, plainImage, nil)

	t.Run("client", func(t *testing.T) {
		list, err := cl.Servers(ctx, Host, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]nova.Server{}
		for _, s := range list {
			got[s.ID] = s
		}
		if len(got) != 4 {
			t.Fatalf("host %s: %d servers, want 4: %+v", Host, len(got), list)
		}
		want := map[string]nova.Asked{
			byMeta:      {Level: "none", From: "server metadata ax:level"},
			byFlavor:    {Level: "ha", From: "flavor ax.ha extra spec ax:level"},
			byImage:     {Level: "ft", From: "image " + ftImage + " property ax_level"},
			asksNothing: {},
		}
		for id, w := range want {
			s := got[id]
			if s.Host != Host || s.Status != "ACTIVE" || !strings.HasPrefix(s.InstanceName, "instance-") || len(s.InstanceName) != len("instance-00000001") {
				t.Errorf("server %s: host %q status %q instance name %q", s.Name, s.Host, s.Status, s.InstanceName)
			}
			a, err := nova.Ask(s, func() (string, error) { return cl.ImageLevel(ctx, s.ImageID) })
			if err != nil || a != w {
				t.Errorf("server %s asks %+v, %v; want %+v", s.Name, a, err, w)
			}
		}
		if other, err := cl.Servers(ctx, "b", time.Time{}); err != nil || len(other) != 0 {
			t.Errorf("host b: %d servers, %v; want none", len(other), err)
		}

		// changes-since: the newest change seen, as axd asks it.
		var newest time.Time
		for _, s := range list {
			if s.Updated.After(newest) {
				newest = s.Updated
			}
		}
		time.Sleep(1100 * time.Millisecond) // Nova's updated_at has seconds
		if _, err := servers.CreateMetadatum(ctx, compute, byFlavor, servers.MetadatumOpts{nova.LevelKey: "ft"}).Extract(); err != nil {
			t.Fatal(err)
		}
		changed, err := cl.Servers(ctx, Host, newest.Add(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if len(changed) != 1 || changed[0].ID != byFlavor {
			t.Fatalf("changes since %s: %+v, want server by-flavor alone", newest, changed)
		}
		if a, err := nova.Ask(changed[0], nil); err != nil || a.Level != "ft" || a.From != "server metadata ax:level" {
			t.Errorf("by-flavor after its change asks %+v, %v", a, err)
		}

		if err := cl.SetStatus(ctx, byImage, "ft towards b: written by TestOpenStackLevels"); err != nil {
			t.Fatal(err)
		}
		s, err := cl.Server(ctx, byImage)
		if err != nil {
			t.Fatal(err)
		}
		if s.Metadata[nova.StatusKey] != "ft towards b: written by TestOpenStackLevels" || len(s.Metadata) != 1 {
			t.Errorf("by-image's metadata after SetStatus: %v", s.Metadata)
		}
		if err := cl.SetStatus(ctx, byImage, strings.Repeat("é", 200)); err != nil {
			t.Errorf("a status longer than Nova takes: %v", err)
		}
	})

	t.Run("axd", func(t *testing.T) {
		osc := func(args ...string) string {
			t.Helper()
			cmd := exec.CommandContext(ctx, "openstack", args...)
			cmd.Env = append(os.Environ(), "OS_CLOUD=ax", "OS_CLIENT_CONFIG_FILE="+c.CloudsYAML())
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("openstack %s: %v: %s", strings.Join(args, " "), err, stderr.Bytes())
			}
			return strings.TrimSpace(string(out))
		}
		psk := filepath.Join(dir, "psk")
		if err := os.WriteFile(psk, []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		ports, err := freePorts(2)
		if err != nil {
			t.Fatal(err)
		}
		// axd runs as on a compute host, beside a libvirtd: one of its
		// own, with no domain, as Nova's fake driver defines none.
		libvirtSock := startLibvirtd(t, dir)
		cmd := exec.Command(axd, "--socket", filepath.Join(dir, "axd.sock"), "--state-dir", filepath.Join(dir, "axd-state"),
			"--host", "a", "--psk-file", psk, "--peer", fmt.Sprintf("b=127.0.0.1:%d,127.0.0.1:%d", ports[0], ports[1]),
			"--libvirt", "qemu:///system", "--libvirt-socket", libvirtSock,
			"--nova-cloud", "ax", "--nova-clouds-file", c.CloudsYAML(), "--nova-host", Host, "--nova-poll", "3s")
		axdLog, err := os.Create(filepath.Join(dir, "axd.log"))
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = axdLog, axdLog
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Signal(os.Interrupt)
			cmd.Wait()
			if t.Failed() {
				b, _ := os.ReadFile(axdLog.Name())
				t.Logf("axd's log:\n%s", tail(string(b), 8000))
			}
		})
		// status waits for ax:status of server id to satisfy ok, polling
		// Nova as the admin; what it last saw is in the failure.
		status := func(id, what string, within time.Duration, ok func(string) bool) string {
			t.Helper()
			var last string
			for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
				md, err := servers.Metadatum(ctx, compute, id, nova.StatusKey).Extract()
				if err == nil {
					last = md[nova.StatusKey]
					if ok(last) {
						return last
					}
				}
			}
			t.Fatalf("server %s: ax:status %s not within %s; last %q", id, what, within, last)
			return ""
		}
		prefix := func(p string) func(string) bool { return func(s string) bool { return strings.HasPrefix(s, p) } }

		// The servers already there: read at axd's start (a full resync).
		// Nova's fake driver defines no libvirt domain: the honest answer
		// to ft or ha is that the VM is not defined here, in these words.
		notHere := func(level, from string) func(string) bool {
			return func(s string) bool {
				rest, ok := strings.CutPrefix(s, level+" towards b asked ("+from+") not applied: VM instance-")
				name, why, _ := strings.Cut(rest, " ")
				return ok && len(name) == 8 && strings.HasPrefix(why, "is not defined here, and discovering it failed: ")
			}
		}
		t.Logf("by-image: %s", status(byImage, "for the image's ft", 20*time.Second, notHere("ft", "image "+ftImage+" property ax_level")))
		t.Logf("by-flavor: %s", status(byFlavor, "for its metadata's ft", 20*time.Second, notHere("ft", "server metadata ax:level")))
		t.Logf("by-metadata: %s", status(byMeta, "for none", 20*time.Second, prefix("none: not protected")))
		if md, err := servers.Metadata(ctx, compute, asksNothing).Extract(); err != nil || len(md) != 0 {
			t.Errorf("a server that asks nothing has metadata %v, %v; want none", md, err)
		}

		// The README's commands: a server created asking ft, then none, then a level AX does not take.
		created := time.Now()
		id := osc("server", "create", "--os-compute-api-version", "2.37", "--flavor", "ax.plain", "--image", "ax-plain",
			"--nic", "none", "--property", "ax:level=ft", "--wait", "-f", "value", "-c", "id", "ax-ft")
		t.Logf("openstack server create … --property ax:level=ft: %s ACTIVE after %s", id, time.Since(created).Round(time.Millisecond))
		st := status(id, "for ft", 15*time.Second, notHere("ft", "server metadata ax:level"))
		t.Logf("ax:status %s after %s", st, time.Since(created).Round(time.Millisecond))
		var props struct {
			Properties map[string]string `json:"properties"`
		}
		if err := json.Unmarshal([]byte(osc("server", "show", id, "-c", "properties", "-f", "json")), &props); err != nil || props.Properties[nova.StatusKey] != st {
			t.Errorf("openstack server show -c properties: %v, %v; want ax:status %q", props.Properties, err, st)
		}

		for _, tc := range []struct {
			level string
			ok    func(string) bool
		}{
			{"none", prefix("none: not protected (server metadata ax:level)")},
			{"gold", func(s string) bool {
				return s == `refused: server metadata ax:level is "gold": AX takes ft, ha or none; nothing applied`
			}},
			{"ha", notHere("ha", "server metadata ax:level")},
		} {
			osc("server", "set", "--property", "ax:level="+tc.level, id)
			changed := time.Now()
			st := status(id, "after ax:level="+tc.level, 15*time.Second, tc.ok)
			t.Logf("openstack server set --property ax:level=%s: ax:status %q %s after the command returned", tc.level, st, time.Since(changed).Round(time.Millisecond))
		}

		// Deleted: Nova's changes-since lists it once more, as DELETED.
		osc("server", "delete", "--wait", id)
		deleted := time.Now()
		want := "Nova: server ax-ft (" + id + ") was deleted: AX no longer takes its level from Nova here"
		for !logged(axdLog.Name(), want) {
			if time.Since(deleted) > 15*time.Second {
				t.Fatalf("axd's log does not say %q within 15 s of openstack server delete", want)
			}
			time.Sleep(500 * time.Millisecond)
		}
		t.Logf("openstack server delete: axd says so %s after", time.Since(deleted).Round(time.Millisecond))
	})
}

func makeFlavor(ctx context.Context, t *testing.T, compute *gophercloud.ServiceClient, name string, specs map[string]string) string {
	t.Helper()
	disk := 1
	f, err := flavors.Create(ctx, compute, flavors.CreateOpts{Name: name, RAM: 64, VCPUs: 1, Disk: &disk}).Extract()
	if err != nil {
		t.Fatalf("flavor %s: %v", name, err)
	}
	if specs != nil {
		if _, err := flavors.CreateExtraSpecs(ctx, compute, f.ID, flavors.ExtraSpecsOpts(specs)).Extract(); err != nil {
			t.Fatalf("flavor %s's extra specs: %v", name, err)
		}
	}
	return f.ID
}

// makeImage is a 4 KiB raw image: Nova's fake driver boots nothing.
func makeImage(ctx context.Context, t *testing.T, image *gophercloud.ServiceClient, name string, props map[string]string) string {
	t.Helper()
	img, err := images.Create(ctx, image, images.CreateOpts{Name: name, DiskFormat: "raw", ContainerFormat: "bare", Properties: props}).Extract()
	if err != nil {
		t.Fatalf("image %s: %v", name, err)
	}
	if err := imagedata.Upload(ctx, image, img.ID, bytes.NewReader(make([]byte, 4096))).ExtractErr(); err != nil {
		t.Fatalf("image %s's data: %v", name, err)
	}
	return img.ID
}

// makeServer creates a server with no network and waits until it is ACTIVE.
func makeServer(ctx context.Context, t *testing.T, compute *gophercloud.ServiceClient, name, flavor, image string, md map[string]string) string {
	t.Helper()
	s, err := servers.Create(ctx, compute, servers.CreateOpts{Name: name, FlavorRef: flavor, ImageRef: image, Networks: "none", Metadata: md}, nil).Extract()
	if err != nil {
		t.Fatalf("server %s: %v", name, err)
	}
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		got, err := servers.Get(ctx, compute, s.ID).Extract()
		if err != nil {
			t.Fatalf("server %s: %v", name, err)
		}
		switch got.Status {
		case "ACTIVE":
			return s.ID
		case "ERROR":
			t.Fatalf("server %s: ERROR: %+v", name, got.Fault)
		}
	}
	t.Fatalf("server %s: not ACTIVE within 2 min", name)
	return ""
}

// logged says whether the file at path has the text s.
func logged(path, s string) bool {
	b, err := os.ReadFile(path)
	return err == nil && bytes.Contains(b, []byte(s))
}

// logTails shows the end of every log of the cloud.
func logTails(t *testing.T, dir string) {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	sort.Strings(names)
	for _, n := range names {
		b, _ := os.ReadFile(n)
		t.Logf("--- %s:\n%s", filepath.Base(n), tail(string(b), 1500))
	}
}
