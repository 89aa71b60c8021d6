package witness

import (
	"bytes"
	"net"
	"testing"
	"time"
)

// fuzzNow is the witness's clock in FuzzDecodeRequest; the signed seeds in
// testdata/fuzz/FuzzDecodeRequest carry it as their timestamp, so they get
// past the replay check and exercise the lease code.
var fuzzNow = time.UnixMilli(1_700_000_000_000)

// FuzzDecodeRequest feeds arbitrary lines to the request decoder and to the
// witness behind it. Whatever the line, nothing panics; a line the decoder
// refuses gets no answer; a decoded request survives a round trip; and only
// a request with a valid MAC gets a signed answer or changes a lease.
func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"op":"query","vm":"web","ts":1700000000000,"nonce":"00112233445566778899aabbccddeeff","mac":"` + string(bytes.Repeat([]byte("0"), 2*macSize)) + `"}`))
	f.Add([]byte(`{}`))
	f.Add([]byte("\x00"))

	from := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1}
	f.Fuzz(func(t *testing.T, line []byte) {
		srv, err := NewServer(testKey, testTTL, func() time.Time { return fuzzNow }, nil)
		if err != nil {
			t.Fatal(err)
		}
		srv.graceEnd = fuzzNow // let valid takeovers through

		req, decodeErr := decodeRequest(line)
		resp, keep := srv.handleLine(line, from)
		if decodeErr != nil {
			if resp != nil || keep {
				t.Fatalf("undecodable line %q answered %+v", line, resp)
			}
			if len(srv.leases) != 0 {
				t.Fatalf("undecodable line %q changed leases", line)
			}
			return
		}

		out, err := req.encode()
		if err != nil {
			t.Fatalf("encode %+v: %v", req, err)
		}
		again, err := decodeRequest(out[:len(out)-1])
		if err != nil || again != req {
			t.Fatalf("round trip of %q: %+v, %v; want %+v", line, again, err, req)
		}
		if !bytes.Equal(again.macInput(), req.macInput()) {
			t.Fatalf("macInput not canonical for %q", line)
		}

		if resp == nil {
			t.Fatalf("decoded line %q got no answer", line)
		}
		if !req.verify(testKey) {
			if keep || resp.Code != codeAuth || resp.MAC != "" || resp.OK {
				t.Fatalf("unauthenticated line %q answered %+v, keep %t", line, resp, keep)
			}
			if len(srv.leases) != 0 {
				t.Fatalf("unauthenticated line %q changed leases", line)
			}
			return
		}
		if !resp.verify(testKey) {
			t.Fatalf("authenticated line %q got an answer with a bad MAC: %+v", line, resp)
		}
	})
}
