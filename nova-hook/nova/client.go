package nova

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack"
	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/servers"
	"github.com/gophercloud/gophercloud/v2/openstack/config"
	"github.com/gophercloud/gophercloud/v2/openstack/config/clouds"
	"github.com/gophercloud/gophercloud/v2/openstack/image/v2/images"
)

// Microversion is the compute API microversion AX asks for: from 2.47 a
// server embeds its flavor with the flavor's extra specs.
const Microversion = "2.47"

// Config says which cloud of clouds.yaml to use.
type Config struct {
	// Cloud is the cloud's name in clouds.yaml (OS_CLOUD).
	Cloud string
	// CloudsFile is the clouds.yaml to read; "" searches where every
	// OpenStack tool does: $OS_CLIENT_CONFIG_FILE, ./clouds.yaml,
	// ~/.config/openstack/clouds.yaml, /etc/openstack/clouds.yaml.
	CloudsFile string
	// Timeout bounds each request (0: 10 s).
	Timeout time.Duration
}

// Client reads servers, flavors' extra specs and images' properties from
// one cloud and writes ax:status. It authenticates at its first request
// (and again when a token expires), so a cloud down when axd starts is
// asked again later.
type Client struct {
	ao      gophercloud.AuthOptions
	eo      gophercloud.EndpointOpts
	tls     *tls.Config
	timeout time.Duration

	mu        sync.Mutex
	pc        *gophercloud.ProviderClient
	compute   *gophercloud.ServiceClient
	image     *gophercloud.ServiceClient
	placement *gophercloud.ServiceClient
}

// New reads the cloud's entry in clouds.yaml; it does not connect.
func New(cfg Config) (*Client, error) {
	if cfg.Cloud == "" {
		return nil, errors.New("nova: no cloud named (--nova-cloud NAME or OS_CLOUD, a cloud of clouds.yaml)")
	}
	opts := []clouds.ParseOption{clouds.WithCloudName(cfg.Cloud)}
	if cfg.CloudsFile != "" {
		opts = append(opts, clouds.WithLocations(cfg.CloudsFile))
	}
	ao, eo, tlsCfg, err := clouds.Parse(opts...)
	if err != nil {
		where := cfg.CloudsFile
		if where == "" {
			where = "clouds.yaml ($OS_CLIENT_CONFIG_FILE, ./, ~/.config/openstack/, /etc/openstack/)"
		}
		return nil, fmt.Errorf("nova: cloud %q in %s: %w", cfg.Cloud, where, err)
	}
	if ao.IdentityEndpoint == "" {
		return nil, fmt.Errorf("nova: cloud %q has no auth_url", cfg.Cloud)
	}
	ao.AllowReauth = true // axd runs longer than a token lives
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	return &Client{ao: ao, eo: eo, tls: tlsCfg, timeout: cfg.Timeout}, nil
}

// provider authenticates once (c.mu held).
func (c *Client) provider(ctx context.Context) (*gophercloud.ProviderClient, error) {
	if c.pc != nil {
		return c.pc, nil
	}
	pc, err := config.NewProviderClient(ctx, c.ao, config.WithHTTPClient(http.Client{Timeout: c.timeout}), config.WithTLSConfig(c.tls))
	if err != nil {
		return nil, fmt.Errorf("keystone at %s: %w", c.ao.IdentityEndpoint, err)
	}
	c.pc = pc
	return pc, nil
}

// service is the client in *slot, made by mk at its first use (what
// could not be made is asked again next time).
func (c *Client) service(ctx context.Context, slot **gophercloud.ServiceClient, what string,
	mk func(*gophercloud.ProviderClient, gophercloud.EndpointOpts) (*gophercloud.ServiceClient, error)) (*gophercloud.ServiceClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if *slot != nil {
		return *slot, nil
	}
	pc, err := c.provider(ctx)
	if err != nil {
		return nil, err
	}
	sc, err := mk(pc, c.eo)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	*slot = sc
	return sc, nil
}

// computeClient is Nova's client at Microversion.
func (c *Client) computeClient(ctx context.Context) (*gophercloud.ServiceClient, error) {
	return c.service(ctx, &c.compute, "no compute endpoint in the catalog", atMicroversion(openstack.NewComputeV2, Microversion))
}

// atMicroversion makes clients as mk does, asking microversion v.
func atMicroversion(mk func(*gophercloud.ProviderClient, gophercloud.EndpointOpts) (*gophercloud.ServiceClient, error), v string) func(*gophercloud.ProviderClient, gophercloud.EndpointOpts) (*gophercloud.ServiceClient, error) {
	return func(pc *gophercloud.ProviderClient, eo gophercloud.EndpointOpts) (*gophercloud.ServiceClient, error) {
		sc, err := mk(pc, eo)
		if err == nil {
			sc.Microversion = v
		}
		return sc, err
	}
}

