package witness

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/names"
)

// The protocol: one JSON object per line in each direction, over TLS 1.3
// (TLS mode) or plain TCP (PSK mode).
//
//	→ {"op":"renew","holder":"a","vm":"web1","ts":1700000000000,"nonce":"…","mac":"…"}
//	← {"nonce":"…","ok":true,"holder":"a","expires_at":…,"remaining_ms":15000,"expired":false,"mac":"…"}
//
// The MACs are HMAC-SHA256 over a canonical binary form of the decoded fields
// (see request.macInput, response.macInput), not over the JSON bytes, so
// JSON's freedom in spacing and escaping cannot change what is authenticated.
// The MAC key is, in TLS mode, exported from the connection's TLS session
// (tlsExportLabel), so a line counts in its own session only; in PSK mode it
// is identity.DeriveKey(psk, identity.PurposeWitness), a key no other use of
// the pre-shared key shares. In TLS mode the holder is the client
// certificate's name and a request naming another is refused; in PSK mode
// the holder is whatever a key holder declares: any holder of the key can
// speak for any host (documented, not fixable without identities).
//
// A request carries its sender's time ("ts", Unix milliseconds) and a random
// nonce; the witness rejects requests more than MaxRequestAge away from its
// own clock and nonces it has seen within that window, so a recorded request
// cannot be replayed to a running witness. Across a restart the nonces are
// gone; instead the witness persists, ahead of time, a bound on the
// timestamps it may have accepted, and after a restart refuses any request
// at or below it (code "floor", with the bound in "floor"), so nothing
// recorded before the restart is granted after it. An honest client then
// sends its timestamps above the floor. A response echoes the request's
// nonce under its MAC, so it answers that request only.

const (
	// MinKeySize is the shortest pre-shared key accepted.
	MinKeySize = identity.MinKeySize
	// MaxNameLen bounds holder and VM names (names.Check's alphabet too).
	MaxNameLen = names.MaxLen
	// MaxLineSize bounds one request or response line, newline included. A
	// longer line drops the connection.
	MaxLineSize = 4096
	// MaxRequestAge is how far a request's timestamp may be from the
	// witness's clock, either way. Hosts' clocks must agree this closely.
	MaxRequestAge = 30 * time.Second

	nonceSize = 16
	macSize   = sha256.Size

	opRenew    = "renew"
	opQuery    = "query"
	opTakeover = "takeover"
	opRelease  = "release"

	// Response codes; empty when ok.
	codeHeld      = "held"      // another holder's lease is valid
	codeRestarted = "restarted" // witness in its post-start grace
	codeAuth      = "auth"      // request MAC wrong; this response is unsigned
	codeReplay    = "replay"    // timestamp too far off, or nonce seen
	codeFloor     = "floor"     // timestamp at or below the restart floor ("floor")
	codeHolder    = "holder"    // request names a holder the connection is not
	codeBusy      = "busy"      // replay cache or lease table full
	codeStore     = "store"     // the witness could not save its state

	// tlsExportLabel names the line MAC key exported from a TLS session.
	tlsExportLabel = "EXPORTER-ax-witness/2 line mac"
	macKeySize     = 32
)

var (
	// ErrWeakKey reports a pre-shared key shorter than MinKeySize.
	ErrWeakKey = errors.New("witness: pre-shared key too short")

	errMalformed = errors.New("malformed request")
)

func checkKey(psk []byte) error {
	if len(psk) < MinKeySize {
		return fmt.Errorf("%w: %d bytes, need at least %d (make one with: axctl pki psk KEYFILE)", ErrWeakKey, len(psk), MinKeySize)
	}
	return nil
}

// pskLineKey is the line MAC key of PSK mode.
func pskLineKey(psk []byte) []byte { return identity.DeriveKey(psk, identity.PurposeWitness) }

// tlsLineKey is the line MAC key of one TLS session, the same at both ends.
func tlsLineKey(cs tls.ConnectionState) ([]byte, error) {
	k, err := cs.ExportKeyingMaterial(tlsExportLabel, nil, macKeySize)
	if err != nil {
		return nil, fmt.Errorf("export line key from the TLS session: %w", err)
	}
	return k, nil
}

func checkName(what, s string) error { return names.Check(what, s) }

// wireRequest is a request line as JSON.
type wireRequest struct {
	Op     string `json:"op"`
	Holder string `json:"holder,omitempty"`
	VM     string `json:"vm"`
	TS     int64  `json:"ts"`
	Nonce  string `json:"nonce"`
	MAC    string `json:"mac"`
}

// request is a decoded, well-formed request whose MAC is not yet checked.
type request struct {
	op, holder, vm string
	ts             int64 // Unix milliseconds, sender's clock
	nonce          [nonceSize]byte
	mac            [macSize]byte
}

