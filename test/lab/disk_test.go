package lab

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/test/workload"
)

// diskLab brings up a lab whose guest keeps its ledger on a virtio-blk disk
// of the given format, and both axd.
func diskLab(t *testing.T, prefix, format string, plain bool) (*Lab, *VM, string) {
	t.Helper()
	l, vm, bin, _ := labWithGuest(t, prefix, GuestConfig{Dirty: 1, DiskMiB: 64, DiskFormat: format, DiskPlain: plain})
	if data, _ := os.ReadFile(vm.Console); !bytes.Contains(data, []byte("ledger: loaded 0 records from /dev/vda")) {
		t.Fatalf("the guest's ledger is not on its disk; console:\n%s", consoleTail(vm.Console, 20))
	}
	return l, vm, bin
}

// FT with a disk: host a killed at a random moment; on b the guest resumes
// from the last checkpoint with its disk as of that checkpoint — every
// record the client saw acknowledged (each flushed to disk before its ack)
// is there, and the disk holds exactly what the resumed memory says.
func TestIntegrationDiskFTFailover(t *testing.T) {
	l, _, bin := diskLab(t, "axdf", "raw", false)
	ctx := context.Background()
	tr, err := l.LevelFailoverTrial(ctx, api.LevelFT, "vm1", HostA, HostB, 20*time.Second+randomPart(), bin, filepath.Join(l.StateDir, "disk-ft.rec"), 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("FT disk failover (%s): %.2f s, epoch %d, tick %d→%d, acked %d, lost %d, records %d, on disk %d",
		tr.DiskMode, tr.Failover.Seconds(), tr.LastEpoch, tr.TickAtCommit, tr.FirstTick, tr.Acked, tr.Lost, tr.Records, tr.DiskRecords)
	if tr.DiskMode != "quorum" {
		t.Fatalf("disk replicated as %q, want quorum", tr.DiskMode)
	}
	if tr.Acked == 0 || tr.Lost != 0 || tr.DiskRecords != tr.Records {
		t.Fatalf("acked %d, lost %d, disk %d records vs ledger %d", tr.Acked, tr.Lost, tr.DiskRecords, tr.Records)
	}
}

// HA with a qcow2 disk attached as libvirt would, without AX's quorum node,
// so replicated by the write-blocking mirror alone: the guest restarts on b
// from its replicated disk; every record flushed (and so acknowledged)
// before the failure is there.
func TestIntegrationDiskHAFailover(t *testing.T) {
	l, _, bin := diskLab(t, "axdh", "qcow2", true)
	ctx := context.Background()
	tr, err := l.LevelFailoverTrial(ctx, api.LevelHA, "vm1", HostA, HostB, 15*time.Second+randomPart(), bin, filepath.Join(l.StateDir, "disk-ha.rec"), 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("HA disk failover: guest running on b after %.2f s, acked %d, lost %d, records %d, on disk %d",
		tr.Failover.Seconds(), tr.Acked, tr.Lost, tr.Records, tr.DiskRecords)
	if tr.DiskMode != "mirror" {
		t.Fatalf("disk replicated as %q, want mirror (no quorum node)", tr.DiskMode)
	}
	if tr.Acked == 0 || tr.Lost != 0 {
		t.Fatalf("acked %d, lost %d", tr.Acked, tr.Lost)
	}
	st, err := l.Client(HostB).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r := st.Reservation; r == nil || len(r.Promises) != 0 {
		t.Fatalf("b still promises capacity for a VM it runs: %+v", r)
	}
}

// Level changes none → HA → FT → HA → none → HA → none while the client
// appends to the disk-backed ledger: the guest never restarts and no acked
// record is lost; the partner's promise follows the VM's protection; a disk
// protected again gets a new quorum child after its last one was removed.
func TestIntegrationLevelChanges(t *testing.T) {
	l, vm, bin := diskLab(t, "axlv", "raw", false)
	ctx := context.Background()
	ca, cb := l.Client(HostA), l.Client(HostB)
	addr := fmt.Sprintf("%s:%d", GuestIP, LedgerPort)
	record := filepath.Join(l.StateDir, "levels.rec")
	client, err := l.StartClient(ctx, bin, addr, 20, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()
	count := func() int { return ledgerCount(l, addr) }
	before := count()
	for i, level := range []string{api.LevelHA, api.LevelFT, api.LevelHA, api.LevelNone, api.LevelHA, api.LevelNone} {
		if i == 1 {
			refusedFT(t, l, vm)
		}
		t0 := time.Now()
		if level == api.LevelNone {
			if err := ca.Level(ctx, vm.Name, api.ProtectRequest{Level: level}); err != nil {
				t.Fatalf("→ %s: %v", level, err)
			}
		} else if err := l.protectLevelAndWait(ctx, ca, vm.Name, HostB, level); err != nil {
			t.Fatalf("→ %s: %v\nevents on a: %s", level, err, l.eventsText(ctx, ca))
		}
		took := time.Since(t0)
		time.Sleep(3 * time.Second) // the workload runs at the new level
		sa, err := l.vmStatus(ctx, ca, vm.Name)
		if err != nil {
			t.Fatal(err)
		}
		stb, err := cb.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		promised := stb.Reservation != nil && len(stb.Reservation.Promises) == 1
		t.Logf("→ %s in %.1f s: a says level %s, state %s, disk bytes %d (%s); b promises %v", level, took.Seconds(), sa.Level, sa.State, sa.DiskBytes, sa.DiskMode, promised)
		switch level {
		case api.LevelNone:
			if sa.Role != api.RoleLocal || promised {
				t.Fatalf("after → none: role %s, b still promises: %v", sa.Role, promised)
			}
		default:
			if sa.Level != level || sa.State != "protected" || !promised {
				t.Fatalf("at %s: level %s, state %s (%s), b promises %v", level, sa.Level, sa.State, sa.Alarm, promised)
			}
			// The lab's disks are AX's quorum nodes: the partner is their
			// second child, not a mirror.
			if sa.DiskMode != "quorum" {
				t.Fatalf("at %s: disks replicated as %q, want quorum", level, sa.DiskMode)
			}
			if i == 0 {
				sparseReplica(t, l, vm.Name, sa.DiskBytes)
			}
		}
		if n := count(); n <= before {
			t.Fatalf("the ledger stopped growing at level %s (%d records)", level, n)
		} else {
			before = n
		}
	}
	client.Stop()
	// The guest never restarted: same QEMU, one boot, ticks never reset.
	if err := syscall.Kill(vm.PID, 0); err != nil {
		t.Fatalf("guest QEMU %d is gone: %v", vm.PID, err)
	}
	console, err := os.ReadFile(vm.Console)
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(console, []byte("AXINIT up")); n != 1 {
		t.Fatalf("the guest booted %d times", n)
	}
	if err := ticksMonotonic(console); err != nil {
		t.Fatal(err)
	}
	acks, onDisk := verifyLedger(t, l, addr, record)
	t.Logf("levels: %d acks, none lost; disk holds %d records, as memory", acks, onDisk)
}

// sparseReplica checks that the initial sync of the guest's mostly empty
// 64 MiB disk sent its zeroes as zero ranges: little data on the stream
// (sent bytes), and a replica on b as sparse as the guest's disk.
func sparseReplica(t *testing.T, l *Lab, vm string, sent uint64) {
	t.Helper()
	path := filepath.Join(l.AxdStateDir(HostB), "replicas", vm, "disks", "disk0.raw")
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if allocated := st.Blocks * 512; allocated > 16<<20 || sent > 16<<20 {
		t.Fatalf("initial sync of a mostly empty 64 MiB disk: %d bytes sent, replica %s holds %d bytes of %d", sent, path, allocated, st.Size)
	} else {
		t.Logf("initial sync: %d bytes sent; replica holds %d bytes of %d", sent, allocated, st.Size)
	}
}

// ledgerCount is how many records the guest's ledger holds (0 when it does
// not answer).
func ledgerCount(l *Lab, addr string) int {
	var n int
	l.InNetns(HostC, func() error {
		recs, err := workload.List(context.Background(), addr, 10*time.Second)
		n = len(recs)
		return err
	})
	return n
}

// verifyLedger checks that every record the client saw acknowledged is in
// the guest's ledger and that its disk holds exactly what its memory does;
// it returns the acks and the records on disk.
// ledgerRecords are the records of the guest's ledger at addr, read from
// host c.
func ledgerRecords(t *testing.T, l *Lab, addr string) []string {
	t.Helper()
	var recs []string
	if err := l.InNetns(HostC, func() error {
		var err error
		recs, err = workload.List(context.Background(), addr, 10*time.Second)
		return err
	}); err != nil {
		t.Fatalf("the guest's ledger at %s does not answer from c: %v", addr, err)
	}
	return recs
}

func verifyLedger(t *testing.T, l *Lab, addr, record string) (acks, onDisk int) {
	t.Helper()
	ctx := context.Background()
	acked, err := workload.ReadRecord(record)
	if err != nil {
		t.Fatal(err)
	}
	recs := ledgerRecords(t, l, addr)
	if v := workload.Verify(acked, recs); len(acked) == 0 || len(v.Missing) > 0 {
		t.Fatalf("acked %d, missing %v", len(acked), v.Missing)
	}
	tr := &Trial{Records: len(recs)}
	if err := l.diskCheck(ctx, tr, addr); err != nil {
		t.Fatal(err)
	}
	return len(acked), tr.DiskRecords
}

// HA with the replication link cut while the client appends (a qcow2 disk
// under AX's quorum node): once a
// declares its partner lost (unprotected, with an alarm) the guest's flushes
// no longer wait for it and the ledger keeps growing on a; when the link
// returns the disks are synchronised again through a new quorum child. No
// acked record is lost, and the disk holds what memory holds.
func TestIntegrationDiskPartnerLost(t *testing.T) {
	l, vm, bin := diskLab(t, "axpl", "qcow2", false)
	ctx := context.Background()
	ca := l.Client(HostA)
	addr := fmt.Sprintf("%s:%d", GuestIP, LedgerPort)
	record := filepath.Join(l.StateDir, "partner-lost.rec")
	client, err := l.StartClient(ctx, bin, addr, 20, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Stop()
	if err := l.protectLevelAndWait(ctx, ca, vm.Name, HostB, api.LevelHA); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	first, _ := l.vmStatus(ctx, ca, vm.Name) // its first disk sync, onto an empty replica
	if err := l.SetLink(ctx, HostA, ReplLink, false); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	var lostAfter time.Duration
	for time.Since(cut) < 8*time.Second {
		if sa, err := l.vmStatus(ctx, ca, vm.Name); err == nil && sa.State == "unprotected" && sa.Alarm != "" && lostAfter == 0 {
			lostAfter = time.Since(cut)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if lostAfter == 0 {
		sa, _ := l.vmStatus(ctx, ca, vm.Name)
		t.Fatalf("a did not report the VM unprotected with an alarm: %+v", sa)
	}
	atLoss := ledgerCount(l, addr)
	time.Sleep(3 * time.Second)
	// 20 appends a second: the ledger must keep growing without the partner.
	if n := ledgerCount(l, addr); n < atLoss+30 {
		t.Fatalf("the ledger grew from %d to %d records in 3 s without the partner: its flushes still wait", atLoss, n)
	}
	if err := l.SetLink(ctx, HostA, ReplLink, true); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		sa, err := l.vmStatus(ctx, ca, vm.Name)
		if err == nil && sa.State == "protected" && sa.DiskMode == "quorum" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("HA protection did not resume after the link returned: %+v\nevents on a: %s", sa, l.eventsText(ctx, ca))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The disk resynchronised on b's replica: only the ranges the guest
	// wrote meanwhile travelled.
	again, _ := l.vmStatus(ctx, ca, vm.Name)
	t.Logf("disk resync after the cut: sent %d of %d bytes compared (%.3f of the 64 MiB disk compared); first sync sent %d of %d",
		again.DiskResyncSent, again.DiskResyncCompared, float64(again.DiskResyncSent)/float64(max(again.DiskResyncCompared, 1)),
		first.DiskResyncSent, first.DiskResyncCompared)
	if again.DiskResyncCompared == 0 || again.DiskResyncSent*4 > again.DiskResyncCompared {
		t.Errorf("the disk resync after the cut sent %d of %d bytes compared: not incremental", again.DiskResyncSent, again.DiskResyncCompared)
	}
	time.Sleep(2 * time.Second)
	client.Stop()
	acks, onDisk := verifyLedger(t, l, addr, record)
	t.Logf("partner lost: a unprotected after %.1f s; %d acks, none lost; disk holds %d records, as memory", lostAfter.Seconds(), acks, onDisk)
}

// refusedFT: a change to FT that cannot be made (here the RAM file FT
// copies from is out of reach) is refused and leaves the VM protected at HA.
func refusedFT(t *testing.T, l *Lab, vm *VM) {
	t.Helper()
	ctx := context.Background()
	ca := l.Client(HostA)
	moved := vm.RAMFile + ".moved"
	if err := os.Rename(vm.RAMFile, moved); err != nil {
		t.Fatal(err)
	}
	err := ca.Level(ctx, vm.Name, api.ProtectRequest{Level: api.LevelFT, Peer: HostB})
	if rerr := os.Rename(moved, vm.RAMFile); rerr != nil {
		t.Fatal(rerr)
	}
	if err == nil || !strings.Contains(err.Error(), "stays at level ha") {
		t.Fatalf("a change to FT without the RAM file: %v, want a refusal that keeps level ha", err)
	}
	s, serr := l.vmStatus(ctx, ca, vm.Name)
	if serr != nil || s.Level != api.LevelHA || s.State != "protected" {
		t.Fatalf("after the refused change: level %s, state %s (%v), want protected at ha", s.Level, s.State, serr)
	}
	t.Logf("refused → ft: %v", err)
}

// ticksMonotonic checks the console's AXTICK values only ever go up by one.
func ticksMonotonic(console []byte) error {
	var last uint64
	for _, line := range bytes.Split(console, []byte("\n")) {
		n, ok := tickOf(line)
		if !ok {
			continue
		}
		if last != 0 && n != last+1 {
			return fmt.Errorf("tick went from %d to %d: the guest was reset or lost time", last, n)
		}
		last = n
	}
	if last == 0 {
		return fmt.Errorf("no tick on the console")
	}
	return nil
}

// randomPart lands a kill at a random moment of the epoch cycle.
func randomPart() time.Duration { return time.Duration(rand.Int64N(int64(2 * time.Second))) }
