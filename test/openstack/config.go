package openstack

import (
	"context"
	"fmt"
	"os"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack"
	"github.com/gophercloud/gophercloud/v2/openstack/identity/v3/endpoints"
	"github.com/gophercloud/gophercloud/v2/openstack/identity/v3/projects"
	"github.com/gophercloud/gophercloud/v2/openstack/identity/v3/roles"
	"github.com/gophercloud/gophercloud/v2/openstack/identity/v3/services"
	"github.com/gophercloud/gophercloud/v2/openstack/identity/v3/users"
)

// The configuration files, relative to Dir, as Go templates of a Cloud
// (with .Password and .Host). Every service runs one worker: the cloud
// fits on 2 cores beside the test.
var configs = map[string]string{
	"my.cnf": `[mysqld]
datadir = {{.Dir}}/mysql
socket = {{.Dir}}/mysql.sock
pid-file = {{.Dir}}/mysql.pid
log-error = {{.Dir}}/log/mariadb-error.log
port = {{.DB}}
bind-address = 127.0.0.1
skip-name-resolve
skip-log-bin
max_connections = 400
innodb_buffer_pool_size = 128M
# a test's data: no fsync at each commit (Nova's schema is ~400 statements)
innodb_flush_log_at_trx_commit = 0
innodb_doublewrite = 0
character-set-server = utf8mb4
`,
	"rabbitmq/rabbitmq.conf": `listeners.tcp.default = 127.0.0.1:{{.Rabbit}}
log.console = true
log.file = false
disk_free_limit.absolute = 50MB
`,
	"rabbitmq/enabled_plugins":   "[].\n",
	"rabbitmq/rabbitmq-env.conf": "# empty: not /etc/rabbitmq/rabbitmq-env.conf\n",
	"keystone/keystone.conf": `[DEFAULT]
use_stderr = true
[database]
connection = {{template "db" .}}/keystone
[token]
provider = fernet
[fernet_tokens]
key_repository = {{.Dir}}/keystone/fernet-keys
[fernet_receipts]
key_repository = {{.Dir}}/keystone/fernet-keys
[credential]
key_repository = {{.Dir}}/keystone/credential-keys
[cache]
enabled = false
` + dbURL,
	"placement/placement.conf": `[DEFAULT]
use_stderr = true
[placement_database]
connection = {{template "db" .}}/placement
[api]
auth_strategy = keystone
[keystone_authtoken]
{{template "auth" .}}
` + dbURL + authBlock,
	"glance/glance-api.conf": `[DEFAULT]
use_stderr = true
bind_host = 127.0.0.1
bind_port = {{.Glance}}
workers = 1
image_cache_dir = {{.Dir}}/glance/cache
node_staging_uri = file://{{.Dir}}/glance/staging
[database]
connection = {{template "db" .}}/glance
[keystone_authtoken]
{{template "auth" .}}
[paste_deploy]
flavor = keystone
config_file = {{.Dir}}/glance/glance-api-paste.ini
[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {{.Dir}}/glance/images
[oslo_concurrency]
lock_path = {{.Dir}}/glance
[oslo_messaging_notifications]
driver = noop
` + dbURL + authBlock,
	"glance/glance-api-paste.ini": `[pipeline:glance-api-keystone]
pipeline = versionnegotiation authtoken context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true
`,
	"nova/nova.conf": `[DEFAULT]
use_stderr = true
host = {{.Host}}
my_ip = 127.0.0.1
state_path = {{.Dir}}/nova
instances_path = {{.Dir}}/nova/instances
transport_url = rabbit://guest:guest@127.0.0.1:{{.Rabbit}}/
compute_driver = fake.FakeDriver
enabled_apis = osapi_compute
osapi_compute_listen = 127.0.0.1
osapi_compute_listen_port = {{.Nova}}
osapi_compute_workers = 1
[api]
auth_strategy = keystone
[wsgi]
api_paste_config = {{.Dir}}/nova/api-paste.ini
[api_database]
connection = {{template "db" .}}/nova_api
[database]
connection = {{template "db" .}}/nova
[keystone_authtoken]
{{template "auth" .}}
[placement]
{{template "auth" .}}
region_name = RegionOne
[glance]
region_name = RegionOne
[neutron]
{{template "auth" .}}
region_name = RegionOne
[conductor]
workers = 1
[scheduler]
workers = 1
[oslo_concurrency]
lock_path = {{.Dir}}/nova/lock
[oslo_messaging_notifications]
driver = noop
[vnc]
enabled = false
[spice]
enabled = false
` + dbURL + authBlock,
	"nova/api-paste.ini": `[composite:osapi_compute]
use = call:nova.api.openstack.urlmap:urlmap_factory
/v2.1: openstack_compute_api_v21

[composite:openstack_compute_api_v21]
use = call:nova.api.auth:pipeline_factory_v21
keystone = request_id faultwrap authtoken keystonecontext osapi_compute_app_v21

[filter:request_id]
paste.filter_factory = oslo_middleware:RequestId.factory

[filter:faultwrap]
paste.filter_factory = nova.api.openstack:FaultWrapper.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory

[filter:keystonecontext]
paste.filter_factory = nova.api.auth:NovaKeystoneContext.factory

[app:osapi_compute_app_v21]
paste.app_factory = nova.api.openstack.compute:APIRouterV21.factory
`,
	// cloud ax: the user axd runs as (admin role).
	"clouds.yaml": `clouds:
  ax:
    auth:
      auth_url: http://127.0.0.1:{{.Keystone}}/v3
      username: ax
      password: {{.Password}}
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    identity_api_version: 3
`,
}

