package agent

import (
	"fmt"
	"strings"
	"time"
)

// ActionKind is what a policy can do about an unhealthy application.
type ActionKind string

// Action kinds.
const (
	Notify     ActionKind = "notify"      // an event and a metric, nothing else
	RestartApp ActionKind = "restart-app" // ask the agent to run the check's recovery action
	RestartVM  ActionKind = "restart-vm"  // axd restarts the VM
	Failover   ActionKind = "failover"    // axd fails the VM over to its partner
)

// ActionKinds lists every kind, for flags and help text.
var ActionKinds = []ActionKind{Notify, RestartApp, RestartVM, Failover}

// ParseActionKind reads a kind as operators write it.
func ParseActionKind(s string) (ActionKind, error) {
	for _, k := range ActionKinds {
		if strings.EqualFold(s, string(k)) {
			return k, nil
		}
	}
	return "", fmt.Errorf("unknown policy action %q (want one of notify, restart-app, restart-vm, failover)", s)
}

// Policy is what AX does about one VM's applications.
type Policy struct {
	// OnFailed is done when an application becomes Failed (default Notify).
	OnFailed ActionKind
	// Recoveries bounds the restart-app requests per failure (default 3);
	// they are spaced by RecoverEvery (default 30 s). A check whose guest
	// has no recovery action configured goes straight to Escalate.
	Recoveries   int
	RecoverEvery time.Duration
	// Escalate is done when restart-app requests are spent and the
	// application is still Failed (default Notify).
	Escalate ActionKind
	// OnSilent is done when the agent has been silent for the Monitor's
	// SilentAfter after having said hello at least once (default Notify;
	// restart-app is meaningless there and counts as Notify).
	OnSilent ActionKind
	// Cooldown is the least time between two restart-vm or failover actions
	// of the VM (default 10 min), so a VM whose application never comes up
	// is not restarted in a loop.
	Cooldown time.Duration
}

// Policy defaults.
const (
	DefaultRecoveries   = 3
	DefaultRecoverEvery = 30 * time.Second
	DefaultCooldown     = 10 * time.Minute
)

// ParsePolicy makes a policy from its OnFailed kind alone, with defaults for
// the rest; restart-app escalates to nothing (notify).
func ParsePolicy(s string) (Policy, error) {
	k, err := ParseActionKind(s)
	if err != nil {
		return Policy{}, err
	}
	return Policy{OnFailed: k}.withDefaults(), nil
}

func (p Policy) withDefaults() Policy {
	if p.OnFailed == "" {
		p.OnFailed = Notify
	}
	if p.Escalate == "" || p.Escalate == RestartApp {
		p.Escalate = Notify
	}
	if p.OnSilent == "" || p.OnSilent == RestartApp {
		p.OnSilent = Notify
	}
	if p.Recoveries <= 0 {
		p.Recoveries = DefaultRecoveries
	}
	if p.RecoverEvery <= 0 {
		p.RecoverEvery = DefaultRecoverEvery
	}
	if p.Cooldown <= 0 {
		p.Cooldown = DefaultCooldown
	}
	return p
}

// Validate rejects kinds that do not exist.
func (p Policy) Validate() error {
	for _, k := range []ActionKind{p.OnFailed, p.Escalate, p.OnSilent} {
		if k == "" {
			continue
		}
		if _, err := ParseActionKind(string(k)); err != nil {
			return err
		}
	}
	return nil
}

// Action is one thing the policy decided. Monitor carries out RestartApp
// itself (it sends recover to the agent) and reports it; RestartVM and
// Failover are for axd to carry out.
type Action struct {
	VM     string
	Kind   ActionKind
	Check  string // the application, empty for agent-wide causes
	Reason string
}

func (a Action) String() string {
	if a.Check == "" {
		return fmt.Sprintf("%s %s: %s", a.Kind, a.VM, a.Reason)
	}
	return fmt.Sprintf("%s %s/%s: %s", a.Kind, a.VM, a.Check, a.Reason)
}

