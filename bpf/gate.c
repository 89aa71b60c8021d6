//go:build ignore

/*
 * ax_gate holds a protected guest's output: attached at tc ingress of the
 * VM's tap, it sees every frame the guest sends. While the gate is shut it
 * copies each frame, tagged with the current epoch, into a ring buffer for
 * user space and drops it; user space re-injects the frame once the
 * checkpoint covering that epoch has committed (see release.c). Re-injected
 * frames carry a marker in their metadata and pass.
 *
 * A frame that cannot be captured is dropped and counted, never passed: the
 * guest's TCP retransmits it, which is correct, whereas a frame let out
 * early would break fault tolerance.
 */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual MIT/GPL";

/* The largest frame the program can copy; jumbo frames fit. */
#define MAX_FRAME 9216
#define ETH_HLEN 14

/* Set by user space before loading. */
volatile const __u32 release_mark = 0;		/* metadata of re-injected frames */
volatile const __u32 max_frame = MAX_FRAME;	/* the largest frame user space can re-inject */

enum drop_reason {
	DROP_RING_FULL = 0,	/* the ring buffer was full: user space fell behind */
	DROP_TOO_BIG,		/* longer than max_frame */
	DROP_GSO,		/* a GSO super-frame: the guest uses segmentation offload */
	DROP_COPY,		/* the frame could not be copied */
	DROP_REASONS,
};

enum frame_flag {
	/* The L4 checksum is left to the device (CHECKSUM_PARTIAL): user space
	 * completes it at csum_start + csum_offset. */
	FRAME_CSUM_PARTIAL = 1,
};

struct frame_hdr {
	__u64 epoch;		/* the epoch the frame belongs to */
	__u64 tstamp;		/* capture time, CLOCK_MONOTONIC ns */
	__u32 len;		/* frame length; the frame follows the header */
	enum frame_flag flags;
	__u16 csum_start;	/* from the frame's first byte */
	__u16 csum_offset;	/* from csum_start */
	__u32 _pad;
};

struct frame {
	struct frame_hdr hdr;
	__u8 data[MAX_FRAME];
};

struct gate_state {
	__u64 epoch;	/* tags captured frames */
	__u32 open;	/* non-zero: pass everything */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);	/* user space may resize before loading */
} ax_frames SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gate_state);
} ax_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, enum drop_reason);
	__type(value, __u64);
} ax_drops SEC(".maps");

/* The frame is assembled here, then copied into the ring buffer with its
 * real length: reserving MAX_FRAME per frame would waste the ring. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct frame);
} ax_scratch SEC(".maps");


/* The kernel's sk_buff, for the checksum state tc cannot see otherwise
 * (CO-RE: offsets are taken from the running kernel). */
struct sk_buff___ax {
	__u16 csum_start;
	__u16 csum_offset;
	__u16 mac_header;
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

#define CHECKSUM_PARTIAL 3

/* Linux ≥ 6.3; without it frames with partial checksums go out as they are. */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

static __always_inline int drop(enum drop_reason reason)
{
	__u32 key = reason;
	__u64 *n = bpf_map_lookup_elem(&ax_drops, &key);

	if (n)
		*n += 1;	/* per CPU: no atomics needed */
	return TC_ACT_SHOT;
}

SEC("tc")
int ax_gate(struct __sk_buff *skb)
{
	void *meta = (void *)(long)skb->data_meta;
	void *data = (void *)(long)skb->data;
	struct gate_state *st;
	struct frame *f;
	__u32 zero = 0;
	__u32 len;

	/* Released by user space: let it through (and on to any later program). */
	if (meta + sizeof(__u32) <= data && *(__u32 *)meta == release_mark)
		return TC_ACT_UNSPEC;

	st = bpf_map_lookup_elem(&ax_state, &zero);
	if (!st)
		return drop(DROP_COPY);
	if (st->open)
		return TC_ACT_UNSPEC;

	if (skb->gso_size)
		return drop(DROP_GSO);
	len = skb->len;
	if (len > max_frame || len > MAX_FRAME)
		return drop(DROP_TOO_BIG);
	if (len < ETH_HLEN)	/* a lower bound older verifiers can follow */
		return drop(DROP_COPY);

	f = bpf_map_lookup_elem(&ax_scratch, &zero);
	if (!f)
		return drop(DROP_COPY);
	f->hdr.epoch = st->epoch;
	f->hdr.tstamp = bpf_ktime_get_ns();
	f->hdr.len = len;
	f->hdr.flags = 0;
	f->hdr.csum_start = 0;
	f->hdr.csum_offset = 0;
	f->hdr._pad = 0;
	if (&bpf_cast_to_kern_ctx != 0) {
		struct sk_buff___ax *k = bpf_cast_to_kern_ctx(skb);

		if (BPF_CORE_READ_BITFIELD(k, ip_summed) == CHECKSUM_PARTIAL) {
			/* tc runs with skb->data at the MAC header. */
			f->hdr.flags = FRAME_CSUM_PARTIAL;
			f->hdr.csum_start = k->csum_start - k->mac_header;
			f->hdr.csum_offset = k->csum_offset;
		}
	}
	if (bpf_skb_load_bytes(skb, 0, f->data, len))
		return drop(DROP_COPY);
	if (bpf_ringbuf_output(&ax_frames, f, sizeof(f->hdr) + len, 0))
		return drop(DROP_RING_FULL);
	return TC_ACT_SHOT;
}
