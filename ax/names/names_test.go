package names

import (
	"errors"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"vm1", true},
		{"web-01.prod_a", true},
		{"instance-0000002a", true},
		{"3f2504e0-4f89-11d3-9a0c-0305e82c3301", true},
		{"", false},
		{".", false},
		{"..", false},
		{".hidden", false},
		{"-rf", false},
		{"a/b", false},
		{"../../../victim", false},
		{"v;touch pwned;#", false},
		{"with space", false},
		{"tab\there", false},
		{"a,b", false},
		{"a=b", false},
		{"$(id)", false},
		{"`id`", false},
		{"naïve", false},
		{"nul\x00", false},
		{strings.Repeat("a", MaxLen), true},
		{strings.Repeat("a", MaxLen+1), false},
	} {
		err := Check("vm", tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("Check(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrBadName) {
			t.Errorf("Check(%q) error %v does not wrap ErrBadName", tc.name, err)
		}
	}
}

func TestJoinStaysInside(t *testing.T) {
	p, err := Join("/var/lib/ax/replicas", "vm", "vm1")
	if err != nil || p != "/var/lib/ax/replicas/vm1" {
		t.Fatalf("Join = %q, %v", p, err)
	}
	for _, bad := range []string{"..", "../x", "a/../../x", "/etc", ".", ""} {
		if p, err := Join("/var/lib/ax/replicas", "vm", bad); err == nil {
			t.Errorf("Join(%q) = %q, want an error", bad, p)
		}
	}
	for _, bad := range []string{"../x", "a/../../x", "/etc/passwd", ".", ""} {
		if p, err := Within("/var/lib/ax", bad); err == nil {
			t.Errorf("Within(%q) = %q, want an error", bad, p)
		}
	}
	if p, err := Within("/var/lib/ax", "replicas/vm1/disks"); err != nil || p != "/var/lib/ax/replicas/vm1/disks" {
		t.Errorf("Within = %q, %v", p, err)
	}
}

func TestCheckInterfaceAndNode(t *testing.T) {
	if err := CheckInterface("tap", "tap-vm1"); err != nil {
		t.Error(err)
	}
	for _, bad := range []string{"a-very-long-tap-name", "tap;x", "", "-tap"} {
		if CheckInterface("tap", bad) == nil {
			t.Errorf("CheckInterface(%q) accepted", bad)
		}
	}
	if err := CheckNode("disk0"); err != nil {
		t.Error(err)
	}
	for _, bad := range []string{"0disk", "d,file=/etc/shadow", "_d", strings.Repeat("d", 33)} {
		if CheckNode(bad) == nil {
			t.Errorf("CheckNode(%q) accepted", bad)
		}
	}
}

func TestCheckPath(t *testing.T) {
	for _, tc := range []struct {
		p    string
		dirs []string
		ok   bool
	}{
		{"/var/cache/ax/lab/vmlinuz-6.1", nil, true},
		{"/var/cache/ax/lab/vmlinuz", []string{"/var/cache/ax"}, true},
		{"/etc/shadow", []string{"/var/cache/ax"}, false},
		{"/var/cache/axe/k", []string{"/var/cache/ax"}, false},
		{"/var/cache/ax/../../etc/shadow", []string{"/var/cache/ax"}, false},
		{"relative/k", nil, false},
		{"/x,file.locking=off", nil, false},
		{"/x y", nil, false},
		{"/x;id", nil, false},
		{"", nil, false},
	} {
		err := CheckPath("kernel", tc.p, tc.dirs...)
		if (err == nil) != tc.ok {
			t.Errorf("CheckPath(%q, %v) = %v, want ok=%v", tc.p, tc.dirs, err, tc.ok)
		}
	}
}
