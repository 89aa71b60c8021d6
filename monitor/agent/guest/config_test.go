package guest

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte(`{"agent_id":"vm1","checks":[
		{"name":"ledger","kind":"tcp","address":"127.0.0.1:7000","recover":{"command":["/bin/true"]}},
		{"name":"web","kind":"http","url":"http://127.0.0.1/"},
		{"name":"fast","kind":"process","process":"sshd","interval":"1s"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.VsockCID != 2 || c.VsockPort != DefaultVsockPort || c.SerialPath != DefaultSerialPath ||
		strings.Join(c.Transports, ",") != "vsock,serial" || time.Duration(c.Heartbeat) != 5*time.Second {
		t.Errorf("transport defaults: %+v", c)
	}
	l := c.Checks[0]
	if time.Duration(l.Interval) != DefaultInterval || time.Duration(l.Timeout) != DefaultTimeout || l.Threshold != DefaultThreshold {
		t.Errorf("check defaults: %+v", l)
	}
	if time.Duration(l.Recover.Timeout) != time.Minute || time.Duration(l.Recover.MinInterval) != time.Minute {
		t.Errorf("recover defaults: %+v", l.Recover)
	}
	if c.Checks[1].ExpectStatus != 200 {
		t.Errorf("http default status %d", c.Checks[1].ExpectStatus)
	}
	if time.Duration(c.Checks[2].Timeout) != 500*time.Millisecond {
		t.Errorf("timeout of a 1 s check: %s, want half the interval", time.Duration(c.Checks[2].Timeout))
	}
	info := l.info()
	if info.Name != "ledger" || info.IntervalMS != 5000 || info.Threshold != 3 || !info.Recover {
		t.Errorf("hello info %+v", info)
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct{ name, json, want string }{
		{"unknown field", `{"checks":[],"reboot":true}`, "unknown field"},
		{"trailing data", `{"checks":[]} {}`, "after the configuration"},
		{"bad duration", `{"heartbeat":5,"checks":[]}`, "duration"},
		{"bad transport", `{"transports":["tcp"],"checks":[]}`, "unknown \"tcp\""},
		{"bad agent id", `{"agent_id":"my agent","checks":[]}`, "agent_id"},
		{"bad name", `{"checks":[{"name":"a/b","kind":"tcp","address":"x:1"}]}`, "only letters"},
		{"duplicate name", `{"checks":[{"name":"a","kind":"tcp","address":"x:1"},{"name":"a","kind":"tcp","address":"x:2"}]}`, "used twice"},
		{"unknown kind", `{"checks":[{"name":"a","kind":"ping"}]}`, "kind \"ping\""},
		{"interval too short", `{"checks":[{"name":"a","kind":"tcp","address":"x:1","interval":"10ms"}]}`, "interval"},
		{"timeout not under interval", `{"checks":[{"name":"a","kind":"tcp","address":"x:1","interval":"1s","timeout":"1s"}]}`, "timeout"},
		{"threshold too big", `{"checks":[{"name":"a","kind":"tcp","address":"x:1","threshold":1000}]}`, "threshold"},
		{"tcp without port", `{"checks":[{"name":"a","kind":"tcp","address":"localhost"}]}`, "host:port"},
		{"tcp with url", `{"checks":[{"name":"a","kind":"tcp","address":"x:1","url":"http://x/"}]}`, "only its own fields"},
		{"process both", `{"checks":[{"name":"a","kind":"process","process":"x","pidfile":"/run/x.pid"}]}`, "exactly one"},
		{"process path", `{"checks":[{"name":"a","kind":"process","process":"/usr/sbin/sshd"}]}`, "not a path"},
		{"http scheme", `{"checks":[{"name":"a","kind":"http","url":"ftp://x/"}]}`, "http://"},
		{"http status", `{"checks":[{"name":"a","kind":"http","url":"http://x/","expect_status":42}]}`, "expect_status"},
		{"command empty", `{"checks":[{"name":"a","kind":"command","command":[]}]}`, "needs command"},
		{"command exit", `{"checks":[{"name":"a","kind":"command","command":["x"],"expect_exit":300}]}`, "expect_exit"},
		{"recover without command", `{"checks":[{"name":"a","kind":"tcp","address":"x:1","recover":{}}]}`, "recover needs command"},
		{"recover as a string", `{"checks":[{"name":"a","kind":"tcp","address":"x:1","recover":"systemctl restart x"}]}`, "cannot unmarshal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tt.json))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestLoadConfigExample(t *testing.T) {
	c, err := LoadConfig(filepath.Join("..", "..", "..", "cmd", "ax-agent", "agent.example.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Checks) == 0 {
		t.Fatal("example has no checks")
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}
