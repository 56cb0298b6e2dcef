// fasttfm._C_emu: every csrc/*.cu kernel file compiled as C++ against the SIMT emulator.
// Add one line per kernel file.
#ifndef FASTTFM_EMU
#define FASTTFM_EMU 1
#endif
#include "../layer_norm.cu"
#include "../cross_entropy.cu"  // cross-entropy section
#include "../softmax.cu"

// Emulator controls reached from bindings.cpp (which cannot include the emulator header).
namespace ftfm {
void emu_set_order(int order, uint64_t seed) { ::ftfm_emu::set_order(order, seed); }
}  // namespace ftfm
