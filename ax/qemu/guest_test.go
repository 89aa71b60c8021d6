package qemu

import (
	"reflect"
	"strings"
	"testing"

	"github.com/axproject/ax/ax/api"
)

// fullGuest sets every field of an api.Guest.
func fullGuest() api.Guest {
	return api.Guest{
		Name: "vm1", RAMMiB: 256, VCPUs: 2, RAMFile: "/dev/shm/x.ram", Console: "/c", Agent: "/a",
		Tap: "tap0", MAC: "52:54:00:00:00:01",
		Boot:     api.Boot{Kernel: "/k", Initrd: "/i", Append: "console=ttyS0"},
		QEMU:     api.QEMU{QMP: "/q", PIDFile: "/p", Accel: "tcg"},
		VsockCID: 1001,
		Disks: []api.Disk{
			{Node: "disk0", Path: "/d0.raw", Format: "raw"},
			{Node: "disk1", Path: "/d1.qcow2", Format: "qcow2", Plain: true},
		},
	}
}

// TestGuestForCarriesEveryField: every field QEMU is started with comes
// from the spec's guest, by the same name; only Incoming is the launcher's
// own.
func TestGuestForCarriesEveryField(t *testing.T) {
	g := fullGuest()
	q := GuestFor(g)
	qv, gv := reflect.ValueOf(q), reflect.ValueOf(g)
	for i := 0; i < qv.NumField(); i++ {
		name := qv.Type().Field(i).Name
		if name == "Incoming" {
			if q.Incoming {
				t.Error("GuestFor starts a replica; it should boot")
			}
			continue
		}
		from := gv.FieldByName(name)
		if !from.IsValid() {
			t.Errorf("qemu.Guest.%s has no api.Guest field of its name", name)
			continue
		}
		if qv.Field(i).IsZero() || !reflect.DeepEqual(qv.Field(i).Interface(), from.Interface()) {
			t.Errorf("%s: GuestFor gives %v, the spec has %v", name, qv.Field(i), from)
		}
	}
	q.Disks[0].Path = "/elsewhere"
	if g.Disks[0].Path != "/d0.raw" {
		t.Error("changing the launcher's disks changed the spec's")
	}
}

func TestArgs(t *testing.T) {
	boot := GuestFor(fullGuest())
	replica := boot
	replica.Incoming = true
	one := boot
	one.VCPUs = 0
	cases := []struct {
		name      string
		g         Guest
		want, not []string
	}{
		{"boot", boot, []string{
			"memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/x.ram,share=on",
			"-machine pc,accel=tcg,memory-backend=mem0 ",
			"-qmp unix:/q,server=on,wait=off",
			"tap,id=net0,ifname=tap0,script=no,downscript=no",
			"name=" + AgentPortName,
			"-kernel /k -initrd /i -append console=ttyS0",
			"-pidfile /p",
			"-smp 2 ",
			"vhost-vsock-pci,guest-cid=1001",
			// disk0 behind a quorum node, disk1 plain.
			"driver=quorum,node-name=disk0,vote-threshold=1,read-pattern=fifo,children.0=disk0-fmt",
			"virtio-blk-pci,drive=disk0,id=vd0",
			"driver=qcow2,node-name=disk1,file=disk1-file",
			"virtio-blk-pci,drive=disk1,id=vd1",
		}, []string{"-incoming", "-cpu host", "node-name=disk1-fmt"}},
		{"vCPUs not given", one, []string{"-smp 1 "}, nil},
		{"replica", replica, []string{
			"pc,accel=tcg,memory-backend=mem0,suppress-vmdesc=on",
			"-incoming defer -global migration.send-configuration=off",
		}, nil},
	}
	for _, c := range cases {
		args := strings.Join(c.g.Args(), " ")
		for _, w := range c.want {
			if !strings.Contains(args, w) {
				t.Errorf("%s: args lack %q:\n%s", c.name, w, args)
			}
		}
		for _, n := range c.not {
			if strings.Contains(args, n) {
				t.Errorf("%s: args have %q:\n%s", c.name, n, args)
			}
		}
	}
}
