package nova

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/gophercloud/gophercloud/v2/openstack/compute/v2/servers"

	"github.com/axproject/ax/ax/names"
)

// FuzzServer: whatever Nova (or whoever answers in its place) says of a
// server, and whatever its image's ax_level is, what AX takes from it
// has ids fit for a URL path, and the level asked is ft, ha, none or
// nothing, with a partner that is a host name; a refusal's reason is one
// bounded line. Nothing panics. Run it with
//
//	go test -run NONE -fuzz FuzzServer -fuzztime 30s ./nova-hook/nova
func FuzzServer(f *testing.F) {
	f.Add(`{"id":"5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00","name":"web-1","status":"ACTIVE","updated":"2026-12-06T08:00:00Z",`+
		`"metadata":{"ax:level":"ft","ax:peer":"compute-2"},"flavor":{"original_name":"m1.ft","extra_specs":{"ax:level":"ha"}},`+
		`"image":{"id":"c0ffee00-1234-4abc-8def-0123456789ab"},"OS-EXT-SRV-ATTR:host":"a","OS-EXT-SRV-ATTR:instance_name":"instance-0000002a"}`, "")
	f.Add(`{"id":"5b9f0c3e","metadata":{},"flavor":{"extra_specs":{"ax:level":"gold"}},"image":""}`, "")
	f.Add(`{"id":"5b9f0c3e","image":{"id":"c0ffee00"},"flavor":{"extra_specs":{"ax:level":7}}}`, "ha")
	f.Add(`{"id":"../../v3","image":{"id":"x/y"}}`, "ft")
	f.Add(`{"id":"5b9f0c3e","metadata":{"ax:level":"ha","ax:peer":"b\nFAKE"}}`, "")
	f.Fuzz(func(t *testing.T, body, imageLevel string) {
		var ns servers.Server
		if json.Unmarshal([]byte(body), &ns) != nil {
			return
		}
		s, err := fromNova(&ns)
		if err != nil {
			return
		}
		if checkID("server", s.ID) != nil || (s.ImageID != "" && checkID("image", s.ImageID) != nil) {
			t.Fatalf("ids taken: %q %q", s.ID, s.ImageID)
		}
		a, err := Ask(s, func() (string, error) { return imageLevel, nil })
		var r *Refusal
		switch {
		case errors.As(err, &r):
			if strings.ContainsAny(r.Reason, "\n\r") || len(r.Reason) > 300 {
				t.Fatalf("reason %q", r.Reason)
			}
			return
		case err != nil:
			t.Fatalf("error that is not a refusal: %v", err)
		}
		switch a.Level {
		case "":
			if a.Peer != "" || a.From != "" {
				t.Fatalf("nothing asked, yet %+v", a)
			}
		case "ft", "ha", "none":
		default:
			t.Fatalf("level %q taken", a.Level)
		}
		if a.Peer != "" && names.Check("host", a.Peer) != nil {
			t.Fatalf("partner %q taken", a.Peer)
		}
	})
}
