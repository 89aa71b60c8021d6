// Package testenv decides whether a test that needs root, QEMU or a kernel
// feature runs, skips with a reason, or fails because CI demanded it.
//
// Two environment variables steer it:
//
//	AX_REQUIRE_PRIVILEGED=1   missing root, QEMU or lab prerequisites fail the test (CI sets it)
//	AX_REQUIRE_FEATURES=a,b   these kernel features must be present (the guest-kernel runner sets it)
//
// Kernel features that this host kernel lacks (soft-dirty, vsock loopback, …)
// are not covered by AX_REQUIRE_PRIVILEGED: CI runs those tests inside a lab
// guest whose kernel has them, and names them in AX_REQUIRE_FEATURES there.
package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Privileged reports whether CI demanded that privileged tests run.
func Privileged() bool { return os.Getenv("AX_REQUIRE_PRIVILEGED") == "1" }

// FeatureRequired reports whether the named kernel feature was demanded.
func FeatureRequired(name string) bool {
	for _, f := range strings.Split(os.Getenv("AX_REQUIRE_FEATURES"), ",") {
		if strings.TrimSpace(f) == name {
			return true
		}
	}
	return false
}

// skipOrFail skips the test with why, or fails it when demanded is true.
func skipOrFail(t testing.TB, demanded bool, why string) {
	t.Helper()
	if demanded {
		t.Fatalf("required but unavailable: %s", why)
	}
	t.Skip(why)
}

// RequireRoot skips (or fails under AX_REQUIRE_PRIVILEGED=1) unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, Privileged(), "needs root (run as root, e.g. sudo make test)")
	}
}

// RequireCommand skips (or fails under AX_REQUIRE_PRIVILEGED=1) unless name is on PATH.
func RequireCommand(t testing.TB, name, how string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		skipOrFail(t, Privileged(), name+" not found (try: "+how+")")
	}
}

// RequireFeature skips unless available; it fails instead when the feature is
// named in AX_REQUIRE_FEATURES.
func RequireFeature(t testing.TB, name string, available bool, how string) {
	t.Helper()
	if !available {
		skipOrFail(t, FeatureRequired(name), "kernel feature "+name+" unavailable ("+how+")")
	}
}

// RequireLong skips tests that take minutes when -short is given.
func RequireLong(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("long test; run without -short")
	}
}
