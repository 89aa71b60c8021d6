package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/axproject/ax/test/testenv"
)

// readCpio parses a newc archive: name → entry.
func readCpio(t *testing.T, data []byte) map[string]cpioEntry {
	t.Helper()
	out := map[string]cpioEntry{}
	for off := 0; ; {
		if off+110 > len(data) || string(data[off:off+6]) != "070701" {
			t.Fatalf("bad header at %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(data[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(data[off+110 : off+110+namesize-1])
		off = (off + 110 + namesize + 3) &^ 3
		content := data[off : off+size]
		off = (off + size + 3) &^ 3
		if name == "TRAILER!!!" {
			return out
		}
		out[name] = cpioEntry{Name: name, Mode: uint32(mode), Data: content}
	}
}

func TestCpioRoundTripAndDeterminism(t *testing.T) {
	entries := []cpioEntry{
		{Name: "bin", Mode: modeDir | 0o755},
		{Name: "init", Mode: modeFile | 0o755, Data: []byte("#!/bin/sh\n")},
		{Name: "bin/sh", Mode: modeSymlink | 0o777, Data: []byte("busybox")},
		{Name: "odd", Mode: modeFile | 0o644, Data: []byte("12345")},
	}
	var a, b bytes.Buffer
	if err := writeCpio(&a, entries); err != nil {
		t.Fatal(err)
	}
	// Same entries in another order: byte-identical archive.
	if err := writeCpio(&b, []cpioEntry{entries[3], entries[1], entries[0], entries[2]}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("archive depends on entry order")
	}
	got := readCpio(t, a.Bytes())
	for _, e := range entries {
		g, ok := got[e.Name]
		if !ok || g.Mode != e.Mode || !bytes.Equal(g.Data, e.Data) {
			t.Errorf("entry %s: got %+v", e.Name, g)
		}
	}
}

func TestCheckStaticRefusesDynamicBinary(t *testing.T) {
	err := checkStatic("/bin/ls")
	if err == nil {
		t.Fatal("/bin/ls accepted as a static binary")
	}
	if err := checkStatic(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("missing file accepted")
	}
}

func TestBuildCachesByContent(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err != nil || checkStatic("/bin/busybox") != nil {
		testenv.RequireCommand(t, "busybox-static-binary", "apt-get install busybox-static")
	}
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	os.WriteFile(kernel, []byte("not really a kernel"), 0o644)
	cfg := Config{CacheDir: filepath.Join(dir, "cache"), Kernel: kernel, WantModules: []string{}, Files: map[string][]byte{"/etc/ax/extra": []byte("one")}}
	ctx := context.Background()
	first, err := Build(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if first.Cached {
		t.Fatal("first build reported as cached")
	}
	again, err := Build(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cached || again.Key != first.Key {
		t.Fatalf("second build: cached=%v key %s vs %s", again.Cached, again.Key, first.Key)
	}
	cfg.Files = map[string][]byte{"/etc/ax/extra": []byte("two")}
	changed, err := Build(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if changed.Cached || changed.Key == first.Key {
		t.Fatal("a changed input did not give a new image")
	}
	f, _ := os.Open(changed.Initrd)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(zr)
	files := readCpio(t, data)
	for _, want := range []string{"init", "bin/busybox", "etc/ax/modules", "etc/ax/extra"} {
		if _, ok := files[want]; !ok {
			t.Errorf("initramfs lacks %s", want)
		}
	}
	if string(files["etc/ax/extra"].Data) != "two" {
		t.Errorf("etc/ax/extra = %q", files["etc/ax/extra"].Data)
	}
}

func TestBuildErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := Build(context.Background(), Config{CacheDir: dir, Kernel: filepath.Join(dir, "nope")})
	if !errors.Is(err, ErrNoKernel) {
		t.Fatalf("missing kernel: err = %v, want ErrNoKernel", err)
	}
	kernel := filepath.Join(dir, "vmlinuz")
	os.WriteFile(kernel, []byte("k"), 0o644)
	_, err = Build(context.Background(), Config{CacheDir: dir, Kernel: kernel})
	if err == nil {
		t.Fatal("modules wanted without a modules directory: no error")
	}
	_, err = Build(context.Background(), Config{CacheDir: dir, Kernel: kernel, WantModules: []string{}, Binaries: []string{"/bin/ls"}})
	if err == nil {
		t.Fatal("dynamic guest binary accepted")
	}
}

func TestResolveModulesFromDebianKernel(t *testing.T) {
	testenv.RequireRoot(t) // the cache under /var/cache needs root
	testenv.RequireCommand(t, "apt-get", "run on Debian")
	kernel, modDir, err := debianKernel(context.Background(), DefaultCacheDir, DefaultKernelPackage, slog.New(slog.DiscardHandler))
	if err != nil {
		if testenv.Privileged() {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	if _, err := os.Stat(kernel); err != nil {
		t.Fatal(err)
	}
	mods, err := resolveModules(modDir, LabModules)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[moduleName(m)] = i
	}
	// Dependencies load first: virtio before virtio_pci, vsock before its transport.
	for _, pair := range [][2]string{{"virtio", "virtio_pci"}, {"virtio_ring", "virtio_net"}, {"vsock", "vmw_vsock_virtio_transport"}} {
		a, aok := pos[pair[0]]
		b, bok := pos[pair[1]]
		if !aok || !bok || a > b {
			t.Errorf("order %v: %s (%d,%v) must precede %s (%d,%v)", mods, pair[0], a, aok, pair[1], b, bok)
		}
	}
	if _, err := resolveModules(modDir, []string{"no_such_module"}); err == nil {
		t.Error("unknown module accepted")
	}
}
