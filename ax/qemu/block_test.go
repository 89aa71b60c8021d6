package qemu

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/axproject/ax/replication/nbd"
	"github.com/axproject/ax/test/testenv"
)

// countingBackend is an in-memory export that counts flushes.
type countingBackend struct {
	*nbd.MemBackend
	flushes atomic.Int64
}

func (b *countingBackend) Flush() error { b.flushes.Add(1); return nil }

// qemuIO runs one qemu-io command on a node through the human monitor.
func qemuIO(t *testing.T, q *QMP, node, cmd string) {
	t.Helper()
	if err := qemuIOErr(q, node, cmd); err != nil {
		t.Fatal(err)
	}
}

func qemuIOErr(q *QMP, node, cmd string) error {
	out, err := q.run(context.Background(), "human-monitor-command", map[string]any{
		"command-line": "qemu-io " + node + " \"" + cmd + "\""})
	if err != nil {
		return fmt.Errorf("qemu-io %s: %w", cmd, err)
	}
	if bytes.Contains(out, []byte("error")) || bytes.Contains(out, []byte("failed")) {
		return fmt.Errorf("qemu-io %s: %s", cmd, out)
	}
	return nil
}

// TestIntegrationQuorumChild runs a disk as Guest sets it up (a quorum node
// over the image) in a real QEMU and attaches an NBD export as a second
// quorum child: writes then reach both the image and the export, the
// guest's flush reaches the export, and after RemoveQuorumChild writes reach
// the image alone.
func TestIntegrationQuorumChild(t *testing.T) {
	const size = 4 << 20
	back := &countingBackend{MemBackend: nbd.NewMemBackend(size)}
	sock, q, img := quorumDisk(t, size, back)
	ctx := context.Background()

	if drv, err := q.NodeDriver(ctx, "disk0"); err != nil || drv != "quorum" {
		t.Fatalf("driver of disk0 = %q, %v; want quorum", drv, err)
	}
	if n, err := q.NodeSize(ctx, "disk0"); err != nil || n != size {
		t.Fatalf("size of disk0 = %d, %v; want %d", n, err, size)
	}
	if err := q.AddNBDTarget(ctx, "child", sock, "vm/disk0"); err != nil {
		t.Fatal(err)
	}
	if err := q.AddQuorumChild(ctx, "disk0", "child"); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, q, "disk0", "write -P 0xab 65536 131072")
	qemuIO(t, q, "disk0", "flush")
	if back.flushes.Load() == 0 {
		t.Error("the guest's flush did not reach the quorum child")
	}
	if err := q.RemoveQuorumChild(ctx, "disk0", "child"); err != nil {
		t.Fatal(err)
	}
	if err := q.DeleteNode(ctx, "child"); err != nil {
		t.Fatalf("the removed child is still in use: %v", err)
	}
	// Removing what is no longer a child does nothing.
	if err := q.RemoveQuorumChild(ctx, "disk0", "child"); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, q, "disk0", "write -P 0xcd 262144 65536")
	qemuIO(t, q, "disk0", "flush")

	onImage, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want[65536:], bytes.Repeat([]byte{0xab}, 131072))
	wantImage := bytes.Clone(want)
	copy(wantImage[262144:], bytes.Repeat([]byte{0xcd}, 65536))
	if !bytes.Equal(onImage, wantImage) {
		t.Error("the image does not hold both writes")
	}
	if !bytes.Equal(back.Bytes(), want) {
		t.Error("the export does not hold exactly the write made while it was a child")
	}
}

// quorumDisk serves back as export vm/disk0 on an NBD server at the unix
// socket it returns, and starts a QEMU with a quorum disk node disk0 over
// a zeroed raw image of size bytes (as Guest sets disks up); it returns the
// socket, QMP and the image's path.
func quorumDisk(t *testing.T, size int, back nbd.Backend) (sock string, q *QMP, img string) {
	t.Helper()
	testenv.RequireCommand(t, Binary, "make deps")
	dir := t.TempDir()
	img = filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nil)
	if err := srv.AddExport("vm/disk0", back); err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(dir, "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go srv.Serve(ctx, ln)

	qmpSock := filepath.Join(dir, "qmp.sock")
	d := Disk{Node: "disk0", Path: img, Format: "raw"}
	args := append([]string{"-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off"}, blockdevArgs(d)...)
	cmd := exec.Command(Binary, args...)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if q, err = Dial(qmpSock, 5*time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qmp: %v; qemu: %s", err, log.String())
		}
	}
	t.Cleanup(func() { q.Close() })
	return sock, q, img
}

// relay stands between QEMU and an NBD server as axd's export does: it
// listens at path and passes each connection on to the server at target.
// Kill closes it and every connection it carries, as axd's death does.
type relay struct {
	path, target string
	ln           net.Listener
	mu           sync.Mutex
	conns        []net.Conn
}

func startRelay(t *testing.T, path, target string) *relay {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{path: path, target: target, ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("unix", target)
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, c, s)
			r.mu.Unlock()
			go func() { io.Copy(s, c); s.Close() }()
			go func() { io.Copy(c, s); c.Close() }()
		}
	}()
	t.Cleanup(r.kill)
	return r
}

func (r *relay) kill() {
	r.ln.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
}

// TestIntegrationQuorumChildServerGone is the guard's window at HA: when
// the process serving the replication child dies (axd killed), a guest
// write and flush must not complete on the local image alone — they wait
// (NBDReconnectDelay) so the guard can stop the guest with them pending.
// Here the server comes back within the delay and the waiting write and
// flush complete on it; with no delay they would have completed at once
// without it.
func TestIntegrationQuorumChildServerGone(t *testing.T) {
	const size = 4 << 20
	back := &countingBackend{MemBackend: nbd.NewMemBackend(size)}
	sock, q, _ := quorumDisk(t, size, back)
	ctx := context.Background()
	front := filepath.Join(filepath.Dir(sock), "front.sock")
	r := startRelay(t, front, sock)
	if err := q.AddNBDTarget(ctx, "child", front, "vm/disk0"); err != nil {
		t.Fatal(err)
	}
	if err := q.AddQuorumChild(ctx, "disk0", "child"); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, q, "disk0", "write -P 0xab 0 65536")
	qemuIO(t, q, "disk0", "flush")
	flushes := back.flushes.Load()

	r.kill()
	os.Remove(front)
	done := make(chan error, 1)
	go func() {
		err := qemuIOErr(q, "disk0", "write -P 0xee 131072 65536")
		if err == nil {
			err = qemuIOErr(q, "disk0", "flush")
		}
		done <- err
	}()
	// The guard's SIGSTOP lands within milliseconds; a second with the
	// write still pending shows it waits rather than completing without
	// the child.
	select {
	case err := <-done:
		t.Fatalf("a write and flush ended (error: %v) while the replication child's server was gone: the guest would see them done with the partner never getting them", err)
	case <-time.After(time.Second):
	}
	startRelay(t, front, sock)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the waiting write, once the server was back: %v", err)
		}
	case <-time.After(3 * NBDReconnectDelay * time.Second):
		t.Fatal("the waiting write never completed after the server came back")
	}
	if !bytes.Equal(back.Bytes()[131072:131072+65536], bytes.Repeat([]byte{0xee}, 65536)) {
		t.Error("the write made while the server was gone did not reach it once it was back")
	}
	if back.flushes.Load() == flushes {
		t.Error("the flush made while the server was gone did not reach it once it was back")
	}
}
