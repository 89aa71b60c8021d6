package netbuffer

// queue holds captured frames in capture order. Frame bytes are packed into
// large chunks, so holding a frame costs its length plus one entry and
// allocates nothing in steady state; a chunk is recycled once every frame
// in it has been released or discarded.
//
// A queue is owned by one goroutine (the gate's loop).
type queue struct {
	chunkSize int
	entries   []entry // entries[head:] are held, oldest first
	head      int
	tail      *chunk   // the chunk being filled
	spares    []*chunk // recycled chunks, kept to avoid churn
	frames    int
	bytes     int
}

type entry struct {
	epoch  uint64
	tstamp uint64 // capture time, CLOCK_MONOTONIC ns
	data   []byte // in chunk
	chunk  *chunk
}

type chunk struct {
	buf  []byte
	used int
	live int // frames in buf not yet popped
}

// maxSpares bounds the chunks an idle queue keeps.
const maxSpares = 4

// entryOverhead is what a held frame costs beyond its bytes (an entry),
// counted against Config.MaxBytes.
const entryOverhead = 48

func newQueue(chunkSize int) *queue {
	return &queue{chunkSize: chunkSize}
}

// push copies frame to the back of the queue and returns the copy.
func (q *queue) push(epoch, tstamp uint64, frame []byte) []byte {
	c := q.tail
	if c == nil || len(c.buf)-c.used < len(frame) {
		c = q.newChunk(len(frame))
		q.tail = c
	}
	data := c.buf[c.used : c.used+len(frame) : c.used+len(frame)]
	copy(data, frame)
	c.used += len(frame)
	c.live++
	if q.head > 0 && q.head == len(q.entries) {
		q.entries, q.head = q.entries[:0], 0
	}
	q.entries = append(q.entries, entry{epoch: epoch, tstamp: tstamp, data: data, chunk: c})
	q.frames++
	q.bytes += len(frame)
	return data
}

func (q *queue) newChunk(need int) *chunk {
	if n := len(q.spares); n > 0 && len(q.spares[n-1].buf) >= need {
		c := q.spares[n-1]
		q.spares = q.spares[:n-1]
		return c
	}
	return &chunk{buf: make([]byte, max(q.chunkSize, need))}
}

// front returns the oldest held frame; ok is false when the queue is empty.
func (q *queue) front() (e entry, ok bool) {
	if q.head == len(q.entries) {
		return entry{}, false
	}
	return q.entries[q.head], true
}

// at returns the k-th oldest held frame (front is at(0)).
func (q *queue) at(k int) (e entry, ok bool) {
	if q.head+k >= len(q.entries) {
		return entry{}, false
	}
	return q.entries[q.head+k], true
}

// pop forgets the oldest held frame. Its bytes stay valid until the next push.
func (q *queue) pop() {
	e := &q.entries[q.head]
	c := e.chunk
	q.frames--
	q.bytes -= len(e.data)
	*e = entry{}
	q.head++
	if q.head == len(q.entries) {
		q.entries, q.head = q.entries[:0], 0
	} else if q.head >= 1024 && q.head*2 >= len(q.entries) {
		n := copy(q.entries, q.entries[q.head:])
		clear(q.entries[n:])
		q.entries, q.head = q.entries[:n], 0
	}
	c.live--
	if c.live > 0 {
		return
	}
	c.used = 0
	if c == q.tail {
		return // refilled in place
	}
	if len(q.spares) < maxSpares && len(c.buf) == q.chunkSize {
		q.spares = append(q.spares, c)
	}
}

// clear drops every held frame and returns how many there were.
func (q *queue) clear() (frames, bytes int) {
	frames, bytes = q.frames, q.bytes
	for q.frames > 0 {
		q.pop()
	}
	return frames, bytes
}
