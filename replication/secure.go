package replication

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
)

// The record layer of PSK mode. After the handshake each direction has its
// own AES-256-GCM key and IV, derived from the stream key, both nonces, the
// VM name and the version, so no two sessions (and no two directions) ever
// share a key. On the wire a record is
//
//	length uint32 (little-endian, of what follows) ‖ AES-GCM(plaintext) ‖ tag
//
// with the length as additional data and the IV XOR the record's 64-bit
// sequence number as nonce: a record dropped, reordered, replayed, cut or
// altered in transit fails to open, and a record that fails to open ends the
// connection. TLS mode needs none of this: TLS is its record layer.

const (
	// maxRecord bounds a record's plaintext: big enough that sealing, not
	// the per-record work, dominates; small enough to keep buffers modest.
	maxRecord = 64 << 10

	recordHeader = 4
	recordTag    = 16
	// maxSealed is the largest length a record header may declare.
	maxSealed = maxRecord + recordTag
	// recordBatch is how many full records one Write sends in one syscall.
	recordBatch = 4

	sealKeySize = 32
	sealIVSize  = 12
)

// ErrRecord is wrapped when a record of the protected stream fails to
// open or declares an impossible length: the stream was altered in transit
// (or the two ends derived different keys).
var ErrRecord = errors.New("sealed record refused")

// sealKey is one direction's key and IV.
type sealKey struct {
	key [sealKeySize]byte
	iv  [sealIVSize]byte
}

// Labels of the two directions' keys.
const (
	labelClientToServer = "ax stream v2 primary to secondary"
	labelServerToClient = "ax stream v2 secondary to primary"
)

// deriveSealKey derives one direction's key from the handshake key and
// everything the handshake agreed on. The nonces have a fixed size and the
// name comes last, so the context is unambiguous.
func deriveSealKey(key []byte, label string, a authenticated) sealKey {
	info := make([]byte, 0, len(label)+1+2*nonceSize+len(a.vm))
	info = append(info, label...)
	info = append(info, a.version)
	info = append(info, a.clientNonce[:]...)
	info = append(info, a.serverNonce[:]...)
	info = append(info, a.vm...)
	out, err := hkdf.Key(sha256.New, key, nil, string(info), sealKeySize+sealIVSize)
	if err != nil {
		panic(err) // only for lengths HKDF cannot make
	}
	var k sealKey
	copy(k.key[:], out)
	copy(k.iv[:], out[sealKeySize:])
	return k
}

