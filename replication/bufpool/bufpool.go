// Package bufpool pools byte buffers by power-of-two size class, so a stream
// of large writes — NBD payloads, queued and held guest disk writes — does
// not allocate each one afresh.
package bufpool

import (
	"math/bits"
	"sync"
)

// minShift is the smallest class: 4 KiB.
const minShift = 12

var pools [40]sync.Pool

func class(n int) int { return max(0, bits.Len(uint(n-1))-minShift) }

// Get returns a buffer of length n (n ≥ 1) from the pool of its class.
func Get(n int) *[]byte {
	cl := class(n)
	if p, ok := pools[cl].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(cl+minShift))
	return &b
}

// Put gives back a buffer Get returned; nil is ignored. The caller must not
// use it afterwards.
func Put(p *[]byte) {
	if p == nil {
		return
	}
	pools[class(cap(*p))].Put(p)
}
