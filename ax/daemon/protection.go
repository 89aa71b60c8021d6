package daemon

import (
	"context"
	"sync"
	"time"
)

// protection is a primary's running protection: its stream loop
// (runPrimary) and its guard (guardPrimary), started together. Close stops
// both and waits for them.
type protection struct {
	cancel     context.CancelFunc
	closing    chan struct{} // closed by stop: a guard retrying a fence gives up
	stopOnce   sync.Once
	streamDone chan struct{}
	guardDone  chan struct{}
}

// startProtection runs stream and guard under a context derived from
// parent; wg (axd's) also waits for them at shutdown.
// The guard is given the stream's end too: at axd's stop it leaves its
// guard process as the stream's last word to the partner allows.
func startProtection(parent context.Context, wg *sync.WaitGroup, stream func(ctx context.Context), guard func(ctx context.Context, closing, streamDone <-chan struct{})) *protection {
	ctx, cancel := context.WithCancel(parent)
	p := &protection{cancel: cancel, closing: make(chan struct{}), streamDone: make(chan struct{}), guardDone: make(chan struct{})}
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer close(p.streamDone)
		stream(ctx)
	}()
	go func() {
		defer wg.Done()
		defer close(p.guardDone)
		guard(ctx, p.closing, p.streamDone)
	}()
	return p
}

// stopStream ends the stream loop and waits for it, at most wait. The guard
// goes on: it is the guard that fences, and the loop holds the VM's one
// hypervisor connection while it checkpoints.
func (p *protection) stopStream(wait time.Duration) {
	p.cancel()
	select {
	case <-p.streamDone:
	case <-time.After(wait):
	}
}

// stop tells both to end without waiting (axd's shutdown waits for all).
func (p *protection) stop() {
	p.stopOnce.Do(func() {
		p.cancel()
		close(p.closing)
	})
}

// Close stops both and waits for them. It is safe to call twice.
func (p *protection) Close() {
	p.stop()
	<-p.streamDone
	<-p.guardDone
}
