package lab

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
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
// guest: axctl protect DOMAIN discovers it.
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
	l, vm, bin, _ := libvirtFTLab(t, "itlvft", GuestConfig{Dirty: 4})
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

	record := filepath.Join(l.StateDir, "libvirt-ft.rec")
	tr, err := l.FailoverTrial(ctx, vm.Domain, HostA, HostB, 15*time.Second+randomPart(), bin, record)
	if err != nil {
		t.Fatalf("failover %s → %s: %v", HostA, HostB, err)
	}
	t.Logf("libvirt FT failover a→b: %.2f s, epoch %d, tick %d → %d, pause p50 %.1f ms, acked %d, lost %d, records %d",
		tr.Failover.Seconds(), tr.LastEpoch, tr.TickAtCommit, tr.FirstTick, tr.PauseP50MS, tr.Acked, tr.Lost, tr.Records)
	if tr.Acked == 0 {
		t.Error("the client got no ack before the kill")
	}
	if tr.Lost > 0 {
		t.Errorf("%d of %d acknowledged records are missing after failover", tr.Lost, tr.Acked)
	}
	out, err := l.Virsh(ctx, HostB, "list")
	if err != nil || !strings.Contains(out, vm.Domain) || !strings.Contains(out, "running") {
		t.Errorf("virsh list on b: %q, %v; want %s running", out, err, vm.Domain)
	}
	if got, err := l.Virsh(ctx, HostB, "domuuid", vm.Domain); err != nil || strings.TrimSpace(got) != uuid {
		t.Errorf("the domain on b has UUID %q (%v), on a it had %s", strings.TrimSpace(got), err, uuid)
	}
	if def, err := l.Virsh(ctx, HostB, "dumpxml", "--inactive", vm.Domain); err != nil || strings.Contains(def, "-incoming") {
		t.Errorf("StartIncoming changed the domain's definition on b (%v)", err)
	}
}
