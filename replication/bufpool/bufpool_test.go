package bufpool

import "testing"

// A buffer has the length asked for and a power-of-two capacity that holds
// it; a buffer given back serves the next request of its class.
func TestGetPut(t *testing.T) {
	for _, n := range []int{1, 4096, 4097, 256 << 10, 1<<20 + 1} {
		p := Get(n)
		if len(*p) != n || cap(*p) < n || cap(*p)&(cap(*p)-1) != 0 || cap(*p) < 4096 {
			t.Fatalf("Get(%d): len %d cap %d", n, len(*p), cap(*p))
		}
		Put(p)
	}
	p := Get(3000)
	(*p)[0] = 42
	Put(p)
	if q := Get(4096); len(*q) != 4096 {
		t.Fatalf("reused buffer has length %d, want 4096", len(*q))
	}
	Put(nil)
}
