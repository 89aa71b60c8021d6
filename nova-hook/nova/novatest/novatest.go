// Package novatest is a fake OpenStack for tests: Keystone v3 (password
// tokens with a catalog), Nova (servers with their metadata and embedded
// flavor, compute nodes), Glance (images) and Placement (resource
// providers, allocations), answering the requests package nova makes
// in the shapes the real APIs use, with outages and errors on demand.
package novatest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The credentials the fake takes (clouds.yaml from CloudsYAML has them).
const (
	User     = "ax"
	Password = "s3cret"
	Project  = "service"
	Domain   = "Default"
)

// Server is a server the fake Nova has.
type Server struct {
	ID           string
	Name         string
	InstanceName string
	Host         string
	Status       string // "" : ACTIVE
	Metadata     map[string]string
	Flavor       string
	FlavorSpecs  map[string]string
	ImageID      string // "": booted from a volume
	Updated      time.Time
	Deleted      bool
}

// Cloud is the fake: start it with New, point clouds.yaml at it.
type Cloud struct {
	URL string

	mu         sync.Mutex
	now        func() time.Time
	token      string
	servers    map[string]*Server
	images     map[string]map[string]string
	down       bool
	glanceDown bool
	failNext   int
	failCode   int
	requests   []string
	// Evacuation: services by host, migrations in order, and whether an
	// evacuation waits for FinishEvacuations (evacuate.go).
	services   map[string]*Service
	migrations []*Migration
	holdEvac   bool
	// Placement: resource providers and consumers by UUID (placement.go).
	providers     map[string]*Provider
	consumers     map[string]*Consumer
	placementDown bool
}

// New starts a fake cloud, stopped at t's end.
func New(t testing.TB) *Cloud {
	c := &Cloud{now: time.Now, token: "gAAAAAB-token-1", servers: map[string]*Server{}, images: map[string]map[string]string{},
		services: map[string]*Service{}, providers: map[string]*Provider{}, consumers: map[string]*Consumer{}}
	srv := httptest.NewServer(http.HandlerFunc(c.serve))
	t.Cleanup(srv.Close)
	c.URL = srv.URL
	return c
}

// CloudsYAML writes a clouds.yaml naming cloud "ax-test" in dir (the
// auth_url without a version, as devstack writes it: Keystone's version
// document is asked first) and returns its path.
func (c *Cloud) CloudsYAML(t testing.TB, dir string) string {
	t.Helper()
	y := fmt.Sprintf(`clouds:
  ax-test:
    auth:
      auth_url: %s/identity
      username: %s
      password: %s
      project_name: %s
      user_domain_name: %s
      project_domain_name: %s
    region_name: RegionOne
    interface: public
    identity_api_version: 3
`, c.URL, User, Password, Project, Domain, Domain)
	p := filepath.Join(dir, "clouds.yaml")
	if err := os.WriteFile(p, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// AddServer adds (or replaces) a server, updated now.
func (c *Cloud) AddServer(s Server) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.Metadata == nil {
		s.Metadata = map[string]string{}
	}
	if s.Status == "" {
		s.Status = "ACTIVE"
	}
	s.Updated = c.stamp()
	c.servers[s.ID] = &s
}

// SetMetadata is `openstack server set --property key=value`; value ""
// is `openstack server unset --property key`.
func (c *Cloud) SetMetadata(id, key, value string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.servers[id]
	if value == "" {
		delete(s.Metadata, key)
	} else {
		s.Metadata[key] = value
	}
	s.Updated = c.stamp()
}

// Update changes a server as Nova would (a move, a state change, a
// deletion), updated now.
func (c *Cloud) Update(id string, change func(s *Server)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	change(c.servers[id])
	c.servers[id].Updated = c.stamp()
}

// Metadata is a copy of server id's metadata.
func (c *Cloud) Metadata(id string) map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for k, v := range c.servers[id].Metadata {
		out[k] = v
	}
	return out
}

// AddImage adds an image with properties.
func (c *Cloud) AddImage(id string, props map[string]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.images[id] = props
}

// SetDown makes every service refuse connections' requests (503, as a
// load balancer before a dead API does) until SetDown(false).
func (c *Cloud) SetDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
}

// SetGlanceDown makes Glance alone answer 503 until SetGlanceDown(false).
func (c *Cloud) SetGlanceDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.glanceDown = down
}

// FailNext answers the next n requests with HTTP code.
func (c *Cloud) FailNext(n, code int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failNext, c.failCode = n, code
}

// ExpireToken makes the token issued so far invalid (Keystone's tokens
// expire): the next request is answered 401 and a new token is needed.
func (c *Cloud) ExpireToken() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.token += "x"
}

// Requests returns the requests answered so far, "METHOD PATH?QUERY".
func (c *Cloud) Requests() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.requests...)
}

