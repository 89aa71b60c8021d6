package novatest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// Service is a host's nova-compute service the fake Nova has.
type Service struct {
	ID         string
	Host       string
	Up         bool // its nova-compute reports (state up unless forced down)
	ForcedDown bool
}

// Migration is an evacuation the fake Nova recorded.
type Migration struct {
	ID       int64
	Server   string
	Source   string
	Dest     string
	Status   string // accepted, done, completed
	Created  time.Time
	Finished bool // the server runs on Dest (status done or later)
}

// AddComputeService gives host a nova-compute service, up, with id.
func (c *Cloud) AddComputeService(host, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.services[host] = &Service{ID: id, Host: host, Up: true}
}

// SetServiceUp makes host's nova-compute report (up) or stop (a dead host).
func (c *Cloud) SetServiceUp(host string, up bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.services[host].Up = up
}

// ComputeService is a copy of host's service.
func (c *Cloud) ComputeService(host string) Service {
	c.mu.Lock()
	defer c.mu.Unlock()
	return *c.services[host]
}

// HoldEvacuations makes an evacuation stop at "accepted", the server in
// REBUILD on its old host, until FinishEvacuations; without it, the
// server is on its new host, ACTIVE, and the migration done at once.
func (c *Cloud) HoldEvacuations(hold bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.holdEvac = hold
}

// FinishEvacuations does what the destination's nova-compute does at the
// end of a rebuild: each accepted evacuation's server is on its new host,
// ACTIVE, and the migration done.
func (c *Cloud) FinishEvacuations() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range c.migrations {
		if m.Status == "accepted" {
			c.finish(m)
		}
	}
}

func (c *Cloud) finish(m *Migration) {
	s := c.servers[m.Server]
	s.Host, s.Status, s.Updated = m.Dest, "ACTIVE", c.stamp()
	m.Status, m.Finished = "done", true
}

// RestartCompute is host's nova-compute starting again: it reports, and
// _destroy_evacuated_instances completes the evacuations away from it
// (accepted, pre-migrating or done).
func (c *Cloud) RestartCompute(host string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.services[host].Up = true
	for _, m := range c.migrations {
		if m.Source == host && (m.Status == "accepted" || m.Status == "done") {
			m.Status = "completed"
		}
	}
}

// Migrations is a copy of the evacuations recorded.
func (c *Cloud) Migrations() []Migration {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Migration, len(c.migrations))
	for i, m := range c.migrations {
		out[i] = *m
	}
	return out
}

func (c *Cloud) renderService(s *Service, uuids bool) map[string]any {
	state := "up"
	if !s.Up || s.ForcedDown {
		state = "down"
	}
	var id any = len(s.Host) // an integer before 2.53
	if uuids {
		id = s.ID
	}
	return map[string]any{"id": id, "binary": "nova-compute", "host": s.Host, "zone": "nova", "status": "enabled",
		"state": state, "forced_down": s.ForcedDown, "disabled_reason": nil, "updated_at": "2026-01-01T00:00:00.000000"}
}

// listServices is GET /os-services?binary=&host=.
func (c *Cloud) listServices(w http.ResponseWriter, r *http.Request, major, minor int) {
	q := r.URL.Query()
	out := []any{}
	for host, s := range c.services {
		if (q.Get("host") == "" || q.Get("host") == host) && (q.Get("binary") == "" || q.Get("binary") == "nova-compute") {
			out = append(out, c.renderService(s, major == 2 && minor >= 53))
		}
	}
	reply(w, http.StatusOK, map[string]any{"services": out})
}

// putService is PUT /os-services/{uuid} {"forced_down": bool} (2.53).
func (c *Cloud) putService(w http.ResponseWriter, r *http.Request, id string, major, minor int) {
	if major != 2 || minor < 53 {
		fault(w, http.StatusNotFound, "itemNotFound", "PUT /os-services/{id} takes microversion 2.53")
		return
	}
	var s *Service
	for _, x := range c.services {
		if x.ID == id {
			s = x
		}
	}
	if s == nil {
		fault(w, http.StatusNotFound, "itemNotFound", "Service "+id+" could not be found.")
		return
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		fault(w, http.StatusBadRequest, "badRequest", "Malformed request body")
		return
	}
	down, ok := body["forced_down"].(bool)
	if !ok || len(body) != 1 {
		fault(w, http.StatusBadRequest, "badRequest", fmt.Sprintf("Invalid input for field/attribute: %v", body))
		return
	}
	s.ForcedDown = down
	reply(w, http.StatusOK, map[string]any{"service": c.renderService(s, true)})
}

