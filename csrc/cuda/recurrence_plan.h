// Host-side planning of a persistent recurrence launch: how many blocks per direction, how many
// units each block owns, whether the weight slices fit in shared memory, the batch chunk, and the
// shared-memory layout. Pure C++ with no CUDA calls: the launcher feeds it the device's limits and
// an occupancy callback (cudaOccupancyMaxActiveBlocksPerMultiprocessor); the GPU-less occupancy
// check feeds it A100/H100 limits and cuda_occupancy.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

#include "fusedrnn/cell_kind.h"
#include "recurrence_layout.h"

namespace fusedrnn::cuda {

struct PlanInput {
  bool backward = false;
  CellKind cell = CellKind::kLstm;
  int64_t batch = 1;
  int64_t hidden = 1;
  int64_t state = 1;
  int num_dirs = 1;
  int64_t elem_bytes = 4;
  int64_t acc_bytes = 4;
  // Device limits.
  int sm_count = 1;
  int64_t max_smem_per_block = 48 * 1024;  // dynamic, opt-in maximum
  int threads = kThreadsPerBlock;
  // Whether streamed 16-bit weights may pass through shared memory (staged streaming; backward:
  // K-staged): the launcher checks that every weight row starts on 16 bytes, as cp.async needs.
  bool stageable = false;
  // Whether a forward without projection in fp32/fp16/bf16 exchanges h as tagged words instead of
  // meeting at a grid barrier every step (tagged_exchange.cuh).
  bool tagged_exchange = false;
  // Whether threads that own one item load the next step's inputs during the exchange.
  bool inputs_ahead = false;
  // Test and tuning knobs: never keep weights in shared memory; cap blocks per direction, batch
  // rows per product pass and weight rows per staging pass (0: no cap).
  bool force_streaming = false;
  int max_blocks_per_dir = 0;
  int max_batch_chunk = 0;
  int max_stage_rows = 0;
};

// Whether a forward's weight rows are whole 16-byte vectors, as staged streaming's cp.async needs:
// W_hh rows (K = P) and, projected, W_hr rows (K = H). The launcher also checks the weights' base
// addresses; the occupancy check assumes torch's, which are aligned.
inline bool weight_rows_are_vectors(int64_t state, int64_t hidden, bool projected,
                                    int64_t elem_bytes) {
  return (state * elem_bytes) % 16 == 0 && (!projected || (hidden * elem_bytes) % 16 == 0);
}

// blocks_per_sm(weights_in_smem, smem_bytes): co-resident blocks per SM for that kernel variant.
using BlocksPerSm = std::function<int(bool, int64_t)>;

namespace plan_detail {

// Phase shapes and weight-slice bytes for units per block U and state columns per block Ps.
inline void shape_phases(const PlanInput& in, int64_t units, int64_t cols, RecurrenceGeometry& g) {
  const int64_t gates = gate_count(in.cell);
  const int64_t H = in.hidden;
  const int64_t P = in.state;
  if (!in.backward) {
    g.phase[0] = PhaseShape{static_cast<int>(gates * units), static_cast<int>(P)};
    g.phase[1] = g.projected ? PhaseShape{static_cast<int>(cols), static_cast<int>(H)} : PhaseShape{};
  } else {
    g.phase[0] = PhaseShape{static_cast<int>(g.projected ? cols : units),
                            static_cast<int>(gates * H)};
    g.phase[1] = g.projected ? PhaseShape{static_cast<int>(units), static_cast<int>(P)} : PhaseShape{};
  }
}

// Whether a streamed backward passes W_hh through shared memory in K ranges (K-staged streaming,
// recurrence_layout.h): 16-bit, without projection, W_hh rows on 16 bytes.
inline bool k_staged_candidate(const PlanInput& in, const RecurrenceGeometry& g) {
  return in.backward && in.stageable && in.elem_bytes == 2 && !g.projected;
}

// The K-staged backward's layout for batch chunk bc and stage_rows[0] K rows a pass: the pass's
// W_hh rows (the block's columns, K-major), then the same K range of bc gate-gradient rows, then
// the partial sums. Returns the total bytes.
inline int64_t layout_k_staged_smem(const PlanInput& in, int64_t bc, RecurrenceGeometry& g) {
  const int64_t pass_k = g.stage_rows[0];
  const int64_t columns = g.phase[0].rows;
  g.weight_pitch[0] = smem_pitch(columns, in.elem_bytes);
  g.weight_pitch[1] = 0;
  g.smem_weights[0] = g.smem_weights[1] = 0;
  int64_t at = round_up(pass_k * g.weight_pitch[0] * in.elem_bytes, 16);
  g.act_pitch = smem_pitch(pass_k, in.elem_bytes);
  g.smem_act = at;
  at += round_up(bc * g.act_pitch * in.elem_bytes, 16);
  g.smem_h_stage = at;
  g.smem_partials = at;
  // A smaller last block or batch chunk has fewer tiles and a wider K split: at most
  // max(its tiles, kMmaWarpsPerBlock) items, and its tiles are at most the planned shape's.
  const ProductTiling t = make_k_staged_tiling(static_cast<int>(columns), static_cast<int>(bc),
                                               static_cast<int>(pass_k));
  const int64_t items = std::max<int64_t>(t.partial_count(), kMmaWarpsPerBlock);
  at += items * kMmaTileValues * in.acc_bytes;
  g.smem_bytes = at;
  return at;
}

// Fills the shared-memory layout for batch chunk bc; returns the total bytes.
inline int64_t layout_smem(const PlanInput& in, int64_t bc, RecurrenceGeometry& g) {
  if (!g.weights_in_smem && in.backward && g.stage_rows[0] > 0) {
    return layout_k_staged_smem(in, bc, g);
  }
  int64_t at = 0;
  int64_t act_pitch = 0;
  const bool staged = !g.weights_in_smem && g.stage_rows[0] > 0;
  int64_t stage_bytes = 0;  // one buffer for the passes of both phases
  for (int i = 0; i < 2; ++i) {
    const PhaseShape& ph = g.phase[i];
    g.weight_pitch[i] = ph.k > 0 ? smem_pitch(ph.k, in.elem_bytes) : 0;
    g.smem_weights[i] = staged ? 0 : at;
    if (g.weights_in_smem) at += round_up(ph.rows * g.weight_pitch[i] * in.elem_bytes, 16);
    if (staged) {
      stage_bytes = std::max(stage_bytes, g.stage_rows[i] * g.weight_pitch[i] * in.elem_bytes);
    }
    if (ph.k > 0) act_pitch = std::max(act_pitch, g.weight_pitch[i]);
  }
  at += round_up(stage_bytes, 16);
  g.act_pitch = act_pitch;
  g.smem_act = at;
  at += round_up(bc * act_pitch * in.elem_bytes, 16);
  g.smem_h_stage = at;
  if (g.tagged_exchange) at += round_up(bc * g.units_per_block * in.elem_bytes, 16);
  g.smem_partials = at;
  int64_t partials = static_cast<int64_t>(in.threads) * kTileSize;  // values
  const bool mma = tensor_core_product(in.elem_bytes, g.weights_in_smem, staged);
  // A block with fewer rows (the last one) or a smaller batch chunk than the planned shape can
  // have fewer MMA tiles but a wider K split: up to kMmaWarpsPerBlock items (tiles * split <=
  // max(tiles, kMmaWarpsPerBlock), and its tiles <= the planned shape's). The FMA floor above
  // covers that with 256 threads, but not with the emulator's 32.
  if (mma) partials = std::max<int64_t>(partials, int64_t{kMmaWarpsPerBlock} * kMmaTileValues);
  for (int i = 0; i < 2; ++i) {
    const PhaseShape& ph = g.phase[i];
    if (staged && g.stage_rows[i] > 0) {
      // With staging the split is chosen for one pass's tiles, so a smaller chunk (fewer batch
      // tiles a pass, a wider split) can have more items than the planned one: B=64 fp16 H=2048
      // on an H100 plans chunks of 38 (20 items) and then runs one of 26 (32 items). No tile
      // straddles passes, and a pass with fewer tiles than kMmaWarpsPerBlock splits K to at most
      // that many items; one with more has no split, and then every pass does, so the chunk's
      // items are its tiles, at most the planned chunk's (counted below). The last block's too.
      const int64_t passes = ceil_div(ph.rows, g.stage_rows[i]);
      partials = std::max<int64_t>(partials, passes * kMmaWarpsPerBlock * kMmaTileValues);
    }
    const ProductTiling t =
        mma
            ? make_mma_tiling(ph.rows, static_cast<int>(bc), ph.k, g.stage_rows[i])
            : make_tiling(ph.rows, static_cast<int>(bc), ph.k, in.threads);
    partials = std::max<int64_t>(partials, static_cast<int64_t>(t.partial_count()) * t.tile_size());
  }
  at += partials * in.acc_bytes;
  g.smem_bytes = at;
  return at;
}

// The largest batch chunk whose layout fits `budget` bytes (0 if not even one row fits).
inline int64_t fit_batch_chunk(const PlanInput& in, int64_t budget, RecurrenceGeometry& g) {
  int64_t lo = 0;
  int64_t hi = in.max_batch_chunk > 0 ? std::min<int64_t>(in.batch, in.max_batch_chunk) : in.batch;
  while (lo < hi) {  // bytes grow with bc: binary search for the last bc that fits
    const int64_t mid = (lo + hi + 1) / 2;
    if (layout_smem(in, mid, g) <= budget) lo = mid;
    else hi = mid - 1;
  }
  if (lo > 0) layout_smem(in, lo, g);
  return lo;
}

// Rows per staging pass of each phase: `rows`, or the phase's whole slice when smaller (rounded
// up to whole MMA tiles); none for a phase that does not exist.
inline void set_stage_rows(int64_t rows, RecurrenceGeometry& g) {
  for (int i = 0; i < 2; ++i) {
    const int64_t slice = round_up(g.phase[i].rows, kStageRowMultiple);
    g.stage_rows[i] = g.phase[i].k > 0 ? static_cast<int>(std::min(rows, slice)) : 0;
  }
}

// The K-staged backward's batch chunk and K rows a pass: the largest batch chunk next to a 16-row
// pass, then the largest pass that keeps it (binary search: K = G*H reaches thousands of rows),
// then as few rows as need the same number of passes (a short last pass still costs two block
// barriers and an L2 round trip). FMA streaming when not even one batch row fits.
inline int64_t fit_k_staged(const PlanInput& in, RecurrenceGeometry& g) {
  g.stage_rows[0] = kStageRowMultiple;
  g.stage_rows[1] = 0;
  const int64_t bc = fit_batch_chunk(in, in.max_smem_per_block, g);
  if (bc == 0) {
    set_stage_rows(0, g);
    return fit_batch_chunk(in, in.max_smem_per_block, g);
  }
  const int64_t k = g.phase[0].k;
  int64_t most = ceil_div(k, kStageRowMultiple);  // in 16-row units
  if (in.max_stage_rows > 0) most = std::min(most, ceil_div(in.max_stage_rows, kStageRowMultiple));
  int64_t lo = 1;
  int64_t hi = most;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    g.stage_rows[0] = static_cast<int>(mid * kStageRowMultiple);
    if (layout_smem(in, bc, g) <= in.max_smem_per_block) lo = mid;
    else hi = mid - 1;
  }
  const int64_t passes = ceil_div(k, lo * kStageRowMultiple);
  g.stage_rows[0] = static_cast<int>(round_up(ceil_div(k, passes), kStageRowMultiple));
  layout_smem(in, bc, g);
  return bc;
}

// The streaming variant's batch chunk and, where allowed, its staging passes: first the largest
// batch chunk next to the smallest pass, then the largest pass that keeps that chunk (every pass
// is a block barrier and an L2 round trip; every batch chunk reads the whole slice again).
// Returns the batch chunk (0: nothing fits).
inline int64_t fit_streaming(const PlanInput& in, RecurrenceGeometry& g) {
  set_stage_rows(0, g);
  if (k_staged_candidate(in, g)) return fit_k_staged(in, g);
  const bool stage = in.stageable && !in.backward && in.elem_bytes == 2;
  if (stage) {
    set_stage_rows(kStageRowMultiple, g);
    const int64_t bc = fit_batch_chunk(in, in.max_smem_per_block, g);
    if (bc > 0) {
      const int64_t cap = in.max_stage_rows > 0 ? round_up(in.max_stage_rows, kStageRowMultiple)
                                                : int64_t{1} << 30;
      const int64_t largest =
          std::min(cap, round_up(std::max(g.phase[0].rows, g.phase[1].rows), kStageRowMultiple));
      int64_t best = kStageRowMultiple;
      for (int64_t rows = best + kStageRowMultiple; rows <= largest; rows += kStageRowMultiple) {
        set_stage_rows(rows, g);
        if (layout_smem(in, bc, g) > in.max_smem_per_block) break;
        best = rows;
      }
      set_stage_rows(best, g);
      layout_smem(in, bc, g);
      return bc;
    }
    set_stage_rows(0, g);
  }
  return fit_batch_chunk(in, in.max_smem_per_block, g);
}

inline void split_units(const PlanInput& in, int64_t blocks, RecurrenceGeometry& g) {
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, in.hidden));
  int64_t units = ceil_div(in.hidden, blocks);
  // The tagged exchange packs two 16-bit values per word, and a block writes whole words.
  if (g.tagged_exchange && in.elem_bytes == 2) units = round_up(units, 2);
  // The K-staged backward copies the block's columns of W_hh as 16-byte vectors.
  if (!g.weights_in_smem && k_staged_candidate(in, g)) units = round_up(units, kKStagedColumnMultiple);
  blocks = ceil_div(in.hidden, units);  // every block owns at least one unit
  g.blocks_per_dir = static_cast<int>(blocks);
  g.units_per_block = static_cast<int>(units);
  g.cols_per_block = g.projected ? static_cast<int>(ceil_div(in.state, blocks)) : g.units_per_block;
  shape_phases(in, units, g.cols_per_block, g);
}

}  // namespace plan_detail