// Actuator receives the policy's decisions. Act must not block (queue the
// work): it is called from the goroutine reading the agent.
type Actuator interface {
	Act(Action)
}

// ActuatorFunc adapts a function to Actuator.
type ActuatorFunc func(Action)

// Act calls f.
func (f ActuatorFunc) Act(a Action) { f(a) }

// episode is the policy's memory of one application's current failure.
type episode struct {
	recoveries  int       // restart-app requests sent in this failure
	lastRecover time.Time // when the last one was sent
	escalated   bool      // Escalate (or OnFailed other than restart-app) done
}

// vmMemory is the policy's memory of the VM as a whole.
type vmMemory struct {
	lastDrastic time.Time // last restart-vm or failover
	silentActed bool      // OnSilent done for the current silence
	everGreeted bool      // the agent said hello at least once
}

// decideFailed says what to do for an application that is Failed now.
// canSend tells whether a recover request can reach the agent right now. It
// is called on the transition to Failed and again on every tick while the
// application stays Failed, so spaced recoveries and escalation happen.
func (p Policy) decideFailed(vm string, a *App, ep *episode, mem *vmMemory, canSend bool, now time.Time) []Action {
	kind := p.OnFailed
	if kind == RestartApp {
		if a.Recoverable && ep.recoveries < p.Recoveries {
			if !canSend || (!ep.lastRecover.IsZero() && now.Sub(ep.lastRecover) < p.RecoverEvery) {
				return nil
			}
			ep.recoveries++
			ep.lastRecover = now
			return []Action{{VM: vm, Kind: RestartApp, Check: a.Name,
				Reason: fmt.Sprintf("%s failed: %s (recovery %d of %d)", a.Name, a.Detail, ep.recoveries, p.Recoveries)}}
		}
		// Spent, or nothing to run: wait one more spacing for the last
		// recovery to show, then escalate.
		if !ep.lastRecover.IsZero() && now.Sub(ep.lastRecover) < p.RecoverEvery {
			return nil
		}
		kind = p.Escalate
	}
	if ep.escalated {
		return nil
	}
	reason := fmt.Sprintf("%s failed: %s", a.Name, a.Detail)
	if p.OnFailed == RestartApp {
		if a.Recoverable {
			reason += fmt.Sprintf(" (still failed after %d recoveries)", ep.recoveries)
		} else {
			reason += " (no recovery action configured in the guest)"
		}
	}
	act, ok := p.drastic(vm, kind, a.Name, reason, mem, now)
	if !ok {
		return nil // in cooldown: try again on a later tick
	}
	ep.escalated = true
	return []Action{act}
}

// decideSilent says what to do once when the agent falls silent.
func (p Policy) decideSilent(vm string, silentFor time.Duration, mem *vmMemory, now time.Time) []Action {
	if mem.silentActed || !mem.everGreeted {
		return nil
	}
	act, ok := p.drastic(vm, p.OnSilent, "", fmt.Sprintf("agent silent for %s", silentFor.Round(time.Second)), mem, now)
	if !ok {
		return nil
	}
	mem.silentActed = true
	return []Action{act}
}

// drastic builds kind, downgrading restart-vm and failover to nothing while
// the VM's cooldown runs (ok false) so they are retried later.
func (p Policy) drastic(vm string, kind ActionKind, check, reason string, mem *vmMemory, now time.Time) (Action, bool) {
	if kind == RestartVM || kind == Failover {
		if !mem.lastDrastic.IsZero() && now.Sub(mem.lastDrastic) < p.Cooldown {
			return Action{}, false
		}
		mem.lastDrastic = now
	}
	if kind == RestartApp || kind == "" {
		kind = Notify
	}
	return Action{VM: vm, Kind: kind, Check: check, Reason: reason}, true
}
