package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/hv/libvirt"
	"github.com/axproject/ax/ax/names"
)

// FuzzHookInput: whatever libvirt (or anyone running the hook) passes as
// arguments and stdin, the hook hands axd only an event with a valid
// domain name, a known operation and a bounded XML, or refuses it; what
// axd then reads of the XML (libvirt.Identify) refuses or names a valid
// domain. Nothing panics. Run it with
//
//	go test -run NONE -fuzz FuzzHookInput -fuzztime 30s ./nova-hook
func FuzzHookInput(f *testing.F) {
	f.Add("instance-0000002a", "started", "begin", "-", novaXML(f))
	f.Add("instance-0000002a", "stopped", "end", "-", "<domain type='kvm'><name>instance-0000002a</name></domain>")
	f.Add("web", "migrate", "begin", "-", "<domain><name>web</name><metadata><ax:level xmlns:ax='"+libvirt.AXNamespace+"' peer='b'>ha</ax:level></metadata></domain>")
	f.Add("../x", "started", "begin", "-", "<domain")
	f.Add("web", "explode", "", "", "")
	f.Fuzz(func(t *testing.T, domain, op, sub, extra, xml string) {
		ev, err := readEvent(context.Background(), []string{domain, op, sub, extra}, strings.NewReader(xml), time.Unix(0, 0))
		if err != nil {
			return
		}
		if names.Check("vm", ev.Domain) != nil || !api.KnownHookOperation(ev.Operation) || len(ev.XML) > api.MaxHookXML || ev.XML != xml {
			t.Fatalf("handed on %+v", ev)
		}
		id, err := libvirt.Identify([]byte(ev.XML))
		if err != nil {
			return
		}
		if names.Check("vm", id.Name) != nil {
			t.Fatalf("identified a domain named %q", id.Name)
		}
	})
}
