package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"syscall"
	"time"
)

// Client talks to one axd over its Unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the axd listening on socket.
func NewClient(socket string) *Client {
	if socket == "" {
		socket = DefaultSocket
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://axd"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("axd is not running (no socket at %s; start it, or give --socket)", c.socket)
		}
		return fmt.Errorf("axd: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("axd: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return &RequestError{Status: resp.StatusCode, Msg: e.Error}
		}
		return &RequestError{Status: resp.StatusCode, Msg: "axd: " + resp.Status}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("axd: bad answer: %w", err)
		}
	}
	return nil
}

// RequestError is axd's answer to a request it refused or failed: axd
// was reached, and said why.
type RequestError struct {
	Status int // the HTTP status
	Msg    string
}

func (e *RequestError) Error() string { return e.Msg }

// Status returns the host's VMs, peers and witness.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Define registers (or updates) a VM's spec with axd.
func (c *Client) Define(ctx context.Context, spec VMSpec) error {
	return c.do(ctx, http.MethodPost, "/v1/vms", spec, nil)
}

// Protect protects a defined VM at a level towards a peer.
func (c *Client) Protect(ctx context.Context, vm string, req ProtectRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/protect", req, nil)
}

// Level changes a VM's level (none, ha, ft) without restarting it.
func (c *Client) Level(ctx context.Context, vm string, req ProtectRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/level", req, nil)
}

// Unprotect stops protecting a VM and frees its replica on the peer.
func (c *Client) Unprotect(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/unprotect", nil, nil)
}

// Failover makes a planned switch of a protected VM to its secondary.
func (c *Client) Failover(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/failover", nil, nil)
}

// Events returns events with a sequence number above since.
func (c *Client) Events(ctx context.Context, since uint64) ([]Event, error) {
	var ev []Event
	return ev, c.do(ctx, http.MethodGet, fmt.Sprintf("/v1/events?since=%d", since), nil, &ev)
}
