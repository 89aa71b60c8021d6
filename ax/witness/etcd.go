package witness

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/ax/ratelog"
)

// EtcdScheme starts a witness address that names etcd members instead of an
// axd --witness: etcd://host:port[,host:port...] (ParseEtcdAddr).
const EtcdScheme = "etcd://"

// DefaultEtcdPrefix is where Etcd keeps its keys when EtcdConfig.Prefix is
// empty.
const DefaultEtcdPrefix = "/ax/witness"

const (
	// etcdKeepAliveTime and etcdKeepAliveTimeout find a member that went
	// silent on an open connection, so that calls go to the others. etcd
	// refuses pings more often than every 5 s by default.
	etcdKeepAliveTime    = 10 * time.Second
	etcdKeepAliveTimeout = 3 * time.Second
	// etcdMaxBackoff caps the wait between attempts to reconnect to a member:
	// gRPC's default grows to 2 minutes, long after a restarted member is back.
	etcdMaxBackoff = 2 * time.Second
)

// EtcdConfig configures an Etcd.
type EtcdConfig struct {
	// Endpoints are the members' client addresses, host:port;
	// ParseEtcdAddr makes them from an etcd:// address.
	Endpoints []string
	// Host is this host's name, which its leases are held under. etcd does
	// not check it: whoever may write under Prefix can claim any name, so
	// let only the hosts write there (etcd's client certificates and roles).
	Host string
	// TTL is the length of a lease. etcd counts leases in whole seconds:
	// it is rounded up to a whole second, and is at least 1 s (Etcd.TTL).
	TTL time.Duration
	// TLS, when set, secures the connections to every member, with a
	// client certificate if it has one.
	TLS *tls.Config
	// Prefix starts every key (DefaultEtcdPrefix when empty); it must not
	// end with '/'.
	Prefix string
	// DialTimeout is the time an attempt to connect to a member is given
	// (DefaultTimeout when <= 0); failed attempts are retried, at most
	// 2 s apart. No call waits for a connection longer than its context
	// allows.
	DialTimeout time.Duration
	// Timeout bounds each call (DefaultTimeout when <= 0), as
	// ClientConfig.Timeout does.
	Timeout time.Duration
	// Log is the logger (discard when nil).
	Log *slog.Logger
}

// Etcd holds the leases of one host in an etcd cluster: the witness is etcd,
// durable and replicated, instead of an axd --witness. Each VM has its own
// etcd lease, so that a VM whose renewals stop lapses while the host renews
// its others, and two keys:
//
//	PREFIX/vms/VM/holder  the holder's host name, bound to the VM's lease:
//	                      etcd deletes it when the lease expires
//	PREFIX/vms/VM/last    the host that held it last, bound to no lease
//
// A lease is valid exactly while its holder key exists: etcd's leader judges
// expiry, and no host's clock is compared. Unlike an axd --witness, etcd
// does not forget leases when a member restarts, so no grace period follows
// a restart: a takeover is refused only while another's holder key exists.
//
// Renew keeps alive the lease this process bound to the VM's holder key last
// (one round trip); without one, or when it lapsed, it grants a fresh lease
// and binds it in a transaction, as Takeover does. A host name must be used
// by one process at a time: a second one binding the key to its own lease
// would leave the first renewing a lease that holds nothing.
//
// Times etcd reports are whole seconds: a LeaseHeldError's and a LeaseInfo's
// Remaining is etcd's remaining TTL rounded down (0 for a lease that lapsed
// but whose key etcd has not yet deleted; the TTL when etcd did not say),
// and ExpiresAt is this host's clock at the answer plus Remaining.
type Etcd struct {
	cli      *clientv3.Client
	members  string // for errors
	host     string
	prefix   string
	ttl      time.Duration // whole seconds
	ttlSec   int64
	timeout  time.Duration
	now      func() time.Time // time.Now; tests replace it
	log      *slog.Logger
	warnings *ratelog.Limiter

	mu      sync.Mutex
	closed  bool
	bound   map[string]boundLease      // by VM
	refused map[string]*watchedRefusal // by VM: takeovers refused, watched
}