// Count is how many requests were method with path containing part.
func (c *Cloud) Count(method, part string) int {
	n := 0
	for _, r := range c.Requests() {
		if strings.HasPrefix(r, method+" ") && strings.Contains(r, part) {
			n++
		}
	}
	return n
}

// stamp is Nova's updated_at for a change now: whole seconds, as Nova's
// database keeps it.
func (c *Cloud) stamp() time.Time { return c.now().UTC().Truncate(time.Second) }

func (c *Cloud) serve(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.requests = append(c.requests, r.Method+" "+r.URL.RequestURI())
	switch {
	case c.down:
		fault(w, http.StatusServiceUnavailable, "serviceUnavailable", "the service is down")
		return
	case c.glanceDown && strings.HasPrefix(r.URL.Path, "/image"):
		fault(w, http.StatusServiceUnavailable, "serviceUnavailable", "glance is down")
		return
	case c.failNext > 0:
		c.failNext--
		fault(w, c.failCode, "computeFault", "injected failure")
		return
	}
	p := r.URL.Path
	switch {
	case p == "/identity" || p == "/identity/":
		c.versions(w)
		return
	case p == "/identity/v3/auth/tokens" && r.Method == http.MethodPost:
		c.issueToken(w, r)
		return
	case p == "/image" || p == "/image/":
		c.imageVersions(w)
		return
	case (p == "/placement" || p == "/placement/") && !c.placementDown:
		// Placement's root: its one version, unauthenticated.
		reply(w, http.StatusOK, map[string]any{"versions": []any{map[string]any{"id": "v1.0", "max_version": "1.39", "min_version": "1.0",
			"status": "CURRENT", "links": []any{map[string]any{"rel": "self", "href": ""}}}}})
		return
	}
	if r.Header.Get("X-Auth-Token") != c.token {
		fault(w, http.StatusUnauthorized, "unauthorized", "The request you have made requires authentication.")
		return
	}
	switch {
	case strings.HasPrefix(p, "/compute/v2.1/"):
		c.compute(w, r, strings.TrimPrefix(p, "/compute/v2.1/"))
	case strings.HasPrefix(p, "/image/v2/images/") && r.Method == http.MethodGet:
		c.image(w, strings.TrimPrefix(p, "/image/v2/images/"))
	case strings.HasPrefix(p, "/placement/"):
		c.placement(w, r, strings.TrimPrefix(p, "/placement/"))
	default:
		fault(w, http.StatusNotFound, "itemNotFound", "no such resource "+p)
	}
}

func (c *Cloud) versions(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusMultipleChoices)
	json.NewEncoder(w).Encode(map[string]any{"versions": map[string]any{"values": []any{map[string]any{
		"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
		"links":       []any{map[string]any{"rel": "self", "href": c.URL + "/identity/v3/"}},
		"media-types": []any{map[string]any{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}},
	}}}})
}

// imageVersions is Glance's version document (its catalog endpoint has
// no version: clients discover it).
func (c *Cloud) imageVersions(w http.ResponseWriter) {
	v := func(id, status string) map[string]any {
		return map[string]any{"id": id, "status": status, "links": []any{map[string]any{"rel": "self", "href": c.URL + "/image/v2/"}}}
	}
	reply(w, http.StatusMultipleChoices, map[string]any{"versions": []any{v("v2.16", "CURRENT"), v("v2.15", "SUPPORTED")}})
}

