package openstack

import (
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"sync"
)

// neutron stands in for Neutron, which the cloud does not run: servers
// are booted with networks "none", yet Nova's API asks Neutron for the
// ports of every server it shows (their security groups) and answers 500
// when no network endpoint is in the catalog. Every list is empty; every
// other request is a 404. It records what it was asked.
type neutron struct {
	srv   *http.Server
	mu    sync.Mutex
	asked map[string]int
}

func startNeutron() (*neutron, int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, 0, err
	}
	n := &neutron{asked: map[string]int{}}
	n.srv = &http.Server{Handler: n}
	go n.srv.Serve(l)
	return n, l.Addr().(*net.TCPAddr).Port, nil
}

func (n *neutron) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	n.asked[r.Method+" "+r.URL.Path]++
	n.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	resource, ok := strings.CutPrefix(strings.TrimSuffix(r.URL.Path, ".json"), "/v2.0/")
	if r.Method != http.MethodGet || !ok || resource == "" || strings.Contains(resource, "/") {
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(map[string]any{"NeutronError": map[string]string{"type": "HTTPNotFound", "message": "AX's test cloud runs no Neutron", "detail": ""}})
		return
	}
	json.NewEncoder(w).Encode(map[string]any{strings.ReplaceAll(resource, "-", "_"): []any{}})
}

// Asked is what Neutron's stand-in was asked: "METHOD PATH" and how often.
func (n *neutron) Asked() map[string]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]int, len(n.asked))
	for k, v := range n.asked {
		out[k] = v
	}
	return out
}

func (n *neutron) Close() error { return n.srv.Close() }