func newGCM(k sealKey) (cipher.AEAD, error) {
	b, err := aes.NewCipher(k.key[:])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// sealedConn is a net.Conn whose bytes travel in sealed records over the
// connection it embeds. Deadlines and addresses are the embedded
// connection's. Read and Write may run concurrently with each other.
type sealedConn struct {
	net.Conn

	rmu   sync.Mutex
	open  cipher.AEAD
	riv   [sealIVSize]byte
	rseq  uint64
	in    []byte // receive buffer: in[r:w] arrived, not yet opened
	r, w  int
	plain []byte // opened, not yet returned (aliases in)
	rerr  error  // final: the stream is out of step or was altered

	wmu  sync.Mutex
	seal cipher.AEAD
	wiv  [sealIVSize]byte
	wseq uint64
	out  []byte
	werr error // final: a record may have gone out in part

	closeOnce sync.Once
	closeErr  error
}

var _ net.Conn = (*sealedConn)(nil)

// newSealedConn protects conn with send for what it writes and recv for
// what it reads.
func newSealedConn(conn net.Conn, send, recv sealKey) (*sealedConn, error) {
	seal, err := newGCM(send)
	if err != nil {
		return nil, fmt.Errorf("replication: record layer: %w", err)
	}
	open, err := newGCM(recv)
	if err != nil {
		return nil, fmt.Errorf("replication: record layer: %w", err)
	}
	return &sealedConn{
		Conn: conn,
		open: open, riv: recv.iv, in: make([]byte, recordBatch*(recordHeader+maxSealed)),
		seal: seal, wiv: send.iv, out: make([]byte, 0, recordBatch*(recordHeader+maxSealed)),
	}, nil
}

func recordNonce(iv *[sealIVSize]byte, seq uint64) [sealIVSize]byte {
	n := *iv
	for i := range 8 {
		n[sealIVSize-1-i] ^= byte(seq >> (8 * i))
	}
	return n
}

// Read returns plaintext of records that opened. A record that fails to
// open, or a declared length out of bounds, is final: the connection is
// closed. A timeout is not: what arrived stays buffered for the next Read.
func (c *sealedConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for len(c.plain) == 0 {
		if c.rerr != nil {
			return 0, c.rerr
		}
		opened, err := c.openBuffered()
		if err != nil {
			c.rerr = err
			c.Close()
			return 0, err
		}
		if opened {
			continue
		}
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.plain)
	c.plain = c.plain[n:]
	// Open what else has arrived whole while p has room: fewer calls for
	// a reader with a large buffer, and no extra syscall.
	for n < len(p) && c.rerr == nil {
		opened, err := c.openBuffered()
		if err != nil {
			c.rerr = err
			c.Close()
			break // this Read returns what opened; the next one the error
		}
		if !opened {
			break
		}
		m := copy(p[n:], c.plain)
		c.plain = c.plain[m:]
		n += m
	}
	return n, nil
}

// openBuffered opens the next record if it has arrived whole.
func (c *sealedConn) openBuffered() (bool, error) {
	if c.w-c.r < recordHeader {
		return false, nil
	}
	hdr := c.in[c.r : c.r+recordHeader]
	n := int(le.Uint32(hdr))
	if n <= recordTag || n > maxSealed {
		return false, fmt.Errorf("%w: record %d from %s declares %d bytes, want %d..%d", ErrRecord, c.rseq, c.remote(), n, recordTag+1, maxSealed)
	}
	if c.w-c.r < recordHeader+n {
		return false, nil
	}
	body := c.in[c.r+recordHeader : c.r+recordHeader+n]
	nonce := recordNonce(&c.riv, c.rseq)
	plain, err := c.open.Open(body[:0], nonce[:], body, hdr)
	if err != nil {
		return false, fmt.Errorf("%w: record %d from %s failed to open: altered or replayed in transit, or the keys differ; connection dropped", ErrRecord, c.rseq, c.remote())
	}
	if c.rseq == math.MaxUint64 {
		return false, fmt.Errorf("%w: record sequence exhausted", ErrRecord)
	}
	c.rseq++
	c.r += recordHeader + n
	if c.r == c.w {
		c.r, c.w = 0, 0
	}
	c.plain = plain
	return true, nil
}

// fill reads more of the stream, first making room for a whole record.
func (c *sealedConn) fill() error {
	if len(c.in)-c.w < recordHeader+maxSealed {
		copy(c.in, c.in[c.r:c.w])
		c.w -= c.r
		c.r = 0
	}
	m, err := c.Conn.Read(c.in[c.w:])
	c.w += m
	switch {
	case m > 0:
		return nil // the data first; a lasting error shows on the next read
	case err == io.EOF && c.w > c.r:
		c.rerr = fmt.Errorf("stream from %s ended inside a sealed record: %w", c.remote(), io.ErrUnexpectedEOF)
		return c.rerr
	case err == io.EOF:
		c.rerr = io.EOF
		return io.EOF
	case err != nil:
		return err
	}
	return nil
}

func (c *sealedConn) remote() string {
	if a := c.Conn.RemoteAddr(); a != nil {
		return a.String()
	}
	return "peer"
}

// Write seals p into records and sends them. An error is final: part of a
// record may have gone out.
func (c *sealedConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return 0, c.werr
	}
	done := 0
	for done < len(p) {
		out := c.out[:0]
		batch := done
		for batch < len(p) && len(out)+recordHeader+maxSealed <= cap(out) {
			if c.wseq == math.MaxUint64 {
				c.werr = errors.New("sealed record sequence exhausted; reconnect")
				return done, c.werr
			}
			chunk := p[batch:min(len(p), batch+maxRecord)]
			var hdr [recordHeader]byte
			le.PutUint32(hdr[:], uint32(len(chunk)+recordTag))
			out = append(out, hdr[:]...)
			nonce := recordNonce(&c.wiv, c.wseq)
			out = c.seal.Seal(out, nonce[:], chunk, hdr[:])
			c.wseq++
			batch += len(chunk)
		}
		if _, err := c.Conn.Write(out); err != nil {
			c.werr = fmt.Errorf("write sealed records: %w", err)
			return done, c.werr
		}
		done = batch
	}
	return done, nil
}

// Close closes the connection; safe to call twice.
func (c *sealedConn) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.Conn.Close() })
	return c.closeErr
}
