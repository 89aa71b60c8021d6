package bpf_test

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/axproject/ax/bpf"
	"github.com/axproject/ax/test/testenv"
)

// TestLoad proves that the running kernel's verifier accepts the programs
// with the constants user space sets.
func TestLoad(t *testing.T) {
	testenv.RequireRoot(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}

	gs, err := bpf.LoadGate()
	if err != nil {
		t.Fatal(err)
	}
	var gvars bpf.GateVariableSpecs
	if err := gs.Assign(&gvars); err != nil {
		t.Fatal(err)
	}
	if err := gvars.ReleaseMark.Set(uint32(0xa5a5a5a5)); err != nil {
		t.Fatal(err)
	}
	if err := gvars.MaxFrame.Set(uint32(3000)); err != nil {
		t.Fatal(err)
	}
	var gate bpf.GateObjects
	if err := gs.LoadAndAssign(&gate, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("gate: %+v", ve)
		}
		t.Fatal(err)
	}
	defer gate.Close()

	var rel bpf.ReleaseObjects
	if err := bpf.LoadReleaseObjects(&rel, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("release: %+v", ve)
		}
		t.Fatal(err)
	}
	defer rel.Close()
}

func TestLayout(t *testing.T) {
	if bpf.FrameHdrSize != 32 {
		t.Errorf("frame header is %d bytes, the decoder expects 32", bpf.FrameHdrSize)
	}
	if bpf.MaxFrame != 9216 {
		t.Errorf("MaxFrame = %d", bpf.MaxFrame)
	}
}
