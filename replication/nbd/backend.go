package nbd

import (
	"errors"
	"fmt"
	"sync"
)

// Backend is where an export's requests go. The server calls it from one
// goroutine per connection, one request at a time, in the order the client
// sent them; offsets and lengths are already checked against Size. The
// buffers passed to ReadAt and WriteAt are reused after the call returns and
// must not be retained.
//
// An error is answered to the client with an NBD error value and the
// connection stays open: errors wrapping ErrNotSupported, ErrNoSpace or
// ErrInvalid become NBD_ENOTSUP, NBD_ENOSPC or NBD_EINVAL, anything else
// NBD_EIO.
type Backend interface {
	// Size is the export size in bytes; it is read once per connection.
	Size() int64
	ReadAt(p []byte, off int64) error
	// WriteAt returns once p is applied; with fua, once it is durable.
	WriteAt(p []byte, off int64, fua bool) error
	WriteZeroes(off, length int64, fua bool) error
	// Trim says the range is no longer needed; it may be a no-op.
	Trim(off, length int64) error
	// Flush makes every write acknowledged so far durable.
	Flush() error
}

// MultiConnBackend is implemented by a Backend whose Flush covers writes
// made through every connection; only then is NBD_FLAG_CAN_MULTI_CONN
// advertised.
type MultiConnBackend interface {
	Backend
	MultiConn() bool
}

// AsyncBackend is a Backend whose writes finish later: WriteAtAsync starts
// a write — p may be reused once it returns — and returns a function that
// waits until the write is done, or nil when it is done already. The server
// then starts the next requests while earlier writes finish, and still
// replies in request order, so a client with several writes in flight
// overlaps their completions (a replicated write waiting for its partner,
// for one). Its other requests are carried out as they are read.
type AsyncBackend interface {
	Backend
	WriteAtAsync(p []byte, off int64, fua bool) (wait func() error, err error)
}

// BufferTaker is an AsyncBackend that keeps a write's payload instead of
// copying it: TakeWrite is handed the buffer, from bufpool (and owns it,
// error or not), and gives it back with bufpool.Put once done with it.
type BufferTaker interface {
	AsyncBackend
	TakeWrite(p *[]byte, off int64, fua bool) (wait func() error, err error)
}

// Sentinel errors a Backend wraps to choose the NBD error value.
var (
	ErrNotSupported = errors.New("operation not supported")
	ErrNoSpace      = errors.New("no space left")
	ErrInvalid      = errors.New("invalid request")
)

// errno maps a backend error onto an NBD error value.
func errno(err error) uint32 {
	switch {
	case errors.Is(err, ErrNotSupported):
		return errnoENOTSUP
	case errors.Is(err, ErrNoSpace):
		return errnoENOSPC
	case errors.Is(err, ErrInvalid):
		return errnoEINVAL
	default:
		return errnoEIO
	}
}

// MemBackend is a Backend held in memory, for tests.
type MemBackend struct {
	mu   sync.Mutex
	data []byte
}

var _ MultiConnBackend = (*MemBackend)(nil)

// NewMemBackend returns a zeroed in-memory export of size bytes.
func NewMemBackend(size int) *MemBackend {
	return &MemBackend{data: make([]byte, size)}
}

// Bytes returns a copy of the export's content.
func (m *MemBackend) Bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data...)
}

// Size implements Backend.
func (m *MemBackend) Size() int64 { return int64(len(m.data)) }

// ReadAt implements Backend.
func (m *MemBackend) ReadAt(p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return err
	}
	copy(p, m.data[off:])
	return nil
}

// WriteAt implements Backend.
func (m *MemBackend) WriteAt(p []byte, off int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return err
	}
	copy(m.data[off:], p)
	return nil
}

// WriteZeroes implements Backend.
func (m *MemBackend) WriteZeroes(off, length int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, length); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	return nil
}

// Trim implements Backend; trimmed bytes read back as zeroes.
func (m *MemBackend) Trim(off, length int64) error { return m.WriteZeroes(off, length, false) }

// Flush implements Backend; memory needs none.
func (m *MemBackend) Flush() error { return nil }

// MultiConn implements MultiConnBackend: all connections share one buffer.
func (m *MemBackend) MultiConn() bool { return true }

func (m *MemBackend) check(off, length int64) error {
	if off < 0 || length < 0 || off > int64(len(m.data))-length {
		return fmt.Errorf("mem backend: range %d+%d outside %d bytes: %w", off, length, len(m.data), ErrInvalid)
	}
	return nil
}
