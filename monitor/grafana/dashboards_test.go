package grafana

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

type target struct {
	Expr       string          `json:"expr"`
	RefID      string          `json:"refId"`
	Datasource json.RawMessage `json:"datasource"`
}

type panel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource json.RawMessage `json:"datasource"`
	GridPos    struct{ X, Y, W, H int }
	Targets    []target `json:"targets"`
	Panels     []panel  `json:"panels"`
}

type dashboard struct {
	UID           string  `json:"uid"`
	Title         string  `json:"title"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

func load(t *testing.T) map[string]dashboard {
	t.Helper()
	files, err := filepath.Glob("dashboards/*.json")
	if err != nil || len(files) == 0 {
		t.Fatalf("no dashboards: %v", err)
	}
	out := map[string]dashboard{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var d dashboard
		dec := json.NewDecoder(strings.NewReader(string(b)))
		if err := dec.Decode(&d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out[f] = d
	}
	return out
}

func TestDashboardsStructure(t *testing.T) {
	uids := map[string]string{}
	for f, d := range load(t) {
		if d.UID == "" || d.Title == "" {
			t.Errorf("%s: uid %q title %q", f, d.UID, d.Title)
		}
		if other, dup := uids[d.UID]; dup {
			t.Errorf("%s and %s share uid %s", f, other, d.UID)
		}
		uids[d.UID] = f
		if d.SchemaVersion < 36 {
			t.Errorf("%s: schemaVersion %d, want Grafana 9's (36 or later)", f, d.SchemaVersion)
		}
		vars := map[string]bool{}
		for _, v := range d.Templating.List {
			vars[v.Name] = true
		}
		if !vars["datasource"] {
			t.Errorf("%s: no datasource variable", f)
		}
		ids := map[int]bool{}
		used := regexp.MustCompile(`\$\{?([a-z_]+)`)
		bottom := 0
		for _, p := range d.Panels {
			if ids[p.ID] {
				t.Errorf("%s: panel id %d twice", f, p.ID)
			}
			ids[p.ID] = true
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
				t.Errorf("%s: panel %q at %+v is off the 24-column grid", f, p.Title, g)
			}
			bottom = max(bottom, g.Y+g.H)
			if p.Type == "row" {
				continue
			}
			if p.Title == "" || len(p.Targets) == 0 {
				t.Errorf("%s: panel %d %q has no title or no queries", f, p.ID, p.Title)
			}
			if !strings.Contains(string(p.Datasource), "${datasource}") {
				t.Errorf("%s: panel %q does not use the datasource variable", f, p.Title)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if tg.Expr == "" || tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("%s: panel %q has an empty query or a repeated refId %q", f, p.Title, tg.RefID)
				}
				refs[tg.RefID] = true
				for _, m := range used.FindAllStringSubmatch(tg.Expr, -1) {
					if !strings.HasPrefix(m[1], "__") && !vars[m[1]] {
						t.Errorf("%s: panel %q uses $%s, which is not a variable of the dashboard", f, p.Title, m[1])
					}
				}
			}
		}
		if bottom == 0 {
			t.Errorf("%s: no panels", f)
		}
	}
}

func TestDrillDown(t *testing.T) {
	ds := load(t)
	vm, ok := ds[filepath.Join("dashboards", "ax-vm.json")]
	if !ok {
		t.Fatal("no per-VM dashboard")
	}
	found := false
	for _, v := range vm.Templating.List {
		// The host variable narrows the VMs offered to those on the chosen hosts.
		if v.Name == "vm" && v.Type == "query" && strings.Contains(string(v.Query), `label_values(ax_vm_level{instance=~\"$host\"}, vm)`) {
			found = true
		}
	}
	if !found {
		t.Error("the per-VM dashboard has no vm variable over ax_vm_level of the chosen hosts")
	}
	for _, p := range vm.Panels {
		for _, tg := range p.Targets {
			if strings.Contains(tg.Expr, "ax_") && !strings.Contains(tg.Expr, `vm="$vm"`) {
				t.Errorf("per-VM panel %q queries beyond the chosen VM: %s", p.Title, tg.Expr)
			}
		}
	}
	b, _ := os.ReadFile(filepath.Join("dashboards", "ax-overview.json"))
	if !strings.Contains(string(b), "/d/ax-vm/") {
		t.Error("the overview does not link to the per-VM dashboard")
	}
}

func TestProvisioning(t *testing.T) {
	for _, f := range []string{"provisioning/datasources/ax.yaml", "provisioning/dashboards/ax.yaml"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		if !strings.Contains(s, "apiVersion: 1") || strings.Contains(s, "\t") {
			t.Errorf("%s: want apiVersion 1 and no tabs", f)
		}
	}
}

// TestHostVariable checks that a fleet can be filtered per host: both
// dashboards have a host variable over the scrape's instance label, and
// every metric the overview queries is narrowed to the chosen hosts.
func TestHostVariable(t *testing.T) {
	ds := load(t)
	for f, d := range ds {
		var host, vm = -1, -1
		for i, v := range d.Templating.List {
			switch v.Name {
			case "host":
				host = i
				if v.Type != "query" || !strings.Contains(string(v.Query), "label_values(ax_witness_reachable, instance)") {
					t.Errorf("%s: host variable is %s over %s, want a query of every axd's instance", f, v.Type, v.Query)
				}
			case "vm":
				vm = i
			}
		}
		if host < 0 {
			t.Errorf("%s: no host variable", f)
		}
		if vm >= 0 && host > vm {
			t.Errorf("%s: host variable after vm; the vm variable depends on it", f)
		}
	}
	overview, ok := ds[filepath.Join("dashboards", "ax-overview.json")]
	if !ok {
		t.Fatal("no overview dashboard")
	}
	selector := regexp.MustCompile(`\bax_[a-z0-9_]+(\{[^}]*\})?`)
	n := 0
	for _, p := range overview.Panels {
		for _, tg := range p.Targets {
			for _, s := range selector.FindAllString(tg.Expr, -1) {
				n++
				if !strings.Contains(s, `instance=~"$host"`) {
					t.Errorf("overview panel %q is not filtered by host: %s in %s", p.Title, s, tg.Expr)
				}
			}
		}
	}
	if n == 0 {
		t.Error("the overview queries no ax_ metric")
	}
}

// TestPromisesShown checks that output commit and the partner's promised
// capacity, what AX promises, are on both dashboards.
func TestPromisesShown(t *testing.T) {
	want := []string{"ax_output_held_frames", "ax_output_held_bytes", "ax_output_release_delay_seconds_bucket",
		"ax_output_dropped_frames", "ax_reserved_capacity", "ax_host_capacity"}
	for f, d := range load(t) {
		var all strings.Builder
		for _, p := range d.Panels {
			for _, tg := range p.Targets {
				all.WriteString(tg.Expr)
				all.WriteByte('\n')
			}
		}
		for _, m := range want {
			if !regexp.MustCompile(`\b` + m + `\b`).MatchString(all.String()) {
				t.Errorf("%s: no panel queries %s", f, m)
			}
		}
	}
}

// TestWitnessShown checks that the overview's host panels show the witness:
// its quorum, members reachable, and this host's lease calls by result.
func TestWitnessShown(t *testing.T) {
	overview, ok := load(t)[filepath.Join("dashboards", "ax-overview.json")]
	if !ok {
		t.Fatal("no overview dashboard")
	}
	queried := map[string]bool{}
	for _, p := range overview.Panels {
		for _, tg := range p.Targets {
			for _, m := range regexp.MustCompile(`\bax_witness_[a-z_]+`).FindAllString(tg.Expr, -1) {
				queried[m] = true
			}
		}
	}
	for _, m := range []string{"ax_witness_reachable", "ax_witness_quorum", "ax_witness_members", "ax_witness_members_reachable",
		"ax_witness_renewals_total", "ax_witness_takeovers_total"} {
		if !queried[m] {
			t.Errorf("the overview shows no %s", m)
		}
	}
}
