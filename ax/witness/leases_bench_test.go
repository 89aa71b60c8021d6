package witness

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/axproject/ax/test/etcdtest"
)

// BenchmarkLeasesRenew measures renewals through Leases, side by side in
// one run: against the witness Server through a Client (leases in memory,
// and with its state file) and against a 1-member etcd on loopback. Each
// iteration renews one VM's lease, or 16 VMs' at once; it reports
// renewals/s/vm (how often one VM's lease can be renewed) and renewals/s
// (for the host). The leases are granted before the timer starts, so etcd's
// renewals are keep-alives, which its leader answers without a disk write,
// as in service.
//
// Run it with the default -benchtime or less: the Server's replay cache
// holds 65,536 requests of 30 s (maxNonces), about 2 s of these renewals.
func BenchmarkLeasesRenew(b *testing.B) {
	for _, backend := range []struct {
		name string
		// witness is called once per backend and returns what opens a
		// host's Leases for each run of a benchmark.
		witness func(b *testing.B) func(b *testing.B, host string) Leases
	}{
		{"server", func(*testing.B) func(*testing.B, string) Leases {
			return func(b *testing.B, host string) Leases { return benchServerLeases(b, "")(host) }
		}},
		{"server-state-file", func(*testing.B) func(*testing.B, string) Leases {
			return func(b *testing.B, host string) Leases {
				return benchServerLeases(b, b.TempDir()+"/witness.state")(host)
			}
		}},
		{"etcd", func(b *testing.B) func(*testing.B, string) Leases {
			endpoints := etcdtest.Start(b, 1).Endpoints()
			return func(b *testing.B, host string) Leases {
				e, err := NewEtcd(EtcdConfig{Endpoints: endpoints, Host: host, TTL: testTTL, Timeout: 5 * time.Second})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { e.Close() })
				return e
			}
		}},
	} {
		b.Run(backend.name, func(b *testing.B) {
			open := backend.witness(b)
			for _, vms := range []int{1, 16} {
				b.Run(fmt.Sprintf("vms=%d", vms), func(b *testing.B) {
					benchRenew(b, open(b, "a"), vms)
				})
			}
		})
	}
}

func benchRenew(b *testing.B, l Leases, vms int) {
	ctx := context.Background()
	names := make([]string, vms)
	for i := range names {
		names[i] = fmt.Sprintf("vm%d", i)
		if _, err := l.Renew(ctx, names[i]); err != nil {
			b.Fatal(err)
		}
	}
	errs := make([]error, vms)
	for b.Loop() {
		var wg sync.WaitGroup
		for i, vm := range names {
			wg.Go(func() { _, errs[i] = l.Renew(ctx, vm) })
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
	}
	sec := b.Elapsed().Seconds()
	b.ReportMetric(float64(b.N)/sec, "renewals/s/vm")
	b.ReportMetric(float64(b.N*vms)/sec, "renewals/s")
}

// benchServerLeases serves a PSK witness on the real clock, past its
// restart grace, until the benchmark ends, and opens clients of it.
func benchServerLeases(b *testing.B, stateFile string) func(host string) Leases {
	addr := benchWitness(b, ServerConfig{PSK: testKey, StateFile: stateFile})
	return func(host string) Leases {
		c, err := NewClient(ClientConfig{Addr: addr, PSK: testKey, Holder: host, Timeout: 5 * time.Second})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return c
	}
}