// watchedRefusal is a takeover etcd refused because another host's holder key
// exists, answered again without asking while a watch on that key sees it
// unchanged and the lease's time etcd reported has not run out. Keep-alives
// of the holder's lease change no key, so the refusal is asked again once
// that time is over; the key's deletion (its lease lapsed, or released)
// ends it at once. A refusal answered from here never promotes anything,
// so a late watch costs only time, never safety.
type watchedRefusal struct {
	held   LeaseHeldError // ExpiresAt: this host's clock
	cancel context.CancelFunc
}

// boundLease is a lease this process bound to a VM's holder key.
type boundLease struct {
	id clientv3.LeaseID
	// rev is the revision of the put that bound it: of two concurrent
	// binds of one VM, the later put holds the key.
	rev int64
}

// NewEtcd returns the leases of cfg.Host in the etcd cluster at
// cfg.Endpoints. It does not wait for a connection: each call does, within
// its context.
func NewEtcd(cfg EtcdConfig) (*Etcd, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("witness: etcd: no endpoints: name at least one member, host:port")
	}
	for _, ep := range cfg.Endpoints {
		if _, err := checkEndpoint(ep); err != nil {
			return nil, fmt.Errorf("witness: etcd: %w", err)
		}
	}
	if err := names.Check("host", cfg.Host); err != nil {
		return nil, fmt.Errorf("witness: etcd: %w", err)
	}
	if cfg.TTL <= 0 {
		return nil, fmt.Errorf("witness: etcd: lease TTL %s, want > 0", cfg.TTL)
	}
	prefix := cfg.Prefix
	if prefix == "" {
		prefix = DefaultEtcdPrefix
	}
	if strings.HasSuffix(prefix, "/") || !utf8.ValidString(prefix) || strings.ContainsFunc(prefix, unicode.IsControl) {
		return nil, fmt.Errorf("witness: etcd: key prefix %q: want printable UTF-8 not ending with '/', such as %q", prefix, DefaultEtcdPrefix)
	}
	e := &Etcd{
		members:  strings.Join(cfg.Endpoints, ","),
		host:     cfg.Host,
		prefix:   prefix,
		ttlSec:   etcdTTLSeconds(cfg.TTL),
		timeout:  cfg.Timeout,
		now:      time.Now,
		log:      cfg.Log,
		warnings: ratelog.New(warnEvery),
		bound:    make(map[string]boundLease),
		refused:  make(map[string]*watchedRefusal),
	}
	e.ttl = time.Duration(e.ttlSec) * time.Second
	if e.timeout <= 0 {
		e.timeout = DefaultTimeout
	}
	if e.log == nil {
		e.log = slog.New(slog.DiscardHandler)
	}
	if e.ttl != cfg.TTL {
		e.log.Info("witness: etcd leases are whole seconds: lease TTL rounded up", "ttl", cfg.TTL, "etcd_ttl", e.ttl)
	}
	dial := cfg.DialTimeout
	if dial <= 0 {
		dial = DefaultTimeout
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          dial,
		DialKeepAliveTime:    etcdKeepAliveTime,
		DialKeepAliveTimeout: etcdKeepAliveTimeout,
		TLS:                  cfg.TLS,
		// Every failure reaches the caller as an error, which it logs;
		// the client's own retries would flood the log.
		Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: etcdMaxBackoff},
			MinConnectTimeout: dial,
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("witness: etcd %s: %w", e.members, err)
	}
	e.cli = cli
	return e, nil
}

var _ Leases = (*Etcd)(nil)

// etcdTTLSeconds is the lease TTL to ask etcd for: d in whole seconds,
// rounded up (a lease shorter than asked could end before its holder
// fences), and at least 1.
func etcdTTLSeconds(d time.Duration) int64 {
	s := int64(d / time.Second)
	if d%time.Second != 0 {
		s++
	}
	return max(s, 1)
}

// TTL returns the lease length etcd is asked for: the configured TTL rounded
// up to whole seconds.
func (e *Etcd) TTL() time.Duration { return e.ttl }

// Close closes the connections to etcd. It revokes nothing: the leases
// lapse by themselves, as they would had this host died. It is safe to call
// twice.
func (e *Etcd) Close() error {
	e.mu.Lock()
	closed := e.closed
	e.closed = true
	for vm, r := range e.refused {
		r.cancel()
		delete(e.refused, vm)
	}
	e.mu.Unlock()
	if closed {
		return nil
	}
	if err := e.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("witness: etcd %s: close: %w", e.members, err)
	}
	return nil
}

