package openstack

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack"
	"github.com/gophercloud/gophercloud/v2/openstack/networking/v2/extensions/agents"
)

// NeutronPythonModules are what a cloud with Options.Neutron imports
// beyond PythonModules (python3-neutron, in deps.sh).
var NeutronPythonModules = []string{"neutron"}

// neutronConfigs are Neutron's configuration files (Options.Neutron):
// ML2 with the flat type and the Linux bridge mechanism driver, no
// tenant networks, no DHCP, L3 or metadata agents — a provider network
// whose bridge (brq<network>) the Linux bridge agent of each compute
// host makes with that host's provider interface in it
// (physical_interface_mappings), and Nova's os-vif plugs ports' taps
// into. Security groups are on
// in the server (so ports say port_filter and os-vif installs no
// iptables rules of its own) and the agents' firewall is noop: the lab's
// ports are made without port security.
var neutronConfigs = map[string]string{
	"neutron/neutron.conf": `[DEFAULT]
use_stderr = true
bind_host = 127.0.0.1
bind_port = {{.Neutron}}
core_plugin = ml2
service_plugins =
auth_strategy = keystone
api_paste_config = {{.Dir}}/neutron/api-paste.ini
transport_url = rabbit://guest:guest@127.0.0.1:{{.Rabbit}}/
state_path = {{.Dir}}/neutron
api_workers = 1
rpc_workers = 1
rpc_state_report_workers = 1
# port status changes become Nova's network-vif-plugged events
notify_nova_on_port_status_changes = true
notify_nova_on_port_data_changes = true
[database]
connection = {{template "db" .}}/neutron
[keystone_authtoken]
{{template "auth" .}}
[nova]
{{template "auth" .}}
region_name = RegionOne
[oslo_concurrency]
lock_path = {{.Dir}}/neutron/lock
[oslo_messaging_notifications]
driver = noop
[experimental]
# Zed marks the Linux bridge mechanism driver and agent experimental
linuxbridge = true
[agent]
# agents run as root: their commands need no sudo
root_helper =
report_interval = 5
` + neutronPrivsep() + dbURL + authBlock,
	"neutron/ml2_conf.ini": `[ml2]
type_drivers = flat
tenant_network_types =
mechanism_drivers = linuxbridge
extension_drivers = port_security
[ml2_type_flat]
flat_networks = *
[securitygroup]
enable_security_group = true
`,
	"neutron/api-paste.ini": `[composite:neutron]
use = egg:Paste#urlmap
/: neutronversions_composite
/v2.0: neutronapi_v2_0

[composite:neutronapi_v2_0]
use = call:neutron.auth:pipeline_factory
keystone = request_id catch_errors authtoken keystonecontext extensions neutronapiapp_v2_0

[composite:neutronversions_composite]
use = call:neutron.auth:pipeline_factory
keystone = neutronversions

[filter:request_id]
paste.filter_factory = oslo_middleware:RequestId.factory

[filter:catch_errors]
paste.filter_factory = oslo_middleware:CatchErrors.factory

[filter:keystonecontext]
paste.filter_factory = neutron.auth:NeutronKeystoneContext.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory

[filter:extensions]
paste.filter_factory = neutron.api.extensions:plugin_aware_extension_middleware_factory

[app:neutronversions]
paste.app_factory = neutron.pecan_wsgi.app:versions_factory

[app:neutronapiapp_v2_0]
paste.app_factory = neutron.api.v2.router:APIRouter.factory
`,
}

// neutronPrivsep runs each of Neutron's privsep contexts' helper directly
// (as root: no sudo, no rootwrap).
func neutronPrivsep() string {
	var b strings.Builder
	for _, ctx := range []string{"privsep", "privsep_link", "privsep_namespace", "privsep_conntrack", "privsep_dhcp_release", "privsep_ovs_vsctl"} {
		fmt.Fprintf(&b, "[%s]\nhelper_command = privsep-helper --config-file {{.Dir}}/neutron/neutron.conf\n", ctx)
	}
	return b.String()
}

// neutronAgentConf is one compute host's Linux bridge agent, laid over
// neutron.conf.
const neutronAgentConf = `[DEFAULT]
host = {{.Host}}
[linux_bridge]
physical_interface_mappings = {{.Mappings}}
[vxlan]
enable_vxlan = false
[securitygroup]
firewall_driver = noop
[agent]
polling_interval = 1
`

