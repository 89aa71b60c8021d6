package novatest

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
)

// Provider is a compute node the fake Nova has, and its resource provider
// in the fake Placement (same UUID, as Nova makes them).
type Provider struct {
	UUID      string
	Host      string
	Inventory map[string]int // totals by resource class; ratio 1, nothing reserved
}

// Consumer is a consumer of the fake Placement.
type Consumer struct {
	Allocations map[string]map[string]int // by provider, by resource class
	Project     string
	User        string
	Type        string // consumer_type ("" : none recorded)
	Generation  int
}

// AddProvider gives host a compute node and its resource provider.
func (c *Cloud) AddProvider(p Provider) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.providers[p.UUID] = &p
}

// Allocate makes consumer's allocation on rp as Nova would for an
// instance (type INSTANCE), over any it had.
func (c *Cloud) Allocate(consumer, rp string, res map[string]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.consumers[consumer] = &Consumer{Allocations: map[string]map[string]int{rp: res}, Project: "p-nova", User: "u-nova", Type: "INSTANCE", Generation: 1}
}

// Consumers is a copy of the fake Placement's consumers.
func (c *Cloud) Consumers() map[string]Consumer {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]Consumer{}
	for id, co := range c.consumers {
		cp := *co
		cp.Allocations = maps.Clone(co.Allocations)
		out[id] = cp
	}
	return out
}

// SetPlacementDown makes Placement alone answer 503 until
// SetPlacementDown(false).
func (c *Cloud) SetPlacementDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.placementDown = down
}

// placementFault is Placement's error body.
func placementFault(w http.ResponseWriter, status int, code, detail string) {
	reply(w, status, map[string]any{"errors": []any{map[string]any{"status": status, "title": http.StatusText(status), "detail": detail, "code": code}}})
}

// placement answers the requests AX makes of Placement, at 1.38.
func (c *Cloud) placement(w http.ResponseWriter, r *http.Request, p string) {
	if c.placementDown {
		placementFault(w, http.StatusServiceUnavailable, "placement.undefined_code", "placement is down")
		return
	}
	if v := r.Header.Get("OpenStack-API-Version"); v != "placement 1.38" {
		placementFault(w, http.StatusNotAcceptable, "placement.undefined_code", fmt.Sprintf("this fake answers placement 1.38, asked %q", v))
		return
	}
	parts := strings.Split(p, "/")
	switch {
	case len(parts) == 3 && parts[0] == "resource_providers" && r.Method == http.MethodGet:
		rp, ok := c.providers[parts[1]]
		if !ok {
			placementFault(w, http.StatusNotFound, "placement.undefined_code", "No resource provider with uuid "+parts[1]+" found")
			return
		}
		switch parts[2] {
		case "inventories":
			inv := map[string]any{}
			for class, n := range rp.Inventory {
				inv[class] = map[string]any{"total": n, "reserved": 0, "allocation_ratio": 1.0, "min_unit": 1, "max_unit": n, "step_size": 1}
			}
			reply(w, http.StatusOK, map[string]any{"inventories": inv, "resource_provider_generation": 1})
		case "allocations":
			out := map[string]any{}
			for id, co := range c.consumers {
				if res, ok := co.Allocations[rp.UUID]; ok {
					out[id] = map[string]any{"resources": res}
				}
			}
			reply(w, http.StatusOK, map[string]any{"allocations": out, "resource_provider_generation": 1})
		default:
			placementFault(w, http.StatusNotFound, "placement.undefined_code", "no such resource "+p)
		}
	case len(parts) == 2 && parts[0] == "allocations" && r.Method == http.MethodGet:
		co, ok := c.consumers[parts[1]]
		if !ok {
			reply(w, http.StatusOK, map[string]any{"allocations": map[string]any{}})
			return
		}
		allocs := map[string]any{}
		for rp, res := range co.Allocations {
			allocs[rp] = map[string]any{"generation": 1, "resources": res}
		}
		reply(w, http.StatusOK, map[string]any{"allocations": allocs, "project_id": co.Project, "user_id": co.User,
			"consumer_generation": co.Generation, "consumer_type": co.Type})
	case len(parts) == 2 && parts[0] == "allocations" && r.Method == http.MethodPut:
		c.putAllocations(w, r, parts[1])
	case len(parts) == 2 && parts[0] == "allocations" && r.Method == http.MethodDelete:
		if _, ok := c.consumers[parts[1]]; !ok {
			placementFault(w, http.StatusNotFound, "placement.undefined_code", "No allocations for consumer '"+parts[1]+"'")
			return
		}
		delete(c.consumers, parts[1])
		w.WriteHeader(http.StatusNoContent)
	default:
		placementFault(w, http.StatusNotFound, "placement.undefined_code", "no such resource "+p)
	}
}

