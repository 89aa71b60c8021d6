package ratelog

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := New(10 * time.Second)
	l.Now = func() time.Time { return now }
	type step struct {
		advance    time.Duration
		ok         bool
		suppressed int
	}
	for i, s := range []step{
		{0, true, 0},
		{time.Second, false, 0},
		{time.Second, false, 0},
		{8 * time.Second, true, 2}, // 10 s after the first: through, with the two held back
		{9 * time.Second, false, 0},
		{time.Hour, true, 1},
		{0, false, 0},
	} {
		now = now.Add(s.advance)
		ok, n := l.Allow()
		if ok != s.ok || n != s.suppressed {
			t.Errorf("step %d: Allow() = %v, %d; want %v, %d", i, ok, n, s.ok, s.suppressed)
		}
	}
}
