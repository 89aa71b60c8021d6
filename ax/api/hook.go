package api

import (
	"context"
	"net/http"
	"slices"
	"time"
)

// DefaultHookSpool is where ax-nova-hook leaves the events it could not
// hand to axd (axd down, or too slow), for axd to replay at its start.
const DefaultHookSpool = "/var/lib/ax/hook-spool"

// MaxHookXML bounds the domain XML of one hook event: Nova's domains are
// a few KiB; a larger one is refused, not truncated.
const MaxHookXML = 1 << 20

// MaxHookEvent bounds a hook event as sent: the XML JSON-escaped (at
// worst 6 bytes a byte: encoding/json writes '<' as \u003c) and its
// fields.
const MaxHookEvent = 6*MaxHookXML + 64<<10

// HookOperations are the operations of libvirt's qemu hook
// (https://libvirt.org/hooks.html) AX takes; any other is refused.
var HookOperations = []string{"prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"}

// KnownHookOperation says whether op is one of HookOperations.
func KnownHookOperation(op string) bool { return slices.Contains(HookOperations, op) }

// HookEvent is one run of libvirt's qemu hook (its arguments and the
// domain XML on its standard input), as ax-nova-hook hands it to axd.
type HookEvent struct {
	Domain       string `json:"domain"`
	Operation    string `json:"operation"`
	SubOperation string `json:"sub_operation,omitempty"`
	Extra        string `json:"extra,omitempty"`
	XML          string `json:"xml"`
	// Time is when the hook ran (a spooled event reaches axd later).
	Time time.Time `json:"time"`
}

// LibvirtHook hands a libvirt hook event to axd, which answers once it
// has checked and recorded it; what axd does about it comes after.
func (c *Client) LibvirtHook(ctx context.Context, ev HookEvent) error {
	return c.do(ctx, http.MethodPost, "/v1/hooks/libvirt", ev, nil)
}
