package agent

import (
	"fmt"
	"time"
)

// Health is an application's state as the host judges it.
type Health int

// Health values; their numbers are what ax_app_health exports.
const (
	Unknown  Health = iota // no recent word from the agent about it
	Healthy                // its check passes
	Degraded               // it failed recently, fewer than threshold times in a row, or has not yet passed long enough
	Failed                 // its check failed threshold times in a row
)

func (h Health) String() string {
	switch h {
	case Unknown:
		return "unknown"
	case Healthy:
		return "healthy"
	case Degraded:
		return "degraded"
	case Failed:
		return "failed"
	}
	return fmt.Sprintf("health(%d)", int(h))
}

// MarshalText makes Health readable in JSON status output.
func (h Health) MarshalText() ([]byte, error) { return []byte(h.String()), nil }

// Hysteresis says how many reports move an application between states.
type Hysteresis struct {
	// FailAfter consecutive failed reports make it Failed. The agent's
	// per-check threshold overrides it (clamped to [1, MaxThreshold]).
	FailAfter int
	// HealAfter consecutive good reports bring a Degraded or Failed
	// application back to Healthy. An Unknown one is Healthy at its first
	// good report: there is no recent failure to be wary of.
	HealAfter int
	// StaleAfter intervals without a report of a check make it Unknown.
	StaleAfter int
}

// DefaultHysteresis is used for zero fields.
var DefaultHysteresis = Hysteresis{FailAfter: 3, HealAfter: 2, StaleAfter: 3}

func (h Hysteresis) withDefaults() Hysteresis {
	if h.FailAfter <= 0 {
		h.FailAfter = DefaultHysteresis.FailAfter
	}
	if h.HealAfter <= 0 {
		h.HealAfter = DefaultHysteresis.HealAfter
	}
	if h.StaleAfter <= 0 {
		h.StaleAfter = DefaultHysteresis.StaleAfter
	}
	return h
}

// App follows one application (one check of the agent) through reports.
// It is a plain value driven by its owner; it does no locking.
type App struct {
	Name     string
	Kind     string
	Interval time.Duration
	// Threshold is the failed-report count that makes it Failed.
	Threshold int
	// Recoverable means the guest has a recovery action for it.
	Recoverable bool

	Health     Health
	Since      time.Time // when Health last changed
	LastReport time.Time // host clock
	Detail     string    // of the last report
	good, bad  int       // consecutive good and failed reports
}

// Observe applies one report and returns the health before it.
func (a *App) Observe(ok bool, detail string, now time.Time, h Hysteresis) (before Health) {
	before = a.Health
	a.LastReport = now
	a.Detail = detail
	next := a.Health
	if ok {
		a.good++
		a.bad = 0
		switch {
		case a.Health == Unknown, a.good >= h.HealAfter:
			next = Healthy
		}
	} else {
		a.bad++
		a.good = 0
		switch {
		case a.bad >= a.Threshold:
			next = Failed
		case a.Health != Failed:
			next = Degraded
		}
	}
	a.set(next, now)
	return before
}

// Expire makes the application Unknown when its agent is silent or its
// check has not reported for StaleAfter intervals; it reports whether it
// changed. The report counts start over, so hysteresis begins afresh.
func (a *App) Expire(now time.Time, agentSilent bool, h Hysteresis) bool {
	if a.Health == Unknown {
		return false
	}
	stale := !a.LastReport.IsZero() && now.Sub(a.LastReport) > time.Duration(h.StaleAfter)*a.Interval
	if !agentSilent && !stale {
		return false
	}
	a.good, a.bad = 0, 0
	a.set(Unknown, now)
	return true
}

func (a *App) set(h Health, now time.Time) {
	if h != a.Health || a.Since.IsZero() {
		a.Health = h
		a.Since = now
	}
}

// newApp makes the tracker for a declared check, keeping the state of the
// same check from an earlier connection when its declaration is unchanged in
// kind, so a reconnecting agent does not reset hysteresis.
func newApp(c CheckInfo, old *App, h Hysteresis) *App {
	th := c.Threshold
	if th <= 0 {
		th = h.FailAfter
	}
	th = min(max(th, 1), MaxThreshold)
	a := &App{Name: c.Name, Kind: c.Kind, Interval: time.Duration(c.IntervalMS) * time.Millisecond,
		Threshold: th, Recoverable: c.Recover}
	if old != nil && old.Kind == c.Kind {
		a.Health, a.Since, a.LastReport, a.Detail, a.good, a.bad =
			old.Health, old.Since, old.LastReport, old.Detail, old.good, old.bad
	}
	return a
}
