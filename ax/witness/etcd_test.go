package witness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/axproject/ax/test/etcdtest"
)

func TestParseEtcdAddr(t *testing.T) {
	for addr, want := range map[string][]string{
		"etcd://127.0.0.1:2379":                         {"127.0.0.1:2379"},
		"etcd://e1:2379,e2.example.org:2380,[::1]:2379": {"e1:2379", "e2.example.org:2380", "[::1]:2379"},
		"etcd://etcd-0.witness.:65535":                  {"etcd-0.witness.:65535"},
	} {
		got, err := ParseEtcdAddr(addr)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("ParseEtcdAddr(%q) = %q, %v; want %q", addr, got, err, want)
		}
	}
	for _, addr := range []string{
		"", "127.0.0.1:2379", "http://e1:2379", "https://e1:2379", "ETCD://e1:2379", "etcd:/e1:2379",
		"etcd://", "etcd://,", "etcd://e1:2379,", "etcd://,e1:2379", "etcd://e1", "etcd://e1:", "etcd://:2379",
		"etcd://e1:0", "etcd://e1:65536", "etcd://e1:+1", "etcd://e1:02379", "etcd://e1:http",
		"etcd://e1:2379,e1:2379", "etcd://user@e1:2379", "etcd://e1:2379/ax", "etcd://e1:2379?x=1",
		"etcd://::1:2379", "etcd://[::1]", "etcd://e 1:2379", "etcd://-e1:2379", "etcd://e_1:2379",
		"etcd://e1..org:2379", "etcd://e1:2379 ", "etcd://" + strings.Repeat("e", 64) + ":2379",
	} {
		if got, err := ParseEtcdAddr(addr); err == nil {
			t.Errorf("ParseEtcdAddr(%q) = %q, want an error", addr, got)
		} else if !strings.Contains(err.Error(), "etcd") {
			t.Errorf("ParseEtcdAddr(%q): %v, want it to say what an etcd address is", addr, err)
		}
	}
}

func TestEtcdTTLSeconds(t *testing.T) {
	for _, c := range []struct {
		ttl  time.Duration
		want int64
	}{
		{time.Nanosecond, 1},
		{300 * time.Millisecond, 1},
		{time.Second, 1},
		{time.Second + time.Nanosecond, 2},
		{1500 * time.Millisecond, 2},
		{10 * time.Second, 10},
	} {
		if got := etcdTTLSeconds(c.ttl); got != c.want {
			t.Errorf("etcdTTLSeconds(%v) = %d, want %d", c.ttl, got, c.want)
		}
	}
}

func TestNewEtcdChecks(t *testing.T) {
	good := EtcdConfig{Endpoints: []string{"127.0.0.1:1"}, Host: "a", TTL: 1500 * time.Millisecond}
	for name, edit := range map[string]func(c *EtcdConfig){
		"no endpoints":         func(c *EtcdConfig) { c.Endpoints = nil },
		"endpoint with scheme": func(c *EtcdConfig) { c.Endpoints = []string{"http://127.0.0.1:2379"} },
		"endpoint sans port":   func(c *EtcdConfig) { c.Endpoints = []string{"127.0.0.1"} },
		"no host":              func(c *EtcdConfig) { c.Host = "" },
		"host with a slash":    func(c *EtcdConfig) { c.Host = "a/b" },
		"zero TTL":             func(c *EtcdConfig) { c.TTL = 0 },
		"prefix ending in /":   func(c *EtcdConfig) { c.Prefix = "/ax/" },
		"prefix with NUL":      func(c *EtcdConfig) { c.Prefix = "/ax\x00" },
		"prefix not UTF-8":     func(c *EtcdConfig) { c.Prefix = "/ax\xff" },
	} {
		cfg := good
		edit(&cfg)
		if e, err := NewEtcd(cfg); err == nil {
			e.Close()
			t.Errorf("%s: NewEtcd succeeded", name)
		}
	}
	// It does not dial: nothing listens there.
	e, err := NewEtcd(good)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if e.TTL() != 2*time.Second {
		t.Errorf("TTL() = %v for 1.5 s, want it rounded up to 2 s", e.TTL())
	}
	if holder, last := e.keys("web"); holder != DefaultEtcdPrefix+"/vms/web/holder" || last != DefaultEtcdPrefix+"/vms/web/last" {
		t.Errorf("keys: %s, %s", holder, last)
	}
}

