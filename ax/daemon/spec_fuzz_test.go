package daemon

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/names"
)

// FuzzAdoptSpec feeds arbitrary stream specs to the partner's validator:
// whatever it accepts names only safe things, kernels only from this host's
// image directory, and leaves nothing of the primary's paths.
func FuzzAdoptSpec(f *testing.F) {
	good, _ := json.Marshal(streamSpec{Primary: "a", Spec: goodSpec()})
	f.Add(good)
	f.Add([]byte(`{"primary":"a","spec":{"name":"vm1","guest":{"ram_mib":1,"kernel":"/var/cache/ax/lab/../../../etc/shadow"}}}`))
	f.Add([]byte(`{"primary":"a","spec":{"name":"v;touch x","guest":{"ram_mib":1}}}`))
	f.Add([]byte(`{"primary":"a","spec":{"name":"vm1","bridge":"br-pub","guest":{"ram_mib":1,"tap":"eth0","disks":[{"node":"d","path":"/x,file=/etc/shadow"}]}}}`))
	d := &Daemon{cfg: Config{Host: "b", Peers: map[string]Peer{"a": {}}, ImageDirs: []string{"/var/cache/ax/lab"}, Bridges: []string{"br-pub"}}}
	f.Fuzz(func(t *testing.T, payload []byte) {
		var ss streamSpec
		if json.Unmarshal(payload, &ss) != nil {
			return
		}
		s, err := d.adoptSpec(ss.Spec.Name, "a", ss)
		if err != nil {
			return
		}
		if names.Check("vm", s.Name) != nil || s.Name != ss.Spec.Name {
			t.Fatalf("accepted VM name %q", s.Name)
		}
		for _, p := range []string{s.Guest.Kernel, s.Guest.Initrd} {
			if p != "" && (names.CheckPath("image", p, "/var/cache/ax/lab") != nil || strings.Contains(p, "..")) {
				t.Fatalf("accepted image %q", p)
			}
		}
		if s.Guest.QMP != "" || s.Guest.RAMFile != "" || s.Guest.Console != "" || s.Guest.Agent != "" || s.Guest.PIDFile != "" {
			t.Fatalf("kept the primary's paths: %+v", s.Guest)
		}
		if s.Guest.Tap != "" && s.Guest.Tap != replicaTap(s.Name) {
			t.Fatalf("kept the primary's tap %q", s.Guest.Tap)
		}
		if s.Bridge != "" && s.Bridge != "br-pub" {
			t.Fatalf("accepted bridge %q", s.Bridge)
		}
		for _, dk := range s.Guest.Disks {
			if names.CheckNode(dk.Node) != nil || names.CheckPath("disk", dk.Path) != nil {
				t.Fatalf("accepted disk %+v", dk)
			}
		}
		for i := 0; i < len(s.Guest.Append); i++ {
			if c := s.Guest.Append[i]; c < 0x20 || c > 0x7e {
				t.Fatalf("accepted command line %q", s.Guest.Append)
			}
		}
	})
}
