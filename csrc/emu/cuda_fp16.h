// Emulator shim: <cuda_fp16.h> resolves here under -I csrc/emu. Host types bit-exact with CUDA's.
#pragma once
#include "cuda_emu.h"
