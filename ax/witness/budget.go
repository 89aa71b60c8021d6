package witness

import (
	"container/list"
	"errors"
	"net"
	"sync"
	"time"
)

// The connection budget. A connection is pre-authentication until its TLS
// handshake completes (TLS mode) or it sends its first validly signed request
// (PSK mode). Pre-authentication connections are cheap to open and prove
// nothing, so they get a small budget of their own, with a short deadline,
// and a new one over a cap evicts the oldest: an attacker who opens
// connections and sends nothing cannot hold slots, only push out his own
// (and, at a rate of maxPreAuth per handshake time, others' handshakes).
// Authenticated connections never count against it; they have larger caps,
// per holder too, where a holder's newest connection evicts its oldest so a
// host that reconnects after losing a connection is never locked out by its
// own stale one.
const (
	// maxPreAuth bounds pre-authentication connections in all.
	maxPreAuth = 256
	// maxPreAuthPerSource bounds them per source: an IPv4 address, or an
	// IPv6 /64 (one host can use a whole /64).
	maxPreAuthPerSource = 16
	// preAuthTimeout is how long a connection may take to authenticate.
	preAuthTimeout = 3 * time.Second
	// maxAuthConns bounds authenticated connections; more are refused.
	maxAuthConns = 1024
	// maxConnsPerHolder bounds one holder's authenticated connections; a
	// new one evicts its oldest. A host's Client keeps up to
	// DefaultMaxConns (at most 7) open, so it is never evicted from one in use.
	maxConnsPerHolder = 8
	// authIdleTimeout closes an authenticated connection that sends no
	// complete line for so long. axd probes the witness every second.
	authIdleTimeout = time.Minute
)

var (
	errEvicted  = errors.New("connection evicted by newer ones")
	errAuthFull = errors.New("too many authenticated connections")
)

type connState int

const (
	connPreAuth connState = iota
	connAuth
	connGone
)

// tracked is one connection in the budget.
type tracked struct {
	conn   net.Conn // the TCP connection: closing it ends its handler
	source string
	holder string
	state  connState
	elem   *list.Element // in budget.pre while connPreAuth
}

// budget tracks connections and decides whom to evict. Its methods return
// the connections to close rather than close them under the lock.
type budget struct {
	mu        sync.Mutex
	pre       list.List // of *tracked, oldest first
	perSource map[string]int
	byHolder  map[string][]*tracked // oldest first
	auth      int

	// For tests and logs.
	accepted, evicted int
}

func newBudget() *budget {
	return &budget{perSource: make(map[string]int), byHolder: make(map[string][]*tracked)}
}

// admit takes a newly accepted connection as pre-authentication and returns
// the connections it evicts to make room: the oldest of its source's if
// that source is over its cap, then the oldest of all if all are.
func (b *budget) admit(conn net.Conn) (t *tracked, evict []net.Conn) {
	t = &tracked{conn: conn, source: sourceOf(conn.RemoteAddr())}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.accepted++
	t.elem = b.pre.PushBack(t)
	b.perSource[t.source]++
	if b.perSource[t.source] > maxPreAuthPerSource {
		for e := b.pre.Front(); e != nil; e = e.Next() {
			if o := e.Value.(*tracked); o.source == t.source {
				evict = append(evict, b.dropPre(o))
				break
			}
		}
	}
	for b.pre.Len() > maxPreAuth {
		evict = append(evict, b.dropPre(b.pre.Front().Value.(*tracked)))
	}
	b.evicted += len(evict)
	return t, evict
}

// dropPre evicts a pre-authentication connection; b.mu is held.
func (b *budget) dropPre(t *tracked) net.Conn {
	b.removePre(t)
	t.state = connGone
	return t.conn
}

func (b *budget) removePre(t *tracked) {
	b.pre.Remove(t.elem)
	t.elem = nil
	if b.perSource[t.source]--; b.perSource[t.source] == 0 {
		delete(b.perSource, t.source)
	}
}

// promote moves t to the authenticated connections of holder. It fails if
// t was evicted meanwhile or the authenticated connections are at their cap;
// the caller then closes t. It may evict holder's oldest connection.
func (b *budget) promote(t *tracked, holder string) (evict net.Conn, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if t.state != connPreAuth {
		return nil, errEvicted
	}
	b.removePre(t)
	if b.auth >= maxAuthConns {
		t.state = connGone
		return nil, errAuthFull
	}
	t.state, t.holder = connAuth, holder
	b.auth++
	conns := append(b.byHolder[holder], t)
	if len(conns) > maxConnsPerHolder {
		old := conns[0]
		conns = conns[1:]
		old.state = connGone
		b.auth--
		b.evicted++
		evict = old.conn
	}
	b.byHolder[holder] = conns
	return evict, nil
}

// release forgets t when its handler ends.
func (b *budget) release(t *tracked) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch t.state {
	case connPreAuth:
		b.removePre(t)
	case connAuth:
		b.auth--
		conns := b.byHolder[t.holder]
		if i := indexOf(conns, t); i >= 0 {
			conns = append(conns[:i], conns[i+1:]...)
		}
		if len(conns) == 0 {
			delete(b.byHolder, t.holder)
		} else {
			b.byHolder[t.holder] = conns
		}
	}
	t.state = connGone
}

func indexOf(ts []*tracked, t *tracked) int {
	for i, o := range ts {
		if o == t {
			return i
		}
	}
	return -1
}

// budgetStats is a snapshot for tests.
type budgetStats struct {
	preAuth, maxPerSource, auth, accepted, evicted int
}

func (b *budget) stats() budgetStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := budgetStats{preAuth: b.pre.Len(), auth: b.auth, accepted: b.accepted, evicted: b.evicted}
	for _, n := range b.perSource {
		st.maxPerSource = max(st.maxPerSource, n)
	}
	return st
}

// sourceOf is the key a source's pre-authentication connections count
// under: the IPv4 address, or the IPv6 /64.
func sourceOf(a net.Addr) string {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	if v4 := ta.IP.To4(); v4 != nil {
		return v4.String()
	}
	return (&net.IPNet{IP: ta.IP.Mask(net.CIDRMask(64, 128)), Mask: net.CIDRMask(64, 128)}).String()
}
