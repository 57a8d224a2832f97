// Sizes and memory layouts of the persistent recurrence kernels, shared by the kernels (device),
// the launcher (host) and the GPU-less occupancy check (host), so that all three agree by
// construction.
//
// Work split (DESIGN.md, "The one idea behind the speed"): a launch covers one layer and both of
// its directions; blocks [0, blocks_per_dir) run direction 0, the next blocks_per_dir direction 1.
// Block j of a direction owns hidden units [j*U, min(H, (j+1)*U)) with all G gates of each, so the
// cell update is block-local, and, for a projected LSTM, state columns [j*Ps, min(P, (j+1)*Ps)).
//
// The per-step product of a block is out[b][r] = sum_k act[b][k] * w[r][k]: act is the B x K state
// exchanged between blocks (h_{t-1}, or for backward the gate gradients), w the block's rows of a
// weight (row-major, K contiguous). That is the operand order of mma.sync m16n8k16 .row.col
// (A = weight rows, B = act^T, M = rows, N = batch), so a tensor-core path replaces the FMA tile
// loop of block_product.cuh without touching anything else.
#pragma once

#include <cstdint>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/macros.h"

namespace fusedrnn::cuda {

// Register tile of the FMA product: kTileRows weight rows x kTileBatch batch rows per thread.
// 2 x 4 keeps 8 accumulators and 6 loads per 8 FMAs; small enough for every dtype without spills.
constexpr int kTileRows = 2;
constexpr int kTileBatch = 4;
constexpr int kTileSize = kTileRows * kTileBatch;

// Threads per block. The GPU uses 8 warps; the emulator one warp, because every emulated
// __syncthreads costs ~10 us per live thread.
#if defined(FUSEDRNN_EMULATED_CUDA)
constexpr int kThreadsPerBlock = 32;
#else
constexpr int kThreadsPerBlock = 256;
#endif

FUSEDRNN_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FUSEDRNN_HOST_DEVICE constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Row pitch, in elements, of a K-long row in shared memory: 16-byte aligned rows (vector loads,
// ldmatrix) plus 16 bytes so that consecutive rows start in different bank groups.
FUSEDRNN_HOST_DEVICE constexpr int64_t smem_pitch(int64_t k, int64_t elem_bytes) {
  return (round_up(k * elem_bytes, 16) + 16) / elem_bytes;
}

// How the threads of a block split one product: tiles of kTileRows x kTileBatch outputs, and when
// there are fewer tiles than threads, the K range split `split` ways (partial sums reduced through
// shared memory, so no warp shuffle is needed).
struct ProductTiling {
  int tiles_rows = 0;
  int tiles_batch = 0;
  int tiles = 0;
  int split = 1;
  int k_chunk = 0;
  FUSEDRNN_HOST_DEVICE int partial_count() const { return tiles * split; }  // x kTileSize values
};

// k_align: K ranges start at multiples of it (the vector width of the shared-memory path).
FUSEDRNN_HOST_DEVICE ProductTiling make_tiling(int rows, int batch, int k, int threads,
                                               int k_align = 1) {
  ProductTiling t;
  t.tiles_rows = static_cast<int>(ceil_div(rows, kTileRows));
  t.tiles_batch = static_cast<int>(ceil_div(batch, kTileBatch));
  t.tiles = t.tiles_rows * t.tiles_batch;
  if (t.tiles == 0 || k == 0) {
    t.tiles = 0;
    return t;
  }
  int split = threads / t.tiles;
  // Below ~16 products per thread the reduction costs more than it saves.
  const int max_split = static_cast<int>(ceil_div(k, 16));
  split = split < 1 ? 1 : (split > max_split ? max_split : split);
  t.split = split;
  t.k_chunk = static_cast<int>(round_up(ceil_div(k, split), k_align));
  return t;
}

// The two products of a step. Forward: phase 0 gates (rows G*U, K = P), phase 1 projection
// (rows Ps of W_hr, K = H). Backward: phase 0 state gradient (rows U, or Ps with projection, of
// W_hh^T, K = G*H), phase 1 projection gradient (rows U of W_hr^T, K = P). Phase 1 only exists
// for a projected LSTM.
struct PhaseShape {
  int rows = 0;  // per block, the largest block
  int k = 0;
};

struct RecurrenceGeometry {
  int num_dirs = 1;
  int blocks_per_dir = 1;
  int threads = kThreadsPerBlock;
  int units_per_block = 1;  // U: hidden units per block (the last block may have fewer)
  int cols_per_block = 1;   // Ps: state columns per block (== U without projection)
  int batch_chunk = 1;      // Bc: batch rows per pass of a product (B if it fits)
  bool weights_in_smem = true;
  bool projected = false;
  PhaseShape phase[2];
  // Dynamic shared memory, byte offsets: weight slices of phase 0 and 1, the activation chunk,
  // the partial sums. Pitches in elements.
  int64_t smem_weights[2] = {0, 0};
  int64_t smem_act = 0;
  int64_t smem_partials = 0;
  int64_t smem_bytes = 0;
  int64_t weight_pitch[2] = {0, 0};
  int64_t act_pitch = 0;
};

// Workspace (allocated by torch per call): per direction, the exchange buffers and the block-local
// state that persists across steps. Offsets in bytes from the direction's base, 256-byte aligned.
//   forward:  [0] h exchange, 2 x [B, P] elements (double-buffered: step s reads s&1, writes the
//                 other, so one grid barrier per step suffices)
//             [1] r exchange [B, H] elements (projected LSTM)
//             [2] LSTM cell state [B, H] accumulators
//   backward: [0] gate-gradient exchange, 2 x [B, G*H] elements (double-buffered)
//             [1] state-gradient exchange [B, P] elements (projected LSTM)
//             [2] LSTM cell-state gradient [B, H] accumulators
//             [3] GRU: the part of dh_{t-1} that bypasses W_hh, [B, H] accumulators
struct WorkspaceLayout {
  int64_t offset[4] = {0, 0, 0, 0};
  int64_t per_direction = 0;
};

FUSEDRNN_HOST_DEVICE WorkspaceLayout make_workspace_layout(bool backward, CellKind cell,
                                                           int64_t batch, int64_t hidden,
                                                           int64_t state, int64_t elem_bytes,
                                                           int64_t acc_bytes) {
  const bool lstm = cell == CellKind::kLstm;
  const bool projected = lstm && state != hidden;
  const int64_t gates = gate_count(cell);
  int64_t size[4];
  if (!backward) {
    size[0] = 2 * batch * state * elem_bytes;
    size[1] = projected ? batch * hidden * elem_bytes : 0;
    size[2] = lstm ? batch * hidden * acc_bytes : 0;
    size[3] = 0;
  } else {
    size[0] = 2 * batch * gates * hidden * elem_bytes;
    size[1] = projected ? batch * state * elem_bytes : 0;
    size[2] = lstm ? batch * hidden * acc_bytes : 0;
    size[3] = cell == CellKind::kGru ? batch * hidden * acc_bytes : 0;
  }
  WorkspaceLayout w;
  int64_t at = 0;
  for (int i = 0; i < 4; ++i) {
    w.offset[i] = at;
    at += round_up(size[i], 256);
  }
  w.per_direction = at;
  return w;
}

}  // namespace fusedrnn::cuda
