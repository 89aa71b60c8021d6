package bpf

import "unsafe"

// MaxFrame is the largest frame ax_gate can copy (MAX_FRAME in gate.c).
const MaxFrame = len(GateFrame{}.Data)

// FrameHdrSize is the size of the header ax_gate writes before each frame
// in the ring buffer.
const FrameHdrSize = int(unsafe.Sizeof(GateFrameHdr{}))