// Renew grants or extends this host's lease on vm; see Leases.Renew. It
// keeps alive the lease bound last, else binds a fresh one as Takeover does.
// The expiry counts from before the keep-alive, or before the fresh lease
// was asked for: etcd counts the TTL from later.
func (e *Etcd) Renew(ctx context.Context, vm string) (time.Time, error) {
	ctx, cancel, err := e.begin(ctx, opRenew, vm)
	if err != nil {
		return time.Time{}, err
	}
	defer cancel()
	if l, ok := e.lease(vm); ok {
		start := e.now()
		ttl, err := e.keepAlive(ctx, l.id)
		if err == nil {
			return start.Add(ttl), nil
		}
		if !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return time.Time{}, e.fail(ctx, opRenew, vm, err)
		}
		// It lapsed, and its key with it: the lease is anyone's to ask for.
		e.forget(vm, l)
	}
	start := e.now()
	ttl, err := e.acquire(ctx, opRenew, vm)
	if err != nil {
		return time.Time{}, err
	}
	return start.Add(ttl), nil
}

// Takeover makes this host vm's holder if no other host's holder key exists;
// see Leases.Takeover. etcd decides in one transaction, so of several hosts
// at most one wins. No grace follows a restart of etcd: it keeps its leases.
//
// A refusal is watched rather than polled: until the holder's lease time
// etcd reported runs out, a takeover asked again is refused from what a
// watch on the holder key has seen (nothing), without a round trip; once
// the key goes, the next one asks etcd.
func (e *Etcd) Takeover(ctx context.Context, vm string) error {
	ctx, cancel, err := e.begin(ctx, opTakeover, vm)
	if err != nil {
		return err
	}
	defer cancel()
	if held := e.refusedBefore(vm); held != nil {
		return held
	}
	_, err = e.acquire(ctx, opTakeover, vm)
	return err
}

// refusedBefore returns the watched refusal of a takeover of vm while it
// stands, with the time left now; nil when etcd must be asked.
func (e *Etcd) refusedBefore(vm string) *LeaseHeldError {
	e.mu.Lock()
	defer e.mu.Unlock()
	r := e.refused[vm]
	if r == nil {
		return nil
	}
	now := e.now()
	if !now.Before(r.held.ExpiresAt) {
		r.cancel()
		delete(e.refused, vm)
		return nil
	}
	held := r.held
	held.Remaining = held.ExpiresAt.Sub(now)
	return &held
}

// dropRefusal forgets the watched refusal of vm's takeover, if any.
func (e *Etcd) dropRefusal(vm string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if r := e.refused[vm]; r != nil {
		r.cancel()
		delete(e.refused, vm)
	}
}

// watchRefusal keeps held, a refusal of vm's takeover by a holder key last
// changed at revision rev, until that key changes or the watch ends (also
// when the member it reaches loses its leader).
func (e *Etcd) watchRefusal(vm string, held *LeaseHeldError, rev int64) {
	if held.Remaining <= 0 || rev <= 0 {
		return
	}
	holder, _ := e.keys(vm)
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(context.Background()))
	r := &watchedRefusal{held: *held, cancel: cancel}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		cancel()
		return
	}
	if old := e.refused[vm]; old != nil {
		old.cancel()
	}
	e.refused[vm] = r
	e.mu.Unlock()
	events := e.cli.Watch(ctx, holder, clientv3.WithRev(rev+1))
	go func() {
		defer cancel()
		for resp := range events {
			if resp.Err() != nil || resp.Canceled || len(resp.Events) > 0 {
				break
			}
		}
		e.mu.Lock()
		if e.refused[vm] == r {
			delete(e.refused, vm)
		}
		e.mu.Unlock()
	}()
}

