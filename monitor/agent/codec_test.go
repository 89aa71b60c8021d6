package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

func sampleMessages() []*Message {
	return []*Message{
		{Type: TypeHello, Hello: &Hello{Version: Version, AgentID: "vm1", Seq: 1, Checks: []CheckInfo{
			{Name: "ledger", Kind: KindTCP, IntervalMS: 5000, Threshold: 3, Recover: true},
			{Name: "web", Kind: KindHTTP, IntervalMS: 1000, Threshold: 1},
		}}},
		{Type: TypeHello, Hello: &Hello{Version: Version, AgentID: "bare", Seq: 1}},
		{Type: TypeReport, Report: &Report{Seq: 2, Check: "ledger", State: StateFail, Detail: "dial tcp 127.0.0.1:7000: connection refused", Time: 1700000000000}},
		{Type: TypeReport, Report: &Report{Seq: 3, Check: "ledger", State: StateOK}},
		{Type: TypeHeartbeat, Heartbeat: &Heartbeat{Seq: 4, Time: 1700000000000}},
		{Type: TypeRecovery, Recovery: &Recovery{Seq: 5, Check: "ledger", OK: true, Detail: "exit 0"}},
		{Type: TypeAck, Ack: &Ack{Seq: 4}},
		{Type: TypeRecover, Recover: &Recover{Check: "ledger"}},
	}
}

func TestCodecRoundTrip(t *testing.T) {
	var stream bytes.Buffer
	for _, m := range sampleMessages() {
		if err := WriteMessage(&stream, m); err != nil {
			t.Fatalf("write %s: %v", m.Type, err)
		}
	}
	fr := NewFrameReader(&stream, 0)
	for _, want := range sampleMessages() {
		got, err := fr.Next()
		if err != nil {
			t.Fatalf("read %s: %v", want.Type, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("round trip of %s: got %+v, want %+v", want.Type, got, want)
		}
	}
	if _, err := fr.Next(); err != io.EOF {
		t.Errorf("after the last frame: %v, want io.EOF", err)
	}
}

func TestDecodeRejects(t *testing.T) {
	long := strings.Repeat("x", MaxDetail+1)
	tests := []struct {
		name, json string
	}{
		{"empty", ``},
		{"not json", `hello`},
		{"array", `[{"type":"ack","ack":{"seq":1}}]`},
		{"scalar", `1`},
		{"truncated", `{"type":"ack","ack":{"seq":1}`},
		{"trailing data", `{"type":"ack","ack":{"seq":1}} {}`},
		{"trailing garbage", `{"type":"ack","ack":{"seq":1}}x`},
		{"unknown type", `{"type":"reboot","ack":{"seq":1}}`},
		{"no body", `{"type":"ack"}`},
		{"null body", `{"type":"ack","ack":null}`},
		{"wrong body", `{"type":"ack","recover":{"check":"a"}}`},
		{"two bodies", `{"type":"ack","ack":{"seq":1},"recover":{"check":"a"}}`},
		{"unknown field", `{"type":"ack","ack":{"seq":1,"cmd":"reboot"}}`},
		{"unknown top field", `{"type":"ack","ack":{"seq":1},"x":1}`},
		{"duplicate key", `{"type":"recover","type":"ack","ack":{"seq":1}}`},
		{"upper-case key", `{"TYPE":"ack","ack":{"seq":1}}`},
		{"folded key", "{\"type\":\"ack\",\"ack\":{\"\u017feq\":1}}"},
		{"seq zero", `{"type":"ack","ack":{"seq":0}}`},
		{"seq negative", `{"type":"ack","ack":{"seq":-1}}`},
		{"seq float", `{"type":"ack","ack":{"seq":1.5}}`},
		{"seq string", `{"type":"ack","ack":{"seq":"1"}}`},
		{"seq overflow", `{"type":"ack","ack":{"seq":18446744073709551616}}`},
		{"bad version", `{"type":"hello","hello":{"version":2,"agent_id":"a","seq":1,"checks":[]}}`},
		{"bad agent id", `{"type":"hello","hello":{"version":1,"agent_id":"a b","seq":1,"checks":[]}}`},
		{"empty agent id", `{"type":"hello","hello":{"version":1,"agent_id":"","seq":1,"checks":[]}}`},
		{"duplicate check", `{"type":"hello","hello":{"version":1,"agent_id":"a","seq":1,"checks":[` +
			`{"name":"c","kind":"tcp","interval_ms":1000,"threshold":1,"recover":false},` +
			`{"name":"c","kind":"tcp","interval_ms":1000,"threshold":1,"recover":false}]}}`},
		{"bad kind", `{"type":"hello","hello":{"version":1,"agent_id":"a","seq":1,"checks":[{"name":"c","kind":"shell","interval_ms":1000,"threshold":1,"recover":false}]}}`},
		{"short interval", `{"type":"hello","hello":{"version":1,"agent_id":"a","seq":1,"checks":[{"name":"c","kind":"tcp","interval_ms":1,"threshold":1,"recover":false}]}}`},
		{"zero threshold", `{"type":"hello","hello":{"version":1,"agent_id":"a","seq":1,"checks":[{"name":"c","kind":"tcp","interval_ms":1000,"threshold":0,"recover":false}]}}`},
		{"deep nesting", `{"type":"hello","hello":{"version":1,"agent_id":"a","seq":1,"checks":[{"name":{"x":[1]}}]}}`},
		{"bad state", `{"type":"report","report":{"seq":1,"check":"c","state":"meh","time":0}}`},
		{"long detail", `{"type":"report","report":{"seq":1,"check":"c","state":"ok","detail":"` + long + `","time":0}}`},
		{"control in detail", `{"type":"report","report":{"seq":1,"check":"c","state":"ok","detail":"a\u001b[2Jb","time":0}}`},
		{"bad check name", `{"type":"recover","recover":{"check":"../etc"}}`},
		{"long check name", `{"type":"recover","recover":{"check":"` + strings.Repeat("c", MaxNameLen+1) + `"}}`},
		{"invalid utf-8", "{\"type\":\"report\",\"report\":{\"seq\":1,\"check\":\"c\",\"state\":\"ok\",\"detail\":\"\xff\",\"time\":0}}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Decode([]byte(tt.json))
			if err == nil {
				t.Fatalf("decoded %+v, want an error", m)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %v does not wrap ErrInvalid", err)
			}
		})
	}
}

