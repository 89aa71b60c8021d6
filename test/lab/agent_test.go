package lab

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/test/testenv"
)

func appHealth(s api.VMStatus, check string) string {
	for _, a := range s.Apps {
		if a.Check == check {
			return a.Health
		}
	}
	return ""
}

func waitVM(t *testing.T, l *Lab, c *api.Client, vm string, timeout time.Duration, what string, ok func(api.VMStatus) bool) api.VMStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s, err := l.vmStatus(context.Background(), c, vm)
		if err == nil && ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last status %+v (%v)\nevents: %s", what, timeout, s, err, l.eventsText(context.Background(), c))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestIntegrationAgentAppRecovery: the monitored application in the guest
// is killed; AX reports it failed within the check's threshold, the
// restart-app policy has the agent bring it back, and metrics and events
// show each step.
func TestIntegrationAgentAppRecovery(t *testing.T) {
	l, vm, _, _ := ftLab(t, "itagent")
	ctx := context.Background()
	ca := l.Client(HostA)
	waitVM(t, l, ca, vm.Name, 60*time.Second, "agent connected and app healthy", func(s api.VMStatus) bool {
		return s.Agent == "connected" && appHealth(s, "app") == "healthy"
	})
	// Kill the application from the client host.
	conn, err := l.DialFrom(ctx, HostC, fmt.Sprintf("%s:7001", vm.IP))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "EXIT\n")
	bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	killed := time.Now()
	waitVM(t, l, ca, vm.Name, 10*time.Second, "app reported failed", func(s api.VMStatus) bool { return appHealth(s, "app") == "failed" })
	failedAfter := time.Since(killed)
	// Threshold 2 at a 500 ms interval: failed after 2-3 intervals.
	if failedAfter > 5*time.Second {
		t.Errorf("failed reported %s after the kill; the check says 2 × 500 ms", failedAfter)
	}
	waitVM(t, l, ca, vm.Name, 20*time.Second, "app healthy again", func(s api.VMStatus) bool { return appHealth(s, "app") == "healthy" })
	t.Logf("app failed after %.1f s, healthy again after %.1f s", failedAfter.Seconds(), time.Since(killed).Seconds())
	// The application answers again.
	conn, err = l.DialFrom(ctx, HostC, fmt.Sprintf("%s:7001", vm.IP))
	if err != nil {
		t.Fatalf("app after recovery: %v", err)
	}
	fmt.Fprintf(conn, "PING\n")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, _ := bufio.NewReader(conn).ReadString('\n'); strings.TrimSpace(line) != "PONG" {
		t.Fatalf("app after recovery answered %q", line)
	}
	conn.Close()
	evs, _ := ca.Events(ctx, 0)
	var kinds []string
	for _, e := range evs {
		if e.VM == vm.Name {
			kinds = append(kinds, e.Kind+": "+e.Text)
		}
	}
	joined := strings.Join(kinds, "\n")
	for _, want := range []string{"app-health", "policy-action", "app-recovery"} {
		if !strings.Contains(joined, want) {
			t.Errorf("no %s event; events:\n%s", want, joined)
		}
	}
	body, err := l.Scrape(ctx, HostW, MetricsAddr(HostA))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`ax_app_health{check="app",vm="vm1"} 1`,
		`ax_agent_connected{vm="vm1"} 1`,
		`ax_agent_policy_actions_total{action="restart-app",vm="vm1"}`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestIntegrationAgentFlood: a second guest whose "agent" floods garbage
