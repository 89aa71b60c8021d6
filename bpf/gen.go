package bpf

// Regenerate with `make generate` (needs clang, llvm-strip and libbpf-dev).
//go:generate go tool bpf2go -cc clang -strip llvm-strip -cflags "-O2 -g -Wall -Werror" -target bpfel -type frame_hdr -type gate_state -type drop_reason -type frame_flag Gate gate.c -- -I./include
//go:generate go tool bpf2go -cc clang -strip llvm-strip -cflags "-O2 -g -Wall -Werror" -target bpfel -type batch Release release.c -- -I./include
