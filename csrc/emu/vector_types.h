// Emulator shim: <vector_types.h> resolves here under -I csrc/emu (tests without a GPU).
#pragma once
#include "cuda_emu.h"
