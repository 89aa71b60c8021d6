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
package netbuffer
