// Package ratelog spaces out a warning that whoever reaches a port can
// trigger: at most one line per interval, with how many were held back.
package ratelog

import (
	"sync"
	"time"
)

// Limiter lets one event through per Every. The zero value lets every
// event through; Now defaults to time.Now (tests replace it).
type Limiter struct {
	Every time.Duration
	Now   func() time.Time

	mu         sync.Mutex
	next       time.Time
	suppressed int
}

// New returns a Limiter letting one event through per every.
func New(every time.Duration) *Limiter { return &Limiter{Every: every} }

// Allow says whether this event may be logged, and how many were held back
// since the last one that was.
func (l *Limiter) Allow() (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if l.Now != nil {
		now = l.Now()
	}
	if now.Before(l.next) {
		l.suppressed++
		return false, 0
	}
	l.next = now.Add(l.Every)
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}
