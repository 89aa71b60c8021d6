package guestrun

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/test/image"
)

// maxTestdata bounds a package's testdata directory: it travels in the
// initramfs, which lives in guest RAM.
const maxTestdata = 64 << 20

// binary is one compiled test binary and what the guest needs to run it.
type binary struct {
	Package  Package
	Name     string // unique in the run; the guest file is /bin/<Name>.test
	Path     string // on the host
	Testdata []byte // tar of the package's testdata directory, or nil
}

// compile builds every package's test binary into dir, statically, and packs
// its testdata directory: go test runs a binary in its package directory,
// and the guest runs it in a directory holding that package's testdata.
func compile(ctx context.Context, cfg Config, dir string) ([]binary, error) {
	paths := make([]string, len(cfg.Packages))
	seen := map[string]bool{}
	for i, p := range cfg.Packages {
		if seen[p.Path] {
			return nil, fmt.Errorf("package %s is listed twice (give one -run regexp joined with |)", p.Path)
		}
		seen[p.Path] = true
		paths[i] = p.Path
	}
	dirs, err := listPackages(ctx, cfg, paths)
	if err != nil {
		return nil, err
	}
	names := binaryNames(paths)
	bins := make([]binary, len(cfg.Packages))
	for i, p := range cfg.Packages {
		b := binary{Package: p, Name: names[i], Path: filepath.Join(dir, names[i]+".test")}
		args := []string{"test", "-c", "-vet=off", "-o", b.Path}
		if len(cfg.Tags) > 0 {
			args = append(args, "-tags", strings.Join(cfg.Tags, ","))
		}
		cmd := goCommand(ctx, cfg, append(args, p.Path)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("compile tests of %s: %v: %s", p.Path, err, strings.TrimSpace(string(out)))
		}
		if _, err := os.Stat(b.Path); err != nil {
			return nil, fmt.Errorf("compile tests of %s: no test binary (does it have _test.go files for these tags?)", p.Path)
		}
		b.Testdata, err = tarTestdata(filepath.Join(dirs[p.Path], "testdata"))
		if err != nil {
			return nil, fmt.Errorf("testdata of %s: %w", p.Path, err)
		}
		bins[i] = b
	}
	return bins, nil
}

// goCommand runs the go command for static binaries. On cancellation it
// kills the go command's process group, which it leads: the compiler and
// linker it started would otherwise run on and hold its output open.
func goCommand(ctx context.Context, cfg Config, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, cfg.Go, args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	return cmd
}

// listPackages returns each package's directory, and refuses a package that
// does not exist or has no tests for the build tags.
func listPackages(ctx context.Context, cfg Config, paths []string) (map[string]string, error) {
	args := []string{"list", "-e", "-f", "{{.ImportPath}}\t{{.Dir}}\t{{len .TestGoFiles}}\t{{len .XTestGoFiles}}\t{{with .Error}}{{.Err}}{{end}}"}
	if len(cfg.Tags) > 0 {
		args = append(args, "-tags", strings.Join(cfg.Tags, ","))
	}
	cmd := goCommand(ctx, cfg, append(args, paths...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go list: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	dirs := map[string]string{}
	s := bufio.NewScanner(bytes.NewReader(out))
	for s.Scan() {
		f := strings.SplitN(s.Text(), "\t", 5)
		if len(f) != 5 {
			continue
		}
		if f[4] != "" {
			return nil, fmt.Errorf("package %s: %s", f[0], f[4])
		}
		if f[2] == "0" && f[3] == "0" {
			why := ""
			if len(cfg.Tags) > 0 {
				why = " for build tags " + strings.Join(cfg.Tags, ",")
			}
			return nil, fmt.Errorf("package %s has no _test.go files%s", f[0], why)
		}
		dirs[f[0]] = f[1]
	}
	for _, p := range paths {
		if _, ok := dirs[p]; !ok {
			return nil, fmt.Errorf("package %s: not found by go list (give import paths, not patterns)", p)
		}
	}
	return dirs, nil
}

// binaryNames gives each import path the shortest unique tail of its
// elements, joined with "-", e.g. ax/dirty → "dirty", or "ax-dirty" and
// "lab-dirty" when both are run.
func binaryNames(paths []string) []string {
	elems := make([][]string, len(paths))
	depth := make([]int, len(paths))
	for i, p := range paths {
		elems[i] = strings.Split(strings.Trim(p, "/"), "/")
		depth[i] = 1
	}
	name := func(i int) string {
		e := elems[i]
		d := min(depth[i], len(e))
		return sanitizeName(strings.Join(e[len(e)-d:], "-"))
	}
	for {
		byName := map[string][]int{}
		for i := range paths {
			byName[name(i)] = append(byName[name(i)], i)
		}
		grew := false
		for _, idx := range byName {
			if len(idx) < 2 {
				continue
			}
			for _, i := range idx {
				if depth[i] < len(elems[i]) {
					depth[i]++
					grew = true
				}
			}
		}
		if !grew {
			break
		}
	}
	out := make([]string, len(paths))
	for i := range paths {
		out[i] = name(i)
	}
	return out
}

// sanitizeName keeps a binary name safe as a file name and a shell word.
func sanitizeName(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '_'
	}, s)
}

// tarTestdata packs dir as testdata/… (nil when there is no such directory).
func tarTestdata(dir string) ([]byte, error) {
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, nil
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(filepath.Dir(dir), path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		} else if !info.Mode().IsRegular() && !info.IsDir() {
			return nil // sockets, fifos: nothing a test reads
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		// Only content counts: the image cache is keyed by it.
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		hdr.ModTime, hdr.AccessTime, hdr.ChangeTime = time.Unix(0, 0), time.Time{}, time.Time{}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if buf.Len()+len(data) > maxTestdata {
				return fmt.Errorf("%s is larger than %d MiB, too big for the guest's initramfs", dir, maxTestdata>>20)
			}
			if _, err := tw.Write(data); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// buildImage packs the binaries, their testdata, the run plan and the
// modules into a guest image on the lab kernel.
func buildImage(ctx context.Context, cfg Config, bins []binary) (*image.Image, error) {
	ic := cfg.Image
	ic.Init = guestInit
	ic.WantModules = cfg.Modules
	ic.Binaries = nil
	ic.Files = map[string][]byte{
		"/etc/ax/guestrun": []byte(runPlan(cfg, bins)),
		"/etc/hosts":       []byte("127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
	}
	for _, b := range bins {
		ic.Binaries = append(ic.Binaries, b.Path)
		if b.Testdata != nil {
			ic.Files["/etc/ax/"+b.Name+".testdata.tar"] = b.Testdata
		}
	}
	img, err := image.Build(ctx, ic)
	if err != nil {
		return nil, fmt.Errorf("guest image: %w", err)
	}
	return img, nil
}