// putAllocations is PUT /allocations/{consumer}: the consumer generation
// checked, then each provider's capacity.
func (c *Cloud) putAllocations(w http.ResponseWriter, r *http.Request, id string) {
	var req struct {
		Allocations map[string]struct {
			Resources map[string]int `json:"resources"`
		} `json:"allocations"`
		ProjectID          string `json:"project_id"`
		UserID             string `json:"user_id"`
		ConsumerGeneration *int   `json:"consumer_generation"`
		ConsumerType       string `json:"consumer_type"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.ProjectID == "" || req.UserID == "" || req.ConsumerType == "" {
		placementFault(w, http.StatusBadRequest, "placement.undefined_code", fmt.Sprintf("JSON does not validate (project_id, user_id, consumer_type required): %v", err))
		return
	}
	co, exists := c.consumers[id]
	switch {
	case exists && (req.ConsumerGeneration == nil || *req.ConsumerGeneration != co.Generation):
		placementFault(w, http.StatusConflict, "placement.concurrent_update", "consumer generation conflict - expected "+fmt.Sprint(co.Generation))
		return
	case !exists && req.ConsumerGeneration != nil:
		placementFault(w, http.StatusConflict, "placement.concurrent_update", "consumer generation conflict - expected null but got "+fmt.Sprint(*req.ConsumerGeneration))
		return
	}
	allocs := map[string]map[string]int{}
	for _, rpID := range slices.Sorted(maps.Keys(req.Allocations)) {
		rp, ok := c.providers[rpID]
		if !ok {
			placementFault(w, http.StatusBadRequest, "placement.undefined_code", "Unable to find resource provider "+rpID)
			return
		}
		res := req.Allocations[rpID].Resources
		for class, n := range res {
			total, ok := rp.Inventory[class]
			if !ok || n < 1 {
				placementFault(w, http.StatusBadRequest, "placement.undefined_code", fmt.Sprintf("Unable to allocate inventory: no %s inventory on %s, or amount %d", class, rpID, n))
				return
			}
			used := 0
			for other, oc := range c.consumers {
				if other != id {
					used += oc.Allocations[rpID][class]
				}
			}
			if used+n > total {
				placementFault(w, http.StatusConflict, "placement.undefined_code", fmt.Sprintf("Unable to allocate inventory: Unable to create allocation for '%s' on resource provider '%s'. The requested amount would exceed the capacity.", class, rpID))
				return
			}
		}
		allocs[rpID] = maps.Clone(res)
	}
	gen := 1
	if exists {
		gen = co.Generation + 1
	}
	c.consumers[id] = &Consumer{Allocations: allocs, Project: req.ProjectID, User: req.UserID, Type: req.ConsumerType, Generation: gen}
	w.WriteHeader(http.StatusNoContent)
}

// listHypervisors is GET /os-hypervisors/detail: ids are the compute
// nodes' UUIDs from 2.53.
func (c *Cloud) listHypervisors(w http.ResponseWriter, major, minor int) {
	out := []any{}
	for i, id := range slices.Sorted(maps.Keys(c.providers)) {
		p := c.providers[id]
		var hid any = i + 1
		if major == 2 && minor >= 53 {
			hid = p.UUID
		}
		out = append(out, map[string]any{"id": hid, "hypervisor_hostname": p.Host, "hypervisor_type": "QEMU", "hypervisor_version": 7002000,
			"state": "up", "status": "enabled", "host_ip": "127.0.0.1", "service": map[string]any{"host": p.Host, "id": i + 1, "disabled_reason": nil}})
	}
	reply(w, http.StatusOK, map[string]any{"hypervisors": out})
}
