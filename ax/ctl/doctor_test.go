package ctl

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/doctor"
	"github.com/axproject/ax/ax/identity"
)

func TestDoctorFlags(t *testing.T) {
	for _, tc := range []struct {
		args string
		want string // the Config, printed; "" when the flags are bad
		json bool
		err  string
	}{
		{args: "", want: fmt.Sprint(doctor.Config{QEMU: doctor.DefaultQEMU, Identity: defaultCA()})},
		{args: "--json --qemu /opt/qemu/bin/qemu-system-x86_64", json: true,
			want: fmt.Sprint(doctor.Config{QEMU: "/opt/qemu/bin/qemu-system-x86_64", Identity: defaultCA()})},
		{args: "--peer b=10.0.1.2:7000,10.0.0.2:7001 --peer c=10.0.1.3:7000,10.0.0.3:7001 --witness-addr 10.0.0.9:7100",
			want: fmt.Sprint(doctor.Config{QEMU: doctor.DefaultQEMU, Identity: defaultCA(), WitnessAddr: "10.0.0.9:7100",
				Peers: []doctor.Peer{{Name: "b", Repl: "10.0.1.2:7000", Mgmt: "10.0.0.2:7001"}, {Name: "c", Repl: "10.0.1.3:7000", Mgmt: "10.0.0.3:7001"}}})},
		{args: "--psk-file /etc/ax/psk", want: fmt.Sprint(doctor.Config{QEMU: doctor.DefaultQEMU, Identity: defaultCA(), PSKFile: "/etc/ax/psk"})},
		{args: "--cert a.crt --key a.key --ca ca.crt",
			want: fmt.Sprint(doctor.Config{QEMU: doctor.DefaultQEMU, Identity: identity.Files{CA: "ca.crt", Cert: "a.crt", Key: "a.key"}})},
		{args: "--cert a.crt", err: "needs both --cert and --key"},
		{args: "--key a.key", err: "needs both --cert and --key"},
		{args: "--cert a.crt --key a.key --psk-file p", err: "not both"},
		{args: "--peer b=10.0.1.2:7000", err: "want NAME=REPL_HOST:PORT,MGMT_HOST:PORT"},
		{args: "--witness-addr w", err: "--witness-addr"},
		{args: "--frobnicate", err: "flag provided but not defined"},
		{args: "extra", err: `unexpected argument "extra"`},
	} {
		cfg, jsonOut, err := parseDoctor(strings.Fields(tc.args))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("doctor %s: error %v, want one with %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil || fmt.Sprint(cfg) != tc.want || jsonOut != tc.json {
			t.Errorf("doctor %s: %v, json %v, %v; want %s, json %v", tc.args, cfg, jsonOut, err, tc.want, tc.json)
		}
	}
}

func defaultCA() identity.Files {
	return identity.Files{CA: DefaultPKIDir + "/ca.crt"}
}

// Bad flags fail before anything is probed or printed.
func TestDoctorBadFlagsPrintNothing(t *testing.T) {
	var out bytes.Buffer
	if err := Doctor(context.Background(), []string{"--peer", "b"}, &out); err == nil || !strings.Contains(err.Error(), "doctor [--json]") {
		t.Errorf("error %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("printed %q", out.String())
	}
}
