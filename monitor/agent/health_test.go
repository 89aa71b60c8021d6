package agent

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHealthMachine drives one application through report sequences: "+" a
// good report, "-" a failed one, "s" the agent falling silent, "t" a tick
// after the check's reports went stale. want is the health after each step.
func TestHealthMachine(t *testing.T) {
	h := Hysteresis{FailAfter: 3, HealAfter: 2, StaleAfter: 3}
	tests := []struct {
		name      string
		threshold int
		steps     string
		want      []Health
	}{
		{"first good report is healthy", 3, "+", []Health{Healthy}},
		{"first failure is degraded", 3, "-", []Health{Degraded}},
		{"threshold failures fail", 3, "+---", []Health{Healthy, Degraded, Degraded, Failed}},
		{"threshold one fails at once", 1, "+-", []Health{Healthy, Failed}},
		{"a blip heals after two good", 3, "+-++", []Health{Healthy, Degraded, Degraded, Healthy}},
		{"failures must be consecutive", 3, "+--+--", []Health{Healthy, Degraded, Degraded, Degraded, Degraded, Degraded}},
		{"failed stays failed on one good", 3, "---+", []Health{Degraded, Degraded, Failed, Failed}},
		{"failed heals after two good", 3, "---++", []Health{Degraded, Degraded, Failed, Failed, Healthy}},
		{"failed: a relapse resets healing", 3, "---+-++", []Health{Degraded, Degraded, Failed, Failed, Failed, Failed, Healthy}},
		{"silence makes unknown", 3, "+s", []Health{Healthy, Unknown}},
		{"silence forgets failure", 3, "---s+", []Health{Degraded, Degraded, Failed, Unknown, Healthy}},
		{"silence restarts the failure count", 3, "--s--", []Health{Degraded, Degraded, Unknown, Degraded, Degraded}},
		{"stale check is unknown", 3, "+t", []Health{Healthy, Unknown}},
		{"unknown stays unknown", 3, "ss", []Health{Unknown, Unknown}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if len(tt.want) != len(tt.steps) {
				t.Fatalf("table: %d steps, %d states", len(tt.steps), len(tt.want))
			}
			a := newApp(CheckInfo{Name: "app", Kind: KindTCP, IntervalMS: 1000, Threshold: tt.threshold}, nil, h)
			now := time.Unix(1000, 0)
			for i, s := range tt.steps {
				now = now.Add(time.Second)
				switch s {
				case '+', '-':
					a.Observe(s == '+', "", now, h)
				case 's':
					a.Expire(now, true, h)
				case 't':
					now = now.Add(time.Duration(h.StaleAfter)*a.Interval + time.Millisecond)
					a.Expire(now, false, h)
				}
				if a.Health != tt.want[i] {
					t.Fatalf("after %q: %s, want %s", tt.steps[:i+1], a.Health, tt.want[i])
				}
			}
		})
	}
}

func TestExpireKeepsFreshChecks(t *testing.T) {
	h := DefaultHysteresis
	a := newApp(CheckInfo{Name: "app", Kind: KindTCP, IntervalMS: 1000, Threshold: 3}, nil, h)
	now := time.Unix(1000, 0)
	a.Observe(true, "", now, h)
	if a.Expire(now.Add(3*time.Second), false, h) {
		t.Fatal("a check reported 3 s ago (3 intervals) expired")
	}
	if !a.Expire(now.Add(3*time.Second+time.Millisecond), false, h) || a.Health != Unknown {
		t.Fatalf("a check silent past 3 intervals did not expire: %s", a.Health)
	}
}

func TestNewAppKeepsState(t *testing.T) {
	h := DefaultHysteresis
	old := newApp(CheckInfo{Name: "app", Kind: KindTCP, IntervalMS: 1000, Threshold: 1}, nil, h)
	old.Observe(false, "down", time.Unix(1, 0), h)
	same := newApp(CheckInfo{Name: "app", Kind: KindTCP, IntervalMS: 2000, Threshold: 5, Recover: true}, old, h)
	if same.Health != Failed || same.Detail != "down" || same.Threshold != 5 || !same.Recoverable {
		t.Errorf("redeclared check: %+v", same)
	}
	other := newApp(CheckInfo{Name: "app", Kind: KindHTTP, IntervalMS: 1000, Threshold: 1}, old, h)
	if other.Health != Unknown {
		t.Errorf("a check that changed kind kept its health %s", other.Health)
	}
	clamped := newApp(CheckInfo{Name: "app", Kind: KindTCP, IntervalMS: 1000, Threshold: 0}, nil, h)
	if clamped.Threshold != h.FailAfter {
		t.Errorf("threshold 0 became %d, want the host's %d", clamped.Threshold, h.FailAfter)
	}
}

