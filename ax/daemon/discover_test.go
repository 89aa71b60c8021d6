package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/hvtest"
	"github.com/axproject/ax/ax/reserve"
	"github.com/axproject/ax/ax/vm"
)

// discoveringFake is the recording fake as a driver that finds its VMs
// by name (libvirt's), describing them as specs says.
type discoveringFake struct {
	*hvtest.Fake
	specs map[string]api.VMSpec
	asked []string
}

func (f *discoveringFake) DiscoverSpec(ctx context.Context, name string) (api.VMSpec, error) {
	f.asked = append(f.asked, name)
	s, ok := f.specs[name]
	if !ok {
		return api.VMSpec{}, errors.New("domain " + name + " cannot be protected: its RAM is anonymous memory, not a file; give the domain <memoryBacking>…")
	}
	return s, nil
}

// protectVia posts axctl's protect request to d's API.
func protectVia(t *testing.T, d *Daemon, vm string, body string) error {
	t.Helper()
	return postVia(d, "/v1/vms/"+vm+"/protect", body)
}

// postVia posts body to d's API at path; the error is axd's answer.
func postVia(d *Daemon, path, body string) error {
	rec := httptest.NewRecorder()
	d.apiHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, strings.NewReader(body)))
	if rec.Code == http.StatusOK {
		return nil
	}
	var r struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil || r.Error == "" {
		return errors.New(rec.Body.String())
	}
	return errors.New(r.Error)
}

// TestProtectDiscovers: axctl protect DOMAIN of a VM axd was never told
// of defines it from what the driver discovers, with no QMP socket.
func TestProtectDiscovers(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	ram := filepath.Join(t.TempDir(), "pc.ram")
	if err := os.WriteFile(ram, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	disc := &discoveringFake{Fake: fake, specs: map[string]api.VMSpec{
		"instance-0000002a": {Name: "instance-0000002a", Guest: api.Guest{Name: "instance-0000002a", RAMMiB: 1, RAMFile: ram, Tap: "tap0", MAC: "fa:16:3e:4c:2a:91"}},
	}}
	d.cfg.Hypervisor = disc
	// An unknown peer ends the request after the VM is defined, before
	// protection starts.
	err := protectVia(t, d, "instance-0000002a", `{"level":"ft","peer":"zz"}`)
	if err == nil || !strings.Contains(err.Error(), "unknown peer") {
		t.Fatalf("protect: %v, want it to reach the peer check", err)
	}
	v, err := d.vm("instance-0000002a")
	if err != nil {
		t.Fatalf("the discovered VM is not defined: %v", err)
	}
	if v.spec.Guest.RAMFile != ram || v.spec.Guest.QMP != "" {
		t.Errorf("defined spec %+v", v.spec)
	}
	if ev := events(d, "define"); len(ev) != 1 || !strings.Contains(ev[0], "discovered from the hypervisor") {
		t.Errorf("define events %q", ev)
	}
	// Known now: not asked again.
	protectVia(t, d, "instance-0000002a", `{"level":"ft","peer":"zz"}`)
	if len(disc.asked) != 1 {
		t.Errorf("discovered %d times", len(disc.asked))
	}
	// A domain that cannot be protected: the driver's refusal reaches
	// axctl, nothing is defined.
	err = protectVia(t, d, "instance-0000002b", `{"level":"ft","peer":"a"}`)
	if err == nil || !strings.Contains(err.Error(), "<memoryBacking>") {
		t.Errorf("an unprotectable domain: %v", err)
	}
	if _, err := d.vm("instance-0000002b"); err == nil {
		t.Error("an unprotectable domain was defined")
	}
}

// TestProtectUnknownWithoutDiscovery: the QMP driver cannot discover; an
// unknown VM is refused as before, and specs need their QMP socket.
func TestProtectUnknownWithoutDiscovery(t *testing.T) {
	d, _ := fakeHost(t, reserve.Capacity{})
	if err := protectVia(t, d, "vm9", `{"level":"ft","peer":"a"}`); err == nil || !strings.Contains(err.Error(), "no VM vm9") {
		t.Errorf("unknown VM: %v", err)
	}
	if !d.needsQMP() {
		t.Error("a driver that cannot discover must be given QMP sockets")
	}
	if err := d.define(api.VMSpec{Name: "vm9", Guest: api.Guest{RAMMiB: 1, Disks: []api.Disk{{Node: "d0", Path: "/var/lib/x.raw"}}}}); err == nil || !strings.Contains(err.Error(), "no QMP socket") {
		t.Errorf("a spec without QMP: %v", err)
	}
}

// TestHypervisorStopped: a domain libvirt stopped on request (virsh
// destroy) ends what axd knew of it, with an event; a replica's stop
// (axd's own kill of a failed promotion, say) is left alone.
func TestHypervisorStopped(t *testing.T) {
	d, fake := fakeHost(t, plenty)
	ram := filepath.Join(t.TempDir(), "pc.ram")
	if err := os.WriteFile(ram, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	d.cfg.Hypervisor = &discoveringFake{Fake: fake, specs: map[string]api.VMSpec{
		"instance-0000002a": {Name: "instance-0000002a", Guest: api.Guest{Name: "instance-0000002a", RAMMiB: 1, RAMFile: ram, Tap: "tap0", MAC: "fa:16:3e:4c:2a:91"}},
	}}
	if err := d.discover(context.Background(), "instance-0000002a"); err != nil {
		t.Fatal(err)
	}
	d.hypervisorStopped("instance-0000002a", "libvirt destroyed domain instance-0000002a (destroyed)")
	if _, err := d.vm("instance-0000002a"); err == nil {
		t.Error("axd still knows the destroyed domain")
	}
	if ev := events(d, "stopped"); len(ev) != 1 || !strings.Contains(ev[0], "no failover") {
		t.Errorf("stopped events %q", ev)
	}
	v := newVM("vm2", vm.Ready)
	d.mu.Lock()
	d.vms["vm2"] = v
	d.mu.Unlock()
	d.hypervisorStopped("vm2", "libvirt destroyed domain vm2 (destroyed)")
	if got, err := d.vm("vm2"); err != nil || got.st != vm.Ready {
		t.Errorf("a replica's stop changed it: %v", err)
	}
	d.hypervisorStopped("nosuch", "libvirt destroyed domain nosuch (destroyed)")
}
