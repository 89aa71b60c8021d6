// Package libvirt is AX's hypervisor driver for domains libvirtd runs. It
// discovers what AX protects from a running domain's XML, and refuses,
// with the XML change to make, what it cannot protect.
//
// Discover (or Inspect, which also returns Nova's and AX's metadata) reads
// the XML `virsh dumpxml DOMAIN` prints for a running domain. Options says
// where qemu.conf's memory_backing_dir is, and which directories a
// domain's disks, console and agent socket may be in. A domain that cannot
// be protected gets a *Refusal. Identify reads only who a domain is and
// the level its metadata asks for, from any domain XML (a libvirt hook's).
//
// Dial (or New, over any Conn) gives a Driver, an ax/hv.Driver whose
// domains are libvirt's, named by their libvirt name:
//
//	drv, err := libvirt.Dial(ctx, libvirt.Config{Socket: "/run/libvirt/libvirt-sock"})
//	defer drv.Close()
//	found, err := drv.Discover(ctx, "instance-0000002a")
//	mon, err := drv.Domain(found.Guest).Control(ctx) // QMP through libvirt
//	events, err := drv.Events(ctx)                    // lifecycle events
//
// Control passes QMP through virDomainQemuMonitorCommand. The QEMU that
// libvirt runs thus gets the same qemu.QMP (checkpoint, failover and block
// commands) as one axd starts. StartIncoming resumes a replica in a
// paused domain whose QEMU waits for its device state; FAILOVER.md says
// why, and what libvirt 9.0 was seen to do.
package libvirt
