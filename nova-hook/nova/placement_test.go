package nova

import (
	"regexp"
	"testing"
)

// A reservation's consumer is a version 5 UUID, the same for the same
// provider and VM (after a restart, on another axd), another for another
// provider or VM; the provider's case does not matter.
func TestReservationConsumer(t *testing.T) {
	const rp = "7d6c5b4a-3f2e-4d1c-8b0a-9f8e7d6c5b4a"
	c := ReservationConsumer(rp, "instance-0000002a")
	if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(c) {
		t.Fatalf("consumer %q is not a version 5 UUID", c)
	}
	if again := ReservationConsumer("7D6C5B4A-3F2E-4D1C-8B0A-9F8E7D6C5B4A", "instance-0000002a"); again != c {
		t.Errorf("same provider (upper case) and VM: %s, then %s", c, again)
	}
	seen := map[string]string{c: "rp/instance-0000002a"}
	for _, x := range []struct{ rp, vm string }{
		{rp, "instance-0000002b"},
		{"1c0a7d52-8b1e-4c8e-9a55-2f3b4c5d6e70", "instance-0000002a"},
		{rp + "/instance", "-0000002a"}, // the separator is in neither a UUID nor a domain name
	} {
		got := ReservationConsumer(x.rp, x.vm)
		if prev, ok := seen[got]; ok {
			t.Errorf("%s/%s has the consumer of %s: %s", x.rp, x.vm, prev, got)
		}
		seen[got] = x.rp + "/" + x.vm
	}
}

func TestResourcesEqual(t *testing.T) {
	a := Resources{"VCPU": 1, "MEMORY_MB": 512}
	for _, c := range []struct {
		b    Resources
		want bool
	}{
		{Resources{"MEMORY_MB": 512, "VCPU": 1}, true},
		{Resources{"VCPU": 1}, false},
		{Resources{"VCPU": 1, "MEMORY_MB": 513}, false},
		{Resources{"VCPU": 1, "DISK_GB": 512}, false},
		{nil, false},
	} {
		if got := a.Equal(c.b); got != c.want {
			t.Errorf("%v equal %v: %v, want %v", a, c.b, got, c.want)
		}
	}
	if !Resources(nil).Equal(Resources{}) {
		t.Error("nil and empty differ")
	}
}
