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
//	APPEND <text>   → ACK <seq>          the record is in guest memory before the ACK is sent
//	GET <seq>       → REC <seq> <text>   or ERR no such record
//	LIST            → REC <seq> <text> … then END <count>
//	COUNT           → COUNT <n>
//	PING            → PONG
//
// Anything else → ERR <reason>. Sequence numbers start at 1 and have no gaps.
const (
	// MaxLine bounds one request line, so a client cannot grow the server's memory.
	MaxLine = 4096
	// DefaultLedgerPort is where the lab guest's ledger listens.
	DefaultLedgerPort = 7000
)

// Ledger is the in-memory record store served by the guest.
type Ledger struct {
	mu      sync.Mutex
	records []string
}

// Append stores text and returns its sequence number.
func (l *Ledger) Append(text string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.records = append(l.records, text)
	return uint64(len(l.records))
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
		fmt.Fprintf(w, "ACK %d\n", l.Append(arg))
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
	case "PING":
		w.WriteString("PONG\n")
	default:
		w.WriteString("ERR unknown command; use APPEND, GET, LIST, COUNT or PING\n")
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
