package witness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// startStateWitness serves a PSK-mode witness keeping its state in path.
func startStateWitness(t *testing.T, clock *fakeClock, path, addr string) *testWitness {
	t.Helper()
	return startWitnessWith(t, clock, ServerConfig{PSK: testKey, StateFile: path}, addr)
}

func TestLeasesSurviveRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "witness.state")
	clock := newFakeClock()
	ctx := context.Background()
	w1 := startStateWitness(t, clock, path, "127.0.0.1:0")
	clock.Advance(testTTL) // past the first start's grace
	granted := clock.Now().Add(testTTL)
	if _, err := w1.client("a").Renew(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := w1.client("b").Renew(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Second)
	w1.stop()

	w2 := startStateWitness(t, clock, path, "127.0.0.1:0")
	if info := w2.query("web"); info.Holder != "a" || info.Expired {
		t.Fatalf("web after the restart: %+v, want held by a", info)
	}
	w2.srv.mu.Lock()
	loaded := w2.srv.leases["web"]
	w2.srv.mu.Unlock()
	if !loaded.expires.Equal(granted) {
		t.Fatalf("web's loaded lease ends %v, want %v", loaded.expires, granted)
	}
	if info := w2.query("db"); info.Holder != "b" || info.Expired {
		t.Fatalf("db after the restart: %+v, want held by b", info)
	}
	// A witness that had forgotten would grant this renewal in its grace.
	_, err := w2.client("b").Renew(ctx, "web")
	wantHeld(t, err, "a")
	if _, err := w2.client("a").Renew(ctx, "web"); err != nil {
		t.Fatalf("the holder's renewal after the restart: %v", err)
	}
	// After the grace and the lease, the lease is free as before.
	clock.Advance(2 * testTTL)
	if err := w2.client("b").Takeover(ctx, "web"); err != nil {
		t.Fatalf("takeover of the expired lease: %v", err)
	}
}

func TestReplayAfterRestartRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "witness.state")
	clock := newFakeClock()
	ctx := context.Background()
	w1 := startStateWitness(t, clock, path, "127.0.0.1:0")
	clock.Advance(testTTL)

	// An attacker records b's takeover on the wire; a renews db.
	recorded := rawRequest(t, opTakeover, "b", "web", clock.Now(), testKey)
	if resp := send(t, w1.addr, recorded); resp == nil || !resp.OK {
		t.Fatalf("the original takeover: %+v", resp)
	}
	a := w1.client("a")
	if _, err := a.Renew(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Second)
	w1.stop()

	// The witness is back at the same address, well within MaxRequestAge of
	// the recording, with its nonces forgotten.
	w2 := startStateWitness(t, clock, path, w1.addr)
	// a's clock is below the floor (w1 persisted floorLead ahead): its first
	// request is refused, it learns the floor and succeeds at once, on a
	// new connection.
	if _, err := a.Renew(ctx, "db"); err != nil {
		t.Fatalf("honest renewal across the restart: %v", err)
	}
	if a.floor != w2.srv.floor || a.floor < clock.Now().UnixMilli() || a.dials != 2 {
		t.Fatalf("client floor %d, witness floor %d, now %d, dials %d: want the floor learnt from the witness, one reconnection",
			a.floor, w2.srv.floor, clock.Now().UnixMilli(), a.dials)
	}

	clock.Advance(testTTL) // b's lease has expired, the grace is over
	if d := clock.Now().Sub(time.UnixMilli(1_700_000_000_000).Add(testTTL)); d >= MaxRequestAge {
		t.Fatalf("test setup: replay %s after the recording; the time check alone would refuse it", d)
	}
	if info := w2.query("web"); !info.Expired || info.Holder != "b" {
		t.Fatalf("web before the replay: %+v", info)
	}
	resp := send(t, w2.addr, recorded)
	if resp == nil || resp.OK || resp.Code != codeFloor || !resp.verify(testLineKey) || resp.Floor != w2.srv.floor {
		t.Fatalf("replayed takeover: %+v, want a signed floor refusal naming %d", resp, w2.srv.floor)
	}
	if info := w2.query("web"); !info.Expired {
		t.Fatalf("the replay renewed b's lease: %+v", info)
	}
	// a goes on renewing; another host may take the free lease.
	if _, err := a.Renew(ctx, "db"); err != nil {
		t.Fatalf("renewal after the replay: %v", err)
	}
	if err := w2.client("c").Takeover(ctx, "web"); err != nil {
		t.Fatalf("takeover of the expired lease: %v", err)
	}
}

// TestStateWritesAreRare checks that renewals do not each write the state
// file: the floor is written ahead, once per floorLead.
func TestStateWritesAreRare(t *testing.T) {
	path := filepath.Join(t.TempDir(), "witness.state")
	clock := newFakeClock()
	w := startStateWitness(t, clock, path, "127.0.0.1:0")
	clock.Advance(testTTL)
	a := w.client("a")
	const every, span = 250 * time.Millisecond, 20 * time.Second
	renewals := 0
	for elapsed := time.Duration(0); elapsed < span; elapsed += every {
		if _, err := a.Renew(context.Background(), "web"); err != nil {
			t.Fatal(err)
		}
		renewals++
		clock.Advance(every)
	}
	w.srv.mu.Lock()
	saves := w.srv.saves
	w.srv.mu.Unlock()
	// One for the new holder, one per floorLead for the floor.
	if limit := 1 + int(span/floorLead) + 1; saves > limit || saves < 2 {
		t.Fatalf("%d renewals wrote the state %d times, want 2..%d", renewals, saves, limit)
	}
	st, found, err := loadState(path)
	if err != nil || !found {
		t.Fatalf("state file: found %t, %v", found, err)
	}
	if len(st.Leases) != 1 || st.Leases[0].Holder != "a" || st.AcceptedUpTo < clock.Now().Add(-every).UnixMilli() {
		t.Fatalf("saved state %+v at %d", st, clock.Now().UnixMilli())
	}
}

