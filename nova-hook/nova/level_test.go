package nova

import (
	"errors"
	"strings"
	"testing"
)

// Where a server's level comes from: its metadata wins over its flavor,
// the flavor over its image; Glance is asked only when it decides.
func TestAskPrecedence(t *testing.T) {
	img := func(level string) func() (string, error) { return func() (string, error) { return level, nil } }
	down := func() (string, error) { return "", errors.New("glance: 503") }
	for _, c := range []struct {
		name   string
		meta   map[string]string
		specs  map[string]string
		image  string // "" : booted from a volume
		glance func() (string, error)
		want   Asked
		asked  bool // Glance asked
	}{
		{"metadata wins", map[string]string{"ax:level": "ha"}, map[string]string{"ax:level": "ft"}, "i1", img("ft"),
			Asked{Level: "ha", From: "server metadata ax:level"}, false},
		{"metadata none wins", map[string]string{"ax:level": "none"}, map[string]string{"ax:level": "ft"}, "i1", img("ft"),
			Asked{Level: "none", From: "server metadata ax:level"}, false},
		{"flavor over image", nil, map[string]string{"ax:level": "ft"}, "i1", img("ha"),
			Asked{Level: "ft", From: "flavor m1.ax extra spec ax:level"}, false},
		{"image when neither", map[string]string{"other": "x"}, map[string]string{"hw:cpu_policy": "dedicated"}, "i1", img("ha"),
			Asked{Level: "ha", From: "image i1 property ax_level"}, true},
		{"image without the property", nil, nil, "i1", img(""), Asked{}, true},
		{"volume-backed, nothing asked", nil, nil, "", img("ft"), Asked{}, false},
		{"flavor extra specs hidden (policy), image decides", nil, nil, "i1", img("ft"),
			Asked{Level: "ft", From: "image i1 property ax_level"}, true},
		{"partner named", map[string]string{"ax:level": "ft", "ax:peer": "compute-2"}, nil, "", nil,
			Asked{Level: "ft", Peer: "compute-2", From: "server metadata ax:level"}, false},
		{"partner with the flavor's level", map[string]string{"ax:peer": "compute-2"}, map[string]string{"ax:level": "ha"}, "", nil,
			Asked{Level: "ha", Peer: "compute-2", From: "flavor m1.ax extra spec ax:level"}, false},
		{"partner alone asks nothing", map[string]string{"ax:peer": "compute-2"}, nil, "", nil, Asked{}, false},
		{"metadata decides while Glance is down", map[string]string{"ax:level": "ft"}, nil, "i1", down,
			Asked{Level: "ft", From: "server metadata ax:level"}, false},
	} {
		asked := false
		glance := c.glance
		if glance != nil {
			g := glance
			glance = func() (string, error) { asked = true; return g() }
		}
		s := Server{ID: "s1", Metadata: c.meta, Flavor: "m1.ax", FlavorSpecs: c.specs, ImageID: c.image}
		got, err := Ask(s, glance)
		if err != nil || got != c.want || asked != c.asked {
			t.Errorf("%s: %+v %v (Glance asked %v), want %+v (asked %v)", c.name, got, err, asked, c.want, c.asked)
		}
	}
}

// What AX refuses: a level that is not ft, ha or none wherever it is
// set, a partner that is not a host name. The reason names the key and
// the value, escaped; a Glance failure is not a refusal.
func TestAskRefuses(t *testing.T) {
	for _, c := range []struct {
		name  string
		s     Server
		image string
		want  []string
	}{
		{"unknown level in metadata", Server{Metadata: map[string]string{"ax:level": "gold"}, FlavorSpecs: map[string]string{"ax:level": "ft"}},
			"", []string{"server metadata ax:level is \"gold\"", "ft, ha or none"}},
		{"upper case", Server{Metadata: map[string]string{"ax:level": "FT"}}, "", []string{"\"FT\""}},
		{"empty value", Server{Metadata: map[string]string{"ax:level": ""}}, "", []string{"is \"\""}},
		{"unknown level in the flavor", Server{Flavor: "m1.gold", FlavorSpecs: map[string]string{"ax:level": "gold"}}, "",
			[]string{"flavor m1.gold extra spec ax:level is \"gold\""}},
		{"unknown level in the image", Server{ImageID: "i1"}, "sometimes", []string{"image i1 property ax_level is \"sometimes\""}},
		{"hostile partner", Server{Metadata: map[string]string{"ax:level": "ft", "ax:peer": "../../etc"}}, "",
			[]string{"ax:peer is \"../../etc\"", "not a host name"}},
		{"partner with a newline", Server{Metadata: map[string]string{"ax:level": "ha", "ax:peer": "b\nFAKE"}}, "", []string{`"b\nFAKE"`}},
		{"partner option", Server{Metadata: map[string]string{"ax:level": "ha", "ax:peer": "-rf"}}, "", []string{"not a host name"}},
		{"long value", Server{Metadata: map[string]string{"ax:level": strings.Repeat("x", 200)}}, "", []string{"…"}},
	} {
		c.s.ID = "s1"
		_, err := Ask(c.s, func() (string, error) { return c.image, nil })
		var r *Refusal
		if !errors.As(err, &r) {
			t.Errorf("%s: %v, want a refusal", c.name, err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(r.Reason, w) {
				t.Errorf("%s: %q does not say %q", c.name, r.Reason, w)
			}
		}
		if strings.ContainsAny(r.Reason, "\n\r") || len(r.Reason) > 200 {
			t.Errorf("%s: reason not bounded and escaped: %q", c.name, r.Reason)
		}
	}
	_, err := Ask(Server{ID: "s1", ImageID: "i1"}, func() (string, error) { return "", errors.New("503") })
	var r *Refusal
	if err == nil || errors.As(err, &r) || !strings.Contains(err.Error(), "503") {
		t.Errorf("Glance down: %v, want its error, not a refusal", err)
	}
}

func TestTruncate(t *testing.T) {
	for _, c := range []struct {
		s    string
		n    int
		want string
	}{
		{"abc", 5, "abc"}, {"abcdef", 3, "abc"}, {"aé", 2, "a"}, {"aé", 3, "aé"}, {"ééé", 5, "éé"},
	} {
		if got := Truncate(c.s, c.n); got != c.want {
			t.Errorf("Truncate(%q, %d) = %q, want %q", c.s, c.n, got, c.want)
		}
	}
}
