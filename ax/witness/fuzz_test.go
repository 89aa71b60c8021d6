package witness

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// fuzzNow is the witness's clock in FuzzDecodeRequest; the signed seeds in
// testdata/fuzz/FuzzDecodeRequest carry it as their timestamp and a MAC
// under testLineKey, so they get past the replay check and exercise the
// lease code.
var fuzzNow = time.UnixMilli(1_700_000_000_000)

// FuzzDecodeRequest feeds arbitrary lines to the request decoder and to the
// witness behind it. Whatever the line, nothing panics; a line the decoder
// refuses gets no answer; a decoded request survives a round trip; and only
// a request with a valid MAC gets a signed answer or changes a lease.
func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"op":"query","vm":"web","ts":1700000000000,"nonce":"00112233445566778899aabbccddeeff","mac":"` + string(bytes.Repeat([]byte("0"), 2*macSize)) + `"}`))
	f.Add([]byte(`{}`))
	f.Add([]byte("\x00"))

	f.Fuzz(func(t *testing.T, line []byte) {
		srv, err := NewServer(ServerConfig{PSK: testKey, LeaseTTL: testTTL, Now: func() time.Time { return fuzzNow }})
		if err != nil {
			t.Fatal(err)
		}
		srv.graceEnd = fuzzNow // let valid takeovers through
		srv.floor = 0          // and requests timed at start
		admitted := false
		sess := &session{from: "192.0.2.1:1", key: testLineKey, admit: func(string) bool { admitted = true; return true }}

		req, decodeErr := decodeRequest(line)
		resp, keep := srv.handleLine(sess, line)
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
		if !req.verify(testLineKey) {
			if keep || resp.Code != codeAuth || resp.MAC != "" || resp.OK {
				t.Fatalf("unauthenticated line %q answered %+v, keep %t", line, resp, keep)
			}
			if len(srv.leases) != 0 || admitted {
				t.Fatalf("unauthenticated line %q changed leases or authenticated its connection", line)
			}
			return
		}
		if !admitted || sess.holder != req.holder {
			t.Fatalf("authenticated line %q did not bind its connection to holder %q", line, req.holder)
		}
		if !resp.verify(testLineKey) {
			t.Fatalf("authenticated line %q got an answer with a bad MAC: %+v", line, resp)
		}
	})
}

// TestSignedSeeds keeps the signed seeds of FuzzDecodeRequest signed: if the
// key derivation or the MAC input changes, they must be signed again, or the
// fuzzer would start from nothing but refusals.
func TestSignedSeeds(t *testing.T) {
	// A signed request naming a holder outside the safe alphabet is refused.
	if _, err := decodeRequest(readSeed(t, filepath.Join("testdata", "fuzz", "FuzzDecodeRequest", "unicode_names"))); err == nil {
		t.Error("the unicode_names seed decoded: non-ASCII holder names must be refused")
	}
	for _, name := range []string{"renew_signed", "takeover_signed", "query_signed", "query_holder", "case_folded_keys", "duplicate_key"} {
		t.Run(name, func(t *testing.T) {
			line := readSeed(t, filepath.Join("testdata", "fuzz", "FuzzDecodeRequest", name))
			req, err := decodeRequest(line)
			if err != nil {
				t.Fatal(err)
			}
			if !req.verify(testLineKey) || req.ts != fuzzNow.UnixMilli() {
				t.Fatalf("seed %s is not signed under testLineKey at fuzzNow", name)
			}
		})
	}
}

// readSeed reads the one []byte value of a "go test fuzz v1" file.
func readSeed(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rest, ok := bytes.CutPrefix(data, []byte("go test fuzz v1\n[]byte("))
	if !ok {
		t.Fatalf("%s: not a fuzz corpus file", path)
	}
	s, err := strconv.Unquote(string(bytes.TrimSuffix(bytes.TrimSpace(rest), []byte(")"))))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return []byte(s)
}

// fuzzRequest is the request FuzzClientResponse's lines answer.
func fuzzRequest() request {
	r := request{op: opRenew, holder: "a", vm: "web", ts: fuzzNow.UnixMilli()}
	copy(r.nonce[:], "0123456789abcdef")
	return r
}

// FuzzClientResponse feeds arbitrary response lines to the client. Whatever
// the line, nothing panics, and the client accepts an answer — a grant, a
// refusal it acts on (lease held, restart floor) — only if it is the
// witness's, signed, for this request.
func FuzzClientResponse(f *testing.F) {
	req := fuzzRequest()
	nonce := hex.EncodeToString(req.nonce[:])
	for _, r := range []response{
		{Nonce: nonce, OK: true, Holder: "a", ExpiresAt: fuzzNow.UnixMilli() + 10_000, RemainingMS: 10_000},
		{Nonce: nonce, Code: codeFloor, Error: "below the floor", Floor: fuzzNow.UnixMilli() + 2000},
		{Nonce: nonce, Code: codeHeld, Error: "held", Holder: "b", ExpiresAt: fuzzNow.UnixMilli() + 5000, RemainingMS: 5000},
		{Nonce: nonce, Code: codeRestarted, Error: "restarted", RemainingMS: 7000},
	} {
		r.sign(testLineKey)
		line, err := encodeLine(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(line[:len(line)-1])
	}
	f.Add([]byte(`{"nonce":"` + nonce + `","ok":false,"code":"auth","error":"x","remaining_ms":0,"expired":false}`))

	c := &Client{holder: "a"}
	f.Fuzz(func(t *testing.T, line []byte) {
		req := fuzzRequest()
		resp, err := c.checkResponse(&req, testLineKey, line)
		var held *LeaseHeldError
		var fl errFloor
		acted := err == nil || errors.As(err, &held) || errors.As(err, &fl)
		if !acted {
			return
		}
		var r response
		if decodeStrict(line, &r) != nil || !r.verify(testLineKey) || r.Nonce != hex.EncodeToString(req.nonce[:]) {
			t.Fatalf("line %q accepted (%+v, %v) without the witness's MAC for this request", line, resp, err)
		}
		switch {
		case err == nil && (!r.OK || r.Holder != "a"):
			t.Fatalf("line %q accepted as a grant to us: %+v", line, r)
		case fl.floor != 0 && fl.floor < req.ts:
			t.Fatalf("line %q: a floor %d below the request's time %d", line, fl.floor, req.ts)
		}
	})
}
