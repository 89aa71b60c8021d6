package daemon

import (
	"github.com/axproject/ax/ax/dirty"
	"github.com/axproject/ax/replication"
)

// diskResync decides, during a stream's initial disk sync, which parts of
// the writes and zero ranges need not go to the partner: its base is what
// the partner's replica disks held when the stream opened, one hash
// (dirty.PageHash) per replication.DiskBaseRange bytes (Sender.TakeDiskBase).
//
// The invariant: a base entry says what the replica holds in its range only
// while nothing was sent for that range on this stream. So anything sent
// that touches a range, even partly, drops the range's entry for good, and a
// later write of the old content is sent like any other. A part is skipped
// only where it covers a range wholly and its content hashes as the range's
// entry: the replica already holds exactly those bytes, and writing them
// again would change nothing — the range keeps its entry.
//
// The caller compares and queues under one lock, the one that orders writes
// on the stream (diskRepl.enqMu): a skipped write then takes its place among
// the writes sent, as if it had been sent and done.
type diskResync struct {
	base  [][]uint64 // per disk, per range
	known [][]bool   // known[d][i]: base[d][i] still says what the replica holds
	sizes []int64
}

// span is a part of a write or zero range, in disk bytes, to be sent.
type span struct{ off, n int64 }

// newDiskResync returns the comparison of writes to disks of sizes with
// base, or nil when there is no base to compare with (Dial refuses a base
// that does not fit the disks).
func newDiskResync(base [][]uint64, sizes []int64) *diskResync {
	if len(base) == 0 || len(base) != len(sizes) {
		return nil
	}
	for i, b := range base {
		if uint64(len(b)) != replication.DiskRanges(sizes[i]) {
			return nil
		}
	}
	known := make([][]bool, len(base))
	for i, b := range base {
		known[i] = make([]bool, len(b))
		for k := range known[i] {
			known[i][k] = true
		}
	}
	return &diskResync{base: base, known: known, sizes: sizes}
}

// write returns the parts of a write of p at off on disk idx to send.
func (c *diskResync) write(idx uint32, off int64, p []byte) []span {
	return c.filter(idx, off, int64(len(p)), func(lo, hi int64) uint64 { return dirty.PageHash(p[lo-off : hi-off]) })
}

// zero returns the parts of a zero range of n bytes at off on disk idx to
// send.
func (c *diskResync) zero(idx uint32, off, n int64) []span {
	return c.filter(idx, off, n, func(lo, hi int64) uint64 {
		if hi-lo == replication.DiskBaseRange {
			return zeroRangeHash
		}
		return dirty.PageHash(zeroChunk[:hi-lo]) // a disk's short last range
	})
}

// filter walks the ranges n bytes at off touch and returns the parts to
// send, merged where they follow each other; hash gives the hash of the
// new content of [lo, hi), a whole range.
func (c *diskResync) filter(idx uint32, off, n int64, hash func(lo, hi int64) uint64) []span {
	const rangeSize = replication.DiskBaseRange
	if int(idx) >= len(c.base) || n <= 0 {
		return []span{{off, n}}
	}
	base, known, end := c.base[idx], c.known[idx], off+n
	var out []span
	send := func(lo, hi int64) {
		if k := len(out) - 1; k >= 0 && out[k].off+out[k].n == lo {
			out[k].n += hi - lo
			return
		}
		out = append(out, span{lo, hi - lo})
	}
	for lo := off; lo < end; {
		i := lo / rangeSize
		if i >= int64(len(base)) { // beyond the base: nothing to compare with
			send(lo, end)
			break
		}
		first, last := i*rangeSize, min((i+1)*rangeSize, c.sizes[idx])
		hi := min(end, (i+1)*rangeSize)
		if lo == first && hi >= last && known[i] && hash(first, last) == base[i] {
			lo = hi
			continue
		}
		known[i] = false
		send(lo, hi)
		lo = hi
	}
	return out
}