// action is POST /servers/{id}/action; the fake knows evacuate at 2.68:
// {"host": h} alone (onSharedStorage is gone since 2.14, force since 2.68).
func (c *Cloud) action(w http.ResponseWriter, r *http.Request, id string, major, minor int) {
	s, ok := c.servers[id]
	if !ok || s.Deleted {
		fault(w, http.StatusNotFound, "itemNotFound", "Instance "+id+" could not be found.")
		return
	}
	var body map[string]map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		fault(w, http.StatusBadRequest, "badRequest", "Malformed request body")
		return
	}
	ev, ok := body["evacuate"]
	if !ok || len(body) != 1 {
		fault(w, http.StatusBadRequest, "badRequest", "the fake Nova knows the evacuate action only")
		return
	}
	if major != 2 || minor < 68 {
		fault(w, http.StatusBadRequest, "badRequest", "the fake Nova evacuates at microversion 2.68 only")
		return
	}
	host, _ := ev["host"].(string)
	if len(ev) != 1 || host == "" {
		fault(w, http.StatusBadRequest, "badRequest", fmt.Sprintf("Invalid input for field/attribute evacuate: %v", ev))
		return
	}
	if _, ok := c.services[host]; !ok {
		fault(w, http.StatusNotFound, "itemNotFound", "Compute host "+host+" not found.")
		return
	}
	if s.Host == host {
		fault(w, http.StatusBadRequest, "badRequest", "The target host can't be the same one.")
		return
	}
	if src, ok := c.services[s.Host]; ok && src.Up && !src.ForcedDown {
		fault(w, http.StatusBadRequest, "badRequest", "Compute service of "+s.Host+" is still in use.")
		return
	}
	switch s.Status {
	case "ACTIVE", "SHUTOFF", "ERROR":
	default:
		fault(w, http.StatusConflict, "conflictingRequest", "Cannot 'evacuate' instance "+id+" while it is in vm_state "+s.Status)
		return
	}
	m := &Migration{ID: int64(len(c.migrations) + 1), Server: id, Source: s.Host, Dest: host, Status: "accepted", Created: c.stamp()}
	c.migrations = append(c.migrations, m)
	s.Status, s.Updated = "REBUILD", c.stamp()
	if !c.holdEvac {
		c.finish(m)
	}
	w.WriteHeader(http.StatusOK) // 2.68: no body
}

// listMigrations is GET /os-migrations?instance_uuid=&migration_type=.
func (c *Cloud) listMigrations(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	out := []any{}
	for i := len(c.migrations) - 1; i >= 0; i-- { // newest first, as Nova
		m := c.migrations[i]
		if q.Get("instance_uuid") != "" && q.Get("instance_uuid") != m.Server {
			continue
		}
		if t := q.Get("migration_type"); t != "" && t != "evacuation" {
			continue
		}
		stamp := m.Created.UTC().Format("2006-01-02T15:04:05.000000")
		out = append(out, map[string]any{"id": m.ID, "uuid": fmt.Sprintf("00000000-0000-4000-8000-%012d", m.ID),
			"instance_uuid": m.Server, "migration_type": "evacuation", "source_compute": m.Source, "dest_compute": m.Dest,
			"source_node": m.Source, "dest_node": m.Dest, "dest_host": "127.0.0.1", "status": m.Status,
			"created_at": stamp, "updated_at": stamp, "old_instance_type_id": 1, "new_instance_type_id": 1,
			"user_id": "u-demo", "project_id": "p-demo"})
	}
	reply(w, http.StatusOK, map[string]any{"migrations": out})
}