// into its port is cut off by axd, while the first guest's FT checkpoints
// and its agent carry on.
func TestIntegrationAgentFlood(t *testing.T) {
	l, vm, _, _ := ftLab(t, "itflood")
	ctx := context.Background()
	ca := l.Client(HostA)
	if err := l.protectAndWait(ctx, ca, vm.Name, HostB); err != nil {
		t.Fatal(err)
	}
	img := testImage(t)
	vm2, err := l.StartGuest(ctx, GuestConfig{Name: "vm2", Index: 2, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: "ax.flood=1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitServing(ctx, vm2, 120*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.DefineGuest(ctx, vm2); err != nil {
		t.Fatal(err)
	}
	before, _ := l.vmStatus(ctx, ca, vm.Name)
	time.Sleep(8 * time.Second)
	after := waitVM(t, l, ca, vm.Name, 5*time.Second, "vm1 protected with its agent", func(s api.VMStatus) bool {
		return s.State == "protected" && s.Agent == "connected" && appHealth(s, "app") == "healthy"
	})
	if after.Epoch < before.Epoch+50 {
		t.Errorf("vm1's checkpoints slowed under vm2's flood: epoch %d → %d in 8 s", before.Epoch, after.Epoch)
	}
	if after.CommitAgeMS > 2000 {
		t.Errorf("vm1's last commit is %.0f ms old", after.CommitAgeMS)
	}
	t.Logf("vm1 under vm2's flood: %d epochs in 8 s, pause p50 %.1f ms p99 %.1f ms", after.Epoch-before.Epoch, after.PauseP50MS, after.PauseP99MS)
	s2, _ := l.vmStatus(ctx, ca, "vm2")
	if s2.Agent == "connected" {
		t.Errorf("vm2's flooding agent is still connected")
	}
	body, err := l.Scrape(ctx, HostW, MetricsAddr(HostA))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`ax_agent_disconnects_total\{reason="[a-z-]+",vm="vm2"\} [1-9]`).MatchString(body) {
		t.Errorf("no disconnect of vm2's agent in the metrics")
	}
	checkPrometheus(t, l)
}

// checkPrometheus starts a real Prometheus server on host w with AX's alert
// rules, checks it scrapes both axd, and that every metric name the rules
// and dashboards use is in what the two axd export now (a live scrape).
func checkPrometheus(t *testing.T, l *Lab) {
	t.Helper()
	testenv.RequireCommand(t, "prometheus", "make deps, or apt-get install prometheus")
	ctx := context.Background()
	rules := "../../monitor/prometheus/ax-rules.yml"
	addr, err := l.StartPrometheus(ctx, rules)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		body, err := l.HTTPGet(ctx, HostW, addr, "/api/v1/query?query=sum(up%7Bjob%3D%22axd%22%7D)")
		if err == nil && strings.Contains(body, `"2"]`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus does not scrape both axd: %v %s", err, body)
		}
		time.Sleep(500 * time.Millisecond)
	}
	body, err := l.HTTPGet(ctx, HostW, addr, "/api/v1/query?query=ax_vm_protected%7Bvm%3D%22vm1%22%7D")
	if err != nil || !strings.Contains(body, `"1"]`) {
		t.Errorf("Prometheus query ax_vm_protected{vm=\"vm1\"}: %s %v", body, err)
	}
	if body, err := l.HTTPGet(ctx, HostW, addr, "/api/v1/rules"); err != nil || !strings.Contains(body, "AXFTProtectionLost") {
		t.Errorf("Prometheus did not load AX's rules: %v", err)
	}
	live := map[string]bool{}
	for _, h := range []string{HostA, HostB} {
		text, err := l.Scrape(ctx, HostW, MetricsAddr(h))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(text, "\n") {
			if line == "" || line[0] == '#' {
				continue
			}
			name := line
			if i := strings.IndexAny(line, "{ "); i > 0 {
				name = line[:i]
			}
			live[name] = true
		}
	}
	files, _ := filepath.Glob("../../monitor/grafana/dashboards/*.json")
	files = append(files, rules)
	nameRE := regexp.MustCompile(`ax_[a-z_]+`)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nameRE.FindAllString(string(data), -1) {
			if !live[n] {
				t.Errorf("%s uses %s, which the live axd do not export", filepath.Base(f), n)
			}
		}
	}
}
