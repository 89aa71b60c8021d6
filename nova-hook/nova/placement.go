package nova

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"strings"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack"
	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/hypervisors"
	"github.com/gophercloud/gophercloud/v2/openstack/identity/v3/tokens"
	"github.com/gophercloud/gophercloud/v2/openstack/placement/v1/allocations"
	"github.com/gophercloud/gophercloud/v2/openstack/placement/v1/resourceproviders"

	"github.com/axproject/ax/ax/names"
)

// The capacity a partner host promised for its partners' guests (package
// reserve) is held in Placement too, so that Nova's scheduler does not
// fill the host with servers that would leave no room for a failover. Each
// promise is an allocation against the host's compute node resource
// provider by a consumer of AX's own: consumer type ReservationType, a
// UUID made from the provider and the guest (ReservationConsumer), AX's
// project and user. Nova's resource tracker leaves allocations by
// consumers that are neither its instances nor its migrations alone (it
// logs them); `nova-manage placement audit --delete` removes them, and axd
// makes them again.
const (
	// PlacementMicroversion: consumer types (1.38), consumer generations
	// (1.28).
	PlacementMicroversion = "1.38"
	// HypervisorMicroversion: a hypervisor's id is its compute node's
	// UUID, which is its resource provider's (2.53).
	HypervisorMicroversion = "2.53"
	// ReservationType is the consumer type of AX's reservations.
	ReservationType = "AX_RESERVATION"
)

// Resources are amounts by resource class (VCPU, MEMORY_MB, DISK_GB).
type Resources map[string]int

// Equal says whether r and o hold the same amounts.
func (r Resources) Equal(o Resources) bool { return maps.Equal(r, o) }

// ErrNoCapacity is returned when Placement refuses a reservation because
// the provider does not have what it asks.
var ErrNoCapacity = errors.New("placement: the resource provider does not have the capacity")

// ErrNoComputeNode is returned when Nova has no compute node on the host.
var ErrNoComputeNode = errors.New("no compute node")

// axNamespace is the UUID namespace of ReservationConsumer's name-based
// UUIDs (RFC 9562 version 5).
var axNamespace = [16]byte{0x6a, 0x0c, 0x8e, 0x53, 0x31, 0x2d, 0x4b, 0x1e, 0x9f, 0x47, 0x0e, 0x2a, 0x5d, 0x61, 0x7c, 0x90}

// ReservationConsumer is the consumer UUID of the reservation for guest vm
// on resource provider rp: the same on every axd and across restarts.
func ReservationConsumer(rp, vm string) string {
	h := sha1.New()
	h.Write(axNamespace[:])
	h.Write([]byte(strings.ToLower(rp) + "/" + vm))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = u[6]&0x0f | 0x50
	u[8] = u[8]&0x3f | 0x80
	s := hex.EncodeToString(u[:])
	return s[0:8] + "-" + s[8:12] + "-" + s[12:16] + "-" + s[16:20] + "-" + s[20:]
}

// placementClient is Placement's client at PlacementMicroversion.
func (c *Client) placementClient(ctx context.Context) (*gophercloud.ServiceClient, error) {
	return c.service(ctx, &c.placement, "no placement endpoint in the catalog, or Placement did not say its version",
		atMicroversion(openstack.NewPlacementV1, PlacementMicroversion))
}

// ComputeNode is the UUID of host's compute node, which is its resource
// provider's in Placement.
func (c *Client) ComputeNode(ctx context.Context, host string) (string, error) {
	if err := names.Check("host", host); err != nil {
		return "", err
	}
	compute, err := c.at(ctx, HypervisorMicroversion)
	if err != nil {
		return "", err
	}
	pages, err := hypervisors.List(compute, hypervisors.ListOpts{}).AllPages(ctx)
	if err != nil {
		return "", fmt.Errorf("listing hypervisors: %w", err)
	}
	all, err := hypervisors.ExtractHypervisors(pages)
	if err != nil {
		return "", fmt.Errorf("listing hypervisors: %w", err)
	}
	var found []string
	for _, h := range all {
		if h.Service.Host == host {
			found = append(found, h.ID)
		}
	}
	switch {
	case len(found) == 0:
		return "", fmt.Errorf("%w on host %s in Nova", ErrNoComputeNode, host)
	case len(found) > 1:
		return "", fmt.Errorf("host %s has %d compute nodes in Nova; AX holds reservations on a host with one", host, len(found))
	}
	if err := checkID("compute node", found[0]); err != nil {
		return "", err
	}
	return strings.ToLower(found[0]), nil
}

// Inventory is the resource classes provider rp has, with what may be
// allocated of each in all: (total − reserved) × allocation ratio.
func (c *Client) Inventory(ctx context.Context, rp string) (Resources, error) {
	if err := checkID("resource provider", rp); err != nil {
		return nil, err
	}
	p, err := c.placementClient(ctx)
	if err != nil {
		return nil, err
	}
	inv, err := resourceproviders.GetInventories(ctx, p, rp).Extract()
	if err != nil {
		return nil, fmt.Errorf("reading resource provider %s's inventory: %w", rp, err)
	}
	out := Resources{}
	for class, i := range inv.Inventories {
		out[class] = int(float64(i.Total-i.Reserved) * float64(i.AllocationRatio))
	}
	return out, nil
}

