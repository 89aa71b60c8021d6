package agent

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Version is the protocol version this package speaks.
const Version = 1

// Protocol bounds. Both ends enforce them; the host may lower the per-VM
// ones further (Limits).
const (
	MaxFrame     = 64 << 10 // bytes of JSON in one frame
	MaxChecks    = 64       // checks in one hello
	MaxDetail    = 256      // bytes of a report's or recovery's detail
	MaxNameLen   = 64       // bytes of a check name or agent id
	MaxThreshold = 100      // a check's failure threshold
)

// Message types.
const (
	TypeHello     = "hello"     // agent → host, first message of a connection
	TypeReport    = "report"    // agent → host, one check's result
	TypeHeartbeat = "heartbeat" // agent → host, "still here"
	TypeRecovery  = "recovery"  // agent → host, outcome of a recover request
	TypeAck       = "ack"       // host → agent, acknowledges hello and heartbeats
	TypeRecover   = "recover"   // host → agent, "run your recovery action for this check"
)

// Check kinds an agent may declare.
const (
	KindProcess = "process"
	KindTCP     = "tcp"
	KindHTTP    = "http"
	KindCommand = "command"
)

// Report states.
const (
	StateOK   = "ok"
	StateFail = "fail"
)

// Message is one frame's JSON: its type and exactly the body of that type.
type Message struct {
	Type      string     `json:"type"`
	Hello     *Hello     `json:"hello,omitempty"`
	Report    *Report    `json:"report,omitempty"`
	Heartbeat *Heartbeat `json:"heartbeat,omitempty"`
	Recovery  *Recovery  `json:"recovery,omitempty"`
	Ack       *Ack       `json:"ack,omitempty"`
	Recover   *Recover   `json:"recover,omitempty"`
}

// Hello opens a connection: who the agent is and which checks it runs.
// Seq numbers every agent message of a connection, from 1, increasing.
type Hello struct {
	Version int         `json:"version"`
	AgentID string      `json:"agent_id"`
	Seq     uint64      `json:"seq"`
	Checks  []CheckInfo `json:"checks"`
}

// CheckInfo describes one check the agent runs.
type CheckInfo struct {
	Name       string `json:"name"`
	Kind       string `json:"kind"`
	IntervalMS int64  `json:"interval_ms"`
	// Threshold is how many consecutive failed results make the
	// application failed (the host clamps it to its own bounds).
	Threshold int `json:"threshold"`
	// Recover says the guest has a recovery action configured for the check.
	Recover bool `json:"recover"`
}

// Report is the result of one run of a check.
type Report struct {
	Seq    uint64 `json:"seq"`
	Check  string `json:"check"`
	State  string `json:"state"` // StateOK or StateFail
	Detail string `json:"detail,omitempty"`
	Time   int64  `json:"time"` // guest clock, Unix milliseconds; informational
}

// Heartbeat says the agent is alive; the host acks it.
type Heartbeat struct {
	Seq  uint64 `json:"seq"`
	Time int64  `json:"time"`
}

