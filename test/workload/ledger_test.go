package workload

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func startLedger(t *testing.T) (*Ledger, string) {
	t.Helper()
	l := new(Ledger)
	return l, serveLedger(t, l)
}

// serveLedger serves l on a loopback port until the test ends.
func serveLedger(t *testing.T, l *Ledger) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Serve(ctx, ln, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return ln.Addr().String()
}

func TestLedgerProtocol(t *testing.T) {
	_, addr := startLedger(t)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	steps := []struct{ send, want string }{
		{"PING", "PONG"},
		{"APPEND first record", "ACK 1"},
		{"append second", "ACK 2"},
		{"APPEND", "ERR APPEND needs a text"},
		{"GET 2", "REC 2 second"},
		{"GET 3", "ERR no such record"},
		{"GET x", "ERR GET needs a sequence number"},
		{"COUNT", "COUNT 2"},
		{"LIST", "REC 1 first record"},
		{"", "REC 2 second"},
		{"", "END 2"},
		{"CHECK", "ERR check: no disk"},
		{"FROB", "ERR unknown command; use APPEND, GET, LIST, COUNT, CHECK, FILL, BLAST or PING"},
	}
	for _, s := range steps {
		if s.send != "" {
			if _, err := conn.Write([]byte(s.send + "\r\n")); err != nil {
				t.Fatal(err)
			}
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", s.send, err)
		}
		if strings.TrimSpace(got) != s.want {
			t.Errorf("%q: got %q, want %q", s.send, strings.TrimSpace(got), s.want)
		}
	}
}

func TestLedgerRefusesLongLine(t *testing.T) {
	l, addr := startLedger(t)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	go conn.Write([]byte("APPEND " + strings.Repeat("x", 3*MaxLine) + "\n"))
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.HasPrefix(got, "ERR line longer") {
		t.Fatalf("got %q, %v; want an ERR about the line length", got, err)
	}
	if n := len(l.Snapshot()); n != 0 {
		t.Fatalf("ledger holds %d records after a refused line", n)
	}
}

func TestClientRecordsAndVerifies(t *testing.T) {
	l, addr := startLedger(t)
	rec := filepath.Join(t.TempDir(), "client.rec")
	res, err := RunClient(context.Background(), ClientConfig{Addr: addr, Rate: 0, Count: 50, Record: rec, Tag: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Acked != 50 {
		t.Fatalf("acked %d, want 50", res.Acked)
	}
	acks, err := ReadRecord(rec)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := List(context.Background(), addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if v := Verify(acks, recs); v.Verified != 50 || len(v.Missing) != 0 || v.Records != 50 {
		t.Fatalf("verify: %+v", v)
	}
	// The command line, as the labs run it.
	var out bytes.Buffer
	if err := Main(context.Background(), []string{"verify", "--addr", addr, "--record", rec, "--timeout", "5s"}, &out); err != nil || !strings.Contains(out.String(), "acked=50 verified=50 records=50 missing=0") {
		t.Fatalf("ax-workload verify --timeout 5s: %v, %q", err, out.String())
	}
	if err := Main(context.Background(), []string{"verify", "--addr", addr, "--record", rec, "--timeout", "1ns"}, &out); err == nil {
		t.Fatal("ax-workload verify --timeout 1ns succeeded: the timeout is not applied")
	}
	// A ledger that lost its last record must fail verification: the check can fail.
	l.mu.Lock()
	l.records = l.records[:49]
	l.mu.Unlock()
	recs, _ = List(context.Background(), addr, 5*time.Second)
	if v := Verify(acks, recs); v.Verified != 49 || len(v.Missing) != 1 || v.Missing[0] != 50 {
		t.Fatalf("verify after loss: %+v, want record 50 missing", v)
	}
	// A record replaced by other text is missing too.
	recs[0] = "forged"
	if v := Verify(acks, recs); len(v.Missing) != 2 {
		t.Fatalf("verify with a changed record: %+v", v)
	}
}

func TestClientReconnectsAndRecordsOnlyAcks(t *testing.T) {
	// No server at all: nothing may be recorded as acknowledged.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	rec := filepath.Join(t.TempDir(), "client.rec")
	res, err := RunClient(context.Background(), ClientConfig{Addr: addr, Rate: 100, For: 300 * time.Millisecond, Record: rec})
	if err != nil {
		t.Fatal(err)
	}
	if res.Acked != 0 || res.Failed == 0 {
		t.Fatalf("result %+v: want no acks and some failures", res)
	}
	if acks, _ := ReadRecord(rec); len(acks) != 0 {
		t.Fatalf("record holds %d acks without a server", len(acks))
	}
}

func TestReadRecordRejectsMalformed(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bad.rec")
	os.WriteFile(p, []byte("ACK 1 1700000000000 a\nNAK 2 1700000000000 b\n"), 0o644)
	if _, err := ReadRecord(p); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("err = %v, want a complaint about line 2", err)
	}
}

func TestDirtyAndTick(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	n, err := Dirty(ctx, 1, 4)
	if err != nil {
		t.Fatal(err)
	}
	// 4 MiB/s for 0.3 s is about 300 page writes; allow for timer slack.
	if n < 100 || n > 400 {
		t.Errorf("dirtied %d pages in 0.3 s at 4 MiB/s, want about 300", n)
	}
	if _, err := Dirty(ctx, 0, 1); err == nil {
		t.Error("Dirty accepted size 0")
	}
	var b strings.Builder
	tctx, tcancel := context.WithTimeout(context.Background(), 55*time.Millisecond)
	defer tcancel()
	Tick(tctx, &b, 10*time.Millisecond)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) < 3 || lines[0] != "AXTICK 1" || lines[1] != "AXTICK 2" {
		t.Errorf("tick output %q", lines)
	}
}

func TestMainRejectsBadInput(t *testing.T) {
	for _, args := range [][]string{{}, {"nope"}, {"ledger", "--bogus"}, {"client", "extra"}, {"verify", "--record", "/nonexistent"}, {"ledger", "--disk", "/nonexistent"}} {
		var b strings.Builder
		if err := Main(context.Background(), args, &b); err == nil {
			t.Errorf("Main(%q) succeeded", args)
		}
	}
}

func TestBlast(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	n, _, err := Blast(pc.LocalAddr().String() + " 5 64")
	if err != nil || n != 5 {
		t.Fatalf("blast: %d, %v", n, err)
	}
	buf := make([]byte, 2048)
	pc.SetReadDeadline(time.Now().Add(2 * time.Second))
	if m, _, err := pc.ReadFrom(buf); err != nil || m != 64 || buf[0] != 0 {
		t.Fatalf("first datagram: %d bytes, %v", m, err)
	}
	for _, bad := range []string{"", "127.0.0.1:1 0 64", "127.0.0.1:1 5 4", "127.0.0.1:1 5 5000", "x y z"} {
		if _, _, err := Blast(bad); err == nil {
			t.Errorf("BLAST %q accepted", bad)
		}
	}
}
