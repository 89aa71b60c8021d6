package lab

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

// libvirtFTLab brings up a lab whose guest is a Nova-shaped libvirt domain
// started on a and defined, not started, on b (the partner's definition:
// AX never creates a domain from XML a peer sent, so the lab plays Nova or
// the operator and defines it on both hosts), with axd on a and b run
// with --libvirt against their host's libvirtd. axd is told nothing of the
// guest: axctl protect DOMAIN discovers it. Both libvirtds run QEMU as
// libvirt-qemu, as Debian's libvirt does by default.
func libvirtFTLab(t *testing.T, prefix string, gcfg GuestConfig) (*Lab, *VM, string, DaemonConfig) {
	t.Helper()
	requireLibvirt(t)
	ctx := context.Background()
	l, err := Open(Config{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	l.Down(ctx) // a leftover of an earlier crashed run
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, name := range []string{"axd-a", "axd-b", "libvirtd-a", "libvirtd-b"} {
				if data, err := os.ReadFile(filepath.Join(l.StateDir, name+".log")); err == nil {
					t.Logf("%s log (tail):\n%s", name, tail(string(data), 40))
				}
			}
			for _, h := range []string{HostA, HostB} {
				filepath.WalkDir(filepath.Join(l.LibvirtDir(h), "log", "qemu"), func(p string, e fs.DirEntry, err error) error {
					if err == nil && !e.IsDir() {
						if data, err := os.ReadFile(p); err == nil {
							t.Logf("%s (tail):\n%s", p, tail(string(data), 10))
						}
					}
					return nil
				})
			}
		}
		state, _ := l.State()
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("down: %v", err)
		}
		if left := l.Leftovers(state); len(left) > 0 {
			t.Errorf("teardown left: %s", strings.Join(left, ", "))
		}
	})
	img := testImage(t)
	// QEMU runs as libvirt-qemu, Debian's default: axd must give it the
	// files it asks QEMU to write and the sockets it asks QEMU to reach.
	l.QEMUUser = libvirtQEMUUser
	for _, h := range []string{HostA, HostB} {
		if err := l.StartLibvirtd(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	gcfg.Host, gcfg.Kernel, gcfg.Initrd = HostA, img.Kernel, img.Initrd
	vm, err := l.DefineLibvirtGuest(ctx, gcfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.StartLibvirtGuest(ctx, vm, false); err != nil {
		t.Fatal(err)
	}
	onB := gcfg
	onB.Host = HostB
	if _, err := l.DefineLibvirtGuest(ctx, onB); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitServing(ctx, vm, 120*time.Second); err != nil {
		t.Fatal(err)
	}
	dcfg := DaemonConfig{Axd: axdBinary(t), Libvirt: true}
	if err := l.StartDaemons(ctx, dcfg); err != nil {
		t.Fatal(err)
	}
	return l, vm, filepath.Join(guestBinaries(t), "ax-workload"), dcfg
}

// TestIntegrationLibvirtFT is FT under libvirt end to end: a libvirt domain
// axd was never told of is protected by name (discovered from libvirt),
// its host is killed (QEMU, libvirtd and axd by SIGKILL, links cut) while
// the memory dirtier and a ledger client run, and b resumes the replica as
// the libvirt domain (StartIncoming): virsh on b lists it running with the
// same UUID and an unchanged definition, its tick goes on from the
// committed checkpoint, and no acknowledged record is lost.
func TestIntegrationLibvirtFT(t *testing.T) {
	l, vm, bin, dcfg := libvirtFTLab(t, "itlvft", GuestConfig{Dirty: 4})
	ctx := context.Background()
	uuid, err := l.Virsh(ctx, HostA, "domuuid", vm.Domain)
	if err != nil {
		t.Fatal(err)
	}
	uuid = strings.TrimSpace(uuid)
	// axctl protect DOMAIN --level ft --peer b
	t0 := time.Now()
	if err := l.Client(HostA).Protect(ctx, vm.Domain, api.ProtectRequest{Level: api.LevelFT, Peer: HostB}); err != nil {
		t.Fatalf("protect %s by discovery: %v", vm.Domain, err)
	}
	st := waitVM(t, l, l.Client(HostA), vm.Domain, 90*time.Second, "FT protection of the discovered domain", func(s api.VMStatus) bool {
		return s.State == "protected" && s.Level == api.LevelFT
	})
	t.Logf("%s discovered and protected at FT %.1f s after protect (%s)", vm.Domain, time.Since(t0).Seconds(), st.State)
	refusedAnonymousRAM(t, l, vm)
	libvirtdRestarted(t, l, vm.Domain, HostA, HostB)

	// AX_LIBVIRT_TRIALS host kills (default 1: CI's time), alternating
	// a→b and b→a; after each the killed host comes back and the domain,
	// declared FT, is protected towards it again by itself.
	trials := 1
	if n, err := strconv.Atoi(os.Getenv("AX_LIBVIRT_TRIALS")); err == nil && n > 0 {
		trials = n
	}
	from, to := HostA, HostB
	for i := 1; i <= trials; i++ {
		record := filepath.Join(l.StateDir, fmt.Sprintf("libvirt-ft-%d.rec", i))
		tr, err := l.FailoverTrial(ctx, vm.Domain, from, to, 15*time.Second+randomPart(), bin, record)
		if err != nil {
			t.Fatalf("trial %d: failover %s → %s: %v", i, from, to, err)
		}
		t.Logf("libvirt FT failover %d %s→%s: %.2f s, epoch %d, tick %d → %d, pause p50 %.1f ms, acked %d, lost %d, records %d",
			i, from, to, tr.Failover.Seconds(), tr.LastEpoch, tr.TickAtCommit, tr.FirstTick, tr.PauseP50MS, tr.Acked, tr.Lost, tr.Records)
		if tr.Acked == 0 {
			t.Errorf("trial %d: the client got no ack before the kill", i)
		}
		if tr.Lost > 0 {
			t.Errorf("trial %d: %d of %d acknowledged records are missing after failover", i, tr.Lost, tr.Acked)
		}
		out, err := l.Virsh(ctx, to, "list")
		if err != nil || !strings.Contains(out, vm.Domain) || !strings.Contains(out, "running") {
			t.Errorf("virsh list on %s: %q, %v; want %s running", to, out, err, vm.Domain)
		}
		if got, err := l.Virsh(ctx, to, "domuuid", vm.Domain); err != nil || strings.TrimSpace(got) != uuid {
			t.Errorf("the domain on %s has UUID %q (%v), it had %s", to, strings.TrimSpace(got), err, uuid)
		}
		if def, err := l.Virsh(ctx, to, "dumpxml", "--inactive", vm.Domain); err != nil || strings.Contains(def, "-incoming") {
			t.Errorf("StartIncoming changed the domain's definition on %s (%v)", to, err)
		}

		// The killed host comes back (libvirtd, axd); the survivor
		// protects the domain towards it again by itself, as it was
		// declared FT.
		if err := l.RecoverHost(ctx, from, dcfg); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		waitVM(t, l, l.Client(to), vm.Domain, 90*time.Second, "FT protection towards "+from+" again, by itself", func(s api.VMStatus) bool {
			return s.Role == api.RolePrimary && s.Level == api.LevelFT && s.Peer == from && s.State == "protected"
		})
		t.Logf("%s protected again from %s towards %s %.1f s after %s's axd started", vm.Domain, to, from, time.Since(back).Seconds(), from)
		from, to = to, from
	}
	// from is the primary now, to its partner.
	plannedLibvirtFailover(t, l, vm.Domain, from, to, uuid)
	destroyedNoFailover(t, l, vm.Domain, to, from)
}

// destroyedNoFailover: virsh destroy of domain, protected on primary
// towards partner, ends its protection with an event (axd hears libvirt's
// lifecycle event) and the partner drops its replica: no failover.
func destroyedNoFailover(t *testing.T, l *Lab, domain, primary, partner string) {
	t.Helper()
	ctx := context.Background()
	if _, err := l.Virsh(ctx, primary, "destroy", domain); err != nil {
		t.Fatal(err)
	}
	destroyed := time.Now()
	for {
		_, err := l.vmStatus(ctx, l.Client(primary), domain)
		_, perr := l.vmStatus(ctx, l.Client(partner), domain)
		if err != nil && perr != nil {
			break // both forgot it: the primary ended protection, the partner dropped the replica
		}
		if time.Since(destroyed) > 20*time.Second {
			t.Fatalf("20 s after virsh destroy on %s: %s still known on %s (%v) or %s (%v); events on %s:%s", primary, domain, primary, err, partner, perr, primary, l.eventsText(ctx, l.Client(primary)))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("virsh destroy on %s: protection ended and the replica on %s dropped %.2f s later", primary, partner, time.Since(destroyed).Seconds())
	if left, _ := filepath.Glob(filepath.Join(l.LibvirtRAMDir(primary), "libvirt", "qemu", "*-"+domain)); len(left) > 0 {
		t.Errorf("libvirt on %s kept the destroyed domain's RAM directory %v", primary, left)
	}
	evs, err := l.Client(primary).Events(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range evs {
		if e.Kind == "stopped" && strings.Contains(e.Text, "no failover") {
			found = true
		}
	}
	if !found {
		t.Errorf("no event on %s says protection ended:%s", primary, l.eventsText(ctx, l.Client(primary)))
	}
	// Longer than a takeover would take (the FT trial's failover).
	time.Sleep(5 * time.Second)
	if out, err := l.Virsh(ctx, partner, "list", "--name"); err != nil || strings.Contains(out, domain) {
		t.Errorf("after virsh destroy on %s, %s runs %q (%v): a false failover", primary, partner, out, err)
	}
	if evs, err := l.Client(partner).Events(ctx, 0); err == nil {
		for _, e := range evs {
			if e.Kind == "promote" || e.Kind == "promoted" {
				if e.Time.After(destroyed) {
					t.Errorf("%s promoted %s after virsh destroy on %s: %s", partner, domain, primary, e.Text)
				}
			}
		}
	}
}

// refusedAnonymousRAM: a domain whose RAM is not a shared file is refused
// by axctl protect DOMAIN, with the XML to add. It is started paused (it
// need not boot to be looked at) and removed again.
func refusedAnonymousRAM(t *testing.T, l *Lab, vm *VM) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	d := NovaDomain{Type: "qemu", Name: "instance-000000ff", UUID: labUUID("ax-lab-instance", l.Prefix, "anon"), DisplayName: "anon",
		RAMMiB: 64, VCPUs: 1, Kernel: vm.Spec.Kernel, Initrd: vm.Spec.Initrd, Cmdline: "console=ttyS0",
		Tap: "tap-anon", MAC: "52:54:00:a7:00:ff", Console: filepath.Join(dir, "console.log"), Agent: filepath.Join(dir, "agent.sock"), Created: time.Now()}
	text, err := d.XML()
	if err != nil {
		t.Fatal(err)
	}
	const backing = "  <memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n  </memoryBacking>\n"
	if !strings.Contains(text, backing) {
		t.Fatalf("NovaDomain's XML has no %q", backing)
	}
	text = strings.Replace(text, backing, "", 1)
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.addTap(ctx, HostA, d.Tap); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Virsh(ctx, HostA, "define", xmlPath); err != nil {
		t.Fatal(err)
	}
	defer l.Virsh(ctx, HostA, "undefine", d.Name)
	if _, err := l.Virsh(ctx, HostA, "start", "--paused", d.Name); err != nil {
		t.Fatal(err)
	}
	defer l.Virsh(ctx, HostA, "destroy", d.Name)
	err = l.Client(HostA).Protect(ctx, d.Name, api.ProtectRequest{Level: api.LevelFT, Peer: HostB})
	if err == nil || !strings.Contains(err.Error(), "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>") {
		t.Errorf("protect of a domain with anonymous RAM: %v; want a refusal naming the <memoryBacking> to add", err)
	} else {
		t.Logf("refused as it should be: %v", err)
	}
}

// TestIntegrationLibvirtHA is a libvirt domain with a disk (libvirt's own
// format node, no quorum: replicated by the write-blocking mirror) taken
// through none → HA → FT → none by name while the ledger client appends
// to its disk-backed ledger — the guest never restarts, the ledger keeps
// growing — and then failed over at HA: host a killed, b boots the domain
// in its libvirtd from the replicated disk, and every acknowledged record
// is there. Across the level changes the guest's ticks never go back and
// no acknowledged record is lost; at level none its QEMU holds nothing of
// the mirror (a change to none that cut off a checkpoint's QMP stop through
// libvirt once closed the monitor, leaving the guest paused and the mirror's
// NBD client reconnecting).
func TestIntegrationLibvirtHA(t *testing.T) {
	l, vm, bin, _ := libvirtFTLab(t, "itlvha", GuestConfig{Dirty: 1, DiskMiB: 64})
	ctx := context.Background()
	if data, _ := os.ReadFile(vm.Console); !bytes.Contains(data, []byte("ledger: loaded 0 records from /dev/vda")) {
		t.Fatalf("the guest's ledger is not on its disk; console:\n%s", consoleTail(vm.Console, 20))
	}
	ca := l.Client(HostA)
	addr := fmt.Sprintf("%s:%d", GuestIP, LedgerPort)
	client, err := l.StartClient(ctx, bin, addr, 20, filepath.Join(l.StateDir, "levels.rec"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()
	before := ledgerCount(l, addr)
	for i, level := range []string{api.LevelHA, api.LevelFT, api.LevelNone} {
		t0 := time.Now()
		switch {
		case i == 0: // axctl protect DOMAIN --level ha --peer b: discovered
			if err := ca.Protect(ctx, vm.Domain, api.ProtectRequest{Level: level, Peer: HostB}); err != nil {
				t.Fatalf("protect %s at %s: %v", vm.Domain, level, err)
			}
			fallthrough
		case level != api.LevelNone:
			if err := l.protectLevelAndWait(ctx, ca, vm.Domain, HostB, level); err != nil {
				t.Fatalf("→ %s: %v\nevents on a: %s", level, err, l.eventsText(ctx, ca))
			}
		default:
			if err := ca.Level(ctx, vm.Domain, api.ProtectRequest{Level: level}); err != nil {
				t.Fatalf("→ %s: %v", level, err)
			}
		}
		took := time.Since(t0)
		time.Sleep(3 * time.Second) // the workload runs at the new level
		sa, err := l.vmStatus(ctx, ca, vm.Domain)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("→ %s in %.1f s: level %s, state %s, disk bytes %d (%s)", level, took.Seconds(), sa.Level, sa.State, sa.DiskBytes, sa.DiskMode)
		if level != api.LevelNone && sa.DiskMode != "mirror" {
			t.Errorf("at %s: disks replicated as %q, want mirror (libvirt's disks have no quorum node)", level, sa.DiskMode)
		}
		if n := ledgerCount(l, addr); n <= before {
			t.Fatalf("the ledger stopped growing at level %s (%d records)", level, n)
		} else {
			before = n
		}
	}
	client.Stop()
	mirrorGone(t, l, HostA, vm.Domain)
	console, err := os.ReadFile(vm.Console)
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(console, []byte("AXINIT up")); n != 1 {
		t.Fatalf("the guest booted %d times across the level changes", n)
	}
	if err := ticksMonotonic(console); err != nil {
		t.Fatal(err)
	}
	acks, onDisk := verifyLedger(t, l, addr, filepath.Join(l.StateDir, "levels.rec"))
	t.Logf("levels: %d acks, none lost; disk holds %d records, as memory", acks, onDisk)

	tr, err := l.LevelFailoverTrial(ctx, api.LevelHA, vm.Domain, HostA, HostB, 10*time.Second+randomPart(), bin, filepath.Join(l.StateDir, "ha.rec"), 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("libvirt HA failover a→b (%s): guest running on b after %.2f s, acked %d, lost %d, records %d, on disk %d",
		tr.DiskMode, tr.Failover.Seconds(), tr.Acked, tr.Lost, tr.Records, tr.DiskRecords)
	if tr.Acked == 0 || tr.Lost != 0 {
		t.Errorf("acked %d, lost %d", tr.Acked, tr.Lost)
	}
	if out, err := l.Virsh(ctx, HostB, "list"); err != nil || !strings.Contains(out, vm.Domain) || !strings.Contains(out, "running") {
		t.Errorf("virsh list on b: %q, %v; want %s running", out, err, vm.Domain)
	}
}

// mirrorGone checks that, once domain is at level none, its QEMU (asked
// through libvirt) runs no AX block job and holds no AX block node: the
// disk mirror and its NBD client were torn down.
func mirrorGone(t *testing.T, l *Lab, host, domain string) {
	t.Helper()
	ctx := context.Background()
	for _, cmd := range []string{"query-block-jobs", "query-named-block-nodes"} {
		out, err := l.Virsh(ctx, host, "qemu-monitor-command", domain, fmt.Sprintf(`{"execute":%q}`, cmd))
		if err != nil {
			t.Fatalf("%s of %s on %s: %v", cmd, domain, host, err)
		}
		for _, name := range []string{`"ax-target-`, `"ax-child-`, `"ax-mirror-`} {
			if strings.Contains(out, name) {
				t.Errorf("at level none, %s of %s still shows AX's disk replication (%s…): %s", cmd, domain, name[1:], out)
			}
		}
	}
}
