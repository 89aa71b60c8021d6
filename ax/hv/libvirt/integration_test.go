package libvirt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/qemu"
)

// TestIntegrationLibvirtFailover runs AX's FT failover steps against a
// real libvirtd: discover a running domain, pause it and save its device
// state through libvirt's monitor pass-through, copy its RAM file as a
// replica, destroy it, then StartIncoming the replica, load the device
// state and resume. It needs a libvirtd of its own (it defines and
// destroys domain ax-it-failover) — set AX_LIBVIRT_SOCKET to its socket,
// and AX_LIBVIRT_RAM_DIR to its memory_backing_dir as this process sees
// it (/proc/PID/root/var/lib/libvirt/qemu/ram for a libvirtd in another
// mount namespace). The guest runs firmware only: this checks libvirt's
// side of failover, the lab checks a live guest.
func TestIntegrationLibvirtFailover(t *testing.T) {
	sock, ramDir := os.Getenv("AX_LIBVIRT_SOCKET"), os.Getenv("AX_LIBVIRT_RAM_DIR")
	if sock == "" || ramDir == "" {
		t.Skip("needs a libvirtd to itself: set AX_LIBVIRT_SOCKET and AX_LIBVIRT_RAM_DIR (see the test's comment)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	const name = "ax-it-failover"
	drv, err := Dial(ctx, Config{Socket: sock, Discover: Options{MemoryBackingDir: ramDir, Dirs: []string{dir}}})
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after the domain's cleanup, which
	// needs the connection.
	t.Cleanup(func() { drv.Close() })
	// libvirtd may be in another network namespace.
	drv.tapExists = func(string) (bool, error) { return true, nil }
	l := drv.conn.(*golibvirt.Libvirt)
	disk := filepath.Join(dir, "disk0.raw")
	if err := os.WriteFile(disk, make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	def := fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>
    <interface type='ethernet'><mac address='52:54:00:a1:b2:c3'/><target dev='axit0'/><model type='virtio'/></interface>
    <serial type='file'><source path='%s/console.log'/></serial>
    <channel type='unix'><source mode='bind' path='%s/agent.sock'/><target type='virtio' name='org.axproject.agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>`, name, disk, dir, dir)
	dom, err := l.DomainDefineXML(def)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		l.DomainDestroy(dom)
		l.DomainUndefine(dom)
	})
	events, err := drv.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g := api.Guest{Name: name, Disks: []api.Disk{{Node: "libvirt-1-format", Path: disk, Format: "raw", Plain: true}}}
	proc, err := drv.Domain(g).Start(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, name, Started)
	found, err := drv.Discover(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("discovered %+v", found.Guest)
	if found.Guest.Disks[0].Node != "libvirt-1-format" || found.Guest.Tap != "axit0" || found.Guest.RAMMiB != 64 {
		t.Errorf("discovered %+v", found.Guest)
	}
	mon, err := drv.Domain(found.Guest).Control(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := mon.Status(ctx); err != nil || st != "running" {
		t.Fatalf("status %q, %v", st, err)
	}
	if d, err := mon.NodeDriver(ctx, "libvirt-1-format"); err != nil || d != "raw" {
		t.Errorf("node driver %q, %v", d, err)
	}
	if err := mon.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, name, Paused)
	dev := filepath.Join(dir, "devstate")
	if err := mon.SaveDeviceState(ctx, dev); err != nil {
		t.Fatal(err)
	}
	mon.Close()
	replica := filepath.Join(dir, "replica.ram")
	if err := copyFile(found.Guest.RAMFile, replica); err != nil {
		t.Fatal(err)
	}
	if err := proc.Kill(); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, name, Destroyed)
	if _, err := os.Stat(found.Guest.RAMFile); !os.IsNotExist(err) {
		t.Errorf("libvirt left the RAM file of the destroyed domain: %v", err)
	}

	// A replica's tap is named by the partner's axd.
	g.RAMFile, g.Tap = replica, "axrit1"
	t0 := time.Now()
	proc, err = drv.Domain(g).StartIncoming(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	defer proc.Kill()
	mon, err = drv.Domain(g).Control(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if st, err := mon.Status(ctx); err != nil || st != "inmigrate" {
		t.Fatalf("replica status %q, %v; want inmigrate", st, err)
	}
	if err := qemu.LoadDeviceStateFile(ctx, mon, dev, filepath.Join(dir, "incoming.sock")); err != nil {
		t.Fatal(err)
	}
	if err := mon.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("replica resumed %v after StartIncoming", time.Since(t0))
	if st, err := mon.Status(ctx); err != nil || st != "running" {
		t.Fatalf("resumed replica status %q, %v", st, err)
	}
	waitEvent(t, events, name, Resumed)
	if found, err := drv.Discover(ctx, name); err != nil || found.Guest.Tap != "axrit1" {
		t.Errorf("the resumed replica's tap: %+v, %v", found, err)
	}
	st, _, err := l.DomainGetState(dom, 0)
	if err != nil || golibvirt.DomainState(st) != golibvirt.DomainRunning {
		t.Errorf("libvirt says the resumed replica is %s (%v)", stateName(golibvirt.DomainState(st)), err)
	}
	persistent, err := l.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive)
	if err != nil || strings.Contains(persistent, "-incoming") {
		t.Errorf("the domain's definition was changed by StartIncoming (%v)", err)
	}
}

func waitEvent(t *testing.T, events <-chan Event, name string, kind EventKind) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case e, ok := <-events:
			if !ok {
				t.Fatalf("event stream ended waiting for %s", kind)
			}
			t.Logf("event %+v", e)
			if e.Domain == name && e.Kind == kind {
				return
			}
		case <-timeout:
			t.Fatalf("no %s event of %s", kind, name)
		}
	}
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o600)
}
