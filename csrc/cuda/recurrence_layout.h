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
// __syncthreads costs ~10 us per live thread. The kernels take any multiple of 32 up to
// kMaxThreadsPerBlock (LaunchOptions::threads_per_block): the emulator's tests run the GPU's
// 8 warps too, so that what passes between warps (shared-memory hand-offs, the K-split sums of
// the tensor-core product) runs off the GPU as well.
constexpr int kMaxThreadsPerBlock = 256;
#if defined(FUSEDRNN_EMULATED_CUDA)
constexpr int kThreadsPerBlock = 32;
#else
constexpr int kThreadsPerBlock = kMaxThreadsPerBlock;
#endif

FUSEDRNN_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FUSEDRNN_HOST_DEVICE constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Row pitch, in elements, of a K-long row in shared memory: 16-byte aligned rows (vector loads,
// ldmatrix) and an odd number of 16-byte chunks, so that 8 consecutive rows start in 8 different
// 16-byte bank groups (an ldmatrix phase, or 8 threads' 16-byte loads, without conflicts). At
// least one spare chunk, which also covers K rounded up to 16 for the tensor-core product.
FUSEDRNN_HOST_DEVICE constexpr int64_t smem_pitch(int64_t k, int64_t elem_bytes) {
  const int64_t chunks = ceil_div(k * elem_bytes, 16);
  return (chunks + 1 + (chunks & 1)) * 16 / elem_bytes;
}

// How the threads of a block split one product: output tiles of 2^tile_rows_log2 weight rows x
// 2^tile_batch_log2 batch rows, and when there are fewer tiles than workers, the K range split
// `split` ways (partial sums reduced through shared memory, so no warp shuffle is needed). The
// partial sums of item i = k_part * tiles + tile are values [i * tile_size(), (i+1) * tile_size()),
// row-in-tile major. Powers of two, so that locating an output is shifts and masks.
struct ProductTiling {
  int tile_rows_log2 = 1;   // kTileRows
  int tile_batch_log2 = 2;  // kTileBatch
  int tiles_rows = 0;
  int tiles_batch = 0;
  int tiles = 0;
  int split = 1;
  int k_chunk = 0;
  FUSEDRNN_HOST_DEVICE int partial_count() const { return tiles * split; }
  FUSEDRNN_HOST_DEVICE int tile_size() const { return 1 << (tile_rows_log2 + tile_batch_log2); }
};

// The FMA tiling: one thread per item, kTileRows x kTileBatch tiles.
// k_align: K ranges start at multiples of it (the vector width of the shared-memory path).
FUSEDRNN_HOST_DEVICE ProductTiling make_tiling(int rows, int batch, int k, int threads,
                                               int k_align = 1) {
  static_assert(kTileRows == 2 && kTileBatch == 4, "ProductTiling's default shifts");
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

// The tensor-core product (16-bit operands with the weights in shared memory, block_product.cuh):
// one warp per item, each item a 16 x 8 output tile of mma.sync.m16n8k16 over a K range that is a
// multiple of 16 (rows are zero-padded to K rounded up to 16 in shared memory). Either operand can
// be the M side, because both are K-contiguous rows: weight rows as M (tile 16 rows x 8 batch) or
// batch rows as M (tile 8 rows x 16 batch); the plan takes whichever needs fewer MMAs (a block of
// a few units with a batch of 16 wastes nothing as batch-major).
// concurrent_rows: when the weight rows pass through shared memory a few at a time (staged
// streaming, below), only the tiles of one pass run at once, so the K split is chosen for those.
constexpr int kMmaK = 16;
constexpr int kMmaTileValues = 16 * 8;  // outputs of one m16n8 tile, in either orientation
// The split is planned for the GPU's warps per block in both builds, so that the emulator (one
// warp per block) runs the K-split the GPU runs.
constexpr int kMmaWarpsPerBlock = 8;

// An MMA tiling of `rows` x `batch` outputs with batch rows as the M side or not, and its K split
// for `concurrent_rows` rows computed at once (0: all).
FUSEDRNN_HOST_DEVICE ProductTiling make_oriented_mma_tiling(int rows, int batch, int k,
                                                            bool batch_major,
                                                            int concurrent_rows = 0) {
  ProductTiling t;
  t.tile_rows_log2 = batch_major ? 3 : 4;
  t.tile_batch_log2 = batch_major ? 4 : 3;
  t.tiles_rows = static_cast<int>(ceil_div(rows, int64_t{1} << t.tile_rows_log2));
  t.tiles_batch = static_cast<int>(ceil_div(batch, int64_t{1} << t.tile_batch_log2));
  t.tiles = t.tiles_rows * t.tiles_batch;
  if (t.tiles == 0 || k == 0) {
    t.tiles = 0;
    return t;
  }
  const int k_steps = static_cast<int>(ceil_div(k, kMmaK));
  const int concurrent_tiles =
      concurrent_rows > 0 && concurrent_rows < rows
          ? static_cast<int>(ceil_div(concurrent_rows, int64_t{1} << t.tile_rows_log2)) * t.tiles_batch
          : t.tiles;
  int split = kMmaWarpsPerBlock / concurrent_tiles;
  split = split < 1 ? 1 : (split > k_steps ? k_steps : split);
  const int steps_per_part = static_cast<int>(ceil_div(k_steps, split));
  t.k_chunk = steps_per_part * kMmaK;
  t.split = static_cast<int>(ceil_div(k_steps, steps_per_part));  // no empty K parts
  return t;
}

FUSEDRNN_HOST_DEVICE ProductTiling make_mma_tiling(int rows, int batch, int k,
                                                   int concurrent_rows = 0) {
  const int64_t rows_as_m = ceil_div(rows, 16) * ceil_div(batch, 8);
  const int64_t batch_as_m = ceil_div(batch, 16) * ceil_div(rows, 8);
  return make_oriented_mma_tiling(rows, batch, k, batch_as_m < rows_as_m, concurrent_rows);
}

// The staged backward's tiling (K-staged streaming, below): batch rows are the M side, because
// the weights arrive K-major and ldmatrix .trans turns an 8-column K-major block into the N
// fragment. k is one pass's K rows; every pass splits its K range the same way, so item i of
// every pass adds to the same partial sums.
FUSEDRNN_HOST_DEVICE ProductTiling make_k_staged_tiling(int rows, int batch, int k_pass) {
  return make_oriented_mma_tiling(rows, batch, k_pass, true);
}

// Whether a product runs on tensor cores: 16-bit elements (fp16, bf16) with the weight slice in
// shared memory, or passing through it (staged streaming). fp32 stays on FMA (TF32 would round
// the operands); weights streamed straight from global memory stay on FMA.
FUSEDRNN_HOST_DEVICE constexpr bool tensor_core_product(int64_t elem_bytes, bool weights_in_smem,
                                                        bool staged = false) {
  return elem_bytes == 2 && (weights_in_smem || staged);
}

// Staged streaming: the forward of a 16-bit recurrence whose weight slice does not fit on chip
// copies it into shared memory every step, kStageRowMultiple-row passes at a time (cp.async, no
// registers), and runs the tensor-core product on each pass. A multiple of 16 rows, so that no MMA
// tile straddles two passes.
constexpr int kStageRowMultiple = 16;

// K-staged streaming: the backward's phase-0 product dh = dpre W_hh needs the block's COLUMNS of
// W_hh, a strided read from global memory (the FMA streaming loads 2 bytes a row). In a 16-bit
// backward without projection whose W_hh rows are whole 16-byte vectors, the block's columns
// start on 16 bytes (units per block a multiple of kKStagedColumnMultiple), so each pass copies
// stage_rows[0] rows of W_hh (K rows, the block's columns contiguous: K-major) and the same K
// range of the gate-gradient rows into shared memory with cp.async, and runs the tensor-core
// product of that K range, adding to the partial sums of the earlier passes.
constexpr int kKStagedColumnMultiple = 8;

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
  // Staged streaming (16-bit, weights not on chip): rows of W_hh (W_hr) per pass of each phase
  // through the staging buffer at smem_weights[0]; 0 = the FMA product reads global memory.
  // Forward: rows of the block's slice, whole K. Backward (K-staged, phase 0 only): K rows of
  // W_hh, the block's columns, with the same K range of act next to them.
  int stage_rows[2] = {0, 0};
  // Forward without projection, fp32/fp16/bf16: h_s goes to the other blocks as tagged words
  // (tagged_exchange.cuh) instead of through a grid barrier; the block stages its slice of h_s
  // at smem_h_stage ([batch_chunk][units_per_block] elements) to pack the words.
  bool tagged_exchange = false;
  int64_t smem_h_stage = 0;
  // A thread that owns one (batch row, unit) for the whole sequence loads the next step's inputs
  // from the sequences (xproj; backward: saved gates, c, out, d_out) right after its cell update,
  // so that they arrive during the exchange, instead of at the start of the step
  // (recurrence_common.cuh, ItemThreads).
  bool inputs_ahead = false;
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
//                 other, so one grid barrier per step suffices); sized for the tagged exchange's
//                 2 x [B, ceil(P / values per word)] 8-byte words, which are larger
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
  const bool lstm = has_cell_state(cell);
  const bool projected = lstm && state != hidden;
  const int64_t gates = gate_count(cell);
  int64_t size[4];
  if (!backward) {
    const int64_t values_per_word = elem_bytes == 2 ? 2 : 1;
    const int64_t value_bytes = state * elem_bytes;
    const int64_t word_bytes = ceil_div(state, values_per_word) * 8;
    size[0] = 2 * batch * (value_bytes > word_bytes ? value_bytes : word_bytes);
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