func TestStateSaveFailureRefuses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "witness.state")
	clock := newFakeClock()
	w := startStateWitness(t, clock, path, "127.0.0.1:0")
	clock.Advance(testTTL)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	_, err := w.client("a").Renew(context.Background(), "web")
	if err == nil || !strings.Contains(err.Error(), "cannot save its state") {
		t.Fatalf("renewal without a state directory: %v, want a refusal naming the state", err)
	}
	w.srv.mu.Lock()
	n := len(w.srv.leases)
	w.srv.mu.Unlock()
	if n != 0 {
		t.Fatalf("a lease was granted without being saved")
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := w.client("a").Renew(context.Background(), "web"); err != nil {
		t.Fatalf("renewal once the directory is back: %v", err)
	}
}

func TestStateFileRefused(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := saveState(good, savedState{AcceptedUpTo: 1_700_000_000_000, Leases: []savedLease{{VM: "web", Holder: "a", ExpiresAt: 1_700_000_010_000}}}); err != nil {
		t.Fatal(err)
	}
	valid, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	// reseal re-checksums a changed state, so only the change is wrong.
	reseal := func(body string) []byte {
		out, err := json.Marshal(stateEnvelope{Version: stateVersion, State: json.RawMessage(body), Checksum: hexSum(body)})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	for _, c := range []struct {
		name string
		data []byte
		want error
	}{
		{"newer version", []byte(`{"version":2,"whatever":"a future format"}`), ErrStateVersion},
		{"torn", valid[:len(valid)/2], ErrStateCorrupt},
		{"empty", nil, ErrStateCorrupt},
		{"flipped byte", bytes.Replace(valid, []byte(`"a"`), []byte(`"b"`), 1), ErrStateCorrupt},
		{"no version", []byte(`{"state":{},"sha256":""}`), ErrStateCorrupt},
		{"unknown field", reseal(`{"accepted_up_to":1,"leases":[],"extra":1}`), ErrStateCorrupt},
		{"duplicate vm", reseal(`{"accepted_up_to":1,"leases":[{"vm":"w","holder":"a","expires_at":1},{"vm":"w","holder":"b","expires_at":1}]}`), ErrStateCorrupt},
		{"no floor", reseal(`{"accepted_up_to":0,"leases":[]}`), ErrStateCorrupt},
		{"bad holder", reseal(`{"accepted_up_to":1,"leases":[{"vm":"w","holder":"","expires_at":1}]}`), ErrStateCorrupt},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-"))
			if err := os.WriteFile(path, c.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: testTTL, StateFile: path})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "move the file aside") && !strings.Contains(err.Error(), "move it aside") {
				t.Fatalf("NewServer: %v, want %v naming %s and what to do", err, c.want, path)
			}
		})
	}
	t.Run("valid", func(t *testing.T) {
		srv, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: testTTL, StateFile: good, Now: newFakeClock().Now})
		if err != nil {
			t.Fatal(err)
		}
		if l := srv.leases["web"]; l.holder != "a" || l.expires.UnixMilli() != 1_700_000_010_000 {
			t.Fatalf("loaded lease %+v", l)
		}
	})
}

func TestStateStartsFresh(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "witness.state")
	leftover := path + tempSuffix + "123"
	if err := os.WriteFile(leftover, []byte("half a write"), 0o600); err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	srv, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: testTTL, StateFile: path, Now: clock.Now})
	if err != nil {
		t.Fatalf("NewServer without a state file: %v", err)
	}
	if len(srv.leases) != 0 || srv.floor != clock.Now().UnixMilli() {
		t.Fatalf("fresh witness: %d leases, floor %d, want none and the start time", len(srv.leases), srv.floor)
	}
	if _, err := os.Stat(leftover); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a crashed write's temporary file was left: %v", err)
	}
	if st, found, err := loadState(path); err != nil || !found || st.AcceptedUpTo != srv.floor {
		t.Fatalf("state written at start: %+v, found %t, %v", st, found, err)
	}
}

func TestStateRoundTrip(t *testing.T) {
	st := savedState{AcceptedUpTo: 42, Leases: []savedLease{{VM: "z", Holder: "h", ExpiresAt: 3}, {VM: "a", Holder: "host-2.example", ExpiresAt: 7}}}
	data, err := encodeState(st)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeState(data)
	if err != nil {
		t.Fatal(err)
	}
	want := savedState{AcceptedUpTo: 42, Leases: []savedLease{st.Leases[1], st.Leases[0]}} // sorted by VM
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip: %+v, want %+v", got, want)
	}
	if again, _ := encodeState(got); !bytes.Equal(again, data) {
		t.Fatalf("the same state encodes differently:\n%s\n%s", data, again)
	}
}

func hexSum(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func TestStateDirectoryMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing", "witness.state")
	_, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: testTTL, StateFile: path})
	if err == nil || !strings.Contains(err.Error(), "directory must exist") {
		t.Fatalf("NewServer with a missing state directory: %v", err)
	}
}