// Allocations are the allocations against provider rp, by consumer.
func (c *Client) Allocations(ctx context.Context, rp string) (map[string]Resources, error) {
	if err := checkID("resource provider", rp); err != nil {
		return nil, err
	}
	p, err := c.placementClient(ctx)
	if err != nil {
		return nil, err
	}
	a, err := resourceproviders.GetAllocations(ctx, p, rp).Extract()
	if err != nil {
		return nil, fmt.Errorf("reading resource provider %s's allocations: %w", rp, err)
	}
	out := make(map[string]Resources, len(a.Allocations))
	for consumer, al := range a.Allocations {
		out[strings.ToLower(consumer)] = Resources(al.Resources)
	}
	return out, nil
}

// ConsumerType is the type Placement records for consumer ("" for none:
// a consumer with no allocations left, or written before 1.38).
func (c *Client) ConsumerType(ctx context.Context, consumer string) (string, error) {
	a, err := c.consumer(ctx, consumer)
	if err != nil || a.ConsumerType == nil {
		return "", err
	}
	return *a.ConsumerType, nil
}

func (c *Client) consumer(ctx context.Context, consumer string) (*allocations.Allocations, error) {
	if err := checkID("consumer", consumer); err != nil {
		return nil, err
	}
	p, err := c.placementClient(ctx)
	if err != nil {
		return nil, err
	}
	a, err := allocations.Get(ctx, p, consumer).Extract()
	if err != nil {
		return nil, fmt.Errorf("reading consumer %s's allocations: %w", consumer, err)
	}
	return a, nil
}

// Reserve makes consumer's allocation r against provider rp alone, as a
// consumer of type ReservationType owned by the project and user axd
// authenticates as. A refusal for want of capacity wraps ErrNoCapacity,
// with Placement's words.
func (c *Client) Reserve(ctx context.Context, consumer, rp string, r Resources) error {
	if err := checkID("resource provider", rp); err != nil {
		return err
	}
	if len(r) == 0 {
		return fmt.Errorf("reserving on %s for consumer %s: no resources", rp, consumer)
	}
	project, user, err := c.owner(ctx)
	if err != nil {
		return err
	}
	p, err := c.placementClient(ctx)
	if err != nil {
		return err
	}
	// The consumer's generation, read and written back: a write that
	// raced another fails (409, concurrent update) and the next round
	// reads it again.
	cur, err := c.consumer(ctx, consumer)
	if err != nil {
		return err
	}
	opts := allocations.UpdateOpts{
		Allocations:        map[string]allocations.ProviderAllocationsOpts{rp: {Resources: r}},
		ProjectID:          project,
		UserID:             user,
		ConsumerGeneration: cur.ConsumerGeneration,
		ConsumerType:       ReservationType,
	}
	if err := allocations.Update(ctx, p, consumer, opts).ExtractErr(); err != nil {
		if code, detail := placementError(err); code != "placement.concurrent_update" && gophercloud.ResponseCodeIs(err, http.StatusConflict) {
			return fmt.Errorf("%w: %s", ErrNoCapacity, printableText(Truncate(detail, 300)))
		}
		return fmt.Errorf("writing consumer %s's allocation on %s: %w", consumer, rp, err)
	}
	return nil
}

// Unreserve removes consumer's allocations; one that has none is not an
// error.
func (c *Client) Unreserve(ctx context.Context, consumer string) error {
	if err := checkID("consumer", consumer); err != nil {
		return err
	}
	p, err := c.placementClient(ctx)
	if err != nil {
		return err
	}
	err = allocations.Delete(ctx, p, consumer).ExtractErr()
	if err != nil && !gophercloud.ResponseCodeIs(err, http.StatusNotFound) {
		return fmt.Errorf("removing consumer %s's allocations: %w", consumer, err)
	}
	return nil
}

// owner is the project and user of axd's token: its reservations are
// theirs.
func (c *Client) owner(ctx context.Context) (project, user string, err error) {
	c.mu.Lock()
	pc, err := c.provider(ctx)
	c.mu.Unlock()
	if err != nil {
		return "", "", err
	}
	tok, ok := pc.GetAuthResult().(tokens.CreateResult)
	if !ok {
		return "", "", fmt.Errorf("placement: the token is not one of Keystone v3 (%T): no project and user to hold reservations", pc.GetAuthResult())
	}
	p, err := tok.ExtractProject()
	if err != nil || p == nil || p.ID == "" {
		return "", "", fmt.Errorf("placement: axd's token names no project (clouds.yaml's project_name): %v", err)
	}
	u, err := tok.ExtractUser()
	if err != nil || u == nil || u.ID == "" {
		return "", "", fmt.Errorf("placement: axd's token names no user: %v", err)
	}
	return p.ID, u.ID, nil
}

// placementError is the code and detail of Placement's error body, if it
// has one.
func placementError(err error) (code, detail string) {
	var e gophercloud.ErrUnexpectedResponseCode
	if !errors.As(err, &e) {
		return "", err.Error()
	}
	var body struct {
		Errors []struct {
			Code   string `json:"code"`
			Detail string `json:"detail"`
		} `json:"errors"`
	}
	if json.Unmarshal(e.Body, &body) != nil || len(body.Errors) == 0 {
		return "", strings.TrimSpace(string(e.Body))
	}
	return body.Errors[0].Code, strings.Join(strings.Fields(body.Errors[0].Detail), " ")
}
