package netbuffer

import (
	"encoding/binary"
	"errors"

	"github.com/axproject/ax/bpf"
)

// record is one frame ax_gate captured: struct frame_hdr, then the frame.
type record struct {
	epoch      uint64
	tstamp     uint64
	flags      uint32
	csumStart  uint16
	csumOffset uint16
	frame      []byte // aliases the ring buffer sample
}

var errMalformed = errors.New("netbuffer: malformed ring buffer record")

// decodeRecord parses a ring buffer sample written by ax_gate. The frame
// came from the guest and the offsets from the kernel: nothing is trusted.
func decodeRecord(sample []byte) (record, error) {
	if len(sample) < bpf.FrameHdrSize {
		return record{}, errMalformed
	}
	le := binary.LittleEndian
	r := record{
		epoch:      le.Uint64(sample[0:]),
		tstamp:     le.Uint64(sample[8:]),
		flags:      le.Uint32(sample[20:]),
		csumStart:  le.Uint16(sample[24:]),
		csumOffset: le.Uint16(sample[26:]),
	}
	n := le.Uint32(sample[16:])
	if n == 0 || uint64(n) != uint64(len(sample)-bpf.FrameHdrSize) {
		return record{}, errMalformed
	}
	r.frame = sample[bpf.FrameHdrSize:]
	return r, nil
}

// completeChecksum finishes the checksum the guest left to the device
// (CHECKSUM_PARTIAL: the field holds the pseudo-header sum), as a NIC or
// skb_checksum_help would: the re-injected frame reaches the stack as a
// plain frame, and nobody downstream would finish it. It reports false when
// the offsets do not fit the frame; the frame is then left as it is.
func completeChecksum(frame []byte, start, offset uint16) bool {
	s, at := int(start), int(start)+int(offset)
	if s >= len(frame) || at+2 > len(frame) {
		return false
	}
	sum := ^onesSum(frame[s:]) // fold and complement
	if sum == 0 {
		sum = 0xffff // 0 means "no checksum" to UDP
	}
	binary.BigEndian.PutUint16(frame[at:], sum)
	return true
}

// onesSum is the folded 16-bit ones' complement sum of b (RFC 1071).
func onesSum(b []byte) uint16 {
	var s uint64
	for len(b) >= 8 {
		v := binary.BigEndian.Uint64(b)
		s0 := s + v
		if s0 < s { // carry out of 64 bits wraps around
			s0++
		}
		s = s0
		b = b[8:]
	}
	s = s&0xffffffff + s>>32 // room for the tail below
	for len(b) >= 2 {
		s += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint64(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}
