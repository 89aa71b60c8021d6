package qemu

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	out, err := q.run(context.Background(), "human-monitor-command", map[string]any{
		"command-line": "qemu-io " + node + " \"" + cmd + "\""})
	if err != nil {
		t.Fatalf("qemu-io %s: %v", cmd, err)
	}
	if bytes.Contains(out, []byte("error")) || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io %s: %s", cmd, out)
	}
}

// TestIntegrationQuorumChild runs a disk as Guest sets it up (a quorum node
// over the image) in a real QEMU and attaches an NBD export as a second
// quorum child: writes then reach both the image and the export, the
// guest's flush reaches the export, and after RemoveQuorumChild writes reach
// the image alone.
func TestIntegrationQuorumChild(t *testing.T) {
	testenv.RequireCommand(t, Binary, "make deps")
	dir := t.TempDir()
	const size = 4 << 20
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	back := &countingBackend{MemBackend: nbd.NewMemBackend(size)}
	srv := nbd.NewServer(nil)
	if err := srv.AddExport("vm/disk0", back); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
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
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var q *QMP
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if q, err = Dial(qmpSock, 5*time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qmp: %v; qemu: %s", err, log.String())
		}
	}
	defer q.Close()

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
