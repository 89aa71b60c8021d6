// Package nova reads from Nova the availability level asked for each
// server of a compute host — server metadata ax:level, else the flavor's
// extra spec ax:level, else the image property ax_level — and writes back
// what AX made of it as server metadata ax:status. It talks to Keystone,
// Nova and Glance with gophercloud, configured by clouds.yaml.
package nova

import (
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
)

// The keys operators set, and the one AX writes.
const (
	// LevelKey is server metadata (mutable; it wins) and a flavor extra
	// spec: ft, ha or none.
	LevelKey = "ax:level"
	// PeerKey is server metadata naming the partner host; without it, the
	// compute host's only partner (axd's only --peer).
	PeerKey = "ax:peer"
	// ImageLevelKey is a Glance image property (Glance's own properties
	// are hw_*-style words, hence no colon).
	ImageLevelKey = "ax_level"
	// StatusKey is server metadata AX writes: what it applied or refused.
	StatusKey = "ax:status"
	// MaxValue is the longest metadata value Nova takes (bytes).
	MaxValue = 255
)

// Server is what AX reads of a Nova server.
type Server struct {
	ID   string
	Name string
	// InstanceName is the libvirt domain's name (OS-EXT-SRV-ATTR:instance_name).
	InstanceName string
	// Host is the compute host Nova has it on (OS-EXT-SRV-ATTR:host).
	Host    string
	Status  string // ACTIVE, SHUTOFF, BUILD, DELETED…
	Updated time.Time
	// Metadata is the server's metadata (ax:level, ax:peer, ax:status).
	Metadata map[string]string
	// Flavor is the flavor's name and FlavorSpecs its extra specs, as
	// embedded in the server at compute microversion ≥ 2.47; nil when Nova
	// does not show them (an older microversion, or the policy
	// os_compute_api:servers:show:flavor-extra-specs).
	Flavor      string
	FlavorSpecs map[string]string
	// ImageID is the image it booted from, "" when it booted from a volume.
	ImageID string
}

// Writable says whether Nova takes metadata writes for a server in
// status: it refuses them (409) before the server was launched and in
// states other than ACTIVE, PAUSED, SUSPENDED and SHUTOFF.
func Writable(status string) bool {
	switch status {
	case "ACTIVE", "PAUSED", "SUSPENDED", "SHUTOFF":
		return true
	}
	return false
}

// Asked is the level asked for a server, where it was found, and the
// partner named with it ("": the host's only one). A zero Asked is no
// level asked.
type Asked struct {
	Level string
	Peer  string
	From  string
}

// Refusal is a level asked that AX does not apply, and why. It is what
// the operator made wrong: nothing is applied until it is fixed.
type Refusal struct {
	Server string
	Reason string
}

func (r *Refusal) Error() string { return "server " + r.Server + ": " + r.Reason }

// Ask reads the level asked for s: server metadata ax:level wins, else
// the flavor's extra spec ax:level, else image's answer (the image's
// ax_level property, asked only when neither has a level). A level that
// is not ft, ha or none, or a partner that is not a host name, is a
// *Refusal; an error of image is returned as it is (Glance unreachable:
// try again).
func Ask(s Server, image func() (string, error)) (Asked, error) {
	var a Asked
	if v, ok := s.Metadata[LevelKey]; ok {
		a = Asked{Level: v, From: "server metadata " + LevelKey}
	} else if v, ok := s.FlavorSpecs[LevelKey]; ok {
		a = Asked{Level: v, From: fmt.Sprintf("flavor %s extra spec %s", printable(s.Flavor), LevelKey)}
	} else if s.ImageID != "" && image != nil {
		v, err := image()
		if err != nil {
			return Asked{}, fmt.Errorf("server %s: reading image %s's property %s: %w", s.ID, s.ImageID, ImageLevelKey, err)
		}
		if v == "" {
			return Asked{}, nil
		}
		a = Asked{Level: v, From: fmt.Sprintf("image %s property %s", s.ImageID, ImageLevelKey)}
	} else {
		return Asked{}, nil
	}
	switch a.Level {
	case api.LevelFT, api.LevelHA, api.LevelNone:
	default:
		return Asked{}, &Refusal{Server: s.ID, Reason: fmt.Sprintf("%s is %s: AX takes ft, ha or none", a.From, quote(a.Level))}
	}
	if p, ok := s.Metadata[PeerKey]; ok {
		if err := names.Check("host", p); err != nil {
			return Asked{}, &Refusal{Server: s.ID, Reason: fmt.Sprintf("server metadata %s is %s, not a host name (letters, digits, '.', '_', '-')", PeerKey, quote(p))}
		}
		a.Peer = p
	}
	return a, nil
}

// quote shows a value an operator (or anyone with the server's metadata)
// wrote, bounded and escaped.
func quote(s string) string {
	if len(s) > 40 {
		return fmt.Sprintf("%q…", s[:40])
	}
	return fmt.Sprintf("%q", s)
}

// printable is s with what is not printable replaced, bounded: for names
// Nova gives, which end up in events and metadata.
func printable(s string) string {
	return Truncate(printableText(s), 64)
}

// printableText is s with what is not printable replaced: for what a
// service answers, which ends up in events.
func printableText(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			return '?'
		}
		return r
	}, s)
}

// Truncate cuts s to at most n bytes without splitting a character.
func Truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
