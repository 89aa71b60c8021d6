package ft

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fakeMonitor records what the loop asked of QEMU.
type fakeMonitor struct {
	mu      sync.Mutex
	calls   []string
	paused  bool
	saveErr error
	// stopping, when set, runs inside Stop once the guest is paused and
	// says how Stop returns: QEMU pauses at once, its answer may come late.
	stopping func(ctx context.Context) error
}

func (m *fakeMonitor) note(c string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, c)
}
func (m *fakeMonitor) Stop(ctx context.Context) error {
	m.note("stop")
	m.mu.Lock()
	m.paused = true
	m.mu.Unlock()
	if m.stopping != nil {
		return m.stopping(ctx)
	}
	return nil
}
func (m *fakeMonitor) Cont(context.Context) error {
	m.note("cont")
	m.mu.Lock()
	m.paused = false
	m.mu.Unlock()
	return nil
}
func (m *fakeMonitor) SaveDeviceState(_ context.Context, path string) error {
	m.note("save")
	if m.saveErr != nil {
		return m.saveErr
	}
	return os.WriteFile(path, []byte("device-state"), 0o644)
}
func (m *fakeMonitor) Status(context.Context) (string, error)     { return "running", nil }
func (m *fakeMonitor) LoadIncoming(context.Context, string) error { return nil }
func (m *fakeMonitor) Announce(context.Context) error             { return nil }
func (m *fakeMonitor) Quit(context.Context) error                 { return nil }
func (m *fakeMonitor) Reset(context.Context) error                { return nil }
func (m *fakeMonitor) Close() error                               { return nil }

// fakeTracker returns scripted dirty sets.
type fakeTracker struct {
	mu      sync.Mutex
	scans   [][]uint64
	n       int
	rebased int
}

func (t *fakeTracker) Name() string { return "fake" }
func (t *fakeTracker) Scan(dst []uint64) ([]uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n < len(t.scans) {
		dst = append(dst, t.scans[t.n]...)
	}
	t.n++
	return dst, nil
}
func (t *fakeTracker) Close() error { return nil }
func (t *fakeTracker) Rebase(pfns []uint64, pages []byte) {
	t.mu.Lock()
	t.rebased += len(pfns)
	t.mu.Unlock()
}

// fakeStream records what was sent and acks on demand.
type fakeStream struct {
	mu       sync.Mutex
	syncPFNs []uint64
	done     bool
	cps      []*Checkpoint
	acks     chan uint64
	autoAck  bool
	onBase   bool
	sent     chan struct{}
	err      error
}

func newFakeStream(autoAck bool) *fakeStream {
	return &fakeStream{acks: make(chan uint64, 100), autoAck: autoAck, sent: make(chan struct{}, 100)}
}
func (s *fakeStream) SendSync(pfns []uint64, pages []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.syncPFNs = append(s.syncPFNs, pfns...)
	return nil
}
func (s *fakeStream) BeginSync(onBase bool) error { s.onBase = onBase; return nil }
func (s *fakeStream) SyncDone() error             { s.done = true; return nil }
func (s *fakeStream) SendCheckpoint(cp *Checkpoint) error {
	s.mu.Lock()
	s.cps = append(s.cps, cp)
	s.mu.Unlock()
	if s.autoAck {
		s.acks <- cp.Epoch
	}
	s.sent <- struct{}{}
	return nil
}
func (s *fakeStream) Acks() <-chan uint64 { return s.acks }
func (s *fakeStream) Err() error          { return s.err }

