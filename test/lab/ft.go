package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/test/workload"
)

// KernelFaults are console lines that mean a resumed guest is not sane.
var KernelFaults = []string{"Oops", "BUG:", "general protection fault", "Kernel panic", "double fault"}

// tickOf reads the value of a console line "AXTICK <n>".
func tickOf(line []byte) (uint64, bool) {
	rest, ok := bytes.CutPrefix(bytes.TrimSpace(line), []byte("AXTICK "))
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(string(rest), 10, 64)
	return n, err == nil
}

// hasTickLine says whether console output b holds a whole tick line (the
// guest may be writing the first one while it is read).
func hasTickLine(b []byte) bool {
	i := bytes.Index(b, []byte("AXTICK "))
	return i >= 0 && bytes.IndexByte(b[i:], '\n') >= 0
}

// TickContinuity checks that a guest's tick continued exactly from the
// checkpoint: pre is the primary's console up to the committed checkpoint's
// offset, post the console of the resumed guest. Together they must read as
// one stream whose ticks go on by one across the boundary. It returns the
// last tick complete at the checkpoint and the first after it.
func TickContinuity(pre, post []byte) (atCommit, firstAfter uint64, err error) {
	joined := append(append([]byte(nil), pre...), post...)
	pos := 0
	var prev uint64
	havePrev := false
	for _, line := range bytes.SplitAfter(joined, []byte("\n")) {
		end := pos + len(line)
		pos = end
		if !bytes.HasSuffix(line, []byte("\n")) {
			break // incomplete last line
		}
		n, ok := tickOf(line)
		if !ok {
			continue
		}
		if havePrev && n != prev+1 && end > len(pre) && firstAfter == 0 {
			return atCommit, n, fmt.Errorf("tick went from %d to %d across the failover", prev, n)
		}
		if end <= len(pre) {
			atCommit = n
		} else if firstAfter == 0 {
			firstAfter = n
			if n != atCommit+1 {
				return atCommit, n, fmt.Errorf("guest resumed at tick %d, want %d (the tick at the committed checkpoint + 1)", n, atCommit+1)
			}
		}
		prev, havePrev = n, true
	}
	if firstAfter == 0 {
		return atCommit, 0, errors.New("no tick from the resumed guest")
	}
	return atCommit, firstAfter, nil
}

// LedgerClient is a ledger client running on host c.
type LedgerClient struct {
	Record string
	cmd    *exec.Cmd
	out    bytes.Buffer
	done   chan error

	stopOnce sync.Once
}

// StartClient runs the ledger client on host c against addr until Stop.
func (l *Lab) StartClient(ctx context.Context, bin, addr string, rate float64, record string) (*LedgerClient, error) {
	c := &LedgerClient{Record: record, done: make(chan error, 1)}
	c.cmd = l.Exec(context.Background(), HostC, bin, "client", "--addr", addr, "--rate", fmt.Sprint(rate), "--record", record)
	c.cmd.Stdout = &c.out
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { c.done <- c.cmd.Wait() }()
	return c, nil
}

// Stop ends the client and returns its summary line; safe to call twice.
func (c *LedgerClient) Stop() string {
	c.stopOnce.Do(func() {
		c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
	})
	return strings.TrimSpace(c.out.String())
}

// Trial is the outcome of one failover.
type Trial struct {
	From, To      string
	Failover      time.Duration // kill → first tick of the resumed guest
	LastEpoch     uint64        // committed epoch the guest resumed from
	TickAtCommit  uint64
	FirstTick     uint64
	PauseP50MS    float64
	Acked         int // records the client saw acknowledged before the kill
	Lost          int // of those, missing from the ledger after failover
	Records       int // records in the ledger after failover
	SanityFailure string
	// DiskRecords is what the ledger's disk holds after failover, checked
	// against the guest's memory (CHECK); -1 when the guest has no disk.
	DiskRecords int
	DiskMode    string // how the disks were replicated before the kill
}

// FailoverTrial protects vm on host from towards to (if not yet), lets it
// run for runFor with the ledger client appending, kills host from, and
// checks the guest resumed on to: continuous ticks, a sane console, a
// ledger that answers. The ledger client's record is kept in record.
func (l *Lab) FailoverTrial(ctx context.Context, vm, from, to string, runFor time.Duration, workloadBin, record string) (*Trial, error) {
	return l.FailoverTrialRate(ctx, vm, from, to, runFor, workloadBin, record, 20)
}

// FailoverTrialRate is FailoverTrial with the ledger client's rate (appends/s).
func (l *Lab) FailoverTrialRate(ctx context.Context, vm, from, to string, runFor time.Duration, workloadBin, record string, rate float64) (*Trial, error) {
	return l.LevelFailoverTrial(ctx, api.LevelFT, vm, from, to, runFor, workloadBin, record, rate)
}

