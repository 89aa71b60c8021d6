package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/axproject/ax/test/testenv"
)

// TestIntegrationQEMUMirror is what axd does, with qemu-storage-daemon in
// place of the guest's QEMU: blockdev-add an nbd node on our socket,
// blockdev-mirror sync=full copy-mode=write-blocking onto it, wait for the
// job to be ready, then write to the source and see the write in the
// backend by the time the writer has its completion.
func TestIntegrationQEMUMirror(t *testing.T) {
	testenv.RequireCommand(t, "qemu-storage-daemon", "apt-get install qemu-system-common, or make deps")
	const size = 16 << 20
	export := "vm-1/disk0" // axd's naming: VM, slash, node
	_, srv, rec, sock := qemuServerNamed(t, export, size)

	dir := filepath.Dir(sock)
	// A sparse source: data at 0-3 MiB and 11-12 MiB, holes the mirror
	// copies as zeroes elsewhere.
	src := make([]byte, size)
	rand.Read(src[:3<<20])
	rand.Read(src[11<<20 : 12<<20])
	srcPath := filepath.Join(dir, "src.raw")
	f, err := os.Create(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.WriteAt(src[:3<<20], 0)
	f.WriteAt(src[11<<20:12<<20], 11<<20)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// Whatever the mirror leaves alone must read as zero.
	rand.Read(rec.mem.data)
	qmpPath, srcSock := filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "src.sock")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=src-file,filename="+srcPath,
		"--blockdev", "driver=raw,node-name=src,file=src-file",
		"--nbd-server", "addr.type=unix,addr.path="+srcSock,
		"--export", "type=nbd,id=exp0,node-name=src,name=src,writable=on",
		"--chardev", "socket,id=qmp,path="+qmpPath+",server=on,wait=off",
		"--monitor", "chardev=qmp",
	)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if t.Failed() {
			t.Logf("qemu-storage-daemon output:\n%s", stderr.String())
		}
	})

	q := dialQMP(t, qmpPath)
	q.exec("blockdev-add", map[string]any{
		"driver": "nbd", "node-name": "target", "export": export,
		"server": map[string]any{"type": "unix", "path": sock},
	})
	q.exec("blockdev-mirror", map[string]any{
		"job-id": "mirror", "device": "src", "target": "target",
		"sync": "full", "copy-mode": "write-blocking",
		"on-source-error": "report", "on-target-error": "report",
	})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var jobs []struct {
			Ready  bool   `json:"ready"`
			Status string `json:"status"`
		}
		if err := json.Unmarshal(q.exec("query-block-jobs", nil), &jobs); err != nil {
			t.Fatal(err)
		}
		if len(jobs) != 1 {
			t.Fatalf("mirror job gone before ready: %+v", jobs)
		}
		if jobs[0].Ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("mirror not ready after 30s: %+v", jobs)
		}
	}
	if !bytes.Equal(rec.mem.Bytes(), src) {
		t.Fatal("after the initial copy the export differs from the source")
	}

	// A write through the source completes only once the target has it.
	runQEMU(t, "qemu-io", "-f", "raw", "nbd+unix:///src?socket="+srcSock, "-c", "write -P 0x5a 5M 256k")
	if got := rec.mem.Bytes()[5<<20 : 5<<20+256<<10]; !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 256<<10)) {
		t.Error("write acknowledged to the source's writer is not in the backend")
	}

	q.exec("block-job-cancel", map[string]any{"device": "mirror", "force": true})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var jobs []json.RawMessage
		json.Unmarshal(q.exec("query-block-jobs", nil), &jobs)
		if len(jobs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("mirror job still there 10s after cancel")
		}
	}
	q.exec("blockdev-del", map[string]any{"node-name": "target"})

	final, err := os.ReadFile(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rec.mem.Bytes(), final) {
		t.Error("export differs from the source after the mirror")
	}
	if s := srv.Stats(); s.Rejected != 0 || s.ProtocolErrors != 0 || s.BackendErrors != 0 || s.WriteRequests == 0 {
		t.Errorf("Stats() = %+v", s)
	}
	ops := map[string]int{}
	for _, c := range rec.Calls() {
		ops[c.op]++
	}
	t.Logf("backend calls by the mirror: %v, stats %+v", ops, srv.Stats())
}

// qmpClient is just enough QMP for the test.
type qmpClient struct {
	t   *testing.T
	nc  net.Conn
	dec *json.Decoder
}

func dialQMP(t *testing.T, path string) *qmpClient {
	t.Helper()
	var nc net.Conn
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if nc, err = net.Dial("unix", path); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qmp: %v", err)
		}
	}
	t.Cleanup(func() { nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(time.Minute))
	q := &qmpClient{t: t, nc: nc, dec: json.NewDecoder(bufio.NewReader(nc))}
	var greeting map[string]any
	if err := q.dec.Decode(&greeting); err != nil {
		t.Fatalf("qmp greeting: %v", err)
	}
	q.exec("qmp_capabilities", nil)
	return q
}

// exec runs cmd and returns its "return" value, skipping events.
func (q *qmpClient) exec(cmd string, args any) json.RawMessage {
	q.t.Helper()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := json.NewEncoder(q.nc).Encode(req); err != nil {
		q.t.Fatalf("qmp %s: %v", cmd, err)
	}
	for {
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := q.dec.Decode(&resp); err != nil {
			q.t.Fatalf("qmp %s: %v", cmd, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			q.t.Fatalf("qmp %s: %s", cmd, resp.Error.Desc)
		}
		return resp.Return
	}
}
