// Package image builds the lab guest: a Debian kernel and an initramfs of
// busybox, the virtio modules and the project's guest binaries, cached by content.
package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// DefaultKernelPackage is the Debian package whose kernel the lab boots.
const DefaultKernelPackage = "linux-image-cloud-amd64"

// DefaultCacheDir keeps downloaded kernels and built images between runs.
const DefaultCacheDir = "/var/cache/ax/lab"

// LabModules are the modules the lab guest loads: virtio transport, net,
// block, console (virtio-serial) and vsock.
var LabModules = []string{
	"virtio_pci", "virtio_net", "virtio_blk", "virtio_console",
	"vmw_vsock_virtio_transport", "vsock_loopback",
}

// formatVersion changes whenever the image layout changes, so old cache
// entries are not mistaken for current ones.
const formatVersion = "ax-image-1"

// ErrNoKernel means no guest kernel could be found or downloaded.
var ErrNoKernel = errors.New("no guest kernel")

// Config says what goes into the image.
type Config struct {
	CacheDir string // default DefaultCacheDir
	// KernelPackage is the Debian package to download when Kernel is empty.
	KernelPackage string
	// Kernel is a vmlinuz path given by the user; Modules is then its
	// lib/modules/<version> directory (may be empty for a kernel with
	// virtio built in).
	Kernel  string
	Modules string
	// WantModules are module names to load at boot, with their dependencies.
	WantModules []string
	// Binaries are copied into the guest's /bin under their base names.
	Binaries []string
	// Files are extra files: guest path → content.
	Files map[string][]byte
	// Init is the /init script; default LabInit.
	Init string
	// Busybox is the static busybox binary; default /bin/busybox.
	Busybox string
	Log     *slog.Logger
}

// Image is a built guest.
type Image struct {
	Kernel  string // vmlinuz path
	Initrd  string // initramfs path (gzip'ed newc cpio)
	Key     string // content hash of every input
	Cached  bool   // true when reused from the cache
	Modules []string
}