// TestEtcdUnreachable: every call ends within its context when no member
// answers, with an error that says what to check, and never ErrLeaseHeld.
func TestEtcdUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // accepted by the kernel, never answered
	e, err := NewEtcd(EtcdConfig{Endpoints: []string{ln.Addr().String(), "127.0.0.1:1"}, Host: "a", TTL: time.Second, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for name, call := range leaseCalls(e) {
		start := time.Now()
		err := call(context.Background(), "web")
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("%s took %v with a 300 ms timeout", name, took)
		}
		if err == nil || errors.Is(err, ErrLeaseHeld) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "majority") {
			t.Errorf("%s: %v, want a deadline error that says what to check", name, err)
		}
	}
	// The caller's context bounds a call too.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := e.Takeover(ctx, "web"); err == nil || time.Since(start) > time.Second {
		t.Errorf("Takeover within 50 ms: %v after %v", err, time.Since(start))
	}
}

// leaseCalls returns the calls of Leases that take a VM, as one shape.
func leaseCalls(l Leases) map[string]func(ctx context.Context, vm string) error {
	return map[string]func(ctx context.Context, vm string) error{
		"Renew":    func(ctx context.Context, vm string) error { _, err := l.Renew(ctx, vm); return err },
		"Takeover": l.Takeover,
		"Release":  l.Release,
		"Query":    func(ctx context.Context, vm string) error { _, err := l.Query(ctx, vm); return err },
	}
}