// LevelFailoverTrial is a failover trial at level ft or ha. At FT the guest
// resumes on to from the last checkpoint (ticks continue); at HA it boots
// there afresh from its replicated disk (its ledger reloads from the disk).
// Either way every acknowledged record must be there, and a disk-backed
// ledger's disk must agree with what the guest holds in memory.
func (l *Lab) LevelFailoverTrial(ctx context.Context, level, vm, from, to string, runFor time.Duration, workloadBin, record string, rate float64) (*Trial, error) {
	tr := &Trial{From: from, To: to, DiskRecords: -1}
	cf := l.Client(from)
	if err := l.protectLevelAndWait(ctx, cf, vm, to, level); err != nil {
		return tr, err
	}
	st, err := l.vmStatus(ctx, cf, vm)
	if err != nil {
		return tr, err
	}
	fromConsole := st.Console
	addr := fmt.Sprintf("%s:%d", GuestIP, LedgerPort)
	client, err := l.StartClient(ctx, workloadBin, addr, rate, record)
	if err != nil {
		return tr, err
	}
	select {
	case <-ctx.Done():
		client.Stop()
		return tr, ctx.Err()
	case <-time.After(runFor):
	}
	if st, err := l.vmStatus(ctx, cf, vm); err == nil {
		tr.PauseP50MS, tr.DiskMode = st.PauseP50MS, st.DiskMode
		if st.State != "protected" {
			client.Stop()
			return tr, fmt.Errorf("before the kill, %s on %s is %s: %s", vm, from, st.State, st.Alarm)
		}
	}
	kill := time.Now()
	if err := l.KillHost(ctx, from); err != nil {
		client.Stop()
		return tr, err
	}
	// Wait for the guest to run on the partner and print its first tick.
	ct := l.Client(to)
	var console string
	deadline := kill.Add(60 * time.Second)
	for time.Now().Before(deadline) {
		s, err := l.vmStatus(ctx, ct, vm)
		if err == nil && s.Role == api.RoleLocal && s.State == "running" {
			console, tr.LastEpoch = s.Console, s.Epoch
			if data, _ := os.ReadFile(console); hasTickLine(data) {
				tr.Failover = time.Since(kill)
				break
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if tr.Failover == 0 {
		client.Stop()
		return tr, fmt.Errorf("guest did not run on %s within 60 s; events there: %s", to, l.eventsText(ctx, ct))
	}
	if level == api.LevelHA {
		return l.haTrialChecks(ctx, tr, client, console, record, addr, kill)
	}
	// Let the client reconnect and append a little on the resumed guest.
	time.Sleep(2 * time.Second)
	client.Stop()
	offset := int64(-1)
	if s, err := l.vmStatus(ctx, ct, vm); err == nil {
		offset = s.ConsoleOffset
	}
	pre, err := os.ReadFile(fromConsole)
	if err != nil {
		return tr, err
	}
	if offset < 0 || offset > int64(len(pre)) {
		return tr, fmt.Errorf("console offset %d of the committed checkpoint is outside %s (%d bytes)", offset, fromConsole, len(pre))
	}
	post, err := os.ReadFile(console)
	if err != nil {
		return tr, err
	}
	tr.TickAtCommit, tr.FirstTick, err = TickContinuity(pre[:offset], post)
	if err != nil {
		return tr, err
	}
	acks, err := tr.checkConsoleAndAcks(post, record, kill)
	if err != nil {
		return tr, err
	}
	var recs []string
	err = l.InNetns(HostC, func() error {
		var err error
		recs, err = workload.List(ctx, addr, 10*time.Second)
		return err
	})
	if err != nil {
		return tr, fmt.Errorf("ledger on %s does not answer: %w", to, err)
	}
	tr.Records = len(recs)
	v := workload.Verify(acks, recs)
	tr.Lost = len(v.Missing)
	return tr, l.diskCheck(ctx, tr, addr)
}

// checkConsoleAndAcks fails on a kernel fault in the console of the guest
// after failover, and counts the acks the client had before the kill.
func (tr *Trial) checkConsoleAndAcks(post []byte, record string, kill time.Time) ([]workload.Ack, error) {
	for _, bad := range KernelFaults {
		if bytes.Contains(post, []byte(bad)) {
			tr.SanityFailure = bad
			return nil, fmt.Errorf("console of the guest on %s shows %q", tr.To, bad)
		}
	}
	acks, err := workload.ReadRecord(record)
	if err != nil {
		return nil, err
	}
	for _, a := range acks {
		if a.Time.Before(kill) {
			tr.Acked++
		}
	}
	return acks, nil
}

// diskCheck asks a disk-backed ledger to compare its disk with its memory.
func (l *Lab) diskCheck(ctx context.Context, tr *Trial, addr string) error {
	var n int
	err := l.InNetns(HostC, func() error {
		var err error
		n, err = workload.Check(ctx, addr, 20*time.Second)
		return err
	})
	switch {
	case err != nil && strings.Contains(err.Error(), "no disk"):
		return nil
	case err != nil:
		return fmt.Errorf("the guest's disk disagrees with its memory after failover: %w", err)
	}
	tr.DiskRecords = n
	if n != tr.Records {
		return fmt.Errorf("disk holds %d records, the ledger lists %d", n, tr.Records)
	}
	return nil
}

// haTrialChecks: the guest booted afresh on the partner from its disk; its
// ledger reloaded what the disk holds. Every acked record must be there.
func (l *Lab) haTrialChecks(ctx context.Context, tr *Trial, client *LedgerClient, console, record, addr string, kill time.Time) (*Trial, error) {
	var recs []string
	var err error
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		err = l.InNetns(HostC, func() error {
			recs, err = workload.List(ctx, addr, 5*time.Second)
			return err
		})
		if err == nil {
			break
		}
	}
	// Let the client reconnect and append a little on the restarted guest.
	time.Sleep(2 * time.Second)
	client.Stop()
	if err != nil {
		return tr, fmt.Errorf("ledger on %s does not answer after the restart: %w", tr.To, err)
	}
	post, err := os.ReadFile(console)
	if err != nil {
		return tr, err
	}
	if !bytes.Contains(post, []byte("ledger: loaded ")) {
		return tr, fmt.Errorf("the restarted guest did not load its ledger from the replicated disk; console:\n%s", consoleTail(console, 20))
	}
	acks, err := tr.checkConsoleAndAcks(post, record, kill)
	if err != nil {
		return tr, err
	}
	err = l.InNetns(HostC, func() error {
		recs, err = workload.List(ctx, addr, 10*time.Second)
		return err
	})
	if err != nil {
		return tr, err
	}
	tr.Records = len(recs)
	tr.Lost = len(workload.Verify(acks, recs).Missing)
	return tr, l.diskCheck(ctx, tr, addr)
}

func (l *Lab) protectAndWait(ctx context.Context, c *api.Client, vm, peer string) error {
	return l.protectLevelAndWait(ctx, c, vm, peer, api.LevelFT)
}

// protectLevelAndWait protects vm at level (or changes its level) and
// waits until it is protected at that level.
func (l *Lab) protectLevelAndWait(ctx context.Context, c *api.Client, vm, peer, level string) error {
	s, err := l.vmStatus(ctx, c, vm)
	if err != nil {
		return err
	}
	if s.Role != api.RolePrimary || s.Level != level {
		if err := c.Level(ctx, vm, api.ProtectRequest{Level: level, Peer: peer}); err != nil {
			// After a failover axd protects the VM again at its declared
			// level by itself: it may have begun since the status above.
			if s, serr := l.vmStatus(ctx, c, vm); serr != nil || s.Role != api.RolePrimary || s.Level != level || s.Peer != peer {
				return err
			}
		}
	}
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if s, err := l.vmStatus(ctx, c, vm); err == nil && s.State == "protected" && s.Level == level {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	s, _ = l.vmStatus(ctx, c, vm)
	return fmt.Errorf("%s not protected at %s after 90 s: level %s, state %s, alarm %q", vm, level, s.Level, s.State, s.Alarm)
}

func (l *Lab) vmStatus(ctx context.Context, c *api.Client, vm string) (api.VMStatus, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return api.VMStatus{}, err
	}
	for _, v := range st.VMs {
		if v.Name == vm {
			return v, nil
		}
	}
	return api.VMStatus{}, fmt.Errorf("no VM %s on %s", vm, st.Host)
}

func (l *Lab) eventsText(ctx context.Context, c *api.Client) string {
	evs, err := c.Events(ctx, 0)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "\n  %s %s %s", e.Time.Format("15:04:05.000"), e.Kind, e.Text)
	}
	return b.String()
}

// RecoverHost brings a killed host back: links up, its libvirtd (with
// DaemonConfig.Libvirt) and axd restarted.
func (l *Lab) RecoverHost(ctx context.Context, h string, cfg DaemonConfig) error {
	if err := l.ReviveHost(ctx, h); err != nil {
		return err
	}
	os.RemoveAll(filepath.Join(l.AxdStateDir(h), "replicas"))
	if cfg.Libvirt {
		// It died with the host; it finds its domains' definitions again.
		if err := l.StartLibvirtd(ctx, h); err != nil {
			return err
		}
	}
	return l.StartAxd(ctx, h, cfg)
}
