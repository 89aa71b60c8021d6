package witness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
)

// TestClientOneConnection checks that concurrent calls on a client of one
// connection (MaxConns 1) take turns on it and each gets its own answer.
func TestClientOneConnection(t *testing.T) {
	w := startWitnessPastGrace(t)
	a := newTestClient(t, ClientConfig{Addr: w.addr, PSK: testKey, Holder: "a", MaxConns: 1}, w.clock)
	ctx := context.Background()
	const callers, calls = 8, 20
	errs := make(chan error, callers*calls)
	var wg sync.WaitGroup
	for i := range callers {
		vm := fmt.Sprintf("vm%d", i)
		wg.Go(func() {
			for range calls {
				if _, err := a.Renew(ctx, vm); err != nil {
					errs <- err
				}
				info, err := a.Query(ctx, vm)
				if err != nil {
					errs <- err
				} else if info.Holder != "a" {
					errs <- fmt.Errorf("%s: holder %q", vm, info.Holder)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if a.dials != 1 {
		t.Fatalf("%d calls dialled %d times, want one connection", 2*callers*calls, a.dials)
	}
}

func TestClientReconnects(t *testing.T) {
	clock := newFakeClock()
	w1 := startWitness(t, clock)
	clock.Advance(testTTL)
	a := w1.client("a")
	ctx := context.Background()
	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	w1.stop() // closes a's connection under it
	w2 := startWitnessWith(t, clock, ServerConfig{PSK: testKey}, w1.addr)
	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatalf("renewal after the witness restarted: %v", err)
	}
	if a.dials != 2 {
		t.Fatalf("dials %d, want 2", a.dials)
	}
	if info := w2.query("web"); info.Holder != "a" {
		t.Fatalf("after the reconnection: %+v", info)
	}
}

func TestClientClose(t *testing.T) {
	w := startWitnessPastGrace(t)
	a := w.client("a")
	ctx := context.Background()
	if _, err := a.Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := a.Renew(ctx, "web"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Renew after Close: %v, want net.ErrClosed", err)
	}
}