// Chooses the launch. Prefers weights in shared memory with one block per SM (the slice stays on
// chip for all steps); falls back to streaming the weights when a slice does not fit, with a grid
// the occupancy calculator says is co-resident. Throws std::runtime_error if no grid fits.
inline RecurrenceGeometry plan_recurrence(const PlanInput& in, const BlocksPerSm& blocks_per_sm) {
  using namespace plan_detail;
  RecurrenceGeometry g;
  g.num_dirs = in.num_dirs;
  g.threads = in.threads;
  g.projected = has_cell_state(in.cell) && in.state != in.hidden;
  g.tagged_exchange = in.tagged_exchange && !in.backward && !g.projected && in.elem_bytes <= 4;
  g.inputs_ahead = in.inputs_ahead;
  int64_t blocks = std::max(1, in.sm_count / in.num_dirs);
  if (in.max_blocks_per_dir > 0) blocks = std::min<int64_t>(blocks, in.max_blocks_per_dir);

  if (!in.force_streaming) {
    g.weights_in_smem = true;
    split_units(in, blocks, g);
    const int64_t bc = fit_batch_chunk(in, in.max_smem_per_block, g);
    if (bc > 0) {
      g.batch_chunk = static_cast<int>(bc);
      const int64_t resident =
          static_cast<int64_t>(blocks_per_sm(true, g.smem_bytes)) * in.sm_count;
      if (resident >= static_cast<int64_t>(g.blocks_per_dir) * in.num_dirs) return g;
    }
  }

  g.weights_in_smem = false;
  split_units(in, blocks, g);  // the activation chunk and partials only depend on the largest block
  const int64_t bc = fit_streaming(in, g);
  if (bc == 0) {
    throw std::runtime_error("fusedrnn: recurrence state too wide for shared memory (hidden=" +
                             std::to_string(in.hidden) + ", state=" + std::to_string(in.state) +
                             ")");
  }
  g.batch_chunk = static_cast<int>(bc);
  const int per_sm = blocks_per_sm(false, g.smem_bytes);
  const int64_t resident = static_cast<int64_t>(per_sm) * in.sm_count;
  if (resident < in.num_dirs) {
    throw std::runtime_error(
        "fusedrnn: the streaming recurrence kernel cannot be co-resident on this device "
        "(blocks per SM = " + std::to_string(per_sm) + ", smem bytes = " +
        std::to_string(g.smem_bytes) + ")");
  }
  // At least one block per SM is resident (per_sm >= 1 here), and the grid has at most
  // max(sm_count, num_dirs) blocks (blocks above; split_units only lowers it), so the grid is
  // co-resident. Checked all the same: a cooperative launch of a grid that is not would hang.
  if (resident < static_cast<int64_t>(g.blocks_per_dir) * in.num_dirs) {
    throw std::logic_error("fusedrnn: the streaming plan's grid (" +
                           std::to_string(g.blocks_per_dir) + " blocks x " +
                           std::to_string(in.num_dirs) + " directions) exceeds the " +
                           std::to_string(resident) + " resident blocks");
  }
  return g;
}

}  // namespace fusedrnn::cuda
