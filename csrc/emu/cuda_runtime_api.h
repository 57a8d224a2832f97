// Emulator shim: <cuda_runtime_api.h> resolves here under -I csrc/emu (tests without a GPU).
#pragma once
#include "cuda_emu.h"
