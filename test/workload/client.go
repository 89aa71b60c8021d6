package workload

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// ClientConfig drives a ledger client.
type ClientConfig struct {
	Addr   string        // host:port of the ledger
	Rate   float64       // appends per second (steady); 0 means as fast as acks come
	Count  int           // stop after this many acks; 0 means no limit
	For    time.Duration // stop after this long; 0 means no limit
	Record string        // file the acknowledged records are appended to
	Tag    string        // prefix of record texts, unique per run
	// DialTimeout and IOTimeout bound one attempt; the client reconnects after failures.
	DialTimeout time.Duration
	IOTimeout   time.Duration
}

// ClientResult counts what a client run saw.
type ClientResult struct {
	Acked      int // appends acknowledged by the ledger (all in the record file)
	Failed     int // attempts that ended without an ack (connection lost, timeout)
	Reconnects int // reconnections made
}

// Ack is one acknowledged record as kept in the client's record file, one
// line each: "ACK <seq> <unix-ms when the ack arrived> <text>".
type Ack struct {
	Seq  uint64
	Time time.Time
	Text string
}

// RunClient appends records at a steady rate and writes every acknowledged
// one to cfg.Record before counting it. A lost connection is redialled; an
// append that got no ACK is not recorded (its fate is unknown to the client,
// so no claim is made about it).
func RunClient(ctx context.Context, cfg ClientConfig) (ClientResult, error) {
	var res ClientResult
	if cfg.Addr == "" || cfg.Record == "" {
		return res, errors.New("ledger client: an address and a record file are required")
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 2 * time.Second
	}
	if cfg.IOTimeout == 0 {
		cfg.IOTimeout = 5 * time.Second
	}
	if cfg.Tag == "" {
		cfg.Tag = fmt.Sprintf("c%d", time.Now().UnixNano())
	}
	rec, err := os.OpenFile(cfg.Record, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return res, fmt.Errorf("ledger client: open record file: %w", err)
	}
	defer rec.Close()

	if cfg.For > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.For)
		defer cancel()
	}
	var tick <-chan time.Time
	if cfg.Rate > 0 {
		t := time.NewTicker(time.Duration(float64(time.Second) / cfg.Rate))
		defer t.Stop()
		tick = t.C
	}

	var conn net.Conn
	var r *bufio.Reader
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	n := 0
	for cfg.Count == 0 || res.Acked < cfg.Count {
		if tick != nil {
			select {
			case <-ctx.Done():
				return res, nil
			case <-tick:
			}
		} else if ctx.Err() != nil {
			return res, nil
		}
		if conn == nil {
			d := net.Dialer{Timeout: cfg.DialTimeout}
			c, err := d.DialContext(ctx, "tcp", cfg.Addr)
			if err != nil {
				res.Failed++
				continue
			}
			if n > 0 {
				res.Reconnects++
			}
			conn, r = c, bufio.NewReader(c)
		}
		n++
		text := fmt.Sprintf("%s-%d", cfg.Tag, n)
		seq, err := appendOne(conn, r, text, cfg.IOTimeout)
		if err != nil {
			res.Failed++
			conn.Close()
			conn = nil
			continue
		}
		if _, err := fmt.Fprintf(rec, "ACK %d %d %s\n", seq, time.Now().UnixMilli(), text); err != nil {
			return res, fmt.Errorf("ledger client: write record file: %w", err)
		}
		res.Acked++
	}
	return res, nil
}

func appendOne(conn net.Conn, r *bufio.Reader, text string, timeout time.Duration) (uint64, error) {
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(conn, "APPEND %s\n", text); err != nil {
		return 0, err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return 0, err
	}
	line = strings.TrimSpace(line)
	rest, ok := strings.CutPrefix(line, "ACK ")
	if !ok {
		return 0, fmt.Errorf("unexpected answer %q", line)
	}
	return strconv.ParseUint(rest, 10, 64)
}

// ReadRecord loads a client's record file.
func ReadRecord(path string) ([]Ack, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read record file: %w", err)
	}
	defer f.Close()
	var acks []Ack
	s := bufio.NewScanner(f)
	for line := 1; s.Scan(); line++ {
		fields := strings.SplitN(s.Text(), " ", 4)
		if len(fields) != 4 || fields[0] != "ACK" {
			return nil, fmt.Errorf("record file %s line %d: malformed %q", path, line, s.Text())
		}
		seq, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("record file %s line %d: bad sequence number: %w", path, line, err)
		}
		ms, err := strconv.ParseInt(fields[2], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("record file %s line %d: bad time: %w", path, line, err)
		}
		acks = append(acks, Ack{Seq: seq, Time: time.UnixMilli(ms), Text: fields[3]})
	}
	return acks, s.Err()
}

// Verification is the result of checking a ledger against a client's record.
type Verification struct {
	Acked    int      // acknowledged records in the client's record
	Verified int      // of those, present in the ledger with the same text
	Records  int      // records the ledger holds
	Missing  []uint64 // acknowledged sequence numbers missing or different in the ledger
}