// Release deletes vm's holder key if it names this host and revokes its
// lease; the last key keeps naming this host. See Leases.Release.
func (e *Etcd) Release(ctx context.Context, vm string) error {
	ctx, cancel, err := e.begin(ctx, opRelease, vm)
	if err != nil {
		return err
	}
	defer cancel()
	holder, _ := e.keys(vm)
	resp, err := e.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.Value(holder), "=", e.host)).
		Then(clientv3.OpDelete(holder, clientv3.WithPrevKV())).
		Else(clientv3.OpGet(holder)).
		Commit()
	if err != nil {
		return e.fail(ctx, opRelease, vm, err)
	}
	rel, err := readRelease((*pb.TxnResponse)(resp), holder)
	if err != nil {
		return e.fail(ctx, opRelease, vm, err)
	}
	switch {
	case rel.deleted:
		e.forgetBefore(vm, rel.rev)
		if rel.lease != 0 {
			// Nothing else is bound to it. Should the revoke fail, the
			// lease lapses by itself; the key is gone either way.
			if _, err := e.cli.Revoke(ctx, rel.lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
				e.log.Debug("witness: etcd: revoking a released lease failed; it lapses by itself", "vm", vm, "lease", fmt.Sprintf("%x", int64(rel.lease)), "err", err)
			}
		}
		e.log.Info("witness: lease released", "vm", vm, "holder", e.host)
		return nil
	case rel.other == nil:
		return nil // no one holds it
	}
	held, lapsed, err := e.heldBy(ctx, vm, rel.other)
	switch {
	case err != nil:
		return e.fail(ctx, opRelease, vm, err)
	case lapsed:
		return nil // another's lease that ran out: nothing to release
	}
	return held
}

// Query returns etcd's view of vm's lease; see Leases.Query. The lease is
// expired when its holder key is gone; Holder then names the last holder.
func (e *Etcd) Query(ctx context.Context, vm string) (LeaseInfo, error) {
	ctx, cancel, err := e.begin(ctx, opQuery, vm)
	if err != nil {
		return LeaseInfo{}, err
	}
	defer cancel()
	holder, last := e.keys(vm)
	resp, err := e.cli.Txn(ctx).Then(clientv3.OpGet(holder), clientv3.OpGet(last)).Commit()
	if err != nil {
		return LeaseInfo{}, e.fail(ctx, opQuery, vm, err)
	}
	// Etcd's answer is newer than any refusal kept: the next takeover
	// asks etcd again.
	e.dropRefusal(vm)
	h, l, err := readQuery((*pb.TxnResponse)(resp), holder, last)
	if err != nil {
		return LeaseInfo{}, e.fail(ctx, opQuery, vm, err)
	}
	if h != nil {
		held, _, err := e.heldBy(ctx, vm, h)
		if err != nil {
			return LeaseInfo{}, e.fail(ctx, opQuery, vm, err)
		}
		return LeaseInfo{Holder: held.Holder, ExpiresAt: held.ExpiresAt, Remaining: held.Remaining}, nil
	}
	if l == nil {
		return LeaseInfo{Expired: true}, nil
	}
	name := string(l.GetValue())
	if err := names.Check("host", name); err != nil {
		return LeaseInfo{}, e.fail(ctx, opQuery, vm, fmt.Errorf("key %s holds no host name (%w): not AX's key?", last, err))
	}
	return LeaseInfo{Holder: name, Expired: true}, nil
}

// Health lists the cluster's members (as the member reached first knows
// them; the configured endpoints when none answers), asks each for its
// status and makes a linearizable read, all at once, each within the call
// timeout. Quorum is the read's success: only a leader that a majority
// follows serves it. See Leases.Health.
func (e *Etcd) Health(ctx context.Context) (Health, error) {
	if e.isClosed() {
		return Health{}, fmt.Errorf("witness etcd %s: health: %w", e.members, errClientClosed)
	}
	h := Health{Kind: KindEtcd, TTL: e.ttl, Members: e.memberList(ctx)}
	var wg sync.WaitGroup
	for i := range h.Members {
		m := &h.Members[i]
		if m.Endpoint == "" {
			m.Err = errors.New("no client address: the member has not started yet")
			continue
		}
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, e.timeout)
			defer cancel()
			_, err := e.cli.Status(pctx, m.Endpoint)
			if errors.Is(err, context.DeadlineExceeded) {
				err = fmt.Errorf("no answer within %s: %w", e.timeout, err)
			}
			m.Reachable, m.Err = err == nil, err
		})
	}
	wg.Go(func() {
		qctx, cancel := context.WithTimeout(ctx, e.timeout)
		defer cancel()
		_, err := e.cli.Get(clientv3.WithRequireLeader(qctx), e.prefix+"/health", clientv3.WithCountOnly())
		if err != nil {
			h.QuorumErr = e.failAt(qctx, "health: linearizable read", err)
		}
		h.Quorum = err == nil
	})
	wg.Wait()
	return h, nil
}

