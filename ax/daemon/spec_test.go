package daemon

import (
	"errors"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/api"
)

func goodSpec() api.VMSpec {
	return api.VMSpec{Name: "vm1", Bridge: "br-pub", Policy: "notify", Tracker: "auto", Guest: api.Guest{
		Name: "vm1", RAMMiB: 256, RAMFile: "/dev/shm/ax-lab-ax/vm1.ram",
		Console: "/run/ax-lab/ax/vm1.console", Agent: "/run/ax-lab/ax/vm1.agent",
		Tap: "tap-vm1", MAC: "52:54:00:a7:00:01",
		Boot: api.Boot{Kernel: "/var/cache/ax/lab/images/k1/vmlinuz", Initrd: "/var/cache/ax/lab/images/k1/initrd",
			Append: "console=ttyS0 quiet ax.ip=10.77.0.10/24"},
		QEMU:  api.QEMU{QMP: "/run/ax-lab/ax/vm1.qmp", PIDFile: "/run/ax-lab/ax/vm1.pid", Accel: "tcg"},
		Disks: []api.Disk{{Node: "disk0", Path: "/dev/shm/ax-lab-ax/vm1.disk0", Format: "raw"}},
	}}
}

func TestCheckSpecFields(t *testing.T) {
	if err := checkSpecFields(goodSpec()); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
	for _, tc := range []struct {
		name   string
		change func(*api.VMSpec)
	}{
		{"name with a slash", func(s *api.VMSpec) { s.Name = "a/b" }},
		{"name that climbs", func(s *api.VMSpec) { s.Name = "../../../victim" }},
		{"name with a shell", func(s *api.VMSpec) { s.Name = "v;touch pwned;#" }},
		{"name with a space", func(s *api.VMSpec) { s.Name = "my vm" }},
		{"name with a leading dot", func(s *api.VMSpec) { s.Name = ".vm" }},
		{"empty name", func(s *api.VMSpec) { s.Name = "" }},
		{"QMP path relative", func(s *api.VMSpec) { s.Guest.QMP = "vm1.qmp" }},
		{"kernel path with QEMU options", func(s *api.VMSpec) { s.Guest.Kernel = "/k,readonly=off" }},
		{"RAM file climbing", func(s *api.VMSpec) { s.Guest.RAMFile = "/dev/shm/../../etc/shadow" }},
		{"tap too long", func(s *api.VMSpec) { s.Guest.Tap = "tap-a-very-long-name" }},
		{"tap with a shell", func(s *api.VMSpec) { s.Guest.Tap = "t;reboot" }},
		{"bridge with a space", func(s *api.VMSpec) { s.Bridge = "br pub" }},
		{"MAC with options", func(s *api.VMSpec) { s.Guest.MAC = "52:54:00:a7:00:01,romfile=/x" }},
		{"multicast MAC", func(s *api.VMSpec) { s.Guest.MAC = "01:00:5e:00:00:01" }},
		{"append with a newline", func(s *api.VMSpec) { s.Guest.Append = "console=ttyS0\ninit=/bin/sh" }},
		{"append too long", func(s *api.VMSpec) { s.Guest.Append = strings.Repeat("a", 3000) }},
		{"unknown accelerator", func(s *api.VMSpec) { s.Guest.Accel = "xen" }},
		{"reserved vsock CID", func(s *api.VMSpec) { s.Guest.VsockCID = 2 }},
		{"disk node with options", func(s *api.VMSpec) { s.Guest.Disks[0].Node = "d,file.filename=/etc/shadow" }},
		{"disk path with options", func(s *api.VMSpec) { s.Guest.Disks[0].Path = "/x,driver=host_device" }},
		{"disk format", func(s *api.VMSpec) { s.Guest.Disks[0].Format = "vmdk" }},
		{"two disks one node", func(s *api.VMSpec) { s.Guest.Disks = append(s.Guest.Disks, s.Guest.Disks[0]) }},
		{"RAM too large", func(s *api.VMSpec) { s.Guest.RAMMiB = 1 << 30 }},
		{"tracker", func(s *api.VMSpec) { s.Tracker = "magic" }},
		{"policy", func(s *api.VMSpec) { s.Policy = "rm -rf" }},
	} {
		s := goodSpec()
		tc.change(&s)
		if err := checkSpecFields(s); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}

func TestAdoptSpecUsesThisHostsPolicy(t *testing.T) {
	d := &Daemon{cfg: Config{Host: "b", Peers: map[string]Peer{"a": {}}, ImageDirs: []string{"/var/cache/ax/lab"}, Bridges: []string{"br-pub"}}}
	ss := streamSpec{Primary: "a", Spec: goodSpec()}
	s, err := d.adoptSpec("vm1", "a", ss)
	if err != nil {
		t.Fatal(err)
	}
	// Host-specific fields are this host's to decide.
	if s.Guest.Tap == "tap-vm1" || s.Guest.Tap != replicaTap("vm1") || len(s.Guest.Tap) > 15 {
		t.Errorf("replica tap %q, want this host's own name", s.Guest.Tap)
	}
	if s.Guest.QMP != "" || s.Guest.RAMFile != "" || s.Guest.PIDFile != "" || s.PID != 0 {
		t.Errorf("the primary's paths were kept: %+v", s.Guest)
	}
	if _, err := d.adoptSpec("vm1", "", ss); err != nil {
		t.Errorf("PSK mode (no certificate name): %v", err)
	}

	for _, tc := range []struct {
		name     string
		vm, auth string
		change   func(*streamSpec)
		policy   bool
	}{
		{"spec for another VM than the stream's", "vm2", "a", func(*streamSpec) {}, false},
		{"primary is not a peer", "vm1", "", func(ss *streamSpec) { ss.Primary = "c" }, false},
		{"primary claims another name than its certificate", "vm1", "c", func(*streamSpec) {}, false},
		{"primary name with a path", "vm1", "", func(ss *streamSpec) { ss.Primary = "../a" }, false},
		{"kernel outside the image directories", "vm1", "a", func(ss *streamSpec) { ss.Spec.Guest.Kernel = "/root/vmlinuz" }, true},
		{"initrd next to the image directory", "vm1", "a", func(ss *streamSpec) { ss.Spec.Guest.Initrd = "/var/cache/ax/lab-evil/i" }, true},
		{"bridge not allowed", "vm1", "a", func(ss *streamSpec) { ss.Spec.Bridge = "br-mgmt" }, true},
		{"unsafe name inside the spec", "v;id", "a", func(ss *streamSpec) { ss.Spec.Name = "v;id" }, false},
		{"no RAM", "vm1", "a", func(ss *streamSpec) { ss.Spec.Guest.RAMMiB = 0 }, false},
	} {
		ss := streamSpec{Primary: "a", Spec: goodSpec()}
		tc.change(&ss)
		_, err := d.adoptSpec(tc.vm, tc.auth, ss)
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
			continue
		}
		if errors.Is(err, errPolicy) != tc.policy {
			t.Errorf("%s: %v (policy refusal: %v, want %v)", tc.name, err, errors.Is(err, errPolicy), tc.policy)
		}
	}
	// A pattern: Neutron's Linux bridge agent's brq<network>.
	d.cfg.Bridges = []string{"br-pub", "brq*"}
	ss = streamSpec{Primary: "a", Spec: goodSpec()}
	for br, ok := range map[string]bool{"brq2631c9c3-ac": true, "br-pub": true, "br-mgmt": false, "xbrq1": false} {
		ss.Spec.Bridge = br
		if _, err := d.adoptSpec("vm1", "a", ss); (err == nil) != ok {
			t.Errorf("bridge %s with --bridge br-pub --bridge 'brq*': %v, want allowed %v", br, err, ok)
		}
	}
	// A host that allows no image directory refuses a spec with a kernel.
	d.cfg.ImageDirs = nil
	if _, err := d.adoptSpec("vm1", "a", streamSpec{Primary: "a", Spec: goodSpec()}); !errors.Is(err, errPolicy) {
		t.Errorf("no image directory: %v", err)
	}
}
