package api

import "testing"

func TestParsePeer(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Peer
		err  bool
	}{
		{in: "b=10.0.1.2:7000,10.0.0.2:7001", want: Peer{"b", "10.0.1.2:7000", "10.0.0.2:7001"}},
		{in: "b=[fd00::2]:7000,hostb:7001", want: Peer{"b", "[fd00::2]:7000", "hostb:7001"}},
		{in: "b=10.0.1.2:7000", err: true},
		{in: "=10.0.1.2:7000,10.0.0.2:7001", err: true},
		{in: "b=10.0.1.2,10.0.0.2:7001", err: true},
		{in: "b=10.0.1.2:x,10.0.0.2:7001", err: true},
		{in: "b=10.0.1.2:7000,10.0.0.2:70000", err: true},
		{in: "b", err: true},
		{in: "../b=10.0.1.2:7000,10.0.0.2:7001", err: true},
	} {
		got, err := ParsePeer(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParsePeer(%q) = %+v, %v", tc.in, got, err)
		}
	}
}