// memberList returns the cluster's members, each at its first client
// address, or the configured endpoints if no member says. Serializable: a
// member cut off from the others still says, and the probes tell the rest.
func (e *Etcd) memberList(ctx context.Context) []Member {
	ctx, cancel := context.WithTimeout(ctx, e.timeout)
	defer cancel()
	var ms []Member
	resp, err := e.cli.MemberList(ctx, clientv3.WithSerializable())
	if err == nil {
		for _, m := range resp.Members {
			name := m.GetName()
			if name == "" {
				name = fmt.Sprintf("%x", m.GetID())
			}
			mem := Member{Name: name}
			if urls := m.GetClientURLs(); len(urls) > 0 {
				mem.Endpoint = clientEndpoint(urls[0])
			}
			ms = append(ms, mem)
		}
	}
	slices.SortFunc(ms, func(a, b Member) int { return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.Endpoint, b.Endpoint)) })
	if len(ms) == 0 {
		for _, ep := range e.cli.Endpoints() {
			ms = append(ms, Member{Endpoint: ep})
		}
	}
	return ms
}

// clientEndpoint returns a member's client URL as host:port, so that the
// probe is secured as the configured endpoints are (with EtcdConfig.TLS
// when set), whatever scheme the member advertises.
func clientEndpoint(url string) string {
	if _, hostPort, ok := strings.Cut(url, "://"); ok {
		url = hostPort
	}
	return strings.TrimSuffix(url, "/")
}

// begin checks a call's VM name and returns its context: bounded by the
// call timeout, and failing at once on a member without a leader rather
// than waiting for one.
func (e *Etcd) begin(ctx context.Context, op, vm string) (context.Context, context.CancelFunc, error) {
	if err := checkName("vm", vm); err != nil {
		return nil, nil, fmt.Errorf("witness: etcd: %s: %w", op, err)
	}
	if e.isClosed() {
		return nil, nil, fmt.Errorf("witness etcd %s: %s vm %q: %w", e.members, op, vm, errClientClosed)
	}
	ctx, cancel := context.WithTimeout(ctx, e.timeout)
	return clientv3.WithRequireLeader(ctx), cancel, nil
}

// keys returns vm's holder and last keys. vm has passed names.Check: it
// holds no '/', so no VM's keys lie under another's.
func (e *Etcd) keys(vm string) (holder, last string) {
	dir := e.prefix + "/vms/" + vm + "/"
	return dir + "holder", dir + "last"
}

