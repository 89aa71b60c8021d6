package guest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/axproject/ax/monitor/agent"
)

// Transport defaults. The host's axd listens on vsock port DefaultVsockPort;
// the lab's QEMU (and a libvirt <channel type='unix'> with this name) gives
// the guest the virtio-serial port at DefaultSerialPath.
const (
	DefaultVsockCID   = 2 // VMADDR_CID_HOST
	DefaultVsockPort  = 7410
	DefaultSerialPath = "/dev/virtio-ports/org.axproject.agent.0"
	DefaultConfigPath = "/etc/ax/agent.json"
)

// Transport names for Config.Transports.
const (
	TransportVsock  = "vsock"
	TransportSerial = "serial"
)

// Check defaults and bounds.
const (
	DefaultInterval    = 5 * time.Second
	DefaultTimeout     = 2 * time.Second
	DefaultThreshold   = 3
	DefaultRecoverWait = time.Minute
	MinInterval        = 100 * time.Millisecond
)

// Duration is a time.Duration written as in Go ("5s", "250ms").
type Duration time.Duration

// UnmarshalJSON reads "5s"-style strings only.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"5s\", got %s", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the Go form.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// Config is the agent's configuration file (JSON). Everything the agent may
// run is in here: the host can only name a check to recover.
type Config struct {
	// AgentID names the agent to the host (default: the hostname).
	AgentID string `json:"agent_id,omitempty"`
	// Transports are tried in order on each connection attempt (default
	// vsock, then serial).
	Transports []string `json:"transports,omitempty"`
	VsockCID   uint32   `json:"vsock_cid,omitempty"`   // default 2, the host
	VsockPort  uint32   `json:"vsock_port,omitempty"`  // default DefaultVsockPort
	SerialPath string   `json:"serial_path,omitempty"` // default DefaultSerialPath; a unix socket path also works
	// Heartbeat is how often the agent says it is alive (default 5 s); with
	// no ack from the host for three heartbeats it reconnects.
	Heartbeat Duration `json:"heartbeat,omitempty"`
	// MaxBackoff caps the wait between connection attempts (default 5 s).
	MaxBackoff Duration `json:"max_backoff,omitempty"`
	Checks     []Check  `json:"checks"`
}

// Check is one health check of an application.
type Check struct {
	Name string `json:"name"`
	Kind string `json:"kind"` // process, tcp, http, command

	// process: alive by name (matches /proc/PID/comm or argv[0]'s base
	// name) or by pidfile.
	Process string `json:"process,omitempty"`
	Pidfile string `json:"pidfile,omitempty"`
	// tcp: host:port to connect to.
	Address string `json:"address,omitempty"`
	// http: URL to GET and the status expected (default 200).
	URL          string `json:"url,omitempty"`
	ExpectStatus int    `json:"expect_status,omitempty"`
	// command: argv run without a shell; healthy when it exits ExpectExit.
	Command    []string `json:"command,omitempty"`
	ExpectExit int      `json:"expect_exit,omitempty"`

	Interval  Duration `json:"interval,omitempty"`  // default 5 s, at least 100 ms
	Timeout   Duration `json:"timeout,omitempty"`   // default 2 s, less than Interval
	Threshold int      `json:"threshold,omitempty"` // consecutive failures that make the application failed (default 3)

	// Recover is the action run when the host asks to recover this check;
	// without it, recover requests are refused.
	Recover *Recovery `json:"recover,omitempty"`
}

// Recovery is a check's recovery action.
type Recovery struct {
	Command []string `json:"command"`           // argv run without a shell
	Timeout Duration `json:"timeout,omitempty"` // default 60 s
	// MinInterval is the least time between two runs, whatever the host
	// asks (default 60 s).
	MinInterval Duration `json:"min_interval,omitempty"`
}

// LoadConfig reads and validates a configuration file.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("agent config %s: %w", path, err)
	}
	return c, nil
}

// ParseConfig decodes a configuration strictly (unknown fields are errors),
// fills defaults and validates it.
func ParseConfig(b []byte) (*Config, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("data after the configuration object")
	}
	if err := c.setDefaults(); err != nil {
		return nil, err
	}
	return &c, c.Validate()
}

func (c *Config) setDefaults() error {
	if c.AgentID == "" {
		h, err := os.Hostname()
		if err != nil || agent.ValidName(h) != nil {
			h = "ax-agent"
		}
		c.AgentID = h
	}
	if len(c.Transports) == 0 {
		c.Transports = []string{TransportVsock, TransportSerial}
	}
	if c.VsockCID == 0 {
		c.VsockCID = DefaultVsockCID
	}
	if c.VsockPort == 0 {
		c.VsockPort = DefaultVsockPort
	}
	if c.SerialPath == "" {
		c.SerialPath = DefaultSerialPath
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = Duration(5 * time.Second)
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = Duration(5 * time.Second)
	}
	for i := range c.Checks {
		ch := &c.Checks[i]
		if ch.Interval == 0 {
			ch.Interval = Duration(DefaultInterval)
		}
		if ch.Timeout == 0 {
			ch.Timeout = Duration(min(DefaultTimeout, time.Duration(ch.Interval)/2))
		}
		if ch.Threshold == 0 {
			ch.Threshold = DefaultThreshold
		}
		if ch.Kind == agent.KindHTTP && ch.ExpectStatus == 0 {
			ch.ExpectStatus = 200
		}
		if r := ch.Recover; r != nil {
			if r.Timeout == 0 {
				r.Timeout = Duration(DefaultRecoverWait)
			}
			if r.MinInterval == 0 {
				r.MinInterval = Duration(DefaultRecoverWait)
			}
		}
	}
	return nil
}

