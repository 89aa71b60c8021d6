//go:build ignore

/*
 * ax_release re-injects held frames: user space runs it with BPF_PROG_RUN
 * in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES) with ingress_ifindex set
 * to the VM's tap, so that each frame enters the stack as if the tap had
 * received it. The marker it leaves in the frame's metadata tells ax_gate
 * (gate.c) to let the frame through.
 *
 * Setting up a live-frames run costs the kernel far more than a frame
 * (a page pool per run), so one run sends a batch: user space packs up to
 * BATCH_FRAMES frames into ax_batch (memory-mapped) and runs the program
 * with repeat = count; every repetition rewrites the packet with the next
 * frame. Repetitions beyond the batch drop, which makes a run that the
 * kernel interrupted (EINTR) and user space restarted send each frame once.
 */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define MAX_FRAME 9216			/* as in gate.c */
#define ETH_HLEN 14
#define BATCH_FRAMES 256		/* the kernel's largest live-frames batch */
#define BATCH_BYTES (512 << 10)

/* Set by user space before loading; ax_gate's copy holds the same value. */
volatile const __u32 release_mark = 0;

/* Frames that could not be rewritten or marked, hence not released. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ax_release_fail SEC(".maps");

struct batch {
	__u32 count;			/* frames in the batch (user space) */
	__u32 next;			/* the next frame to send (ax_release) */
	__u32 off[BATCH_FRAMES];	/* in bytes; at most BATCH_BYTES - MAX_FRAME */
	__u32 len[BATCH_FRAMES];
	__u8 bytes[BATCH_BYTES];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct batch);
} ax_batch SEC(".maps");

SEC("xdp")
int ax_release(struct xdp_md *ctx)
{
	struct batch *b;
	__u64 *failures;
	__u32 zero = 0, i, off, len;
	long cur, meta_len;
	void *meta, *data;

	b = bpf_map_lookup_elem(&ax_batch, &zero);
	if (!b)
		goto fail;
	i = b->next;
	if (i >= b->count || i >= BATCH_FRAMES)
		return XDP_DROP;	/* past the batch: nothing to send */
	b->next = i + 1;
	off = b->off[i];
	len = b->len[i];
	/* Bounds older verifiers can follow (len < ETH_HLEN, not len == 0). */
	if (off > BATCH_BYTES - MAX_FRAME || len < ETH_HLEN || len > MAX_FRAME)
		goto fail;

	/* Size the packet to the frame, then fill it. A recycled page keeps
	 * the previous run's length and metadata unless the kernel reset it. */
	cur = bpf_xdp_get_buff_len(ctx);
	if (bpf_xdp_adjust_tail(ctx, (int)len - (int)cur))
		goto fail;
	if (bpf_xdp_store_bytes(ctx, 0, &b->bytes[off], len))
		goto fail;

	/* Exactly four bytes of metadata: the marker. */
	meta_len = -1;
	meta = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
#pragma unroll
	for (int m = 0; m <= 32; m += 4) {
		if (meta + m == data) {
			meta_len = m;
			break;
		}
	}
	if (meta_len < 0 || bpf_xdp_adjust_meta(ctx, (int)meta_len - (int)sizeof(__u32)))
		goto fail;
	meta = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
	if (meta + sizeof(__u32) > data)
		goto fail;
	*(__u32 *)meta = release_mark;
	return XDP_PASS;
fail:
	failures = bpf_map_lookup_elem(&ax_release_fail, &zero);
	if (failures)
		__sync_fetch_and_add(failures, 1);
	return XDP_DROP;
}

/* Drops everything: user space runs it in live-frames mode to learn the
 * largest frame the kernel accepts there, without sending anything. */
SEC("xdp")
int ax_release_probe(struct xdp_md *ctx)
{
	return XDP_DROP;
}
