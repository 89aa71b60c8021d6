// Package names checks the names AX accepts from peers, guests and API
// callers (VMs, hosts, taps, block nodes) and builds paths from them that
// cannot leave their directory.
package names

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// MaxLen bounds a VM or host name.
const MaxLen = 128

// ErrBadName is wrapped by every refusal of a name.
var ErrBadName = errors.New("bad name")

// Check accepts 1..MaxLen characters of [A-Za-z0-9._-] that do not start
// with '.' or '-': such a name is a single path element that is neither
// "." nor "..", an argument that is never an option, and a word a shell
// or QEMU's option parser (which splits on ',' and '=') takes as it is.
// kind says what the name is for ("vm", "host") in the error.
func Check(kind, s string) error {
	return checkLen(kind, s, MaxLen)
}

func checkLen(kind, s string, max int) error {
	if len(s) == 0 || len(s) > max {
		return fmt.Errorf("%w: %s name of %d bytes, want 1..%d", ErrBadName, kind, len(s), max)
	}
	if s[0] == '.' || s[0] == '-' {
		return fmt.Errorf("%w: %s name %q starts with %q", ErrBadName, kind, s, s[0])
	}
	for i := 0; i < len(s); i++ {
		if !safe(s[i]) {
			return fmt.Errorf("%w: %s name %q has %q; use letters, digits, '.', '_' and '-'", ErrBadName, kind, s, s[i])
		}
	}
	return nil
}

func safe(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
}

// CheckInterface accepts a network interface name (Linux: at most 15 bytes)
// of the same safe alphabet.
func CheckInterface(kind, s string) error { return checkLen(kind, s, 15) }

// CheckNode accepts a QEMU block node name: a letter, then up to 31 of
// [A-Za-z0-9._-] (QEMU's own rule for node names).
func CheckNode(s string) error {
	if err := checkLen("block node", s, 32); err != nil {
		return err
	}
	if c := s[0]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
		return fmt.Errorf("%w: block node name %q must start with a letter", ErrBadName, s)
	}
	return nil
}

// Join returns dir/name for a name that passes Check, and checks that the
// result is a direct child of dir.
func Join(dir, kind, name string) (string, error) {
	if err := Check(kind, name); err != nil {
		return "", err
	}
	return Within(dir, name)
}

// Within returns dir joined with rel and refuses a result outside dir (for
// relative paths of several elements built by AX itself).
func Within(dir, rel string) (string, error) {
	if filepath.IsAbs(rel) {
		return "", fmt.Errorf("%w: path %q is absolute, want one inside %s", ErrBadName, rel, dir)
	}
	base := filepath.Clean(dir)
	p := filepath.Join(base, rel)
	if p == base || !strings.HasPrefix(p, base+string(filepath.Separator)) && base != string(filepath.Separator) {
		return "", fmt.Errorf("%w: path %q leaves %s", ErrBadName, rel, dir)
	}
	return p, nil
}

// CheckPath accepts an absolute, clean path without characters QEMU's
// option parser or a shell would read as syntax (',', '=', spaces, quotes,
// control characters): what AX passes to QEMU as a file name. When dirs is
// not empty the path must lie below one of them.
func CheckPath(kind, p string, dirs ...string) error {
	if p == "" || !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return fmt.Errorf("%w: %s path %q must be absolute and clean", ErrBadName, kind, p)
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c != '/' && !safe(c) && c != '+' && c != '~' && c != ':' && c != '@' {
			return fmt.Errorf("%w: %s path %q has %q", ErrBadName, kind, p, c)
		}
	}
	if len(dirs) == 0 {
		return nil
	}
	for _, d := range dirs {
		d = filepath.Clean(d)
		if strings.HasPrefix(p, d+"/") || d == "/" {
			return nil
		}
	}
	return fmt.Errorf("%w: %s path %q is outside the directories this host allows (%s)", ErrBadName, kind, p, strings.Join(dirs, ", "))
}