// Validate says what is wrong with the configuration, one problem at a time.
func (c *Config) Validate() error {
	if err := agent.ValidName(c.AgentID); err != nil {
		return fmt.Errorf("agent_id: %w", err)
	}
	for _, t := range c.Transports {
		if t != TransportVsock && t != TransportSerial {
			return fmt.Errorf("transports: unknown %q (want vsock or serial)", t)
		}
	}
	if time.Duration(c.Heartbeat) < 100*time.Millisecond {
		return fmt.Errorf("heartbeat %s: at least 100ms", time.Duration(c.Heartbeat))
	}
	if time.Duration(c.MaxBackoff) < 10*time.Millisecond {
		return fmt.Errorf("max_backoff %s: at least 10ms", time.Duration(c.MaxBackoff))
	}
	if len(c.Checks) > agent.MaxChecks {
		return fmt.Errorf("%d checks: at most %d", len(c.Checks), agent.MaxChecks)
	}
	seen := map[string]bool{}
	for i := range c.Checks {
		ch := &c.Checks[i]
		if err := ch.validate(); err != nil {
			return fmt.Errorf("check %d (%q): %w", i+1, ch.Name, err)
		}
		if seen[ch.Name] {
			return fmt.Errorf("check %q: name used twice", ch.Name)
		}
		seen[ch.Name] = true
	}
	return nil
}

func (ch *Check) validate() error {
	if err := agent.ValidName(ch.Name); err != nil {
		return err
	}
	iv, to := time.Duration(ch.Interval), time.Duration(ch.Timeout)
	if iv < MinInterval || iv > 24*time.Hour {
		return fmt.Errorf("interval %s: want %s to 24h", iv, MinInterval)
	}
	if to <= 0 || to >= iv {
		return fmt.Errorf("timeout %s: want more than 0 and less than the interval %s", to, iv)
	}
	if ch.Threshold < 1 || ch.Threshold > agent.MaxThreshold {
		return fmt.Errorf("threshold %d: want 1 to %d", ch.Threshold, agent.MaxThreshold)
	}
	only := func(kind string, set ...bool) error {
		for _, s := range set {
			if s {
				return fmt.Errorf("a %s check takes only its own fields (see the documentation of Check)", kind)
			}
		}
		return nil
	}
	switch ch.Kind {
	case agent.KindProcess:
		if (ch.Process == "") == (ch.Pidfile == "") {
			return errors.New("a process check needs exactly one of process or pidfile")
		}
		if strings.Contains(ch.Process, "/") {
			return fmt.Errorf("process %q: give the name, not a path", ch.Process)
		}
		if err := only("process", ch.Address != "", ch.URL != "", ch.Command != nil, ch.ExpectStatus != 0, ch.ExpectExit != 0); err != nil {
			return err
		}
	case agent.KindTCP:
		if _, _, err := net.SplitHostPort(ch.Address); err != nil {
			return fmt.Errorf("address %q: %w (want host:port)", ch.Address, err)
		}
		if err := only("tcp", ch.Process != "", ch.Pidfile != "", ch.URL != "", ch.Command != nil, ch.ExpectStatus != 0, ch.ExpectExit != 0); err != nil {
			return err
		}
	case agent.KindHTTP:
		u, err := url.Parse(ch.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("url %q: want an http:// or https:// URL", ch.URL)
		}
		if ch.ExpectStatus < 100 || ch.ExpectStatus > 599 {
			return fmt.Errorf("expect_status %d: want 100 to 599", ch.ExpectStatus)
		}
		if err := only("http", ch.Process != "", ch.Pidfile != "", ch.Address != "", ch.Command != nil, ch.ExpectExit != 0); err != nil {
			return err
		}
	case agent.KindCommand:
		if len(ch.Command) == 0 || ch.Command[0] == "" {
			return errors.New("a command check needs command: [\"/path/to/program\", \"arg\", …]")
		}
		if ch.ExpectExit < 0 || ch.ExpectExit > 255 {
			return fmt.Errorf("expect_exit %d: want 0 to 255", ch.ExpectExit)
		}
		if err := only("command", ch.Process != "", ch.Pidfile != "", ch.Address != "", ch.URL != "", ch.ExpectStatus != 0); err != nil {
			return err
		}
	default:
		return fmt.Errorf("kind %q: want process, tcp, http or command", ch.Kind)
	}
	if r := ch.Recover; r != nil {
		if len(r.Command) == 0 || r.Command[0] == "" {
			return errors.New("recover needs command: [\"/path/to/program\", \"arg\", …]")
		}
		if time.Duration(r.Timeout) <= 0 || time.Duration(r.MinInterval) < 0 {
			return errors.New("recover: timeout must be positive and min_interval not negative")
		}
	}
	return nil
}

// info is what the hello tells the host about the check.
func (ch *Check) info() agent.CheckInfo {
	return agent.CheckInfo{Name: ch.Name, Kind: ch.Kind, IntervalMS: time.Duration(ch.Interval).Milliseconds(),
		Threshold: ch.Threshold, Recover: ch.Recover != nil}
}
