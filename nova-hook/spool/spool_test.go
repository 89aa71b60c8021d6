package spool

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
)

func event(op string, at time.Time) api.HookEvent {
	return api.HookEvent{Domain: "instance-1", Operation: op, SubOperation: "begin", Extra: "-", XML: "<domain/>", Time: at}
}

// Events come back in the order they happened, each once, and leave the
// directory empty.
func TestPutReplay(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	t0 := time.Date(2026, 12, 6, 4, 0, 0, 0, time.UTC)
	for i, op := range []string{"stopped", "started", "prepare"} {
		// written out of order: replay goes by when they happened
		at := map[int]time.Duration{0: 2, 1: 3, 2: 1}[i]
		if dropped, err := Put(dir, event(op, t0.Add(at*time.Second))); err != nil || len(dropped) != 0 {
			t.Fatalf("put %s: %v %v", op, dropped, err)
		}
	}
	if info, err := os.Stat(dir); err != nil || info.Mode().Perm() != 0o700 {
		t.Errorf("spool directory: %v %v", info.Mode(), err)
	}
	var got []string
	n, errs := Replay(dir, func(ev api.HookEvent) error {
		got = append(got, ev.Operation)
		if ev.Domain != "instance-1" || ev.XML != "<domain/>" {
			t.Errorf("replayed %+v", ev)
		}
		return errors.New("refused")
	})
	if n != 3 || len(errs) != 3 || strings.Join(got, ",") != "prepare,stopped,started" {
		t.Errorf("replayed %d %v (%v)", n, got, errs)
	}
	if es, _ := os.ReadDir(dir); len(es) != 0 {
		t.Errorf("left %v", es)
	}
	if n, errs := Replay(filepath.Join(dir, "none"), nil); n != 0 || errs != nil {
		t.Errorf("a missing spool: %d %v", n, errs)
	}
}

// A full spool drops its oldest events and keeps the newest.
func TestPutBounded(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Now()
	var dropped []string
	for i := range MaxEvents + 3 {
		d, err := Put(dir, event("started", t0.Add(time.Duration(i)*time.Millisecond)))
		if err != nil {
			t.Fatal(err)
		}
		dropped = append(dropped, d...)
	}
	if len(dropped) != 3 {
		t.Errorf("dropped %v", dropped)
	}
	var first time.Time
	n, _ := Replay(dir, func(ev api.HookEvent) error {
		if first.IsZero() {
			first = ev.Time
		}
		return nil
	})
	if n != MaxEvents || !first.Equal(t0.Add(3*time.Millisecond)) {
		t.Errorf("kept %d from %v, want %d from the fourth", n, first.Sub(t0), MaxEvents)
	}
	// The largest XML the hook takes fits, however JSON escapes it.
	worst := event("started", t0)
	worst.XML = strings.Repeat("<", api.MaxHookXML)
	if _, err := Put(t.TempDir(), worst); err != nil {
		t.Errorf("a 1 MiB XML of '<': %v", err)
	}
	big := event("started", t0)
	big.XML = strings.Repeat("x", api.MaxHookEvent)
	if _, err := Put(dir, big); err == nil {
		t.Error("an oversize event was spooled")
	}
}

// What is not a well-formed event file is dropped with an error, a
// symlink is not followed, a half-written file is left to its writer.
func TestReplayHostile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "1-bad.json"), []byte("{"), 0o600)
	os.WriteFile(filepath.Join(dir, "2-big.json"), make([]byte, api.MaxHookEvent+1), 0o600)
	target := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(target, []byte(`{"domain":"x","operation":"started"}`), 0o600)
	os.Symlink(target, filepath.Join(dir, "3-link.json"))
	os.WriteFile(filepath.Join(dir, tmpPrefix+"x"), []byte("{"), 0o600)
	n, errs := Replay(dir, func(api.HookEvent) error { t.Error("took a hostile event"); return nil })
	if n != 0 || len(errs) != 2 {
		t.Errorf("replayed %d, errors %v", n, errs)
	}
	if _, err := os.Stat(filepath.Join(dir, tmpPrefix+"x")); err != nil {
		t.Errorf("a file being written was removed: %v", err)
	}
	if _, err := os.Stat(target); err != nil {
		t.Errorf("the symlink's target: %v", err)
	}
}
