package nova

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/migrations"
	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/services"

	"github.com/axproject/ax/ax/names"
)

// The calls that make Nova's record follow an AX failover (FAILOVER.md):
// force the old host's compute service down, evacuate the server to the
// host it runs on now, and watch the evacuation's migration until the old
// host's nova-compute has cleaned up after it. Each asks the microversion
// it needs.
const (
	// ServiceMicroversion: services are named by UUID and forced_down
	// is set with PUT /os-services/{id} (2.53).
	ServiceMicroversion = "2.53"
	// EvacuateMicroversion: the scheduler checks the host named (no
	// force), and no onSharedStorage (2.68). Nova answers 200 with no
	// body: no adminPass comes back (from 2.14 it is made and kept by
	// Nova; the adopting driver never uses it).
	EvacuateMicroversion = "2.68"
	// MigrationMicroversion: os-migrations filters by instance_uuid and
	// shows each migration's uuid and type (2.59).
	MigrationMicroversion = "2.59"
)

// ComputeService is a host's nova-compute service as Nova records it.
type ComputeService struct {
	ID         string // a UUID (2.53)
	Host       string
	State      string // up, down
	Status     string // enabled, disabled
	ForcedDown bool
}

// Migration is one of a server's migrations.
type Migration struct {
	ID     int64
	Type   string // evacuation, live-migration, migration, resize
	Source string // source_compute
	Dest   string // dest_compute
	// Status of an evacuation: accepted, pre-migrating, done (the server
	// runs on Dest), completed (Source's nova-compute cleaned up after
	// it: _destroy_evacuated_instances), failed or error.
	Status  string
	Created time.Time
}

// ErrNoService is returned when Nova has no nova-compute on the host.
var ErrNoService = errors.New("no nova-compute service")

// at is compute with microversion v for one call; the shared client's
// stays as it is.
func (c *Client) at(ctx context.Context, v string) (*gophercloud.ServiceClient, error) {
	compute, err := c.computeClient(ctx)
	if err != nil {
		return nil, err
	}
	sc := *compute
	sc.Microversion = v
	return &sc, nil
}

// ComputeService is the nova-compute service of host.
func (c *Client) ComputeService(ctx context.Context, host string) (ComputeService, error) {
	if err := names.Check("host", host); err != nil {
		return ComputeService{}, err
	}
	compute, err := c.at(ctx, ServiceMicroversion)
	if err != nil {
		return ComputeService{}, err
	}
	pages, err := services.List(compute, services.ListOpts{Binary: "nova-compute", Host: host}).AllPages(ctx)
	if err != nil {
		return ComputeService{}, fmt.Errorf("reading host %s's nova-compute service: %w", host, err)
	}
	all, err := services.ExtractServices(pages)
	if err != nil {
		return ComputeService{}, fmt.Errorf("reading host %s's nova-compute service: %w", host, err)
	}
	for _, s := range all {
		if s.Host == host && s.Binary == "nova-compute" {
			if err := checkID("service", s.ID); err != nil {
				return ComputeService{}, err
			}
			return ComputeService{ID: s.ID, Host: s.Host, State: s.State, Status: s.Status, ForcedDown: s.ForcedDown}, nil
		}
	}
	return ComputeService{}, fmt.Errorf("host %s: %w", host, ErrNoService)
}

// SetForcedDown sets or clears service id's forced_down: forced down, its
// host counts as dead at once and its servers can be evacuated.
// (gophercloud's UpdateOpts leaves a false forced_down out.)
func (c *Client) SetForcedDown(ctx context.Context, id string, down bool) error {
	if err := checkID("service", id); err != nil {
		return err
	}
	compute, err := c.at(ctx, ServiceMicroversion)
	if err != nil {
		return err
	}
	_, err = compute.Put(ctx, compute.ServiceURL("os-services", id), map[string]any{"forced_down": down}, nil,
		&gophercloud.RequestOpts{OkCodes: []int{http.StatusOK}})
	if err != nil {
		return fmt.Errorf("setting service %s's forced_down to %t: %w", id, down, err)
	}
	return nil
}

// Evacuate asks Nova to rebuild server id on host, its current host's
// compute service being down (else Nova answers 400: ComputeServiceInUse).
// (gophercloud's EvacuateOpts always sends onSharedStorage, which 2.68
// refuses.)
func (c *Client) Evacuate(ctx context.Context, id, host string) error {
	if err := checkID("server", id); err != nil {
		return err
	}
	if err := names.Check("host", host); err != nil {
		return err
	}
	compute, err := c.at(ctx, EvacuateMicroversion)
	if err != nil {
		return err
	}
	_, err = compute.Post(ctx, compute.ServiceURL("servers", id, "action"), map[string]any{"evacuate": map[string]any{"host": host}}, nil,
		&gophercloud.RequestOpts{OkCodes: []int{http.StatusOK}})
	if err != nil {
		return fmt.Errorf("evacuating server %s to host %s: %w", id, host, err)
	}
	return nil
}

// Evacuations lists server id's evacuations, oldest first.
func (c *Client) Evacuations(ctx context.Context, id string) ([]Migration, error) {
	if err := checkID("server", id); err != nil {
		return nil, err
	}
	compute, err := c.at(ctx, MigrationMicroversion)
	if err != nil {
		return nil, err
	}
	typ := "evacuation"
	pages, err := migrations.List(compute, migrations.ListOpts{InstanceID: &id, MigrationType: &typ}).AllPages(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing server %s's evacuations: %w", id, err)
	}
	all, err := migrations.ExtractMigrations(pages)
	if err != nil {
		return nil, fmt.Errorf("listing server %s's evacuations: %w", id, err)
	}
	var out []Migration
	for _, m := range all {
		if m.InstanceID != id || m.MigrationType != typ {
			continue
		}
		out = append(out, Migration{ID: m.ID, Type: m.MigrationType, Source: printable(m.SourceCompute), Dest: printable(m.DestCompute),
			Status: printable(m.Status), Created: m.CreatedAt})
	}
	slices.SortFunc(out, func(a, b Migration) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}