// Recovery is the outcome of a recovery action the host asked for.
type Recovery struct {
	Seq    uint64 `json:"seq"`
	Check  string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// Ack acknowledges the agent message numbered Seq.
type Ack struct {
	Seq uint64 `json:"seq"`
}

// Recover asks the agent to run the recovery action it has configured for
// Check. It carries no command: the guest decides what recovery means.
type Recover struct {
	Check string `json:"check"`
}

// ErrInvalid is wrapped by every validation and decoding failure.
var ErrInvalid = errors.New("invalid agent message")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Seq returns the sequence number of an agent→host message (0 for others).
func (m *Message) Seq() uint64 {
	switch m.Type {
	case TypeHello:
		return m.Hello.Seq
	case TypeReport:
		return m.Report.Seq
	case TypeHeartbeat:
		return m.Heartbeat.Seq
	case TypeRecovery:
		return m.Recovery.Seq
	}
	return 0
}

// FromAgent reports whether the message type travels from agent to host.
func (m *Message) FromAgent() bool {
	switch m.Type {
	case TypeHello, TypeReport, TypeHeartbeat, TypeRecovery:
		return true
	}
	return false
}

// Validate checks that the message has exactly the body its type names and
// that every field is within the protocol's bounds.
func (m *Message) Validate() error {
	bodies := 0
	for _, set := range []bool{m.Hello != nil, m.Report != nil, m.Heartbeat != nil,
		m.Recovery != nil, m.Ack != nil, m.Recover != nil} {
		if set {
			bodies++
		}
	}
	if bodies != 1 {
		return invalid("message of type %q has %d bodies, want 1", m.Type, bodies)
	}
	switch m.Type {
	case TypeHello:
		if m.Hello == nil {
			break
		}
		return m.Hello.validate()
	case TypeReport:
		if m.Report == nil {
			break
		}
		return m.Report.validate()
	case TypeHeartbeat:
		if m.Heartbeat == nil {
			break
		}
		return validSeq(m.Heartbeat.Seq)
	case TypeRecovery:
		if m.Recovery == nil {
			break
		}
		if err := validSeq(m.Recovery.Seq); err != nil {
			return err
		}
		if err := ValidName(m.Recovery.Check); err != nil {
			return err
		}
		return validDetail(m.Recovery.Detail)
	case TypeAck:
		if m.Ack == nil {
			break
		}
		return validSeq(m.Ack.Seq)
	case TypeRecover:
		if m.Recover == nil {
			break
		}
		return ValidName(m.Recover.Check)
	default:
		return invalid("unknown message type %.32q", m.Type)
	}
	return invalid("message of type %q lacks its body", m.Type)
}

func (h *Hello) validate() error {
	if h.Version != Version {
		return invalid("protocol version %d, want %d", h.Version, Version)
	}
	if err := validSeq(h.Seq); err != nil {
		return err
	}
	if err := ValidName(h.AgentID); err != nil {
		return fmt.Errorf("agent id: %w", err)
	}
	if len(h.Checks) > MaxChecks {
		return invalid("%d checks, at most %d", len(h.Checks), MaxChecks)
	}
	seen := make(map[string]bool, len(h.Checks))
	for _, c := range h.Checks {
		if err := ValidName(c.Name); err != nil {
			return fmt.Errorf("check: %w", err)
		}
		if seen[c.Name] {
			return invalid("check %q declared twice", c.Name)
		}
		seen[c.Name] = true
		switch c.Kind {
		case KindProcess, KindTCP, KindHTTP, KindCommand:
		default:
			return invalid("check %q: unknown kind %.32q", c.Name, c.Kind)
		}
		if c.IntervalMS < 100 || c.IntervalMS > 24*3600*1000 {
			return invalid("check %q: interval %d ms out of range [100 ms, 24 h]", c.Name, c.IntervalMS)
		}
		if c.Threshold < 1 || c.Threshold > MaxThreshold {
			return invalid("check %q: threshold %d out of range [1, %d]", c.Name, c.Threshold, MaxThreshold)
		}
	}
	return nil
}

func (r *Report) validate() error {
	if err := validSeq(r.Seq); err != nil {
		return err
	}
	if err := ValidName(r.Check); err != nil {
		return err
	}
	if r.State != StateOK && r.State != StateFail {
		return invalid("check %q: state %.16q, want ok or fail", r.Check, r.State)
	}
	return validDetail(r.Detail)
}

func validSeq(seq uint64) error {
	if seq == 0 {
		return invalid("sequence number 0")
	}
	return nil
}

// ValidName checks a check name or agent id: 1 to MaxNameLen bytes of
// letters, digits, '.', '_', '-' and ':', so names are safe as metric label
// values, in logs and in file names.
func ValidName(s string) error {
	if s == "" || len(s) > MaxNameLen {
		return invalid("name of %d bytes, want 1 to %d", len(s), MaxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '.' || c == '_' || c == '-' || c == ':') {
			return invalid("name %.64q: only letters, digits and . _ - : are allowed", s)
		}
	}
	return nil
}

func validDetail(s string) error {
	if len(s) > MaxDetail {
		return invalid("detail of %d bytes, at most %d", len(s), MaxDetail)
	}
	if !utf8.ValidString(s) {
		return invalid("detail is not UTF-8")
	}
	for _, r := range s {
		if r < 0x20 && r != '\t' || r == 0x7f {
			return invalid("detail holds control character %U", r)
		}
	}
	return nil
}

// CleanDetail makes free text a valid detail: control characters become
// spaces, invalid UTF-8 is replaced, and it is cut to MaxDetail bytes on a
// character boundary. The agent uses it on command output and errors.
func CleanDetail(s string) string {
	out := make([]rune, 0, min(len(s), MaxDetail))
	n := 0
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			r = ' '
		}
		l := utf8.RuneLen(r) // invalid bytes arrive as RuneError, 3 bytes
		if n+l > MaxDetail {
			break
		}
		out = append(out, r)
		n += l
	}
	return strings.TrimSpace(string(out))
}
