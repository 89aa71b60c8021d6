package libvirt

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/libvirttest"

	"github.com/axproject/ax/ax/api"
)

// TestGoLibvirtRPC drives the driver through go-libvirt's own client over
// its mock libvirtd, which speaks libvirt's RPC protocol: the calls the
// driver makes are the protocol's, and a QMP error reply that libvirt
// passes back as a successful RPC is an error.
func TestGoLibvirtRPC(t *testing.T) {
	mock := libvirttest.New()
	l := golibvirt.NewWithDialer(mock)
	if err := l.Connect(); err != nil {
		t.Fatal(err)
	}
	drv := New(l, Config{})
	defer drv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The mock knows one running domain, "test".
	mon, err := drv.Domain(api.Guest{Name: "test"}).Control(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if err := mon.Cont(ctx); err != nil {
		t.Errorf("cont: %v", err)
	}
	mock.Fail = true
	if err := mon.Stop(ctx); err == nil || !strings.Contains(err.Error(), "CommandNotFound") {
		t.Errorf("a QMP error reply: %v", err)
	}
}

func TestDialRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Dial(ctx, Config{Socket: filepath.Join(t.TempDir(), "libvirt-sock")})
	if err == nil || !strings.Contains(err.Error(), "is libvirtd running?") {
		t.Errorf("no libvirtd: %v", err)
	}
}