// Build returns the image for cfg, building it only when no image with the
// same inputs is cached.
func Build(ctx context.Context, cfg Config) (*Image, error) {
	if cfg.CacheDir == "" {
		cfg.CacheDir = DefaultCacheDir
	}
	if cfg.KernelPackage == "" {
		cfg.KernelPackage = DefaultKernelPackage
	}
	if cfg.Init == "" {
		cfg.Init = LabInit
	}
	if cfg.Busybox == "" {
		cfg.Busybox = "/bin/busybox"
	}
	if cfg.WantModules == nil {
		cfg.WantModules = LabModules
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	kernel, modDir := cfg.Kernel, cfg.Modules
	if kernel == "" {
		var err error
		kernel, modDir, err = debianKernel(ctx, cfg.CacheDir, cfg.KernelPackage, cfg.Log)
		if err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(kernel); err != nil {
		return nil, fmt.Errorf("%w: kernel %s: %v", ErrNoKernel, kernel, err)
	}
	mods, err := resolveModules(modDir, cfg.WantModules)
	if err != nil {
		return nil, err
	}
	if err := checkStatic(cfg.Busybox); err != nil {
		return nil, fmt.Errorf("busybox: %w (try: apt-get install busybox-static)", err)
	}
	for _, b := range cfg.Binaries {
		if err := checkStatic(b); err != nil {
			return nil, fmt.Errorf("guest binary: %w (build it with CGO_ENABLED=0)", err)
		}
	}

	// Gather every input and hash it; the hash names the cache entry.
	h := sha256.New()
	entries := []cpioEntry{}
	add := func(name string, mode uint32, data []byte) {
		fmt.Fprintf(h, "%s %o %d\n", name, mode, len(data))
		h.Write(data)
		entries = append(entries, cpioEntry{Name: name, Mode: mode, Data: data})
	}
	fmt.Fprintln(h, formatVersion)
	kdata, err := os.ReadFile(kernel)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoKernel, err)
	}
	h.Write(kdata)
	for _, d := range []string{"bin", "dev", "etc", "etc/ax", "lib", "lib/modules", "proc", "run", "sys", "tmp"} {
		add(d, modeDir|0o755, nil)
	}
	add("init", modeFile|0o755, []byte(cfg.Init))
	bb, err := os.ReadFile(cfg.Busybox)
	if err != nil {
		return nil, fmt.Errorf("busybox: %w (try: apt-get install busybox-static)", err)
	}
	add("bin/busybox", modeFile|0o755, bb)
	add("bin/sh", modeSymlink|0o777, []byte("busybox"))
	var order []string
	for _, m := range mods {
		data, err := os.ReadFile(filepath.Join(modDir, m))
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", m, err)
		}
		base := filepath.Base(m)
		add("lib/modules/"+base, modeFile|0o644, data)
		order = append(order, base)
	}
	add("etc/ax/modules", modeFile|0o644, []byte(strings.Join(order, "\n")+"\n"))
	for _, b := range cfg.Binaries {
		data, err := os.ReadFile(b)
		if err != nil {
			return nil, fmt.Errorf("guest binary: %w", err)
		}
		add("bin/"+filepath.Base(b), modeFile|0o755, data)
	}
	names := make([]string, 0, len(cfg.Files))
	for n := range cfg.Files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		add(strings.TrimPrefix(n, "/"), modeFile|0o755, cfg.Files[n])
	}
	key := hex.EncodeToString(h.Sum(nil))[:24]

	dir := filepath.Join(cfg.CacheDir, "images", key)
	img := &Image{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Key: key, Modules: order}
	if fileExists(img.Kernel) && fileExists(img.Initrd) {
		img.Cached = true
		// Images cached before QEMU could run as another user than root.
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, fmt.Errorf("image cache: %w", err)
		}
		return img, nil
	}
	cfg.Log.Info("building guest image", "key", key, "modules", len(order), "binaries", len(cfg.Binaries))
	var cpio bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&cpio, gzip.BestSpeed)
	if err := writeCpio(zw, entries); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	// Build in a temporary directory and rename it into place, so a crash
	// never leaves a half-written image that looks complete.
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".build-")
	if err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	// QEMU may run as another user (libvirt's libvirt-qemu): the image
	// holds nothing secret.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "vmlinuz"), kdata, 0o644); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "initrd.img"), cpio.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil && !fileExists(img.Initrd) {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	return img, nil
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// checkStatic refuses a binary that needs a dynamic loader: the guest has none.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; the guest needs a static binary", path)
		}
	}
	return nil
}

// debianKernel downloads (once) and unpacks the Debian kernel package,
// returning its vmlinuz and lib/modules/<version> directory.
func debianKernel(ctx context.Context, cacheDir, meta string, log *slog.Logger) (string, string, error) {
	pkg, version, err := resolveKernelPackage(ctx, meta)
	if err != nil {
		return "", "", err
	}
	dir := filepath.Join(cacheDir, "kernel", pkg+"_"+version)
	if k, m, ok := unpackedKernel(dir); ok {
		return k, m, nil
	}
	log.Info("downloading guest kernel", "package", pkg, "version", version)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", "", fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".dl-")
	if err != nil {
		return "", "", fmt.Errorf("kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	dl := exec.CommandContext(ctx, "apt-get", "download", pkg+"="+version)
	dl.Dir = tmp
	if out, err := dl.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("%w: apt-get download %s=%s failed: %s (try: apt-get update, or give --kernel and --modules)",
			ErrNoKernel, pkg, version, lastLine(out))
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", "", fmt.Errorf("%w: apt-get download %s left %d packages", ErrNoKernel, pkg, len(debs))
	}
	root := filepath.Join(tmp, "root")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], root).CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("%w: unpack %s: %s", ErrNoKernel, debs[0], lastLine(out))
	}
	if err := os.Rename(root, dir); err != nil {
		// Another build (a parallel test) may have unpacked it first.
		if k, m, ok := unpackedKernel(dir); ok {
			return k, m, nil
		}
		return "", "", fmt.Errorf("kernel cache: %w", err)
	}
	if k, m, ok := unpackedKernel(dir); ok {
		return k, m, nil
	}
	return "", "", fmt.Errorf("%w: package %s holds no boot/vmlinuz-* and lib/modules/*", ErrNoKernel, pkg)
}

