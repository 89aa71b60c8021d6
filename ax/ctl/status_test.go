package ctl

import (
	"strings"
	"testing"

	"github.com/axproject/ax/ax/api"
)

// axctl status says which VMs run below their declared level, for how
// long, and alarms; a protected VM gets no such line.
func TestStatusShowsDeclaredLevelGaps(t *testing.T) {
	st := &api.Status{Host: "b", VMs: []api.VMStatus{
		{Name: "vm1", Level: api.LevelNone, Role: api.RoleLocal, State: "running", Declared: api.LevelFT, DeclaredPeer: "a", UnprotectedS: 12.34},
		{Name: "vm2", Level: api.LevelHA, Role: api.RolePrimary, State: "protected", Declared: api.LevelHA, DeclaredPeer: "a"},
		{Name: "vm3", Level: api.LevelFT, Role: api.RolePrimary, State: "unprotected", Declared: api.LevelFT, DeclaredPeer: "a",
			UnprotectedS: 2, Alarm: "replication link down"},
	}}
	var out strings.Builder
	printStatus(&out, st)
	text := out.String()
	for _, want := range []string{
		"UNPROTECTED vm1: declared ft, not protected for 12.3 s; axd protects it again by itself when a (or another partner) can take the replica",
		"ALARM vm3: replication link down",
		"UNPROTECTED vm3: declared ft, not protected for 2.0 s",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "UNPROTECTED vm2") {
		t.Errorf("a protected VM shown unprotected:\n%s", text)
	}
}