// decodeRequest parses one request line (without its newline) and checks
// its shape; it does not check the MAC, which needs the key.
func decodeRequest(line []byte) (request, error) {
	var w wireRequest
	if err := decodeStrict(line, &w); err != nil {
		return request{}, fmt.Errorf("%w: %v", errMalformed, err)
	}
	r := request{op: w.Op, holder: w.Holder, vm: w.VM, ts: w.TS}
	switch r.op {
	case opRenew, opTakeover, opRelease:
		if err := checkName("holder", r.holder); err != nil {
			return request{}, fmt.Errorf("%w: %s: %v", errMalformed, r.op, err)
		}
	case opQuery:
		if r.holder != "" {
			if err := checkName("holder", r.holder); err != nil {
				return request{}, fmt.Errorf("%w: %s: %v", errMalformed, r.op, err)
			}
		}
	default:
		return request{}, fmt.Errorf("%w: unknown op %q", errMalformed, r.op)
	}
	if err := checkName("vm", r.vm); err != nil {
		return request{}, fmt.Errorf("%w: %s: %v", errMalformed, r.op, err)
	}
	if r.ts <= 0 {
		return request{}, fmt.Errorf("%w: timestamp %d", errMalformed, r.ts)
	}
	if err := decodeHex(r.nonce[:], w.Nonce); err != nil {
		return request{}, fmt.Errorf("%w: nonce: %v", errMalformed, err)
	}
	if err := decodeHex(r.mac[:], w.MAC); err != nil {
		return request{}, fmt.Errorf("%w: mac: %v", errMalformed, err)
	}
	return r, nil
}

func (r *request) wire() wireRequest {
	return wireRequest{
		Op: r.op, Holder: r.holder, VM: r.vm, TS: r.ts,
		Nonce: hex.EncodeToString(r.nonce[:]),
		MAC:   hex.EncodeToString(r.mac[:]),
	}
}

// macInput is the canonical form a request's MAC covers: a label that keeps
// requests and responses apart, then each field, strings length-prefixed.
func (r *request) macInput() []byte {
	b := make([]byte, 0, 64+len(r.op)+len(r.holder)+len(r.vm))
	b = append(b, "ax-witness/2 request\x00"...)
	b = appendString(b, r.op)
	b = appendString(b, r.holder)
	b = appendString(b, r.vm)
	b = binary.BigEndian.AppendUint64(b, uint64(r.ts))
	return append(b, r.nonce[:]...)
}

func (r *request) sign(key []byte) { r.mac = sum(key, r.macInput()) }

func (r *request) verify(key []byte) bool {
	m := sum(key, r.macInput())
	return hmac.Equal(m[:], r.mac[:])
}

func (r *request) time() time.Time { return time.UnixMilli(r.ts) }

func (r *request) encode() ([]byte, error) { return encodeLine(r.wire()) }

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// encodeLine encodes v as one JSON line. HTML escaping is off so that a
// name of MaxNameLen bytes cannot grow six-fold and overflow MaxLineSize.
func encodeLine(v any) ([]byte, error) {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	if err := e.Encode(v); err != nil { // Encode ends with a newline
		return nil, err
	}
	return b.Bytes(), nil
}

func sum(key, msg []byte) [macSize]byte {
	var out [macSize]byte
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	m.Sum(out[:0])
	return out
}

// response is a response line; the same struct is the JSON and the decoded
// form, as responses are checked by the client only.
type response struct {
	Nonce       string `json:"nonce"`
	OK          bool   `json:"ok"`
	Code        string `json:"code,omitempty"`
	Error       string `json:"error,omitempty"`
	Holder      string `json:"holder,omitempty"`
	ExpiresAt   int64  `json:"expires_at,omitempty"` // Unix milliseconds, witness's clock
	RemainingMS int64  `json:"remaining_ms"`
	Expired     bool   `json:"expired"`
	// Floor is, with code "floor", the timestamp a request must exceed.
	Floor int64  `json:"floor,omitempty"`
	MAC   string `json:"mac,omitempty"`
}

func (r *response) macInput() []byte {
	b := make([]byte, 0, 128+len(r.Error)+len(r.Holder))
	b = append(b, "ax-witness/2 response\x00"...)
	b = appendString(b, r.Nonce)
	b = appendBool(b, r.OK)
	b = appendString(b, r.Code)
	b = appendString(b, r.Error)
	b = appendString(b, r.Holder)
	b = binary.BigEndian.AppendUint64(b, uint64(r.ExpiresAt))
	b = binary.BigEndian.AppendUint64(b, uint64(r.RemainingMS))
	b = appendBool(b, r.Expired)
	return binary.BigEndian.AppendUint64(b, uint64(r.Floor))
}

func (r *response) sign(key []byte) {
	m := sum(key, r.macInput())
	r.MAC = hex.EncodeToString(m[:])
}

func (r *response) verify(key []byte) bool {
	var got [macSize]byte
	if decodeHex(got[:], r.MAC) != nil {
		return false
	}
	want := sum(key, r.macInput())
	return hmac.Equal(got[:], want[:])
}

// decodeStrict decodes exactly one JSON object with no unknown fields.
func decodeStrict(line []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(line))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if _, err := d.Token(); err != io.EOF {
		return errors.New("data after the object")
	}
	return nil
}

// decodeHex fills dst from exactly len(dst) bytes of lowercase hex, so each
// value has one spelling.
func decodeHex(dst []byte, s string) error {
	if len(s) != 2*len(dst) {
		return fmt.Errorf("%d hex digits, want %d", len(s), 2*len(dst))
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("not lowercase hex")
		}
	}
	_, err := hex.Decode(dst, []byte(s))
	return err
}