// issueToken is Keystone's POST /v3/auth/tokens with a password, scoped
// to a project.
func (c *Cloud) issueToken(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Auth struct {
			Identity struct {
				Methods  []string `json:"methods"`
				Password struct {
					User struct {
						Name     string `json:"name"`
						Password string `json:"password"`
						Domain   struct {
							Name string `json:"name"`
						} `json:"domain"`
					} `json:"user"`
				} `json:"password"`
			} `json:"identity"`
			Scope struct {
				Project struct {
					Name   string `json:"name"`
					Domain struct {
						Name string `json:"name"`
					} `json:"domain"`
				} `json:"project"`
			} `json:"scope"`
		} `json:"auth"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		fault(w, http.StatusBadRequest, "error", "Expecting to find auth in request body: "+err.Error())
		return
	}
	id, u, sc := req.Auth.Identity, req.Auth.Identity.Password.User, req.Auth.Scope.Project
	if len(id.Methods) != 1 || id.Methods[0] != "password" || u.Name != User || u.Password != Password || u.Domain.Name != Domain {
		fault(w, http.StatusUnauthorized, "error", "The request you have made requires authentication.")
		return
	}
	if sc.Name != Project || sc.Domain.Name != Domain {
		fault(w, http.StatusUnauthorized, "error", "The request you have made requires authentication.")
		return
	}
	endpoint := func(typ, name, url string) map[string]any {
		return map[string]any{"type": typ, "name": name, "id": name + "-id", "endpoints": []any{
			map[string]any{"id": name + "-public", "interface": "public", "region": "RegionOne", "region_id": "RegionOne", "url": url},
			map[string]any{"id": name + "-internal", "interface": "internal", "region": "RegionOne", "region_id": "RegionOne", "url": url},
		}}
	}
	now := c.now().UTC()
	w.Header().Set("X-Subject-Token", c.token)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	json.NewEncoder(w).Encode(map[string]any{"token": map[string]any{
		"methods": []string{"password"}, "issued_at": now.Format(time.RFC3339), "expires_at": now.Add(time.Hour).Format(time.RFC3339),
		"user":    map[string]any{"id": "u-1", "name": User, "domain": map[string]any{"id": "default", "name": Domain}},
		"project": map[string]any{"id": "p-1", "name": Project, "domain": map[string]any{"id": "default", "name": Domain}},
		"roles":   []any{map[string]any{"id": "r-1", "name": "admin"}},
		"catalog": []any{
			endpoint("identity", "keystone", c.URL+"/identity"),
			endpoint("compute", "nova", c.URL+"/compute/v2.1"),
			endpoint("image", "glance", c.URL+"/image"),
			endpoint("placement", "placement", c.URL+"/placement"),
		},
	}})
}

// microversion is the compute microversion asked (2.1 when none is).
func microversion(r *http.Request) (major, minor int) {
	v := r.Header.Get("X-OpenStack-Nova-API-Version")
	if h := r.Header.Get("OpenStack-API-Version"); strings.HasPrefix(h, "compute ") {
		v = strings.TrimPrefix(h, "compute ")
	}
	if v == "" {
		return 2, 1
	}
	a, b, _ := strings.Cut(v, ".")
	major, _ = strconv.Atoi(a)
	minor, _ = strconv.Atoi(b)
	return major, minor
}

func (c *Cloud) compute(w http.ResponseWriter, r *http.Request, p string) {
	major, minor := microversion(r)
	embed := major == 2 && minor >= 47
	parts := strings.Split(p, "/")
	switch {
	case p == "servers/detail" && r.Method == http.MethodGet:
		c.list(w, r, embed)
	case len(parts) == 2 && parts[0] == "servers" && r.Method == http.MethodGet:
		s, ok := c.servers[parts[1]]
		if !ok || s.Deleted {
			fault(w, http.StatusNotFound, "itemNotFound", "Instance "+parts[1]+" could not be found.")
			return
		}
		reply(w, http.StatusOK, map[string]any{"server": c.render(s, embed)})
	case len(parts) == 3 && parts[0] == "servers" && parts[2] == "metadata" && r.Method == http.MethodGet:
		s, ok := c.servers[parts[1]]
		if !ok || s.Deleted {
			fault(w, http.StatusNotFound, "itemNotFound", "Instance "+parts[1]+" could not be found.")
			return
		}
		reply(w, http.StatusOK, map[string]any{"metadata": s.Metadata})
	case len(parts) == 4 && parts[0] == "servers" && parts[2] == "metadata" && r.Method == http.MethodPut:
		c.putMetadatum(w, r, parts[1], parts[3])
	case len(parts) == 3 && parts[0] == "servers" && parts[2] == "action" && r.Method == http.MethodPost:
		c.action(w, r, parts[1], major, minor)
	case p == "os-services" && r.Method == http.MethodGet:
		c.listServices(w, r, major, minor)
	case len(parts) == 2 && parts[0] == "os-services" && r.Method == http.MethodPut:
		c.putService(w, r, parts[1], major, minor)
	case p == "os-migrations" && r.Method == http.MethodGet:
		c.listMigrations(w, r)
	case p == "os-hypervisors/detail" && r.Method == http.MethodGet:
		c.listHypervisors(w, major, minor)
	default:
		fault(w, http.StatusNotFound, "itemNotFound", "no such resource "+p)
	}
}

// list is GET /servers/detail with the filters AX uses: host (admin),
// all_tenants, changes-since (updated at or after it; deleted servers
// included, as Nova does).
func (c *Cloud) list(w http.ResponseWriter, r *http.Request, embed bool) {
	q := r.URL.Query()
	var since time.Time
	if v := q.Get("changes-since"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			fault(w, http.StatusBadRequest, "badRequest", "Invalid input for query parameters changes-since. Value: "+v)
			return
		}
		since = t
	}
	host := q.Get("host")
	ids := make([]string, 0, len(c.servers))
	for id := range c.servers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	out := []any{}
	for _, id := range ids {
		s := c.servers[id]
		switch {
		case host != "" && s.Host != host:
		case s.Deleted && since.IsZero():
		case !since.IsZero() && s.Updated.Before(since):
		default:
			out = append(out, c.render(s, embed))
		}
	}
	reply(w, http.StatusOK, map[string]any{"servers": out})
}

// render is a server as Nova's API shows it to an admin.
func (c *Cloud) render(s *Server, embed bool) map[string]any {
	var flavor map[string]any
	if embed {
		specs := map[string]string{}
		for k, v := range s.FlavorSpecs {
			specs[k] = v
		}
		flavor = map[string]any{"vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0, "swap": 0, "original_name": s.Flavor, "extra_specs": specs}
	} else {
		flavor = map[string]any{"id": "f-" + s.Flavor, "links": []any{}}
	}
	var image any = ""
	if s.ImageID != "" {
		image = map[string]any{"id": s.ImageID, "links": []any{map[string]any{"rel": "bookmark", "href": c.URL + "/compute/images/" + s.ImageID}}}
	}
	status, vmState := s.Status, strings.ToLower(s.Status)
	if s.Deleted {
		status, vmState = "DELETED", "deleted"
	}
	meta := map[string]string{}
	for k, v := range s.Metadata {
		meta[k] = v
	}
	created := s.Updated.Add(-time.Hour)
	return map[string]any{
		"id": s.ID, "name": s.Name, "status": status, "tenant_id": "p-demo", "user_id": "u-demo",
		"created": created.Format(time.RFC3339), "updated": s.Updated.Format(time.RFC3339),
		"hostId": "h-" + s.Host, "metadata": meta, "flavor": flavor, "image": image,
		"addresses": map[string]any{}, "links": []any{}, "key_name": nil,
		"OS-EXT-SRV-ATTR:host": s.Host, "OS-EXT-SRV-ATTR:hypervisor_hostname": s.Host + ".example",
		"OS-EXT-SRV-ATTR:instance_name": s.InstanceName,
		"OS-EXT-STS:vm_state":           vmState, "OS-EXT-STS:power_state": 1, "OS-EXT-STS:task_state": nil,
		"OS-SRV-USG:launched_at": created.Format("2006-01-02T15:04:05.000000"), "OS-SRV-USG:terminated_at": nil,
	}
}

// putMetadatum is PUT /servers/{id}/metadata/{key} {"meta": {key: value}}:
// Nova refuses a body of another key, more than one, or a value over 255.
func (c *Cloud) putMetadatum(w http.ResponseWriter, r *http.Request, id, key string) {
	s, ok := c.servers[id]
	if !ok || s.Deleted {
		fault(w, http.StatusNotFound, "itemNotFound", "Instance "+id+" could not be found.")
		return
	}
	switch s.Status {
	case "ACTIVE", "PAUSED", "SUSPENDED", "SHUTOFF":
	default:
		// Nova's update_instance_metadata: vm_state active, paused,
		// suspended or stopped, and launched (BUILD is not yet).
		fault(w, http.StatusConflict, "conflictingRequest", "Instance "+id+" is in an invalid state for 'update metadata'")
		return
	}
	var body struct {
		Meta map[string]string `json:"meta"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		fault(w, http.StatusBadRequest, "badRequest", "Malformed request body")
		return
	}
	v, ok := body.Meta[key]
	switch {
	case len(body.Meta) != 1:
		fault(w, http.StatusBadRequest, "badRequest", "Request body contains too many items")
		return
	case !ok:
		fault(w, http.StatusBadRequest, "badRequest", "Request body and URI mismatch")
		return
	case len(v) > 255:
		fault(w, http.StatusBadRequest, "badRequest", "Invalid input for field/attribute meta. Value is too long")
		return
	}
	s.Metadata[key] = v
	s.Updated = c.stamp()
	reply(w, http.StatusOK, map[string]any{"meta": map[string]string{key: v}})
}

// image is Glance's GET /v2/images/{id}: properties at the top level.
func (c *Cloud) image(w http.ResponseWriter, id string) {
	props, ok := c.images[id]
	if !ok {
		fault(w, http.StatusNotFound, "itemNotFound", "No image found with ID "+id)
		return
	}
	img := map[string]any{"id": id, "name": "img-" + id, "status": "active", "visibility": "public", "protected": false,
		"container_format": "bare", "disk_format": "qcow2", "size": 1 << 20, "min_disk": 0, "min_ram": 0, "tags": []string{},
		"created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "owner": "p-1",
		"self": "/v2/images/" + id, "file": "/v2/images/" + id + "/file", "schema": "/v2/schemas/image"}
	for k, v := range props {
		img[k] = v
	}
	reply(w, http.StatusOK, img)
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// fault is an error body as Nova writes it: {"kind": {"code", "message"}}.
func fault(w http.ResponseWriter, code int, kind, msg string) {
	reply(w, code, map[string]any{kind: map[string]any{"code": code, "message": msg}})
}