// neutronConfArgs are the --config-file arguments of Neutron's server.
func (c *Cloud) neutronConfArgs() []string {
	return []string{"--config-file", filepath.Join(c.Dir, "neutron", "neutron.conf"), "--config-file", filepath.Join(c.Dir, "neutron", "ml2_conf.ini")}
}

// syncNeutron makes Neutron's database.
func (c *Cloud) syncNeutron(ctx context.Context) error {
	_, err := c.run(ctx, "neutron-db-manage", nil, append(append([]string{c.script("neutron-db-manage")}, c.neutronConfArgs()...), "upgrade", "head")...)
	return err
}

// startNeutronServer starts neutron-server (API and RPC, one worker each).
func (c *Cloud) startNeutronServer(ctx context.Context) error {
	if err := c.start("neutron-server", nil, append([]string{c.script("neutron-server")}, c.neutronConfArgs()...)...); err != nil {
		return err
	}
	return c.wait(ctx, "neutron-server", 3*time.Minute, func() bool { return answers(fmt.Sprintf("http://127.0.0.1:%d/", c.Neutron)) })
}

// NeutronAgent is the Linux bridge agent of compute host Host.
type NeutronAgent struct {
	// Host is the compute host's name (Nova's and the agent's host).
	Host string
	// Netns, when set, is the network namespace it runs in (ip netns
	// exec), where the host's taps and bridges are; the cloud's loopback
	// endpoints (RabbitMQ's) must be reachable there.
	Netns string
	// Mappings is its physical_interface_mappings: PHYSNET:INTERFACE,...
	Mappings string
}

// AgentName is the service name (and log, DIR/log/NAME.log) of host's
// Linux bridge agent.
func AgentName(host string) string { return "neutron-linuxbridge-agent-" + host }

// StartNeutronAgent starts a's Linux bridge agent and waits until Neutron
// lists it alive.
func (c *Cloud) StartNeutronAgent(ctx context.Context, a NeutronAgent) error {
	if !c.opts.Neutron {
		return fmt.Errorf("neutron agent %s: the cloud runs no Neutron (Options.Neutron)", a.Host)
	}
	if a.Host == "" || !mappingsOK(a.Mappings) {
		return fmt.Errorf("neutron agent: a host and interface mappings PHYSNET:INTERFACE are needed: %+v", a)
	}
	conf := filepath.Join(c.Dir, "neutron", "linuxbridge-"+a.Host+".ini")
	if err := os.WriteFile(conf, []byte(renderWith(neutronAgentConf, a)), 0o600); err != nil {
		return err
	}
	argv := append(append(inNetns(a.Netns), c.script("neutron-linuxbridge-agent"), "--config-file", filepath.Join(c.Dir, "neutron", "neutron.conf")), "--config-file", conf)
	name := AgentName(a.Host)
	if err := c.start(name, nil, argv...); err != nil {
		return err
	}
	pc, err := c.Admin(ctx)
	if err != nil {
		return err
	}
	client, err := openstack.NewNetworkV2(pc, gophercloud.EndpointOpts{})
	if err != nil {
		return err
	}
	return c.wait(ctx, name, 2*time.Minute, func() bool {
		pages, err := agents.List(client, agents.ListOpts{Host: a.Host, AgentType: "Linux bridge agent"}).AllPages(ctx)
		if err != nil {
			return false
		}
		as, err := agents.ExtractAgents(pages)
		return err == nil && len(as) == 1 && as[0].Alive
	})
}

// inNetns is the prefix that runs a command in network namespace ns
// (none: "").
func inNetns(ns string) []string {
	if ns == "" {
		return nil
	}
	return []string{"ip", "netns", "exec", ns}
}

// mappingsOK says whether interface mappings are PHYSNET:INTERFACE pairs
// of plain names.
func mappingsOK(m string) bool {
	for _, pair := range strings.Split(m, ",") {
		p, b, ok := strings.Cut(pair, ":")
		if !ok || p == "" || b == "" || strings.ContainsAny(pair, " \n=[]") {
			return false
		}
	}
	return true
}