// acquire binds vm's holder key to a fresh lease of this host's if the key
// is absent or names this host already, in one transaction, and returns the
// lease's TTL; else a *LeaseHeldError naming the holder.
func (e *Etcd) acquire(ctx context.Context, op, vm string) (time.Duration, error) {
	g, err := e.cli.Grant(ctx, e.ttlSec)
	if err != nil {
		return 0, e.fail(ctx, op, vm, err)
	}
	if g.ID == 0 {
		return 0, e.fail(ctx, op, vm, errors.New("etcd granted lease 0, which binds nothing"))
	}
	ttl, err := e.granted(g.TTL)
	if err != nil {
		return 0, e.fail(ctx, op, vm, err)
	}
	holder, last := e.keys(vm)
	bind := []clientv3.Op{clientv3.OpPut(holder, e.host, clientv3.WithLease(g.ID)), clientv3.OpPut(last, e.host)}
	// etcd's comparisons combine with AND alone: the OR of "absent" and
	// "ours" is a transaction nested in the first one's else.
	resp, err := e.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(holder), "=", 0)).
		Then(bind...).
		Else(clientv3.OpTxn(
			[]clientv3.Cmp{clientv3.Compare(clientv3.Value(holder), "=", e.host)},
			bind,
			[]clientv3.Op{clientv3.OpGet(holder)},
		)).
		Commit()
	if err != nil {
		// Bound or not, the lease lapses unrenewed.
		return 0, e.fail(ctx, op, vm, err)
	}
	acq, err := readAcquire((*pb.TxnResponse)(resp), holder)
	if err != nil {
		return 0, e.fail(ctx, op, vm, err)
	}
	if acq.other != nil {
		// The fresh lease holds nothing and lapses after the TTL; etcd's
		// leader revokes it then as it would now, so a refusal costs no
		// round trip for it.
		held, _, err := e.heldBy(ctx, vm, acq.other)
		if err != nil {
			return 0, e.fail(ctx, op, vm, err)
		}
		e.log.Debug("witness: etcd: lease refused", "op", op, "vm", vm, "holder", e.host, "held_by", held.Holder, "remaining", held.Remaining)
		if op == opTakeover {
			e.watchRefusal(vm, held, acq.other.ModRevision)
		}
		return 0, held
	}
	e.remember(vm, boundLease{id: g.ID, rev: acq.rev})
	if acq.fresh {
		e.log.Info("witness: lease granted", "op", op, "vm", vm, "holder", e.host, "ttl", ttl)
	}
	return ttl, nil
}

// keepAlive renews lease id once and returns its TTL.
func (e *Etcd) keepAlive(ctx context.Context, id clientv3.LeaseID) (time.Duration, error) {
	resp, err := e.cli.KeepAliveOnce(ctx, id)
	if err != nil {
		return 0, err
	}
	if resp.ID != id {
		return 0, fmt.Errorf("etcd renewed lease %x when asked for %x", int64(resp.ID), int64(id))
	}
	return e.granted(resp.TTL)
}

// granted returns how long the holder may count a lease etcd granted with
// ttl seconds: the TTL asked for, or less if etcd granted less.
func (e *Etcd) granted(ttl int64) (time.Duration, error) {
	switch {
	case ttl <= 0:
		return 0, fmt.Errorf("etcd granted a lease of %d s", ttl)
	case ttl < e.ttlSec:
		return time.Duration(ttl) * time.Second, nil
	case ttl > e.ttlSec:
		// Its minimum lease TTL (1.5 election timeouts) is longer: etcd
		// holds the lease longer than this host counts it, which is safe,
		// but a takeover waits that long.
		if ok, _ := e.warnings.Allow(); ok {
			e.log.Warn("witness: etcd grants leases longer than asked: takeovers wait for its TTL", "asked", e.ttl, "granted", time.Duration(min(ttl, maxSeconds))*time.Second)
		}
	}
	return e.ttl, nil
}

// maxSeconds is the most seconds a time.Duration holds.
const maxSeconds = math.MaxInt64 / int64(time.Second)

// heldBy reads kv, a holder key that is not this host's, into a
// *LeaseHeldError, asking etcd how long its lease has left. lapsed reports a
// lease that ran out whose key etcd has not deleted yet.
func (e *Etcd) heldBy(ctx context.Context, vm string, kv *mvccpb.KeyValue) (held *LeaseHeldError, lapsed bool, err error) {
	name := string(kv.GetValue())
	if err := names.Check("host", name); err != nil {
		return nil, false, fmt.Errorf("key %s holds no host name (%w): not AX's key?", kv.GetKey(), err)
	}
	id := clientv3.LeaseID(kv.GetLease())
	if id == 0 {
		return nil, false, fmt.Errorf("key %s names %q but has no lease, so it never expires: AX never writes it so (delete it once %s surely runs no %s)", kv.GetKey(), name, name, vm)
	}
	held = &LeaseHeldError{VM: vm, Holder: name, Remaining: e.ttl}
	resp, err := e.cli.TimeToLive(ctx, id)
	switch {
	case err != nil:
		// Held all the same: only the time left is unknown.
		e.log.Debug("witness: etcd: lease's time to live unknown", "vm", vm, "held_by", name, "err", err)
	case resp.ID != id && resp.ID != 0:
		return nil, false, fmt.Errorf("etcd answered about lease %x when asked about %x", int64(resp.ID), int64(id))
	case resp.TTL < 0:
		held.Remaining, lapsed = 0, true
	case resp.TTL > maxSeconds:
		return nil, false, fmt.Errorf("etcd says lease %x has %d s left", int64(id), resp.TTL)
	default:
		held.Remaining = time.Duration(resp.TTL) * time.Second
	}
	held.ExpiresAt = e.now().Add(held.Remaining)
	return held, lapsed, nil
}

