package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/axproject/ax/ax/api"
)

// apiHandler serves axctl's requests (JSON over the Unix socket).
func (d *Daemon) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, d.status(), nil)
	})
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) {
		since, _ := strconv.ParseUint(r.URL.Query().Get("since"), 10, 64)
		reply(w, d.eventsSince(since), nil)
	})
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var spec api.VMSpec
		if err := decode(r, &spec); err != nil {
			reply(w, nil, err)
			return
		}
		err := d.define(spec)
		if err == nil {
			d.event(spec.Name, "define", fmt.Sprintf("VM %s defined (QMP %s, %d MiB)", spec.Name, spec.Guest.QMP, spec.Guest.RAMMiB))
		}
		reply(w, nil, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/protect", func(w http.ResponseWriter, r *http.Request) {
		var req api.ProtectRequest
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		name := r.PathValue("name")
		if err := d.discover(r.Context(), name); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, nil, d.protect(name, req))
	})
	mux.HandleFunc("POST /v1/vms/{name}/level", func(w http.ResponseWriter, r *http.Request) {
		var req api.ProtectRequest
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 25*time.Second)
		defer cancel()
		reply(w, nil, d.setLevel(ctx, r.PathValue("name"), req))
	})
	mux.HandleFunc("POST /v1/vms/{name}/unprotect", func(w http.ResponseWriter, r *http.Request) {
		reply(w, nil, d.unprotect(r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/hooks/libvirt", d.serveLibvirtHook)
	mux.HandleFunc("POST /v1/vms/{name}/failover", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		reply(w, nil, d.plannedFailover(ctx, r.PathValue("name")))
	})
	return mux
}

func decode(r *http.Request, v any) error {
	data, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("bad request: %w", err)
	}
	return nil
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(api.Error{Error: err.Error()})
		return
	}
	if v == nil {
		v = struct{}{}
	}
	json.NewEncoder(w).Encode(v)
}

// maxMetricsConns bounds the /metrics connections served at once.
const maxMetricsConns = 16

// limitListener accepts at most n connections at once; beyond that a new
// connection is closed at once (Prometheus retries at its next scrape), so
// the accept loop never blocks behind idle clients.
func limitListener(ln net.Listener, n int) net.Listener {
	return &limitedListener{Listener: ln, slots: make(chan struct{}, n)}
}

type limitedListener struct {
	net.Listener
	slots chan struct{}
}

func (l *limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &limitedConn{Conn: c, release: func() { <-l.slots }}, nil
		default:
			c.Close()
		}
	}
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
