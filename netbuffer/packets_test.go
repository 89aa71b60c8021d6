package netbuffer_test

import (
	"encoding/binary"
	"net"
	"testing"
)

var (
	guestIP4 = net.IPv4(10, 7, 0, 1).To4()
	peerIP4  = net.IPv4(10, 7, 0, 2).To4()
	guestIP6 = net.ParseIP("fd00:a7::1")
	peerIP6  = net.ParseIP("fd00:a7::2")
)

func arpRequest() []byte {
	f := ethHeader(broadcast, 0x0806)
	f = binary.BigEndian.AppendUint16(f, 1)      // Ethernet
	f = binary.BigEndian.AppendUint16(f, 0x0800) // IPv4
	f = append(f, 6, 4)
	f = binary.BigEndian.AppendUint16(f, 1) // request
	f = append(f, guestMAC...)
	f = append(f, guestIP4...)
	f = append(f, make([]byte, 6)...)
	f = append(f, peerIP4...)
	return padded(f, 60)
}

func ipv4Header(proto byte, payloadLen int) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+payloadLen))
	h[8] = 64
	h[9] = proto
	copy(h[12:], guestIP4)
	copy(h[16:], peerIP4)
	binary.BigEndian.PutUint16(h[10:], ^sum16(h, 0))
	return h
}

// udp4 is a UDP datagram to the peer with a valid checksum.
func udp4(dst net.HardwareAddr, payload []byte) []byte {
	f := append(ethHeader(dst, 0x0800), ipv4Header(17, 8+len(payload))...)
	u := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:], 40000)
	binary.BigEndian.PutUint16(u[2:], 40001)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	u = append(u, payload...)
	f = append(f, u...)
	binary.BigEndian.PutUint16(f[14+20+6:], ^sum16(f[14+20:], uint32(pseudoHeaderSum4(f))))
	return f
}

// tcp4 is a TCP segment to the peer (its checksum is left to offload).
func tcp4(dst net.HardwareAddr, payload []byte) []byte {
	f := append(ethHeader(dst, 0x0800), ipv4Header(6, 20+len(payload))...)
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], 40000)
	binary.BigEndian.PutUint16(h[2:], 40001)
	h[12] = 5 << 4
	h[13] = 0x18 // PSH, ACK
	binary.BigEndian.PutUint16(h[14:], 65535)
	f = append(append(f, h...), payload...)
	binary.BigEndian.PutUint16(f[14+20+16:], pseudoHeaderSum4(f))
	return f
}

// pseudoHeaderSum4 is the folded sum of an IPv4 frame's pseudo-header.
func pseudoHeaderSum4(f []byte) uint16 {
	ip := f[14:]
	l4len := int(binary.BigEndian.Uint16(ip[2:])) - 20
	var p []byte
	p = append(p, ip[12:20]...)
	p = append(p, 0, ip[9])
	p = binary.BigEndian.AppendUint16(p, uint16(l4len))
	return sum16(p, 0)
}

func udp4ChecksumOK(f []byte) bool {
	if len(f) < 14+20+8 || binary.BigEndian.Uint16(f[12:]) != 0x0800 || f[14+9] != 17 {
		return false
	}
	l4 := f[14+20 : 14+int(binary.BigEndian.Uint16(f[16:]))]
	return sum16(l4, uint32(pseudoHeaderSum4(f))) == 0xffff
}

func udp6(dst net.HardwareAddr, payload []byte) []byte {
	f := ethHeader(dst, 0x86dd)
	h := make([]byte, 40)
	h[0] = 6 << 4
	binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
	h[6] = 17
	h[7] = 64
	copy(h[8:], guestIP6)
	copy(h[24:], peerIP6)
	u := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:], 40000)
	binary.BigEndian.PutUint16(u[2:], 40001)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	u = append(u, payload...)
	var p []byte
	p = append(p, h[8:40]...)
	p = binary.BigEndian.AppendUint32(p, uint32(len(u)))
	p = append(p, 0, 0, 0, 17)
	binary.BigEndian.PutUint16(u[6:], ^sum16(u, uint32(sum16(p, 0))))
	return append(append(f, h...), u...)
}

// vlanTagged inserts an 802.1Q tag (VLAN 7) after the MAC addresses.
func vlanTagged(f []byte) []byte {
	out := append([]byte{}, f[:12]...)
	out = append(out, 0x81, 0x00, 0x00, 0x07)
	return append(out, f[12:]...)
}

// sum16 is the folded ones' complement sum of b, starting from init.
func sum16(b []byte, init uint32) uint16 {
	s := init
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// vnetHdr is struct virtio_net_hdr, which QEMU writes before each frame
// on a tap with IFF_VNET_HDR.
type vnetHdr struct {
	flags, gsoType                         uint8
	hdrLen, gsoSize, csumStart, csumOffset uint16
}

func (l *lab) sendVnet(t testing.TB, h vnetHdr, f []byte) {
	t.Helper()
	b := []byte{h.flags, h.gsoType}
	for _, v := range []uint16{h.hdrLen, h.gsoSize, h.csumStart, h.csumOffset} {
		b = binary.LittleEndian.AppendUint16(b, v)
	}
	if _, err := l.tap.Write(append(b, f...)); err != nil {
		t.Fatalf("write to tap: %v", err)
	}
}
