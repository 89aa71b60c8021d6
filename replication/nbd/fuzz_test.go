package nbd

import (
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"
)

// fuzzSize is the export the fuzz targets write to.
const fuzzSize = 64 << 10

// requestSeeds are transmission-phase byte streams, valid and broken;
// testdata/fuzz/FuzzServeConn holds the same.
func requestSeeds() map[string][]byte {
	return map[string][]byte{
		"write-read-flush-disc": slices.Concat(
			requestMsg(cmdWrite, 0, 1, 512, 8, []byte("abcdefgh")),
			requestMsg(cmdRead, 0, 2, 0, 1024, nil),
			requestMsg(cmdFlush, 0, 3, 0, 0, nil),
			requestMsg(cmdDisc, 0, 4, 0, 0, nil)),
		"fua-trim-zeroes": slices.Concat(
			requestMsg(cmdWrite, cmdFlagFUA, 1, 0, 4, []byte{1, 2, 3, 4}),
			requestMsg(cmdTrim, cmdFlagFUA, 2, 4096, 4096, nil),
			requestMsg(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 3, 0, fuzzSize, nil)),
		"pipelined-no-disc": slices.Concat(
			requestMsg(cmdWrite, 0, 1, 0, 16, make([]byte, 16)),
			requestMsg(cmdWrite, 0, 2, 16, 16, make([]byte, 16)),
			requestMsg(cmdRead, 0, 3, 0, 32, nil)),
		"bad-magic":        append([]byte{0, 0, 0, 0}, requestMsg(cmdFlush, 0, 1, 0, 0, nil)[4:]...),
		"read-over-max":    requestMsg(cmdRead, 0, 1, 0, MaxPayload+1, nil),
		"write-past-end":   requestMsg(cmdWrite, 0, 1, fuzzSize-1, 2, []byte{1, 2}),
		"truncated-write":  requestMsg(cmdWrite, 0, 1, 0, 100, make([]byte, 10)),
		"unknown-command":  requestMsg(7, 0, 1, 0, 512, nil),
		"unknown-flag":     requestMsg(cmdRead, 1<<9, 1, 0, 512, nil),
		"truncated-header": requestMsg(cmdRead, 0, 1, 0, 512, nil)[:27],
	}
}

// handshakeSeeds are client byte streams from the client flags on;
// testdata/fuzz/FuzzHandshake holds the same.
func handshakeSeeds() map[string][]byte {
	flags := []byte{0, 0, 0, flagCFixedNewstyle | flagCNoZeroes}
	return map[string][]byte{
		"go-flush-disc": slices.Concat(flags,
			optionMsg(optStructuredReply, nil),
			optionMsg(optGo, infoData("disk", infoBlockSize)),
			requestMsg(cmdFlush, 0, 1, 0, 0, nil),
			requestMsg(cmdDisc, 0, 2, 0, 0, nil)),
		"list-info-abort": slices.Concat(flags,
			optionMsg(optList, nil),
			optionMsg(optInfo, infoData("nope")),
			optionMsg(optInfo, infoData("disk", 0, 1, 2, 3)),
			optionMsg(optAbort, nil)),
		"export-name-write": slices.Concat([]byte{0, 0, 0, flagCFixedNewstyle},
			optionMsg(optExportName, []byte("disk")),
			requestMsg(cmdWrite, 0, 1, 0, 3, []byte("abc"))),
		"bad-go-data":   slices.Concat(flags, optionMsg(optGo, []byte{0, 0, 1, 0, 'x'})),
		"bad-flags":     {0, 0, 1, 3},
		"option-length": slices.Concat(flags, optionMsg(optGo, nil)[:12], []byte{0, 1, 0, 0}),
	}
}

// socketPair returns two connected Unix stream sockets; unlike net.Pipe the
// client can half-close, so the server sees a clean end of input.
func socketPair(t testing.TB) (*net.UnixConn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conns[i].Close() })
	}
	return conns[0].(*net.UnixConn), conns[1]
}

// feed runs ServeConn against a client that optionally handshakes onto
// "disk", sends input, half-closes and discards the replies. It fails t on
// a hang and on an error that is not one ServeConn documents.
func feed(t *testing.T, input []byte, handshake bool) {
	srv := NewServer(nil)
	mem := NewMemBackend(fuzzSize)
	if err := srv.AddExport("disk", mem); err != nil {
		t.Fatal(err)
	}
	cs, ss := socketPair(t)
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(t.Context(), ss) }()
	_ = cs.SetDeadline(time.Now().Add(10 * time.Second))
	c := &testClient{t: t, nc: cs}
	if handshake {
		c.connect("disk")
	} else {
		c.read(18)
	}
	drained := make(chan struct{})
	go func() {
		io.Copy(io.Discard, cs)
		close(drained)
	}()
	cs.Write(input) // fails once the server gives up on us; that is fine
	cs.CloseWrite()
	err := result(t, done)
	<-drained
	if err != nil && !errors.Is(err, ErrProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("ServeConn: undocumented error %v", err)
	}
	s := srv.Stats()
	if s.BytesWritten > uint64(len(input)) || s.ProtocolErrors > 1 || s.Rejected > 1 {
		t.Fatalf("stats %+v after %d bytes", s, len(input))
	}
	if errors.Is(err, ErrProtocol) && s.ProtocolErrors+s.Rejected != 1 {
		t.Fatalf("protocol error %v not counted: %+v", err, s)
	}
}

func FuzzServeConn(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) { feed(t, data, true) })
}

func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) { feed(t, data, false) })
}
