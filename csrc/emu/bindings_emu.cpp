// fasttfm._C_emu: csrc/bindings.cpp built for CPU tensors against the SIMT emulator.
// (A separate translation unit name keeps its object file apart from fasttfm._C's.)
#ifndef FASTTFM_EMU
#define FASTTFM_EMU 1
#endif
#include "../bindings.cpp"