func TestHelloWithTooManyChecks(t *testing.T) {
	h := &Hello{Version: Version, AgentID: "a", Seq: 1}
	for i := 0; i <= MaxChecks; i++ {
		h.Checks = append(h.Checks, CheckInfo{Name: fmt.Sprintf("c%d", i),
			Kind: KindTCP, IntervalMS: 1000, Threshold: 1})
	}
	if _, err := Encode(&Message{Type: TypeHello, Hello: h}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("encode of %d checks: %v, want ErrInvalid", len(h.Checks), err)
	}
}

func TestFrameReaderBounds(t *testing.T) {
	frame := func(n uint32, payload string) []byte {
		b := binary.BigEndian.AppendUint32(nil, n)
		return append(b, payload...)
	}
	tests := []struct {
		name  string
		input []byte
		want  error
	}{
		{"clean end", nil, io.EOF},
		{"torn header", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"empty frame", frame(0, ""), ErrInvalid},
		{"over the bound", frame(MaxFrame+1, ""), ErrFrameTooLarge},
		{"huge", frame(0xffffffff, ""), ErrFrameTooLarge},
		{"torn payload", frame(10, "{}"), io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewFrameReader(bytes.NewReader(tt.input), 0).Next()
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
	// A reader with a lower bound refuses what the protocol would allow.
	_, err := NewFrameReader(bytes.NewReader(frame(200, strings.Repeat(" ", 200))), 100).Next()
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("200-byte frame under a 100-byte bound: %v", err)
	}
}

func TestCleanDetail(t *testing.T) {
	tests := []struct{ in, want string }{
		{"fine", "fine"},
		{"line one\nline two\r\n", "line one line two"},
		{"bell\x07 and \x1b[31mred", "bell  and  [31mred"},
		{"bad \xff byte", "bad \ufffd byte"},
		{strings.Repeat("é", MaxDetail), strings.Repeat("é", MaxDetail/2)},
	}
	for _, tt := range tests {
		got := CleanDetail(tt.in)
		if got != tt.want {
			t.Errorf("CleanDetail(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if err := validDetail(got); err != nil {
			t.Errorf("CleanDetail(%q) is not a valid detail: %v", tt.in, err)
		}
	}
}

// FuzzDecode feeds arbitrary bytes both as one payload and as a stream of
// frames. Whatever decodes must validate, re-encode and decode to the same
// message; nothing may panic or read past its bound.
func FuzzDecode(f *testing.F) {
	for _, m := range sampleMessages() {
		frame, err := Encode(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(frame[headerLen:])
		f.Add(frame)
	}
	f.Add([]byte(`{"type":"ack","ack":{"seq":1},"ack":{"seq":2}}`))
	f.Add([]byte{0, 0, 0, 2, '{', '}'})
	f.Fuzz(func(t *testing.T, data []byte) {
		check := func(m *Message) {
			if err := m.Validate(); err != nil {
				t.Fatalf("decoded message does not validate: %v", err)
			}
			frame, err := Encode(m)
			if err != nil {
				t.Fatalf("decoded message does not encode: %v", err)
			}
			again, err := Decode(frame[headerLen:])
			if err != nil {
				t.Fatalf("re-encoded message does not decode: %v\n%s", err, frame[headerLen:])
			}
			if !reflect.DeepEqual(m, again) {
				t.Fatalf("round trip changed the message: %+v → %+v", m, again)
			}
		}
		if m, err := Decode(data); err == nil {
			check(m)
		} else if !errors.Is(err, ErrInvalid) {
			t.Fatalf("Decode error %v does not wrap ErrInvalid", err)
		}
		fr := NewFrameReader(bytes.NewReader(data), 0)
		for i := 0; i < 64; i++ {
			m, err := fr.Next()
			if err != nil {
				break
			}
			check(m)
		}
		if cap(fr.buf) > MaxFrame {
			t.Fatalf("frame buffer grew to %d bytes", cap(fr.buf))
		}
	})
}

// BenchmarkDecode measures the strict decoder on a report and on the
// largest hello, which with the session's buckets bounds an agent's CPU cost.
func BenchmarkDecode(b *testing.B) {
	big := &Hello{Version: Version, AgentID: "bench", Seq: 1}
	for i := 0; i < MaxChecks; i++ {
		big.Checks = append(big.Checks, CheckInfo{Name: fmt.Sprintf("check-%02d", i), Kind: KindHTTP, IntervalMS: 1000, Threshold: 3, Recover: true})
	}
	for _, bc := range []struct {
		name string
		m    *Message
	}{
		{"report", sampleMessages()[2]},
		{"hello-64-checks", &Message{Type: TypeHello, Hello: big}},
	} {
		frame, err := Encode(bc.m)
		if err != nil {
			b.Fatal(err)
		}
		p := frame[headerLen:]
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Decode(p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
