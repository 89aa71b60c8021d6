package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/replication"
)

// After a failover the old primary's copy of a VM ends here (handed over,
// or killed once the partner took it over), and the VM, declared FT, is soon
// protected again towards this host. The RAM that copy left is the best base
// there is for that replica: it differs from the survivor's only by what the
// guest changed since. seedReplica keeps it as the replica-to-be
// (replication.SeedReplica), so the survivor's initial sync sends only the
// pages that differ.

// seedUnusedFor is how long a seed nobody synced on is kept: it holds a
// whole RAM image in the state directory (tmpfs).
const seedUnusedFor = 10 * time.Minute

// seedReplica keeps the RAM file of spec's ended copy as the base of the
// VM's next replica here. The copy must no longer change: paused, stopped
// or gone.
func (d *Daemon) seedReplica(spec api.VMSpec) {
	if spec.Guest.RAMFile == "" || spec.Guest.RAMMiB <= 0 {
		return
	}
	dir, err := names.Join(filepath.Join(d.cfg.StateDir, "replicas"), "vm", spec.Name)
	if err != nil {
		return
	}
	t0 := time.Now()
	seeded, err := replication.SeedReplica(dir, int64(spec.Guest.RAMMiB)<<20, spec.Guest.RAMFile)
	switch {
	case err != nil:
		d.log.Info("the RAM of the ended copy is not kept as a base", "vm", spec.Name, "err", err)
	case seeded:
		d.event(spec.Name, "seed", fmt.Sprintf("the RAM of this host's ended copy of %s is kept as the base of its next replica here (%.2f s to copy): protecting it again towards this host sends only what changed",
			spec.Name, time.Since(t0).Seconds()))
	}
}

// seeding marks name's seed as being made until the returned function is
// called: a stream of the VM arriving meanwhile waits for it (awaitSeed)
// rather than being refused and retried seconds later.
func (d *Daemon) seeding(name string) func() {
	ch := make(chan struct{})
	d.mu.Lock()
	if d.seeds == nil {
		d.seeds = map[string]chan struct{}{}
	}
	d.seeds[name] = ch
	d.mu.Unlock()
	return func() {
		d.mu.Lock()
		if d.seeds[name] == ch {
			delete(d.seeds, name)
		}
		d.mu.Unlock()
		close(ch)
	}
}

// awaitSeed waits, at most seedWait, while name's seed is being made.
func (d *Daemon) awaitSeed(name string) {
	d.mu.Lock()
	ch := d.seeds[name]
	d.mu.Unlock()
	if ch == nil {
		return
	}
	select {
	case <-ch:
	case <-time.After(seedWait):
	}
}

// seedWait bounds how long a stream waits for a seed (well inside the
// primary's wait for an answer to its spec).
const seedWait = 5 * time.Second

// dropUnusedSeeds removes the seeds no stream synced on within
// seedUnusedFor (the VM was protected towards another host, or not again).
func (d *Daemon) dropUnusedSeeds() {
	root := filepath.Join(d.cfg.StateDir, "replicas")
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range ents {
		if _, err := d.vm(e.Name()); err == nil {
			continue // a replica of it is open here (or it runs here)
		}
		dir := filepath.Join(root, e.Name())
		if age, ok := replication.SeedAge(dir); ok && age > seedUnusedFor {
			os.RemoveAll(dir)
			d.log.Info("dropped an unused replica seed", "vm", e.Name(), "age", age.Round(time.Second).String())
		}
	}
}