// List reads every record of the ledger at addr.
func List(ctx context.Context, addr string, timeout time.Duration) ([]string, error) {
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ledger list: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte("LIST\n")); err != nil {
		return nil, fmt.Errorf("ledger list: %w", err)
	}
	var recs []string
	s := bufio.NewScanner(conn)
	s.Buffer(make([]byte, MaxLine+64), MaxLine+64)
	for s.Scan() {
		line := s.Text()
		if rest, ok := strings.CutPrefix(line, "END "); ok {
			n, err := strconv.Atoi(rest)
			if err != nil || n != len(recs) {
				return nil, fmt.Errorf("ledger list: END says %q but %d records came", rest, len(recs))
			}
			return recs, nil
		}
		fields := strings.SplitN(line, " ", 3)
		if len(fields) != 3 || fields[0] != "REC" || fields[1] != strconv.Itoa(len(recs)+1) {
			return nil, fmt.Errorf("ledger list: unexpected line %q", line)
		}
		recs = append(recs, fields[2])
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("ledger list: %w", err)
	}
	return nil, errors.New("ledger list: connection closed before END")
}

// Verify checks every acknowledged record against the ledger's records.
func Verify(acks []Ack, records []string) Verification {
	v := Verification{Acked: len(acks), Records: len(records)}
	for _, a := range acks {
		if a.Seq >= 1 && a.Seq <= uint64(len(records)) && records[a.Seq-1] == a.Text {
			v.Verified++
			continue
		}
		v.Missing = append(v.Missing, a.Seq)
	}
	return v
}

// AppendLatency sends n APPENDs to the ledger at addr one at a time, each
// after the previous ACK, and returns the round trip of each: on a
// disk-backed ledger the time to make a record durable, as the client sees it.
func AppendLatency(ctx context.Context, addr string, n int) ([]time.Duration, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ledger append latency: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r := bufio.NewReader(conn)
	tag := fmt.Sprintf("lat%d", time.Now().UnixNano())
	rtts := make([]time.Duration, 0, n)
	for i := range n {
		t0 := time.Now()
		if _, err := appendOne(conn, r, fmt.Sprintf("%s-%d", tag, i+1), 30*time.Second); err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return rtts, fmt.Errorf("ledger append latency: append %d: %w", i+1, err)
		}
		rtts = append(rtts, time.Since(t0))
	}
	return rtts, nil
}

// ask sends one request line to the ledger at addr on a new connection and
// returns its one-line answer, without the line end.
func ask(ctx context.Context, addr, request string, timeout time.Duration) (string, error) {
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte(request + "\n")); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(line), err
}

// Check asks the ledger at addr to compare its disk with its memory and
// returns the number of records both hold.
func Check(ctx context.Context, addr string, timeout time.Duration) (int, error) {
	line, err := ask(ctx, addr, "CHECK", timeout)
	if err != nil {
		return 0, fmt.Errorf("ledger check: %w", err)
	}
	rest, ok := strings.CutPrefix(line, "CHECK ok ")
	if !ok {
		return 0, fmt.Errorf("ledger check: %s", strings.TrimPrefix(line, "ERR check: "))
	}
	n, err := strconv.Atoi(rest)
	if err != nil {
		return 0, fmt.Errorf("ledger check: malformed answer %q", line)
	}
	return n, nil
}

// AppendPipelined sends n APPENDs on one connection without waiting, then
// reads their n ACKs, and returns how long all took: the ledger's append
// throughput when latency is not the limit (a disk-backed ledger: its disk
// write throughput, one 4 KiB block and a flush per record).
func AppendPipelined(ctx context.Context, addr string, n int) (time.Duration, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("ledger pipelined appends: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	conn.SetDeadline(time.Now().Add(5 * time.Minute))
	tag := fmt.Sprintf("pipe%d", time.Now().UnixNano())
	t0 := time.Now()
	errc := make(chan error, 1)
	go func() {
		w := bufio.NewWriter(conn)
		for i := range n {
			fmt.Fprintf(w, "APPEND %s-%d\n", tag, i+1)
		}
		errc <- w.Flush()
	}()
	r := bufio.NewReader(conn)
	for i := range n {
		line, err := r.ReadString('\n')
		if err != nil {
			return 0, fmt.Errorf("ledger pipelined appends: ack %d of %d: %w", i+1, n, err)
		}
		if !strings.HasPrefix(line, "ACK ") {
			return 0, fmt.Errorf("ledger pipelined appends: %s", strings.TrimSpace(line))
		}
	}
	if err := <-errc; err != nil {
		return 0, fmt.Errorf("ledger pipelined appends: %w", err)
	}
	return time.Since(t0), nil
}

// Fill asks the disk-backed ledger at addr to write mib MiB of scratch data
// with writers concurrent writers (FILL) and returns the guest's own measure
// of how long it took.
func Fill(ctx context.Context, addr string, mib, writers int, timeout time.Duration) (time.Duration, error) {
	line, err := ask(ctx, addr, fmt.Sprintf("FILL %d %d", mib, writers), timeout)
	if err != nil {
		return 0, fmt.Errorf("ledger fill: %w", err)
	}
	var n, us int64
	if _, err := fmt.Sscanf(line, "FILLED %d %d", &n, &us); err != nil {
		return 0, fmt.Errorf("ledger fill: %s", line)
	}
	return time.Duration(us) * time.Microsecond, nil
}
