package lab

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestOpenValidatesPrefix(t *testing.T) {
	for _, p := range []string{"Ax", "1ab", "toolongname", "a-b", "a b"} {
		if _, err := Open(Config{Prefix: p}); !errors.Is(err, ErrBadPrefix) {
			t.Errorf("prefix %q: err = %v, want ErrBadPrefix", p, err)
		}
	}
	l, err := Open(Config{Prefix: "t1", StateRoot: "/tmp/x"})
	if err != nil {
		t.Fatal(err)
	}
	if l.Netns(HostA) != "t1-a" || l.StateDir != "/tmp/x/t1" {
		t.Errorf("names: %s %s", l.Netns(HostA), l.StateDir)
	}
}

func TestLastTick(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	os.WriteFile(p, []byte("boot noise\nAXTICK 1\nAXTICK 2\r\n[ 1.0] kernel says hi\nAXTICK 17\nAXTICK 1x\n"), 0o644)
	n, err := LastTick(p)
	if err != nil || n != 17 {
		t.Fatalf("LastTick = %d, %v; want 17", n, err)
	}
}

func TestCLIRejectsBadInput(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"up", "--bogus"}, "flag provided but not defined"},
		{[]string{"up", "--accel", "xen"}, "--accel must be auto, kvm or tcg"},
		{[]string{"up", "--modules", "/x"}, "--modules goes with --kernel"},
		{[]string{"up", "extra"}, "unexpected argument"},
		{[]string{"frob"}, "unknown command"},
		{[]string{"up", "--prefix", "BAD"}, "bad lab prefix"},
		{nil, "usage"},
	}
	for _, c := range cases {
		var out strings.Builder
		err := Main(context.Background(), c.args, &out, log)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("lab %q: err = %v, want it to say %q", c.args, err, c.want)
		}
	}
}

func TestDownWithoutLabIsNoop(t *testing.T) {
	l, _ := Open(Config{Prefix: "nolab", StateRoot: t.TempDir()})
	if err := l.Down(context.Background()); err != nil {
		t.Fatalf("down without a lab: %v", err)
	}
}
