package nbd

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
)

// BenchmarkWrite sends 1 MiB NBD_CMD_WRITEs through a Unix socket to a
// MemBackend, one at a time and with 16 in flight (QEMU's mirror keeps up to
// 16 going).
func BenchmarkWrite(b *testing.B) {
	for _, inflight := range []int{1, 16} {
		b.Run(fmt.Sprintf("inflight=%d", inflight), func(b *testing.B) {
			const chunk, size = 1 << 20, 64 << 20
			srv := NewServer(nil)
			if err := srv.AddExport("disk", NewMemBackend(size)); err != nil {
				b.Fatal(err)
			}
			ln, path := unixListener(b)
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- srv.Serve(ctx, ln) }()
			defer func() {
				cancel()
				<-served
			}()
			nc, err := net.Dial("unix", path)
			if err != nil {
				b.Fatal(err)
			}
			defer nc.Close()
			c := &testClient{t: b, nc: nc}
			c.connect("disk")

			// Header and payload in one buffer; the offset is patched per request.
			msg := requestMsg(cmdWrite, 0, 0, 0, chunk, pattern(chunk, 1))
			slots := make(chan struct{}, inflight)
			replyErr := make(chan error, 1)
			go func() {
				var h [16]byte
				for range b.N {
					if _, err := io.ReadFull(nc, h[:]); err != nil {
						replyErr <- err
						return
					}
					if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
						replyErr <- fmt.Errorf("error reply %d", e)
						return
					}
					<-slots
				}
				replyErr <- nil
			}()
			b.SetBytes(chunk)
			b.ResetTimer()
			for i := range b.N {
				slots <- struct{}{}
				binary.BigEndian.PutUint64(msg[8:], uint64(i))
				binary.BigEndian.PutUint64(msg[16:], uint64(i%(size/chunk))*chunk)
				if _, err := nc.Write(msg); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-replyErr; err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			c.disconnect()
		})
	}
}
