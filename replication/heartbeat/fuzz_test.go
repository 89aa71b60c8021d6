package heartbeat

import (
	"bytes"
	"github.com/axproject/ax/ax/identity/identitytest"
	"testing"
	"time"
)

// FuzzDecodeHeartbeat feeds arbitrary datagrams to the decoder and to both
// kinds of receiver. testdata/fuzz holds a committed corpus of the same kind.
func FuzzDecodeHeartbeat(f *testing.F) {
	_, ids := identitytest.PKI(f, "a", "b")
	// A fixed clock keeps the PSK seeds the same bytes in every fuzzing
	// process, so "accepted" can be checked against them.
	now := time.Unix(1_700_000_000, 0)
	p := packet{path: PathRepl, heardYou: true, from: "a", to: "b", seq: 1, sent: now.UnixNano()}
	signed := mustSign(f, ids["a"], p)
	authentic := [][]byte{sealPSK(pskKey(), p), signed}
	for _, b := range authentic {
		f.Add(b)
		f.Add(b[:len(b)/2])
	}
	f.Add([]byte("AXHB"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))

	receivers := []*Detector{mustNew(f, "b", Security{PSK: testPSK}, "a"), mustNew(f, "b", Security{Identity: ids["b"]}, "a")}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, signed, err := decode(b)
		if err == nil {
			if !bytes.Equal(p.marshal(), b) {
				t.Fatalf("re-encoding of %+v differs from the datagram", p)
			}
			if !bytes.HasPrefix(b, signed) || len(b)-len(signed) != len(p.auth) {
				t.Fatal("the signed part is not everything before the MAC or signature")
			}
		}
		for _, d := range receivers {
			for _, path := range []Path{PathRepl, PathMgmt} {
				if d.handle(path, b, now) == nil && !containsBytes(authentic, b) {
					t.Fatalf("%v receiver accepted a datagram nobody authenticated: %q", d.mode, b)
				}
			}
		}
	})
}

func containsBytes(set [][]byte, b []byte) bool {
	for _, s := range set {
		if bytes.Equal(s, b) {
			return true
		}
	}
	return false
}
