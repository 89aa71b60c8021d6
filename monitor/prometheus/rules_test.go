package prometheus

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/axproject/ax/monitor"
	"github.com/axproject/ax/monitor/agent"
	"github.com/axproject/ax/test/testenv"
	promclient "github.com/prometheus/client_golang/prometheus"
)

const promtoolHow = "apt-get install prometheus, or make deps"

func promtool(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("promtool", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func TestRulesPromtool(t *testing.T) {
	testenv.RequireCommand(t, "promtool", promtoolHow)
	promtool(t, "check", "rules", "ax-rules.yml")
	promtool(t, "test", "rules", "ax-rules.test.yml")
	promtool(t, "check", "config", "prometheus.yml")
}

// TestAlertsUnitTested checks that every alert of ax-rules.yml is evaluated
// by a unit test of ax-rules.test.yml, which TestRulesPromtool runs.
func TestAlertsUnitTested(t *testing.T) {
	read := func(f string, re *regexp.Regexp) map[string]bool {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		found := map[string]bool{}
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			found[m[1]] = true
		}
		if len(found) == 0 {
			t.Fatalf("%s: nothing matches %s", f, re)
		}
		return found
	}
	alerts := read("ax-rules.yml", regexp.MustCompile(`(?m)^\s*- alert: (\w+)$`))
	tested := read("ax-rules.test.yml", regexp.MustCompile(`(?m)^\s*alertname: (\w+)$`))
	for a := range alerts {
		if !tested[a] {
			t.Errorf("alert %s has no unit test in ax-rules.test.yml", a)
		}
	}
	for a := range tested {
		if !alerts[a] {
			t.Errorf("ax-rules.test.yml tests alert %s, which ax-rules.yml does not define", a)
		}
	}
}

// TestDashboardQueriesParse hands every dashboard query to promtool as a
// recording rule, Grafana's variables replaced, so PromQL syntax errors in
// the dashboards fail here rather than in front of an operator.
func TestDashboardQueriesParse(t *testing.T) {
	testenv.RequireCommand(t, "promtool", promtoolHow)
	vars := strings.NewReplacer("$__rate_interval", "1m", "$__range", "3h", "$__interval", "15s", "$vm", "vm1", "$host", "a:9400")
	var b strings.Builder
	b.WriteString("groups:\n  - name: dashboards\n    rules:\n")
	n := 0
	for file, exprs := range dashboardExprs(t) {
		for _, e := range exprs {
			q, _ := json.Marshal(vars.Replace(e)) // a JSON string is a YAML string
			fmt.Fprintf(&b, "      - record: dashboard:query_%d # %s\n        expr: %s\n", n, filepath.Base(file), q)
			n++
		}
	}
	if n == 0 {
		t.Fatal("no dashboard queries found")
	}
	path := filepath.Join(t.TempDir(), "dashboards.yml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	promtool(t, "check", "rules", path)
	t.Logf("%d dashboard queries parse", n)
}

// TestMetricNamesExist checks that every ax_ name in the rules, their unit
// tests and the dashboards is exported by axd: the names are taken from
// monitor.NewMetrics and agent.NewMetrics registered in a fresh registry.
func TestMetricNamesExist(t *testing.T) {
	known := exportedNames(t)
	for _, must := range []string{"ax_vm_level", "ax_vm_protected", "ax_commit_latency_seconds_bucket",
		"ax_pause_seconds_bucket", "ax_app_health", "ax_agent_silent", "ax_epochs_total",
		"ax_witness_quorum", "ax_witness_members", "ax_witness_members_reachable",
		"ax_witness_renewals_total", "ax_witness_takeovers_total"} {
		if !known[must] {
			t.Fatalf("%s is not among the exported names %v; the test's gathering is broken", must, keys(known))
		}
	}
	files := []string{"ax-rules.yml", "ax-rules.test.yml"}
	dash, _ := filepath.Glob(filepath.Join("..", "grafana", "dashboards", "*.json"))
	if len(dash) < 2 {
		t.Fatalf("dashboards not found: %v", dash)
	}
	files = append(files, dash...)
	name := regexp.MustCompile(`\bax_[a-z0-9_]+\b`)
	used := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range name.FindAllString(string(b), -1) {
			used[n] = true
			if !known[n] {
				t.Errorf("%s names %s, which axd does not export (known: %v)", f, n, keys(known))
			}
		}
	}
	// The dashboards and rules should show what axd exports; list what
	// nothing uses so it is a decision, not an accident.
	var unused []string
	for n := range known {
		base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")
		if !used[n] && !used[base+"_bucket"] {
			unused = append(unused, n)
		}
	}
	sort.Strings(unused)
	t.Logf("exported but not shown: %v", unused)
}

// capture registers collectors in a registry and remembers them.
type capture struct {
	*promclient.Registry
	cs []promclient.Collector
}

func (c *capture) Register(col promclient.Collector) error {
	c.cs = append(c.cs, col)
	return c.Registry.Register(col)
}

func (c *capture) MustRegister(cols ...promclient.Collector) {
	for _, col := range cols {
		if err := c.Register(col); err != nil {
			panic(err)
		}
	}
}

// exportedNames registers axd's and the agent monitor's metrics, gives every
// vector one series (a vector without series is not gathered), and returns
// the sample names Prometheus will store: counters as named (with _total),
// histograms as _bucket, _sum and _count.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	reg := &capture{Registry: promclient.NewRegistry()}
	monitor.NewMetrics(reg)
	agent.NewMetrics(reg)
	for _, c := range reg.cs {
		var vec *promclient.MetricVec
		switch v := c.(type) {
		case *promclient.CounterVec:
			vec = v.MetricVec
		case *promclient.GaugeVec:
			vec = v.MetricVec
		case *promclient.HistogramVec:
			vec = v.MetricVec
		case *promclient.SummaryVec:
			vec = v.MetricVec
		case promclient.Metric:
			continue // a single series already
		default:
			t.Fatalf("collector %T: teach exportedNames about it", c)
		}
		filled := false
		for n := 0; n <= 8 && !filled; n++ {
			_, err := vec.GetMetricWithLabelValues(slices.Repeat([]string{"x"}, n)...)
			filled = err == nil
		}
		if !filled {
			t.Fatalf("collector %T: no label count between 0 and 8 fits", c)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		n := mf.GetName()
		if mf.GetHelp() == "" {
			t.Errorf("%s has no HELP text", n)
		}
		if !strings.HasPrefix(n, "ax_") {
			t.Errorf("%s is not prefixed ax_", n)
		}
		switch mf.GetType().String() {
		case "HISTOGRAM":
			names[n+"_bucket"], names[n+"_sum"], names[n+"_count"] = true, true, true
		case "SUMMARY":
			names[n], names[n+"_sum"], names[n+"_count"] = true, true, true
		default:
			names[n] = true
		}
	}
	return names
}

// dashboardExprs returns the PromQL of every panel target, per file.
func dashboardExprs(t *testing.T) map[string][]string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join("..", "grafana", "dashboards", "*.json"))
	out := map[string][]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var d struct {
			Panels []struct {
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
			} `json:"panels"`
		}
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, p := range d.Panels {
			for _, tg := range p.Targets {
				out[f] = append(out[f], tg.Expr)
			}
		}
	}
	return out
}

func keys(m map[string]bool) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