// TestPolicies runs each policy over an application that fails and stays
// failed, ticking once a second, and lists the actions in order.
func TestPolicies(t *testing.T) {
	tests := []struct {
		name        string
		policy      Policy
		recoverable bool
		canSend     bool
		until       time.Duration
		want        []string // "kind@seconds"
	}{
		{"notify once", Policy{OnFailed: Notify}, true, true, time.Hour, []string{"notify@0"}},
		{"restart-vm once, no loop in cooldown", Policy{OnFailed: RestartVM, Cooldown: time.Hour}, true, true, 59 * time.Minute, []string{"restart-vm@0"}},
		{"failover once", Policy{OnFailed: Failover}, false, false, time.Hour, []string{"failover@0"}},
		{"restart-app spaced, then escalates", Policy{OnFailed: RestartApp, Recoveries: 3, RecoverEvery: 10 * time.Second, Escalate: RestartVM},
			true, true, time.Minute, []string{"restart-app@0", "restart-app@10", "restart-app@20", "restart-vm@30"}},
		{"restart-app without escalation notifies", Policy{OnFailed: RestartApp, Recoveries: 1, RecoverEvery: 5 * time.Second},
			true, true, time.Minute, []string{"restart-app@0", "notify@5"}},
		{"restart-app with no action in the guest escalates at once", Policy{OnFailed: RestartApp, Escalate: Failover},
			false, true, time.Minute, []string{"failover@0"}},
		{"restart-app waits for a connected agent", Policy{OnFailed: RestartApp, Recoveries: 2, RecoverEvery: 10 * time.Second},
			true, false, time.Minute, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.policy.withDefaults()
			a := &App{Name: "app", Recoverable: tt.recoverable, Health: Failed, Detail: "down"}
			ep, mem := &episode{}, &vmMemory{}
			start := time.Unix(1000, 0)
			var got []string
			for at := time.Duration(0); at <= tt.until; at += time.Second {
				for _, act := range p.decideFailed("vm1", a, ep, mem, tt.canSend, start.Add(at)) {
					if act.VM != "vm1" || act.Check != "app" || act.Reason == "" {
						t.Errorf("incomplete action %+v", act)
					}
					got = append(got, string(act.Kind)+"@"+strconv.Itoa(int(at/time.Second)))
				}
			}
			if strings.Join(got, " ") != strings.Join(tt.want, " ") {
				t.Fatalf("actions %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPolicyCooldownAcrossApps(t *testing.T) {
	p := Policy{OnFailed: Failover, Cooldown: time.Minute}.withDefaults()
	mem := &vmMemory{}
	now := time.Unix(1000, 0)
	a1 := &App{Name: "a1", Health: Failed}
	a2 := &App{Name: "a2", Health: Failed}
	ep1, ep2 := &episode{}, &episode{}
	if acts := p.decideFailed("vm", a1, ep1, mem, true, now); len(acts) != 1 {
		t.Fatalf("first failover: %v", acts)
	}
	if acts := p.decideFailed("vm", a2, ep2, mem, true, now.Add(30*time.Second)); len(acts) != 0 {
		t.Fatalf("second app in the cooldown: %v, want nothing", acts)
	}
	if acts := p.decideFailed("vm", a2, ep2, mem, true, now.Add(61*time.Second)); len(acts) != 1 {
		t.Fatalf("second app after the cooldown: %v, want a failover", acts)
	}
}

func TestPolicySilent(t *testing.T) {
	tests := []struct {
		name    string
		policy  Policy
		greeted bool
		want    ActionKind
	}{
		{"never connected: nothing", Policy{OnSilent: RestartVM}, false, ""},
		{"default notifies", Policy{}, true, Notify},
		{"restart-app is meaningless: notify", Policy{OnSilent: RestartApp}, true, Notify},
		{"restart-vm", Policy{OnSilent: RestartVM}, true, RestartVM},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.policy.withDefaults()
			mem := &vmMemory{everGreeted: tt.greeted}
			acts := p.decideSilent("vm", 20*time.Second, mem, time.Unix(1, 0))
			acts = append(acts, p.decideSilent("vm", 21*time.Second, mem, time.Unix(2, 0))...)
			switch {
			case tt.want == "" && len(acts) != 0:
				t.Fatalf("actions %v, want none", acts)
			case tt.want != "" && (len(acts) != 1 || acts[0].Kind != tt.want):
				t.Fatalf("actions %v, want one %s", acts, tt.want)
			}
		})
	}
}

func TestParsePolicy(t *testing.T) {
	for _, s := range []string{"notify", "restart-app", "Restart-VM", "failover"} {
		if _, err := ParsePolicy(s); err != nil {
			t.Errorf("ParsePolicy(%q): %v", s, err)
		}
	}
	if _, err := ParsePolicy("reboot"); err == nil {
		t.Error("ParsePolicy accepted reboot")
	}
	if err := (Policy{OnFailed: "explode"}).Validate(); err == nil {
		t.Error("Validate accepted an unknown kind")
	}
}