// acquired is the outcome of acquire's transaction.
type acquired struct {
	rev   int64            // the revision that bound the lease
	fresh bool             // the key was absent: a new holder
	other *mvccpb.KeyValue // refused: another host's holder key
}

// readAcquire reads acquire's transaction response; an answer of another
// shape is an error, never a grant.
func readAcquire(resp *pb.TxnResponse, holder string) (acquired, error) {
	if resp == nil {
		return acquired{}, errOdd("no transaction response")
	}
	rev := resp.GetHeader().GetRevision()
	if resp.GetSucceeded() {
		if rev <= 0 {
			return acquired{}, errOdd("a put at revision %d", rev)
		}
		return acquired{rev: rev, fresh: true}, nil
	}
	rs := resp.GetResponses()
	if len(rs) != 1 || rs[0].GetResponseTxn() == nil {
		return acquired{}, errOdd("%d results where one nested transaction's was due", len(rs))
	}
	nested := rs[0].GetResponseTxn()
	if nested.GetSucceeded() {
		if rev <= 0 {
			return acquired{}, errOdd("a put at revision %d", rev)
		}
		return acquired{rev: rev}, nil
	}
	kv, err := oneKey(nested.GetResponses(), holder)
	if err != nil {
		return acquired{}, err
	}
	if kv == nil {
		// The key existed (its create revision was not 0) in the same
		// transaction: it cannot be absent.
		return acquired{}, errOdd("holder key %s both present and absent", holder)
	}
	return acquired{other: kv}, nil
}

// released is the outcome of Release's transaction.
type released struct {
	deleted bool
	rev     int64
	lease   clientv3.LeaseID // the deleted key's
	other   *mvccpb.KeyValue // not deleted: the holder key (nil: none)
}

func readRelease(resp *pb.TxnResponse, holder string) (released, error) {
	if resp == nil {
		return released{}, errOdd("no transaction response")
	}
	rs := resp.GetResponses()
	if !resp.GetSucceeded() {
		kv, err := oneKey(rs, holder)
		return released{other: kv}, err
	}
	if len(rs) != 1 || rs[0].GetResponseDeleteRange() == nil {
		return released{}, errOdd("%d results where one delete's was due", len(rs))
	}
	rel := released{deleted: true, rev: resp.GetHeader().GetRevision()}
	for _, kv := range rs[0].GetResponseDeleteRange().GetPrevKvs() {
		if string(kv.GetKey()) == holder {
			rel.lease = clientv3.LeaseID(kv.GetLease())
		}
	}
	return rel, nil
}

// readQuery reads Query's transaction response: the holder and last keys,
// nil when absent.
func readQuery(resp *pb.TxnResponse, holder, last string) (h, l *mvccpb.KeyValue, err error) {
	if resp == nil {
		return nil, nil, errOdd("no transaction response")
	}
	rs := resp.GetResponses()
	if !resp.GetSucceeded() || len(rs) != 2 {
		return nil, nil, errOdd("%d results (succeeded %t) where two reads' were due", len(rs), resp.GetSucceeded())
	}
	if h, err = oneKey(rs[:1], holder); err != nil {
		return nil, nil, err
	}
	if l, err = oneKey(rs[1:], last); err != nil {
		return nil, nil, err
	}
	return h, l, nil
}

// oneKey reads the result of one get of key: the key, or nil if absent.
func oneKey(rs []*pb.ResponseOp, key string) (*mvccpb.KeyValue, error) {
	if len(rs) != 1 || rs[0].GetResponseRange() == nil {
		return nil, errOdd("%d results where one read's was due", len(rs))
	}
	kvs := rs[0].GetResponseRange().GetKvs()
	switch {
	case len(kvs) == 0:
		return nil, nil
	case len(kvs) > 1 || kvs[0] == nil || string(kvs[0].GetKey()) != key:
		return nil, errOdd("%d keys where %s alone was due", len(kvs), key)
	}
	return kvs[0], nil
}

