package agent

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// A frame is a 4-byte big-endian payload length (1 to MaxFrame) followed by
// that many bytes of JSON holding one Message.
const headerLen = 4

// ErrFrameTooLarge means a frame header announced more than the reader's
// bound; the stream cannot be resynchronised and must be dropped.
var ErrFrameTooLarge = errors.New("agent frame too large")

// maxDepth bounds JSON nesting: Message → Hello → checks → CheckInfo is 4.
const maxDepth = 4

// Encode marshals m into one frame.
func Encode(m *Message) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("encode %s: %w", m.Type, err)
	}
	payload, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", m.Type, err)
	}
	if len(payload) > MaxFrame {
		return nil, fmt.Errorf("encode %s: %w: %d bytes, at most %d", m.Type, ErrFrameTooLarge, len(payload), MaxFrame)
	}
	frame := make([]byte, headerLen+len(payload))
	binary.BigEndian.PutUint32(frame, uint32(len(payload)))
	copy(frame[headerLen:], payload)
	return frame, nil
}

// WriteMessage writes m as one frame with a single Write, so a frame is
// never interleaved with another writer's or split by this end.
func WriteMessage(w io.Writer, m *Message) error {
	frame, err := Encode(m)
	if err != nil {
		return err
	}
	_, err = w.Write(frame)
	return err
}

// FrameReader reads frames from a stream into one reused buffer, so a
// reader holds at most its bound in memory whatever the peer sends.
type FrameReader struct {
	r   io.Reader
	max int
	hdr [headerLen]byte
	buf []byte
}

// NewFrameReader reads frames of at most max bytes (0 or more than MaxFrame
// means MaxFrame).
func NewFrameReader(r io.Reader, max int) *FrameReader {
	if max <= 0 || max > MaxFrame {
		max = MaxFrame
	}
	return &FrameReader{r: r, max: max}
}

// ReadHeader reads the next frame's length. It returns io.EOF only when the
// stream ended cleanly between frames.
func (fr *FrameReader) ReadHeader() (int, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return 0, err
	}
	n := binary.BigEndian.Uint32(fr.hdr[:])
	if n == 0 {
		return 0, invalid("empty frame")
	}
	if n > uint32(fr.max) {
		return 0, fmt.Errorf("%w: %d bytes announced, at most %d", ErrFrameTooLarge, n, fr.max)
	}
	return int(n), nil
}

// ReadPayload reads the n bytes of the frame whose header ReadHeader
// returned. The slice is valid until the next call.
func (fr *FrameReader) ReadPayload(n int) ([]byte, error) {
	if cap(fr.buf) < n {
		fr.buf = make([]byte, n, max(n, min(2*cap(fr.buf), fr.max)))
	}
	b := fr.buf[:n]
	if _, err := io.ReadFull(fr.r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// Next reads one frame and decodes it strictly.
func (fr *FrameReader) Next() (*Message, error) {
	n, err := fr.ReadHeader()
	if err != nil {
		return nil, err
	}
	p, err := fr.ReadPayload(n)
	if err != nil {
		return nil, err
	}
	return Decode(p)
}

// Decode parses one frame's payload strictly: valid UTF-8, one JSON object,
// nesting at most maxDepth, keys exactly as the protocol spells them (lower
// case, no duplicates, none unknown), nothing after the object, and a
// message that passes Validate.
func Decode(payload []byte) (*Message, error) {
	if len(payload) == 0 || len(payload) > MaxFrame {
		return nil, invalid("payload of %d bytes, want 1 to %d", len(payload), MaxFrame)
	}
	if !utf8.Valid(payload) {
		return nil, invalid("payload is not UTF-8")
	}
	if err := checkShape(payload); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	var m Message
	if err := dec.Decode(&m); err != nil {
		return nil, invalid("%v", err)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// checkShape walks the JSON tokens once to reject what encoding/json would
// let through: duplicate keys (last one wins there), keys matched case-
// insensitively or by Unicode folding, deep nesting, a top level that is not
// an object, and trailing data.
func checkShape(payload []byte) error {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	type frame struct {
		object bool
		keys   map[string]bool
		key    bool // the next token in this object is a key
	}
	var stack []frame
	first := true
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			if len(stack) != 0 || first {
				return invalid("truncated JSON")
			}
			return nil
		}
		if err != nil {
			return invalid("%v", err)
		}
		if len(stack) == 0 && !first {
			return invalid("data after the message")
		}
		if first {
			if d, ok := tok.(json.Delim); !ok || d != '{' {
				return invalid("message is not a JSON object")
			}
		}
		first = false
		if n := len(stack); n > 0 && stack[n-1].object && stack[n-1].key && tok != json.Delim('}') {
			k, ok := tok.(string)
			if !ok { // the decoder guarantees a string here; keep the walk honest
				return invalid("object key is not a string")
			}
			if err := validKey(k); err != nil {
				return err
			}
			if stack[n-1].keys[k] {
				return invalid("duplicate key %q", k)
			}
			stack[n-1].keys[k] = true
			stack[n-1].key = false
			continue
		}
		// A value: after it, the enclosing object expects a key again.
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if len(stack) >= maxDepth {
				return invalid("JSON nested deeper than %d", maxDepth)
			}
			if tok == json.Delim('{') {
				stack = append(stack, frame{object: true, keys: map[string]bool{}, key: true})
			} else {
				stack = append(stack, frame{})
			}
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].key = true
		}
	}
}

// validKey admits the protocol's key alphabet only, so encoding/json's
// case-insensitive matching cannot map an odd spelling onto a field.
func validKey(k string) error {
	if k == "" || len(k) > 32 {
		return invalid("key of %d bytes", len(k))
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; !('a' <= c && c <= 'z' || c == '_') {
			return invalid("key %.32q: only a-z and _ are allowed", k)
		}
	}
	return nil
}
