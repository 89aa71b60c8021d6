// Package bpf holds AX's eBPF programs and their Go bindings: ax_gate (tc
// ingress on a VM's tap) captures the guest's output, ax_release (XDP, run
// with BPF_PROG_RUN in live-frames mode) re-injects it once committed.
//
// The C sources are compiled by bpf2go (go generate, see gen.go); the
// objects and bindings are committed, so building needs no clang.
package bpf
