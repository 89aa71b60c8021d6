package daemon

import (
	"context"
	"sync"
	"testing"
	"time"
)

// Close stops the stream and the guard and returns only once both
// returned; a guard retrying a fence sees closing; twice is fine.
func TestProtectionClose(t *testing.T) {
	var wg sync.WaitGroup
	var streamEnded, guardEnded bool
	var mu sync.Mutex
	p := startProtection(context.Background(), &wg,
		func(ctx context.Context) {
			<-ctx.Done()
			time.Sleep(20 * time.Millisecond) // a stream saying bye
			mu.Lock()
			streamEnded = true
			mu.Unlock()
		},
		func(ctx context.Context, closing, _ <-chan struct{}) {
			<-ctx.Done()
			<-closing // a fence being retried gives up only on closing
			mu.Lock()
			guardEnded = true
			mu.Unlock()
		})
	p.Close()
	mu.Lock()
	if !streamEnded || !guardEnded {
		t.Errorf("Close returned with the stream ended %v, the guard ended %v", streamEnded, guardEnded)
	}
	mu.Unlock()
	p.Close()
	wg.Wait()
}

// stopStream waits for the stream only, and not forever.
func TestProtectionStopStream(t *testing.T) {
	var wg sync.WaitGroup
	release := make(chan struct{})
	guardRuns := make(chan struct{})
	p := startProtection(context.Background(), &wg,
		func(ctx context.Context) { <-release }, // a stream stuck in a write
		func(ctx context.Context, closing, _ <-chan struct{}) {
			<-ctx.Done()
			close(guardRuns) // the guard sees the cancel but goes on (fencing)
			<-closing
		})
	p.stopStream(10 * time.Millisecond)
	select {
	case <-p.streamDone:
		t.Fatal("the stuck stream ended")
	default:
	}
	<-guardRuns
	select {
	case <-p.guardDone:
		t.Fatal("stopStream ended the guard")
	default:
	}
	close(release)
	p.Close()
	wg.Wait()
}