func TestEtcdClose(t *testing.T) {
	e, err := NewEtcd(EtcdConfig{Endpoints: []string{"127.0.0.1:1"}, Host: "a", TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := e.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	for name, call := range leaseCalls(e) {
		if err := call(context.Background(), "web"); !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s after Close: %v, want net.ErrClosed", name, err)
		}
	}
}

// TestEtcdOddAnswers: answers of a shape etcd does not give are errors,
// never a grant, never a panic.
func TestEtcdOddAnswers(t *testing.T) {
	const holder, last = "/p/vms/web/holder", "/p/vms/web/last"
	header := &pb.ResponseHeader{Revision: 7}
	kv := func(key, value string, lease int64) *mvccpb.KeyValue {
		return &mvccpb.KeyValue{Key: []byte(key), Value: []byte(value), Lease: lease, CreateRevision: 3}
	}
	rng := func(kvs ...*mvccpb.KeyValue) *pb.ResponseOp {
		return &pb.ResponseOp{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{Kvs: kvs}}}
	}
	nested := func(ok bool, rs ...*pb.ResponseOp) *pb.ResponseOp {
		return &pb.ResponseOp{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: &pb.TxnResponse{Succeeded: ok, Responses: rs}}}
	}
	put := &pb.ResponseOp{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{}}}
	del := func(kvs ...*mvccpb.KeyValue) *pb.ResponseOp {
		return &pb.ResponseOp{Response: &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: &pb.DeleteRangeResponse{Deleted: 1, PrevKvs: kvs}}}
	}

	t.Run("acquire", func(t *testing.T) {
		for name, resp := range map[string]*pb.TxnResponse{
			"nil":                       nil,
			"granted without revision":  {Succeeded: true},
			"no else result":            {Header: header},
			"else result not a txn":     {Header: header, Responses: []*pb.ResponseOp{put}},
			"two else results":          {Header: header, Responses: []*pb.ResponseOp{nested(true), nested(true)}},
			"nil else result":           {Header: header, Responses: []*pb.ResponseOp{nil}},
			"nested granted sans rev":   {Responses: []*pb.ResponseOp{nested(true)}},
			"refused without a read":    {Header: header, Responses: []*pb.ResponseOp{nested(false)}},
			"refused, read not a range": {Header: header, Responses: []*pb.ResponseOp{nested(false, put)}},
			"refused, key absent":       {Header: header, Responses: []*pb.ResponseOp{nested(false, rng())}},
			"refused, two keys":         {Header: header, Responses: []*pb.ResponseOp{nested(false, rng(kv(holder, "b", 9), kv(holder, "c", 9)))}},
			"refused, another key":      {Header: header, Responses: []*pb.ResponseOp{nested(false, rng(kv(last, "b", 9)))}},
			"refused, nil key":          {Header: header, Responses: []*pb.ResponseOp{nested(false, rng(nil))}},
		} {
			if got, err := readAcquire(resp, holder); err == nil {
				t.Errorf("%s: %+v, want an error", name, got)
			}
		}
		if got, err := readAcquire(&pb.TxnResponse{Header: header, Succeeded: true}, holder); err != nil || !got.fresh || got.rev != 7 || got.other != nil {
			t.Errorf("granted to a new holder: %+v, %v", got, err)
		}
		if got, err := readAcquire(&pb.TxnResponse{Header: header, Responses: []*pb.ResponseOp{nested(true, put, put)}}, holder); err != nil || got.fresh || got.rev != 7 || got.other != nil {
			t.Errorf("granted to the holder: %+v, %v", got, err)
		}
		if got, err := readAcquire(&pb.TxnResponse{Header: header, Responses: []*pb.ResponseOp{nested(false, rng(kv(holder, "b", 9)))}}, holder); err != nil || got.other == nil || string(got.other.Value) != "b" {
			t.Errorf("refused: %+v, %v", got, err)
		}
	})

	t.Run("release", func(t *testing.T) {
		for name, resp := range map[string]*pb.TxnResponse{
			"nil":                    nil,
			"deleted without result": {Header: header, Succeeded: true},
			"deleted, not a delete":  {Header: header, Succeeded: true, Responses: []*pb.ResponseOp{rng()}},
			"refused without a read": {Header: header},
			"refused, two keys":      {Header: header, Responses: []*pb.ResponseOp{rng(kv(holder, "b", 9), kv(holder, "b", 9))}},
		} {
			if got, err := readRelease(resp, holder); err == nil {
				t.Errorf("%s: %+v, want an error", name, got)
			}
		}
		if got, err := readRelease(&pb.TxnResponse{Header: header, Succeeded: true, Responses: []*pb.ResponseOp{del(kv(holder, "a", 9))}}, holder); err != nil || !got.deleted || got.lease != 9 || got.rev != 7 {
			t.Errorf("released: %+v, %v", got, err)
		}
	})

	t.Run("query", func(t *testing.T) {
		for name, resp := range map[string]*pb.TxnResponse{
			"nil":          nil,
			"not executed": {Header: header, Responses: []*pb.ResponseOp{rng(), rng()}},
			"one result":   {Header: header, Succeeded: true, Responses: []*pb.ResponseOp{rng()}},
			"keys swapped": {Header: header, Succeeded: true, Responses: []*pb.ResponseOp{rng(kv(last, "a", 0)), rng()}},
		} {
			if h, l, err := readQuery(resp, holder, last); err == nil {
				t.Errorf("%s: %v, %v, want an error", name, h, l)
			}
		}
	})

	t.Run("holder key", func(t *testing.T) {
		e, err := NewEtcd(EtcdConfig{Endpoints: []string{"127.0.0.1:1"}, Host: "a", TTL: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		for name, kv := range map[string]*mvccpb.KeyValue{
			"empty name":     kv(holder, "", 9),
			"path as a name": kv(holder, "../b", 9),
			"binary name":    kv(holder, "b\x00", 9),
			"no lease":       kv(holder, "b", 0),
			"nil":            nil,
		} {
			if held, _, err := e.heldBy(context.Background(), "web", kv); err == nil {
				t.Errorf("%s: %+v, want an error", name, held)
			}
		}
	})
}

// TestEtcdTTLRounding: a TTL that is no whole second is rounded up, never
// down, and renewals keep the lease they bound alive.
func TestEtcdTTLRounding(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ctx := context.Background()
	raw := rawEtcd(t, c.Endpoints())

	e := newTestEtcd(t, c.Endpoints(), "a", 1200*time.Millisecond)
	if e.TTL() != 2*time.Second {
		t.Fatalf("TTL() = %v, want 2s", e.TTL())
	}
	start := time.Now()
	exp, err := e.Renew(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if d := exp.Sub(start); d < 2*time.Second || d > 2*time.Second+time.Since(start) {
		t.Fatalf("Renew expires %v after the call began, want 2s", d)
	}
	l, ok := e.lease("web")
	if !ok {
		t.Fatal("no lease bound after Renew")
	}
	ttl, err := raw.TimeToLive(ctx, l.id)
	if err != nil || ttl.GrantedTTL != 2 {
		t.Fatalf("etcd's lease: %+v, %v; want granted for 2 s", ttl, err)
	}
	// Renewals keep that lease alive rather than bind new ones.
	for range 3 {
		if _, err := e.Renew(ctx, "web"); err != nil {
			t.Fatal(err)
		}
	}
	if again, _ := e.lease("web"); again != l {
		t.Fatalf("renewals bound lease %x, want %x kept alive", again.id, l.id)
	}

	// 300 ms becomes 1 s: the lease is still there when a 300 ms one
	// would have gone, and lapses in about a second.
	short := newTestEtcd(t, c.Endpoints(), "a", 300*time.Millisecond)
	before := time.Now()
	if _, err := short.Renew(ctx, "short"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	info := query(t, short, "short")
	if time.Since(before) < time.Second && info.Expired {
		t.Fatalf("lease of 300 ms, rounded up to 1 s, gone after %v: %+v", time.Since(before), info)
	}
	waitLapsed(t, short, "short")
	t.Logf("a 1 s lease lapsed %v after the renewal began", time.Since(before).Round(10*time.Millisecond))
	// Its holder renews again with a fresh lease.
	if _, err := short.Renew(ctx, "short"); err != nil {
		t.Fatal(err)
	}
	if info := query(t, short, "short"); info.Holder != "a" || info.Expired {
		t.Fatalf("after renewing a lapsed lease: %+v", info)
	}
}

// TestEtcdMemberLoss: a 3-member cluster serves the leases with one member
// killed (the leader); with two killed every call fails within its context
// with an error that says why, and no takeover succeeds even after the
// holder's lease would have run out.
func TestEtcdMemberLoss(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx := context.Background()
	a := newTestEtcd(t, c.Endpoints(), "a", leaseTTL)
	b := newTestEtcd(t, c.Endpoints(), "b", leaseTTL)
	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}

	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	leader.Kill()
	t.Logf("killed the leader, %s", leader.Name)
	// a keeps its lease across the election: etcd extends leases on a
	// new leader, so it cannot lapse meanwhile.
	eventually(t, 10*time.Second, func() error {
		_, err := a.Renew(callCtx(t, time.Second), "web")
		return err
	})
	t.Logf("renewed %v after the leader was killed", time.Since(killed).Round(10*time.Millisecond))
	eventually(t, 5*time.Second, func() error {
		err := b.Takeover(callCtx(t, time.Second), "web")
		if err == nil {
			t.Fatal("b took over a's valid lease")
		}
		if errors.Is(err, ErrLeaseHeld) {
			wantHeld(t, err, "a")
			return nil
		}
		return err
	})
	eventually(t, 5*time.Second, func() error { return b.Takeover(callCtx(t, time.Second), "db") })
	if info := query(t, a, "web"); info.Holder != "a" || info.Expired {
		t.Fatalf("with two members: %+v", info)
	}

	var running []*etcdtest.Member
	for _, m := range c.Members {
		if m.Running() {
			running = append(running, m)
		}
	}
	running[0].Kill()
	last := running[1]
	t.Logf("killed %s: %s left alone, no quorum", running[0].Name, last.Name)
	// At once: the member left may still lead for up to two election
	// timeouts, and renew the leases it governs (a's), but it commits
	// nothing: b gets no lease.
	for name, call := range leaseCalls(b) {
		if name == "Renew" || name == "Takeover" {
			if err := call(callCtx(t, 1500*time.Millisecond), "web"); err == nil {
				t.Fatalf("b.%s right after the quorum was lost succeeded", name)
			}
		}
	}
	eventually(t, 5*time.Second, func() error {
		if has, err := last.HasLeader(ctx); err != nil || has {
			return fmt.Errorf("%s still has a leader (%v)", last.Name, err)
		}
		return nil
	})
	// Every call at once: each waits up to its context.
	noQuorum := func() {
		t.Helper()
		const timeout = 1500 * time.Millisecond
		type result struct {
			call string
			err  error
			took time.Duration
		}
		var mu sync.Mutex
		var results []result
		var wg sync.WaitGroup
		for host, l := range map[string]Leases{"a": a, "b": b} {
			for name, call := range leaseCalls(l) {
				wg.Go(func() {
					start := time.Now()
					err := call(callCtx(t, timeout), "web")
					mu.Lock()
					defer mu.Unlock()
					results = append(results, result{host + "." + name, err, time.Since(start)})
				})
			}
		}
		wg.Wait()
		for _, r := range results {
			switch {
			case r.err == nil:
				t.Fatalf("%s without quorum succeeded", r.call)
			case r.took > timeout+time.Second:
				t.Errorf("%s without quorum took %v, its context %v", r.call, r.took, timeout)
			case errors.Is(r.err, ErrLeaseHeld) || !strings.Contains(r.err.Error(), "majority"):
				t.Errorf("%s without quorum: %v, want an error that says a majority is missing", r.call, r.err)
			}
			t.Logf("%s without quorum, after %v: %v", r.call, r.took.Round(time.Millisecond), r.err)
		}
	}
	noQuorum()
	// a's lease has run out on every clock by now, but no member can say
	// so: b still gets no grant.
	time.Sleep(leaseTTL)
	noQuorum()
}

// eventually calls f until it returns nil, failing the test after within.
func eventually(t *testing.T, within time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing after %v: %v", within, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func callCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// rawEtcd is a plain etcd client, to look at what Etcd wrote.
func rawEtcd(t *testing.T, endpoints []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// TestEtcdTakeoverWatched: a refused takeover is watched, not polled —
// asked again while the holder's lease has time left, it is refused without
// a transaction reaching etcd; once the holder releases, the next takeover
// goes to etcd and wins, without waiting out the time the refusal gave.
func TestEtcdTakeoverWatched(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ctx := context.Background()
	a := newTestEtcd(t, c.Endpoints(), "a", 5*time.Second)
	b := newTestEtcd(t, c.Endpoints(), "b", 5*time.Second)
	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	var held *LeaseHeldError
	if err := b.Takeover(ctx, "web"); !errors.As(err, &held) || held.Holder != "a" {
		t.Fatalf("takeover of a's lease: %v, want held by a", err)
	}
	before := txnCount(t, c.Members[0].ClientURL)
	for range 20 {
		err := b.Takeover(ctx, "web")
		if !errors.As(err, &held) || held.Holder != "a" || held.Remaining <= 0 {
			t.Fatalf("takeover asked again: %v, want held by a with time left", err)
		}
	}
	if after := txnCount(t, c.Members[0].ClientURL); after != before {
		t.Fatalf("20 takeovers asked again while a's lease had time left sent %d transactions to etcd, want 0", after-before)
	}
	released := time.Now()
	if err := a.Release(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, func() error { return b.Takeover(ctx, "web") })
	if d := time.Since(released); d >= held.Remaining {
		t.Fatalf("b won %v after a released, not before the refusal's %v ran out", d, held.Remaining)
	} else {
		t.Logf("b won %v after a released (the refusal had %v left)", d.Round(time.Millisecond), held.Remaining.Round(time.Millisecond))
	}
	if info := query(t, b, "web"); info.Holder != "b" || info.Expired {
		t.Fatalf("after b's takeover: %+v", info)
	}
}

// txnCount is how many transactions the etcd member at url has begun
// serving (its gRPC metrics).
func txnCount(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, "grpc_server_started_total{") && strings.Contains(line, `grpc_method="Txn"`) {
			n, err := strconv.Atoi(line[strings.LastIndexByte(line, ' ')+1:])
			if err != nil {
				t.Fatalf("etcd metric %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("etcd at %s reports no grpc_server_started_total for Txn", url)
	return 0
}