// errOdd is an answer from etcd that cannot be: a bug, or not etcd.
func errOdd(format string, args ...any) error {
	return fmt.Errorf("odd answer from etcd: "+format, args...)
}

// fail wraps a call's error with where it went and, when nothing answered,
// what to check.
func (e *Etcd) fail(ctx context.Context, op, vm string, err error) error {
	return e.failAt(ctx, fmt.Sprintf("%s vm %q", op, vm), err)
}

// failAt is fail for a call about no VM: what names what was asked.
func (e *Etcd) failAt(ctx context.Context, what string, err error) error {
	hint := ""
	switch {
	case errors.Is(err, rpctypes.ErrNoLeader):
		hint = ": the members reached have no leader (is a majority of the etcd cluster up?)"
	case ctx.Err() != nil:
		if !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w (%v)", context.Cause(ctx), err)
		}
		hint = ": no answer in time (is a majority of the etcd cluster up and reachable?)"
	}
	return fmt.Errorf("witness etcd %s: %s: %w%s", e.members, what, err, hint)
}

func (e *Etcd) isClosed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closed
}

func (e *Etcd) lease(vm string) (boundLease, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	l, ok := e.bound[vm]
	return l, ok
}

// remember records the lease a put bound to vm's holder key, unless a later
// put is known to have bound another.
func (e *Etcd) remember(vm string, l boundLease) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if old, ok := e.bound[vm]; !ok || old.rev < l.rev {
		e.bound[vm] = l
	}
}

// forget drops l, found lapsed, unless another lease has replaced it.
func (e *Etcd) forget(vm string, l boundLease) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.bound[vm] == l {
		delete(e.bound, vm)
	}
}

// forgetBefore drops vm's lease if it was bound before revision rev, when
// the holder key was deleted.
func (e *Etcd) forgetBefore(vm string, rev int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if l, ok := e.bound[vm]; ok && l.rev < rev {
		delete(e.bound, vm)
	}
}

// ParseEtcdAddr returns the members of an etcd address,
// etcd://host:port[,host:port...], as host:port endpoints for
// EtcdConfig.Endpoints. Hosts are names or IP addresses (IPv6 in brackets);
// anything else, a member named twice included, is refused.
func ParseEtcdAddr(addr string) ([]string, error) {
	rest, ok := strings.CutPrefix(addr, EtcdScheme)
	if !ok {
		return nil, fmt.Errorf("witness: address %q is no etcd address: want %shost:port[,host:port...]", addr, EtcdScheme)
	}
	if rest == "" {
		return nil, fmt.Errorf("witness: etcd address %q names no member: want %shost:port[,host:port...]", addr, EtcdScheme)
	}
	var eps []string
	seen := make(map[string]bool)
	for m := range strings.SplitSeq(rest, ",") {
		ep, err := checkEndpoint(m)
		if err != nil {
			return nil, fmt.Errorf("witness: etcd address %q: %w", addr, err)
		}
		if seen[ep] {
			return nil, fmt.Errorf("witness: etcd address %q names member %s twice", addr, ep)
		}
		seen[ep] = true
		eps = append(eps, ep)
	}
	return eps, nil
}

// checkEndpoint accepts host:port with a host name or IP address and a port
// 1-65535, and returns it as net.JoinHostPort spells it.
func checkEndpoint(ep string) (string, error) {
	host, port, err := net.SplitHostPort(ep)
	if err != nil {
		return "", fmt.Errorf("member %q: want host:port (an IPv6 address in brackets): %w", ep, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 || port != strconv.FormatUint(n, 10) {
		return "", fmt.Errorf("member %q: port %q, want 1-65535", ep, port)
	}
	if net.ParseIP(host) == nil && !hostName(host) {
		return "", fmt.Errorf("member %q: host %q is neither a host name nor an IP address", ep, host)
	}
	return net.JoinHostPort(host, port), nil
}

// hostName accepts a DNS name: labels of letters, digits and '-', not
// starting or ending with '-', dot-separated.
func hostName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for label := range strings.SplitSeq(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
