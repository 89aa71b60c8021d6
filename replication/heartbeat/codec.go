package heartbeat

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/axproject/ax/ax/identity"
	"github.com/axproject/ax/ax/names"
)

// Datagram (integers big-endian):
//
//	"AXHB" | version u8 | mode u8 | path u8 | flags u8 | fromLen u8 | toLen u8 |
//	from | to | seq u64 | sent i64 (unix ns) | auth
//
// PSK mode: auth = HMAC-SHA256(heartbeat key, everything before it).
// Identity mode: auth = certLen u16 | certificate (DER) | ECDSA signature
// (ASN.1, the rest of the datagram) of everything before the signature.
//
// The receiver's name is inside so a datagram sent to one partner is
// worth nothing to another, and the path is inside so one replayed onto
// the other path's socket is refused.
const (
	magic   = "AXHB"
	version = 2

	headerSize = len(magic) + 6 // through toLen
	trailSize  = 16             // seq, sent
	macSize    = sha256.Size
	minSig     = 8   // shortest ASN.1 ECDSA signature
	maxSig     = 139 // longest ASN.1 ECDSA signature (P-521)

	// maxDatagram keeps a heartbeat in one unfragmented packet on a
	// 1,500-byte MTU, with room for IPv6, UDP and a tunnel's headers.
	maxDatagram = 1400

	flagHeardYou = 1 << 0
)

// mode is how a datagram is authenticated; a receiver accepts its own only.
type mode uint8

const (
	modePSK      mode = 1
	modeIdentity mode = 2
)

// packet is one heartbeat. It says nothing until authenticated.
type packet struct {
	mode     mode
	path     Path
	heardYou bool
	from, to string
	seq      uint64
	sent     int64
	cert     []byte // identity mode
	auth     []byte // the MAC or the signature
}

// Why a datagram was refused. Each is cheap to tell apart in tests and logs.
var (
	errMalformed   = errors.New("malformed heartbeat")
	errMode        = errors.New("heartbeat of the other security mode")
	errPath        = errors.New("heartbeat for the other path than the socket it arrived on")
	errRecipient   = errors.New("heartbeat addressed to another host")
	errUnknownPeer = errors.New("heartbeat from a host that is not a partner")
	errStale       = errors.New("heartbeat sent outside the clock window")
	errReplay      = errors.New("heartbeat not newer than the last accepted on its path")
	errAuth        = errors.New("heartbeat fails authentication")
	errRole        = errors.New("heartbeat signed by a certificate that is not a host's")
	errName        = errors.New("heartbeat's sender name differs from its certificate's")
)

// appendSigned appends what the MAC or signature covers.
func (p *packet) appendSigned(b []byte) []byte {
	b = append(b, magic...)
	flags := byte(0)
	if p.heardYou {
		flags |= flagHeardYou
	}
	b = append(b, version, byte(p.mode), byte(p.path), flags, byte(len(p.from)), byte(len(p.to)))
	b = append(b, p.from...)
	b = append(b, p.to...)
	b = binary.BigEndian.AppendUint64(b, p.seq)
	b = binary.BigEndian.AppendUint64(b, uint64(p.sent))
	if p.mode == modeIdentity {
		b = binary.BigEndian.AppendUint16(b, uint16(len(p.cert)))
		b = append(b, p.cert...)
	}
	return b
}

// marshal is the datagram of a packet whose auth is set.
func (p *packet) marshal() []byte {
	return append(p.appendSigned(make([]byte, 0, p.size())), p.auth...)
}

func (p *packet) size() int {
	n := headerSize + len(p.from) + len(p.to) + trailSize + len(p.auth)
	if p.mode == modeIdentity {
		n += 2 + len(p.cert)
	}
	return n
}

// sealPSK authenticates p with the heartbeat key derived from the PSK.
func sealPSK(key []byte, p packet) []byte {
	p.mode = modePSK
	m := hmac.New(sha256.New, key)
	m.Write(p.appendSigned(nil))
	p.auth = m.Sum(nil)
	return p.marshal()
}

// sealSigned carries id's certificate and signs p with id's key.
func sealSigned(id *identity.Identity, p packet) ([]byte, error) {
	p.mode, p.cert = modeIdentity, id.CertDER()
	signed := p.appendSigned(nil)
	sig, err := id.Sign(signed)
	if err != nil {
		return nil, fmt.Errorf("heartbeat: sign: %w", err)
	}
	return append(signed, sig...), nil
}

// decode parses a datagram's structure; it checks no MAC or signature.
// signed is the part of b the MAC or signature covers.
func decode(b []byte) (p packet, signed []byte, err error) {
	if len(b) < headerSize+2+trailSize || len(b) > maxDatagram {
		return packet{}, nil, fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	}
	if string(b[:len(magic)]) != magic || b[4] != version {
		return packet{}, nil, fmt.Errorf("%w: not an AX heartbeat of version %d", errMalformed, version)
	}
	p.mode, p.path = mode(b[5]), Path(b[6])
	if p.mode != modePSK && p.mode != modeIdentity {
		return packet{}, nil, fmt.Errorf("%w: mode %d", errMalformed, p.mode)
	}
	if p.path != PathRepl && p.path != PathMgmt {
		return packet{}, nil, fmt.Errorf("%w: path %d", errMalformed, p.path)
	}
	if b[7]&^flagHeardYou != 0 {
		return packet{}, nil, fmt.Errorf("%w: flags %#x", errMalformed, b[7])
	}
	p.heardYou = b[7]&flagHeardYou != 0
	fromLen, toLen := int(b[8]), int(b[9])
	rest := b[headerSize:]
	if len(rest) < fromLen+toLen+trailSize {
		return packet{}, nil, fmt.Errorf("%w: truncated", errMalformed)
	}
	p.from, p.to = string(rest[:fromLen]), string(rest[fromLen:fromLen+toLen])
	if names.Check("host", p.from) != nil || names.Check("host", p.to) != nil {
		return packet{}, nil, fmt.Errorf("%w: bad host name", errMalformed)
	}
	rest = rest[fromLen+toLen:]
	p.seq = binary.BigEndian.Uint64(rest)
	p.sent = int64(binary.BigEndian.Uint64(rest[8:]))
	rest = rest[trailSize:]
	switch p.mode {
	case modePSK:
		if len(rest) != macSize {
			return packet{}, nil, fmt.Errorf("%w: MAC of %d bytes", errMalformed, len(rest))
		}
	case modeIdentity:
		if len(rest) < 2 {
			return packet{}, nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		n := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if n == 0 || len(rest) < n+minSig || len(rest) > n+maxSig {
			return packet{}, nil, fmt.Errorf("%w: certificate and signature of %d bytes", errMalformed, len(rest))
		}
		p.cert, rest = rest[:n], rest[n:]
	}
	p.auth = rest
	return p, b[:len(b)-len(rest)], nil
}
