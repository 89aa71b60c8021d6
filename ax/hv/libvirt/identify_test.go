package libvirt

import (
	"errors"
	"strings"
	"testing"
)

func TestIdentify(t *testing.T) {
	nova := readTestdata(t, "nova-domain.xml")
	id, err := Identify([]byte(nova))
	if err != nil {
		t.Fatal(err)
	}
	if id.Name != "instance-0000002a" || !id.Running || id.Nova == nil || id.Nova.Name != "web-1" || id.Level != "ft" || id.Peer != "compute-2" || id.UUID == "" {
		t.Errorf("nova domain: %+v", id)
	}
	// A stopped domain's XML (no id) is identified too.
	stopped := strings.Replace(nova, "id='", "data-id='", 1)
	if id, err := Identify([]byte(stopped)); err != nil || id.Running {
		t.Errorf("stopped domain: %+v %v", id, err)
	}
	plain, err := Identify([]byte("<domain type='kvm'><name>web</name></domain>"))
	if err != nil || plain.Nova != nil || plain.Level != "" {
		t.Errorf("a domain without metadata: %+v %v", plain, err)
	}
	for _, c := range []struct{ xml, want string }{
		{"<domain", "unreadable domain XML"},
		{"<domain type='kvm'><name>../etc</name></domain>", "vm name"},
		{"<domain type='kvm'><name>web</name><metadata><ax:level xmlns:ax='" + AXNamespace + "'>gold</ax:level></metadata></domain>", "<ax:level>"},
		{"<domain type='kvm'><name>web</name><metadata><ax:level xmlns:ax='" + AXNamespace + "' peer='a/b'>ft</ax:level></metadata></domain>", "peer"},
	} {
		_, err := Identify([]byte(c.xml))
		var r *Refusal
		if !errors.As(err, &r) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want a refusal saying %q", c.xml, err, c.want)
		}
	}
}