func testRAM(t *testing.T, pages int) (*RAM, string) {
	p := filepath.Join(t.TempDir(), "ram")
	data := make([]byte, pages*PageSize)
	for i := 0; i < pages; i++ {
		data[i*PageSize] = byte(i + 1)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := OpenRAM(p, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, p
}

func TestLoopSyncsThenCheckpoints(t *testing.T) {
	ram, _ := testRAM(t, 16)
	mon := &fakeMonitor{}
	tr := &fakeTracker{scans: [][]uint64{{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {3}, {5, 9}, {1}}}
	st := newFakeStream(true)
	var epochs []EpochStats
	var mu sync.Mutex
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir()}, mon, tr, ram, st, nil,
		Observer{Epoch: func(e EpochStats) { mu.Lock(); epochs = append(epochs, e); mu.Unlock() }}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- l.Run(ctx) }()
	for i := 0; i < 3; i++ {
		<-st.sent
	}
	// Acks are taken by the loop on its own time: wait for the third
	// commit rather than assume it was counted when the third send returned.
	for deadline := time.Now().Add(10 * time.Second); l.Committed() < 3 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	committed := l.Committed()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("run: %v", err)
	}
	if committed < 3 {
		t.Errorf("committed %d within 10 s of three acked checkpoints, want ≥ 3", committed)
	}
	// One round: a first scan of under 64 pages ends the pre-copy.
	if !st.done || len(st.syncPFNs) != 16 {
		t.Fatalf("sync: done=%v pages=%v", st.done, st.syncPFNs)
	}
	if tr.rebased != 16 {
		t.Errorf("rebased %d pages, want every page sent while running (16)", tr.rebased)
	}
	if cp := st.cps[0]; cp.Epoch != 1 || len(cp.PFNs) != 1 || cp.PFNs[0] != 3 || cp.Pages[0] != 4 {
		t.Fatalf("first checkpoint: epoch %d pfns %v", cp.Epoch, cp.PFNs)
	}
	cp := st.cps[1]
	if cp.Epoch != 2 || len(cp.PFNs) != 2 || cp.PFNs[0] != 5 || !bytes.Equal(cp.DeviceState, []byte("device-state")) {
		t.Fatalf("second checkpoint: epoch %d pfns %v dev %q", cp.Epoch, cp.PFNs, cp.DeviceState)
	}
	if cp.Pages[0] != 6 || cp.Pages[PageSize] != 10 {
		t.Errorf("checkpoint pages hold %d, %d; want the RAM's bytes 6, 10", cp.Pages[0], cp.Pages[PageSize])
	}
	// Every pause is closed by a cont, and saves happen while paused.
	mon.mu.Lock()
	defer mon.mu.Unlock()
	paused := false
	for _, c := range mon.calls {
		switch c {
		case "stop":
			paused = true
		case "cont":
			paused = false
		case "save":
			if !paused {
				t.Fatal("device state saved while the VM ran")
			}
		}
	}
	if mon.paused {
		t.Fatal("VM left paused")
	}
}

func TestLoopBackpressureLimitsInFlight(t *testing.T) {
	ram, _ := testRAM(t, 4)
	st := newFakeStream(false) // the secondary never acks
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir(), MaxInFlight: 2}, &fakeMonitor{}, &fakeTracker{}, ram, st, nil, Observer{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- l.Run(ctx) }()
	<-st.sent
	<-st.sent
	time.Sleep(50 * time.Millisecond)
	st.mu.Lock()
	n := len(st.cps)
	st.mu.Unlock()
	if n != 2 {
		t.Fatalf("%d checkpoints in flight without acks, want 2", n)
	}
	st.acks <- 1 // one commit frees one slot
	<-st.sent
	time.Sleep(30 * time.Millisecond)
	st.mu.Lock()
	n = len(st.cps)
	st.mu.Unlock()
	if n != 3 {
		t.Fatalf("%d checkpoints after one ack, want 3", n)
	}
	cancel()
	<-done
}

func TestLoopResumesVMOnError(t *testing.T) {
	ram, _ := testRAM(t, 4)
	mon := &fakeMonitor{saveErr: errors.New("qemu said no")}
	st := newFakeStream(true)
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir()}, mon, &fakeTracker{}, ram, st, nil, Observer{}, nil)
	err := l.Run(context.Background())
	if err == nil || mon.paused {
		t.Fatalf("err = %v, paused = %v; want an error and a running VM", err, mon.paused)
	}
}

