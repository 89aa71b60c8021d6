// Package workload holds the lab guest's workloads — the ledger service, the
// memory dirtier and the console tick — and the ledger client that proves, from
// outside, which records the guest acknowledged.
package workload

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
)

// The ledger protocol is line based (send with nc). Requests:
//
//	APPEND <text>   → ACK <seq>          the record is in guest memory (and, with a disk,
//	                                     durable in block seq) before the ACK is sent;
//	                                     ERR disk: <reason> or ERR disk full and no record
//	GET <seq>       → REC <seq> <text>   or ERR no such record
//	LIST            → REC <seq> <text> … then END <count>
//	COUNT           → COUNT <n>
//	CHECK           → CHECK ok <n>       the disk, read past the page cache, holds exactly
//	                                     the n records in memory; else ERR check: <difference>
//	                                     (ERR check: no disk on a memory-only ledger)
//	FILL <MiB> [n]  → FILLED <bytes> <µs> scratch data written to the end of the disk in
//	                                     256 KiB O_DIRECT writes by n writers (default 1) and
//	                                     flushed (a throughput probe)
//	BLAST <ip:port> <n> <size> → BLASTED <n> <µs>   n UDP datagrams of size bytes sent to
//	                                     ip:port as fast as the guest can (a frame-rate probe)
//	PING            → PONG
//
// Anything else → ERR <reason>. Sequence numbers start at 1 and have no gaps.
const (
	// MaxLine bounds one request line, so a client cannot grow the server's memory.
	MaxLine = 4096
	// DefaultLedgerPort is where the lab guest's ledger listens.
	DefaultLedgerPort = 7000
)

// Ledger is the record store served by the guest: in memory, and on a disk
// when opened with OpenLedger. The zero Ledger is memory-only.
type Ledger struct {
	mu      sync.Mutex // guards records, never held across disk I/O
	records []string
	disk    *diskLog
}

// Append stores text and returns its sequence number. With a disk the
// record is durable in its block before it enters memory; on an error it is
// not in memory and the next append takes the same sequence number and block.
func (l *Ledger) Append(text string) (uint64, error) {
	if l.disk == nil {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.records = append(l.records, text)
		return uint64(len(l.records)), nil
	}
	l.disk.mu.Lock()
	defer l.disk.mu.Unlock()
	l.mu.Lock()
	seq := uint64(len(l.records)) + 1
	l.mu.Unlock()
	if err := l.disk.write(seq, text); err != nil {
		return 0, err
	}
	l.mu.Lock()
	l.records = append(l.records, text)
	l.mu.Unlock()
	return seq, nil
}

// CheckDisk reads every record back from the disk, past the page cache,
// and returns their number if the disk holds exactly the records in memory.
func (l *Ledger) CheckDisk() (int, error) {
	if l.disk == nil {
		return 0, ErrNoDisk
	}
	l.disk.mu.Lock()
	defer l.disk.mu.Unlock()
	recs := l.Snapshot()
	if err := l.disk.check(recs); err != nil {
		return 0, err
	}
	return len(recs), nil
}

// Close closes the ledger's disk; it is safe to call twice.
func (l *Ledger) Close() error {
	if l.disk == nil {
		return nil
	}
	return l.disk.close()
}

// Get returns the record with sequence number seq.
func (l *Ledger) Get(seq uint64) (string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if seq == 0 || seq > uint64(len(l.records)) {
		return "", false
	}
	return l.records[seq-1], true
}

// Snapshot returns a copy of all records, index i holding sequence number i+1.
func (l *Ledger) Snapshot() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.records...)
}

// Serve accepts ledger connections on ln until ctx ends.
func (l *Ledger) Serve(ctx context.Context, ln net.Listener, log *slog.Logger) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("ledger accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			stopConn := context.AfterFunc(ctx, func() { conn.Close() })
			defer stopConn()
			if err := l.handle(conn); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				log.Debug("ledger connection ended", "remote", conn.RemoteAddr(), "err", err)
			}
		}()
	}
}

func (l *Ledger) handle(conn io.ReadWriter) error {
	r := bufio.NewReaderSize(conn, MaxLine)
	w := bufio.NewWriter(conn)
	for {
		line, err := readLine(r)
		if err != nil {
			if errors.Is(err, errLineTooLong) {
				fmt.Fprintf(w, "ERR line longer than %d bytes\n", MaxLine)
				w.Flush()
			}
			return err
		}
		l.answer(w, line)
		// Flush only when no further pipelined request is already buffered:
		// one write per burst instead of one per line.
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
	}
}

func (l *Ledger) answer(w *bufio.Writer, line string) {
	cmd, arg, _ := strings.Cut(line, " ")
	switch strings.ToUpper(cmd) {
	case "APPEND":
		if arg == "" {
			w.WriteString("ERR APPEND needs a text\n")
			return
		}
		seq, err := l.Append(arg)
		if err != nil {
			fmt.Fprintf(w, "ERR %v\n", err)
			return
		}
		fmt.Fprintf(w, "ACK %d\n", seq)
	case "GET":
		seq, err := strconv.ParseUint(arg, 10, 64)
		if err != nil {
			w.WriteString("ERR GET needs a sequence number\n")
			return
		}
		text, ok := l.Get(seq)
		if !ok {
			w.WriteString("ERR no such record\n")
			return
		}
		fmt.Fprintf(w, "REC %d %s\n", seq, text)
	case "LIST":
		recs := l.Snapshot()
		for i, text := range recs {
			fmt.Fprintf(w, "REC %d %s\n", i+1, text)
		}
		fmt.Fprintf(w, "END %d\n", len(recs))
	case "COUNT":
		fmt.Fprintf(w, "COUNT %d\n", len(l.Snapshot()))
	case "CHECK":
		n, err := l.CheckDisk()
		if err != nil {
			fmt.Fprintf(w, "ERR check: %v\n", err)
			return
		}
		fmt.Fprintf(w, "CHECK ok %d\n", n)
	case "FILL":
		f := strings.Fields(arg)
		writers := 1
		mib, err := 0, error(nil)
		if len(f) >= 1 {
			mib, err = strconv.Atoi(f[0])
		}
		if len(f) == 2 && err == nil {
			writers, err = strconv.Atoi(f[1])
		}
		if len(f) < 1 || len(f) > 2 || err != nil {
			w.WriteString("ERR FILL needs a size in MiB and optionally a number of writers\n")
			return
		}
		took, err := l.Fill(mib, writers)
		if err != nil {
			fmt.Fprintf(w, "ERR %v\n", err)
			return
		}
		fmt.Fprintf(w, "FILLED %d %d\n", int64(mib)<<20, took.Microseconds())
	case "BLAST":
		n, took, err := Blast(arg)
		if err != nil {
			fmt.Fprintf(w, "ERR %v\n", err)
			return
		}
		fmt.Fprintf(w, "BLASTED %d %d\n", n, took.Microseconds())
	case "PING":
		w.WriteString("PONG\n")
	default:
		w.WriteString("ERR unknown command; use APPEND, GET, LIST, COUNT, CHECK, FILL, BLAST or PING\n")
	}
}

var errLineTooLong = errors.New("line too long")

// readLine reads one line without its end, refusing lines over MaxLine.
func readLine(r *bufio.Reader) (string, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return "", errLineTooLong
	}
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}