func unpackedKernel(dir string) (string, string, bool) {
	ks, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	ms, _ := filepath.Glob(filepath.Join(dir, "lib", "modules", "*", "modules.order"))
	if len(ks) != 1 || len(ms) != 1 {
		return "", "", false
	}
	return ks[0], filepath.Dir(ms[0]), true
}

// resolveKernelPackage turns the meta package into the concrete kernel
// package and its candidate version, as apt sees them now.
func resolveKernelPackage(ctx context.Context, meta string) (string, string, error) {
	if _, err := exec.LookPath("apt-cache"); err != nil {
		return "", "", fmt.Errorf("%w: apt-cache not found; give --kernel and --modules", ErrNoKernel)
	}
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", meta).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("%w: package %s not found (try: apt-get update, or give --kernel and --modules)", ErrNoKernel, meta)
	}
	pkg := ""
	s := bufio.NewScanner(bytes.NewReader(out))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			pkg = f[1]
			break
		}
	}
	if pkg == "" {
		pkg = meta // already a concrete kernel package
	}
	out, err = exec.CommandContext(ctx, "apt-cache", "policy", pkg).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("%w: apt-cache policy %s: %s", ErrNoKernel, pkg, lastLine(out))
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Candidate: "); ok && v != "(none)" {
			return pkg, v, nil
		}
	}
	return "", "", fmt.Errorf("%w: package %s has no installable version (try: apt-get update, or give --kernel and --modules)", ErrNoKernel, pkg)
}

func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// resolveModules returns the module files (relative to modDir) needed to
// load want, dependencies before dependents. Built-in modules are skipped.
func resolveModules(modDir string, want []string) ([]string, error) {
	if len(want) == 0 {
		return nil, nil
	}
	if modDir == "" {
		return nil, errors.New("modules wanted but no modules directory given (give --modules lib/modules/<version>)")
	}
	byName, err := moduleFiles(modDir)
	if err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(data)) {
			builtin[moduleName(l)] = true
		}
	}
	var order []string
	seen := map[string]bool{}
	var visit func(path string)
	visit = func(path string) {
		if seen[path] {
			return
		}
		seen[path] = true
		// Debian's package ships no modules.dep (depmod makes it at install
		// time), so dependencies come from each module's .modinfo, as depmod reads them.
		for _, name := range modinfoDepends(filepath.Join(modDir, path)) {
			if d, ok := byName[name]; ok {
				visit(d)
			}
		}
		order = append(order, path)
	}
	for _, w := range want {
		w = strings.ReplaceAll(w, "-", "_")
		if builtin[w] {
			continue
		}
		path, ok := byName[w]
		if !ok {
			return nil, fmt.Errorf("module %s is neither built into the kernel nor in %s", w, modDir)
		}
		visit(path)
	}
	return order, nil
}

// moduleFiles maps module names to their files (relative to modDir).
func moduleFiles(modDir string) (map[string]string, error) {
	byName := map[string]string{}
	err := filepath.WalkDir(modDir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			rel, _ := filepath.Rel(modDir, path)
			byName[moduleName(rel)] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("modules: %w", err)
	}
	return byName, nil
}

// modinfoDepends reads the "depends=" entry of a module's .modinfo section.
func modinfoDepends(path string) []string {
	f, err := elf.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil
	}
	data, err := sec.Data()
	if err != nil {
		return nil
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var names []string
			for _, n := range strings.Split(string(v), ",") {
				if n != "" {
					names = append(names, strings.ReplaceAll(n, "-", "_"))
				}
			}
			return names
		}
	}
	return nil
}

func moduleName(path string) string {
	base := filepath.Base(path)
	base = strings.TrimSuffix(base, ".xz")
	base = strings.TrimSuffix(base, ".zst")
	base = strings.TrimSuffix(base, ".ko")
	return strings.ReplaceAll(base, "-", "_")
}