func TestLoopEndsWhenStreamFails(t *testing.T) {
	ram, _ := testRAM(t, 4)
	st := newFakeStream(false)
	st.err = errors.New("connection reset")
	close(st.acks)
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir()}, &fakeMonitor{}, &fakeTracker{}, ram, st, nil, Observer{}, nil)
	if err := l.Run(context.Background()); err == nil || !errors.Is(err, st.err) {
		t.Fatalf("err = %v, want the stream's error", err)
	}
}

func TestOpenRAMChecksSize(t *testing.T) {
	_, p := testRAM(t, 2)
	if _, err := OpenRAM(p, 3*PageSize); err == nil {
		t.Fatal("wrong size accepted")
	}
	r, _ := OpenRAM(p, 2*PageSize)
	defer r.Close()
	if err := r.ReadPage(2, make([]byte, PageSize)); err == nil {
		t.Fatal("page beyond RAM read")
	}
}

func TestLoopFinishLeavesVMPausedAfterCommit(t *testing.T) {
	ram, _ := testRAM(t, 4)
	mon := &fakeMonitor{}
	st := newFakeStream(true)
	l := NewLoop(Config{Interval: 5 * time.Millisecond, StateDir: t.TempDir()}, mon, &fakeTracker{}, ram, st, nil, Observer{}, nil)
	done := make(chan error)
	go func() { done <- l.Run(context.Background()) }()
	<-st.sent
	epoch, err := l.Finish(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrFinished) {
		t.Fatalf("run: %v", err)
	}
	if l.Committed() != epoch || !mon.paused {
		t.Fatalf("committed %d (final %d), paused %v: want the final epoch committed and the VM paused", l.Committed(), epoch, mon.paused)
	}
}

// fakeGate records releases.
type fakeGate struct {
	mu       sync.Mutex
	released []uint64
}

func (g *fakeGate) NextEpoch(uint64) error { return nil }
func (g *fakeGate) Release(e uint64) error {
	g.mu.Lock()
	g.released = append(g.released, e)
	g.mu.Unlock()
	return nil
}

func TestLoopIgnoresAckOfUnsentCheckpoint(t *testing.T) {
	ram, _ := testRAM(t, 4)
	st := newFakeStream(false)
	g := &fakeGate{}
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir()}, &fakeMonitor{}, &fakeTracker{}, ram, st, g, Observer{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- l.Run(ctx) }()
	<-st.sent
	st.acks <- 99 // never taken
	st.acks <- 1
	time.Sleep(30 * time.Millisecond)
	cancel()
	<-done
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, e := range g.released {
		if e > l.Taken() || e == 99 {
			t.Fatalf("released epoch %d; taken %d", e, l.Taken())
		}
	}
	if len(g.released) == 0 || g.released[0] != 1 {
		t.Fatalf("releases %v, want epoch 1 released", g.released)
	}
}

// TestLoopStoppedMidPauseResumesVM: the loop stopped (a level change,
// protection ending) while QEMU has paused the guest but not yet answered
// the stop: the pause is finished, the guest resumed, and nothing more is
// sent. A stop cut off by the loop's end left the guest paused (and, with
// qemu.QMP, its monitor closed).
func TestLoopStoppedMidPauseResumesVM(t *testing.T) {
	ram, _ := testRAM(t, 4)
	inStop := make(chan struct{}, 100)
	mon := &fakeMonitor{stopping: func(ctx context.Context) error {
		inStop <- struct{}{}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
			return nil
		}
	}}
	st := newFakeStream(true)
	l := NewLoop(Config{Interval: time.Millisecond, StateDir: t.TempDir()}, mon, &fakeTracker{}, ram, st, nil, Observer{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	<-inStop // the first checkpoint's pause
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("run: %v, want context.Canceled", err)
	}
	mon.mu.Lock()
	defer mon.mu.Unlock()
	if mon.paused {
		t.Fatalf("the guest was left paused (QEMU was asked %v)", mon.calls)
	}
	if n := len(mon.calls); n < 2 || mon.calls[n-1] != "cont" {
		t.Errorf("QEMU was asked %v, want the pause closed by a cont", mon.calls)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if len(st.cps) != 0 {
		t.Errorf("%d checkpoints sent after the loop was stopped", len(st.cps))
	}
}