// imageClient is Glance's client, made at its first use: Glance's
// catalog endpoint has no version and is asked for one, so Glance down
// does not keep Nova's levels from being read.
func (c *Client) imageClient(ctx context.Context) (*gophercloud.ServiceClient, error) {
	return c.service(ctx, &c.image, "no image endpoint in the catalog, or Glance did not say its version", openstack.NewImageV2)
}

// Servers lists the servers Nova has on compute host host (all projects;
// it takes an admin's role), those changed since since when it is not
// zero — deleted ones included, Nova's changes-since says so.
func (c *Client) Servers(ctx context.Context, host string, since time.Time) ([]Server, error) {
	compute, err := c.computeClient(ctx)
	if err != nil {
		return nil, err
	}
	opts := servers.ListOpts{Host: host, AllTenants: true}
	if !since.IsZero() {
		opts.ChangesSince = since.UTC().Format(time.RFC3339)
	}
	pages, err := servers.List(compute, opts).AllPages(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing the servers of host %s: %w", host, err)
	}
	all, err := servers.ExtractServers(pages)
	if err != nil {
		return nil, fmt.Errorf("listing the servers of host %s: %w", host, err)
	}
	out := make([]Server, 0, len(all))
	var bad []error
	for i := range all {
		s, err := fromNova(&all[i])
		if err != nil {
			bad = append(bad, err)
			continue
		}
		out = append(out, s)
	}
	return out, errors.Join(bad...)
}

// Server reads one server.
func (c *Client) Server(ctx context.Context, id string) (Server, error) {
	if err := checkID("server", id); err != nil {
		return Server{}, err
	}
	compute, err := c.computeClient(ctx)
	if err != nil {
		return Server{}, err
	}
	s, err := servers.Get(ctx, compute, id).Extract()
	if err != nil {
		return Server{}, fmt.Errorf("reading server %s: %w", id, err)
	}
	return fromNova(s)
}

// ImageLevel is image id's property ax_level ("" without one).
func (c *Client) ImageLevel(ctx context.Context, id string) (string, error) {
	if err := checkID("image", id); err != nil {
		return "", err
	}
	image, err := c.imageClient(ctx)
	if err != nil {
		return "", err
	}
	img, err := images.Get(ctx, image, id).Extract()
	if err != nil {
		return "", fmt.Errorf("reading image %s: %w", id, err)
	}
	switch v := img.Properties[ImageLevelKey].(type) {
	case nil:
		return "", nil
	case string:
		return v, nil
	default:
		return "", fmt.Errorf("image %s property %s is %T, not a string", id, ImageLevelKey, v)
	}
}

// SetStatus writes text as server id's ax:status (that key alone: the
// rest of its metadata is left as it is), cut to what Nova takes.
func (c *Client) SetStatus(ctx context.Context, id, text string) error {
	if err := checkID("server", id); err != nil {
		return err
	}
	compute, err := c.computeClient(ctx)
	if err != nil {
		return err
	}
	_, err = servers.CreateMetadatum(ctx, compute, id, servers.MetadatumOpts{StatusKey: Truncate(text, MaxValue)}).Extract()
	if err != nil {
		return fmt.Errorf("writing server %s's %s: %w", id, StatusKey, err)
	}
	return nil
}

// fromNova is what AX reads of a server gophercloud decoded; the ids it
// puts in URLs later are checked here.
func fromNova(s *servers.Server) (Server, error) {
	if err := checkID("server", s.ID); err != nil {
		return Server{}, err
	}
	out := Server{ID: s.ID, Name: printable(s.Name), InstanceName: s.InstanceName, Host: s.Host, Status: s.Status,
		Updated: s.Updated, Metadata: s.Metadata}
	if id, ok := s.Image["id"].(string); ok && id != "" {
		if err := checkID("image", id); err != nil {
			return Server{}, fmt.Errorf("server %s: %w", s.ID, err)
		}
		out.ImageID = id
	}
	if name, ok := s.Flavor["original_name"].(string); ok {
		out.Flavor = printable(name)
	}
	if specs, ok := s.Flavor["extra_specs"].(map[string]any); ok {
		out.FlavorSpecs = make(map[string]string, len(specs))
		for k, v := range specs {
			if v, ok := v.(string); ok {
				out.FlavorSpecs[k] = v
			}
		}
	}
	return out, nil
}

// checkID accepts what a Nova or Glance id is (a UUID, with or without
// dashes): it goes into a URL path.
func checkID(kind, id string) error {
	if len(id) == 0 || len(id) > 64 {
		return fmt.Errorf("%s id of %d bytes: not a UUID", kind, len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' || c == '-') {
			return fmt.Errorf("%s id %s: not a UUID", kind, quote(id))
		}
	}
	return nil
}
