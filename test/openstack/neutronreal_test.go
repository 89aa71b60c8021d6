package openstack

import (
	"context"
	"strings"
	"testing"
)

// TestNeutronConfig: the server's configuration runs every privsep
// context's helper directly and enables the experimental Linux bridge
// driver; an agent's maps its physnet to its interface; agents need the
// real Neutron and plain PHYSNET:INTERFACE mappings.
func TestNeutronConfig(t *testing.T) {
	c := &Cloud{Dir: "/tmp/ax-cloud", Neutron: 9696, Rabbit: 5672, DB: 3306, Keystone: 5000}
	conf := render(neutronConfigs["neutron/neutron.conf"], c)
	for _, want := range []string{"bind_port = 9696", "[privsep_link]\nhelper_command = privsep-helper --config-file /tmp/ax-cloud/neutron/neutron.conf",
		"[experimental]\n# Zed marks the Linux bridge mechanism driver and agent experimental\nlinuxbridge = true", "transport_url = rabbit://guest:guest@127.0.0.1:5672/"} {
		if !strings.Contains(conf, want) {
			t.Errorf("neutron.conf lacks %q:\n%s", want, conf)
		}
	}
	agent := renderWith(neutronAgentConf, NeutronAgent{Host: "a", Mappings: "public:nprov"})
	if !strings.Contains(agent, "host = a\n") || !strings.Contains(agent, "physical_interface_mappings = public:nprov\n") {
		t.Errorf("agent configuration:\n%s", agent)
	}
	ctx := context.Background()
	if err := c.StartNeutronAgent(ctx, NeutronAgent{Host: "a", Mappings: "public:nprov"}); err == nil || !strings.Contains(err.Error(), "runs no Neutron") {
		t.Errorf("an agent without Neutron: %v", err)
	}
	c.opts.Neutron = true
	for _, bad := range []string{"", "public", "public:", ":nprov", "public:nprov\n[DEFAULT]", "public:n prov"} {
		if err := c.StartNeutronAgent(ctx, NeutronAgent{Host: "a", Mappings: bad}); err == nil || !strings.Contains(err.Error(), "PHYSNET:INTERFACE") {
			t.Errorf("mappings %q: %v", bad, err)
		}
	}
}