const dbURL = `{{define "db"}}mysql+pymysql://os:{{.Password}}@127.0.0.1:{{.DB}}{{end}}`

// authBlock is how a service reaches Keystone (keystone_authtoken,
// Nova's placement client): as admin, to keep the cloud small.
const authBlock = `{{define "auth"}}www_authenticate_uri = http://127.0.0.1:{{.Keystone}}/v3
auth_url = http://127.0.0.1:{{.Keystone}}/v3
auth_type = password
username = admin
password = {{.Password}}
project_name = admin
user_domain_name = Default
project_domain_name = Default{{end}}`

// dbSQL makes the databases and the user every service connects as.
const dbSQL = `CREATE DATABASE keystone; CREATE DATABASE placement; CREATE DATABASE glance;
CREATE DATABASE nova_api; CREATE DATABASE nova; CREATE DATABASE nova_cell0; CREATE DATABASE neutron;
CREATE USER 'os'@'127.0.0.1' IDENTIFIED BY '{{.Password}}';
GRANT ALL PRIVILEGES ON *.* TO 'os'@'127.0.0.1';`

// Admin is a client of Keystone as its admin.
func (c *Cloud) Admin(ctx context.Context) (*gophercloud.ProviderClient, error) {
	return openstack.AuthenticatedClient(ctx, gophercloud.AuthOptions{IdentityEndpoint: c.AuthURL(), Username: "admin",
		Password: Password, DomainName: "Default", TenantName: "admin", AllowReauth: true})
}

// register puts Placement, Glance and Nova in Keystone's catalog and adds
// the user ax (admin role on project admin), as an operator would for axd.
func (c *Cloud) register(ctx context.Context) error {
	pc, err := c.Admin(ctx)
	if err != nil {
		return fmt.Errorf("keystone: %w", err)
	}
	id, err := openstack.NewIdentityV3(pc, gophercloud.EndpointOpts{})
	if err != nil {
		return err
	}
	for _, s := range []struct {
		name, typ string
		port      int
		path      string
	}{
		{"nova", "compute", c.Nova, "/v2.1"},
		{"placement", "placement", c.Placement, ""},
		{"glance", "image", c.Glance, ""},
		{"neutron", "network", c.Neutron, ""},
	} {
		svc, err := services.Create(ctx, id, services.CreateOpts{Type: s.typ, Extra: map[string]any{"name": s.name}}).Extract()
		if err != nil {
			return fmt.Errorf("keystone: service %s: %w", s.name, err)
		}
		for _, a := range []gophercloud.Availability{gophercloud.AvailabilityPublic, gophercloud.AvailabilityInternal, gophercloud.AvailabilityAdmin} {
			_, err := endpoints.Create(ctx, id, endpoints.CreateOpts{Availability: a, Name: s.name, Region: "RegionOne",
				URL: fmt.Sprintf("http://127.0.0.1:%d%s", s.port, s.path), ServiceID: svc.ID}).Extract()
			if err != nil {
				return fmt.Errorf("keystone: endpoint of %s: %w", s.name, err)
			}
		}
	}
	pages, err := projects.List(id, projects.ListOpts{Name: "admin"}).AllPages(ctx)
	if err != nil {
		return err
	}
	ps, err := projects.ExtractProjects(pages)
	if err != nil || len(ps) != 1 {
		return fmt.Errorf("keystone: project admin: %v (%d found)", err, len(ps))
	}
	rpages, err := roles.List(id, roles.ListOpts{Name: "admin"}).AllPages(ctx)
	if err != nil {
		return err
	}
	rs, err := roles.ExtractRoles(rpages)
	if err != nil || len(rs) != 1 {
		return fmt.Errorf("keystone: role admin: %v (%d found)", err, len(rs))
	}
	u, err := users.Create(ctx, id, users.CreateOpts{Name: "ax", Password: Password, DomainID: "default", DefaultProjectID: ps[0].ID}).Extract()
	if err != nil {
		return fmt.Errorf("keystone: user ax: %w", err)
	}
	if err := roles.Assign(ctx, id, rs[0].ID, roles.AssignOpts{UserID: u.ID, ProjectID: ps[0].ID}).ExtractErr(); err != nil {
		return fmt.Errorf("keystone: ax's admin role: %w", err)
	}
	return os.Chmod(c.CloudsYAML(), 0o600)
}
