// Package netbuffer holds a protected VM's network output until the FT
// checkpoint that covers it has committed on the secondary, then lets it
// out in order (output commit), with eBPF and without touching how the
// VM's tap is plugged (Linux bridge, OVS or routed).
//
// A Gate per VM attaches ax_gate (package bpf) at the tap's ingress, where
// every frame the guest sends arrives: ARP, IPv4, IPv6, anything. While the
// gate is shut the program copies each frame, with the current epoch, into
// a ring buffer and drops it; the gate's goroutine keeps the frames in
// bounded memory, in capture order. Release(n) re-injects the frames of
// epochs ≤ n with BPF_PROG_RUN of ax_release in live-frames mode
// (BPF_F_TEST_XDP_LIVE_FRAMES) on the tap's ifindex: they enter the stack
// as if the tap had received them, carrying a marker in their metadata
// that makes ax_gate let them through. A frame is never released early:
// whatever cannot be held (limits, jumbo or offloaded frames) is dropped
// and counted, and the guest's transport retransmits it.
//
// Limits of re-injection: live-frames mode takes frames up to a page less
// headroom and tailroom (with 4 KiB pages, 3408 bytes on Linux 6.18, 3368
// on 6.1), so the guest's MTU must stay below that; and offloaded
// super-frames (TSO/USO) cannot be re-injected. Start the protected guest's
// virtio-net with csum=off, which turns its offloads off, so that it
// segments and checksums itself. Frames with partial checksums are
// completed before re-injection on Linux ≥ 6.3 all the same.
//
// The FT loop drives a Gate through ft.OutputGate: NextEpoch while the
// guest is paused, Release when the secondary acknowledges a checkpoint.
//
// # Outliving the process
//
// An unpinned gate is held by its process: when that ends, however it
// ends, its tcx link closes and the guest's output flows unheld (a clsact
// filter stays, and holds everything for nobody). A gate attached with
// Config.PinDir, a directory on a bpffs (EnsureBPFFS mounts
// one at /sys/fs/bpf), fails closed instead. It is pinned there under fixed
// names:
//
//	link       the tcx link that holds ax_gate at the tap's ingress
//	ax_state   the epoch and the open flag
//	ax_frames  the ring buffer of captured frames
//	ax_drops   ax_gate's drop counters
//	meta       an array of uint64 made by this package: format version,
//	           the tap's ifindex and network namespace, release mark,
//	           largest frame, ring buffer size, frames dropped on leaving
//
// When the process ends (Leave, a crash, SIGKILL) the kernel keeps holding:
// ax_gate goes on capturing the guest's frames into the ring buffer,
// tagged with the epoch of the moment, and once the ring is full it drops
// them, counted (DropRingFull); nothing passes. Attach with the same
// PinDir in a later process adopts the gate (Gate.Adopted): it loads the
// pins, checks that they belong together and to this tap, loads
// ax_release with the pinned mark, and reads the ring buffer from where
// the last reader stopped before it returns, so the frames captured
// meanwhile are held with their epochs (and counted in Stats) and go out
// with the Release of their epoch, in order. The
// adopted gate is shut, at the pinned epoch, which NextEpoch cannot go
// back from. Pins it cannot adopt (another tap, an unknown format, pieces
// missing or not matching) fail with ErrNotAdoptable and are left as they
// are; Unpin removes them. One Gate at a time holds a pinned gate (a lock
// on PinDir that ends with its process): another fails with ErrInUse.
//
// What survives the process: the hold on the tap, the frames in the ring
// buffer, the epoch, the kernel's drop counts and those of Leave. What does
// not: the frames the process had read into its memory (after a crash they
// are not even counted; Leave counts them as DropLeft), never released, so
// the guest's transport sends them again; the process's own counters; and
// an open gate stays open if its process dies without Leave (Leave and
// adoption shut it). Nothing survives the tap: when QEMU exits and the
// tap goes, the link holds nothing and the pins are stale (Unpin them).
// Pins live in memory, so nothing survives a reboot either.
//
// Detach of a pinned gate removes it and its pins: the tap's frames pass.
//
// Pinned gates take tcx (Linux ≥ 6.6): Attach refuses PinDir with
// Config.ForceClsact, or where only clsact works. A cls_bpf filter would
// outlive its process too, but only as a black hole that no later process
// finds by name to adopt.
package netbuffer
