// The CPU emulator of the CUDA programming model, for tests: with `-I csrc/emu` and
// -DFUSEDRNN_EMULATED_CUDA, unmodified CUDA kernel sources compile with g++ and run on CPU threads
// (one OS thread per CUDA thread). See csrc/emu/README.md for how kernels must be written and
// launched, and for what the emulator cannot show.
#pragma once

#include "emu_keywords.h"
#include "emu_runtime_types.h"
#include "emu_engine.h"
#include "emu_intrinsics.h"
#include "emu_launch.h"
#include "emu_runtime_api.h"
#include "emu_half_types.h"
