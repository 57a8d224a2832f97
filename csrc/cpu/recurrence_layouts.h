// How a direction's workspace is carved (packed weights, row buffers, per-unit states) and the
// panel shapes and product choices of the forward and backward recurrence.
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "recurrence_layouts.h is included by the per-ISA translation units only"
#endif

#include <cstdint>

#include "amx_tiles.h"
#include "in_place_dots.h"
#include "panel_gemm.h"
#include "recurrence_common.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// ------------------------------------------------------------------------------ workspace
struct Carver {
  int64_t size = 0;
  int64_t take(int64_t bytes) {
    const int64_t offset = size;
    size += round_up(imax(bytes, 0), 64);
    return offset;
  }
  // +64: the caller aligns the base pointer up to 64 bytes.
  int64_t total() const { return size + 64; }
};

inline char* aligned_base(void* workspace) {
  const auto addr = reinterpret_cast<uintptr_t>(workspace);
  return reinterpret_cast<char*>((addr + 63) & ~uintptr_t(63));
}

// Row stride of the per-step row buffers (h, d_pre, ...). The micro-kernel reads MR rows at
// once; with a power-of-two stride (H = 256, 1024, ...) every row of a column falls into the same
// L1 set and the rows evict each other (and 4K-alias with the stores), so the A operand would come
// from L2 on every k. One extra cache line per row spreads the rows over the sets.
template <typename T>
constexpr int64_t padded_ld(int64_t cols) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  return round_up(cols, line) + line;
}

// Forward panel shape per cell: the LSTMs and GRU put the G gates of W units in one panel; the
// Elman RNN has one gate, so its panel spans 4 vectors of units to keep enough accumulators busy.
template <CellKind C>
struct FwdPanel {
  static constexpr int kGates = gate_count(C);
  static constexpr int kUnitVecs = gate_count(C) > 1 ? 1 : 4;
  static constexpr int kVecs = kGates * kUnitVecs;
};
// Panels over plain output columns (backward products, projections).
constexpr int kColVecs = 4;

// Input projection bytes per step (B x G*H elements) from which the forward's cell update runs
// after the whole step's product instead of in the product's epilogue. In the epilogue it visits,
// per panel, one line per gate of each row: rows lie G*H elements apart, and no hardware
// prefetcher follows that pattern, so with rows that are not in cache every line is a miss in
// series (LSTM B=32 H=256, one thread: ~70 us of a ~190 us step waited on xproj, the saved gates
// and out). After the product each row is read and written front to back, which the prefetchers
// stream, provided a thread's share of a row is long enough to stream: at least
// kDeferredMinRowBytes of each gate (256 fp32 units). Measured on the 2-core SPR VM, forward of
// a training call: LSTM B=32 H=256 bidirectional (one thread a direction) 18.9 -> 17.1 ms,
// B=64 H=512 34.5 -> 31 ms, GRU B=16 H=512 14.7 -> 13.1 ms; shorter shares (B=32 H=128 or
// B=16 H=256 on two threads) and smaller steps (B=8 H=128) were 5-17% slower deferred.
constexpr int64_t kDeferredMinStepBytes = 64 << 10;
constexpr int64_t kDeferredMinRowBytes = 1 << 10;

// The h, c and r row buffers are ld wide; lanes past H (or P) are padding. The packed product
// leaves zeros there, the in-place one copies of the last unit's value: no reader may use them
// (products read k < K, outputs and final states stop at H and P).
template <typename T, CellKind C>
struct FwdLayout {
  static constexpr int W = kWidth<T>;
  static constexpr int NV = FwdPanel<C>::kVecs;
  static constexpr int UV = FwdPanel<C>::kUnitVecs;
  int64_t units_per_panel, panels, proj_panels, ld;
  // Small batch: the product reads W_hh and b_hh in place (InPlaceDots), nothing is packed;
  // proj_in_place: the same for the projection's W_hr.
  bool in_place, proj_in_place;
  // can_defer: there is a `pre` buffer where the packed product can park each step's
  // pre-activations, for the cell update to run afterwards row by row (kDeferredMinStepBytes).
  bool can_defer;
  // amx: the product h_{t-1} W_hh^T runs as the bfloat16 VNNI product (amx_tiles.h: AMX tiles,
  // or VDPBF16PS in the avx512bf16 build): bfloat16 layers of those builds that would pack W_hh
  // (a projected LSTM's r W_hr^T stays on FMAs). W_hh is packed into
  // amx_pack, h is kept in bfloat16 too (double-buffered, hbf: the product's A operand) and the
  // sums always take the round trip through `pre` (amx_rows(B) rows: a tile store writes 16).
  bool amx;
  int64_t w_pack, bias_pack, wr_pack, amx_pack, h, hbf, c, r, pre, scratch, proj_scratch, bytes;
  explicit FwdLayout(const RecurrenceFwdParams& p) {
    const int64_t H = p.hidden, P = p.state, B = p.batch;
    const bool projected = has_cell_state(C) && P != H;
    in_place = forward_in_place<T>(p.seq_len, B, gate_count(C) * H, P);
    proj_in_place = projected && forward_in_place<T>(p.seq_len, B, P, H);
    units_per_panel = UV * W;
    panels = ceil_div(H, units_per_panel);
    proj_panels = projected ? ceil_div(P, kColVecs * W) : 0;
    ld = padded_ld<T>(round_up(imax(H, P), kColVecs * W));
    amx = kVnniBf16Build && p.dtype == DType::kBFloat16 && !in_place && NV <= kAmxMaxVecs &&
          W == kAmxCols && amx_tiles_granted();
    can_defer = amx || (!in_place && B * gate_count(C) * H * static_cast<int64_t>(sizeof(T)) >=
                                         kDeferredMinStepBytes);
    const int64_t e = sizeof(T), bf16 = 2;
    Carver carve;
    w_pack = carve.take(in_place || amx ? 0 : panels * P * NV * W * e);
    bias_pack = carve.take(in_place ? 0 : panels * NV * W * e);
    wr_pack = carve.take(proj_in_place ? 0 : proj_panels * H * kColVecs * W * e);
    amx_pack = carve.take(amx ? panels * amx_panel_elems(NV, P) * bf16 : 0);
    h = carve.take(2 * B * ld * e);
    hbf = carve.take(amx ? 2 * amx_rows(B) * amx_lda(P) * bf16 : 0);
    c = carve.take(has_cell_state(C) ? B * ld * e : 0);
    r = carve.take(projected ? B * ld * e : 0);
    pre = carve.take(can_defer ? (amx ? amx_rows(B) : B) * pre_row_elems() * e : 0);
    scratch = carve.take(in_place || amx ? 0 : PanelGemm<T, NV>::scratch_elems(panels, B, P) * e);
    proj_scratch = carve.take(
        proj_in_place ? 0 : PanelGemm<T, kColVecs>::scratch_elems(proj_panels, B, H) * e);
    bytes = carve.total();
  }
  // One batch row of `pre`: every panel's NV vectors, panel after panel, so that the cell
  // update of a row reads it front to back. The AMX product stores and reloads 16 rows of a
  // panel at a time: one more cache line per row keeps rows 2^n floats long out of one L1 set.
  int64_t pre_row_elems() const { return panels * NV * W + (amx ? W : 0); }
};

template <typename T, CellKind C>
struct BwdLayout {
  static constexpr int W = kWidth<T>;
  int64_t cols_per_panel, panels, proj_panels, ld, ldg;
  // amx: as FwdLayout's, for the product d_pre W_hh: W_hh packed into amx_pack, d_pre kept in
  // bfloat16 only (double-buffered, dpbf: nothing else reads d_pre, so the float dpre is not
  // carved) and the sums coming back through amx_sums (amx_rows(B) rows of amx_sums_ld floats).
  bool amx;
  int64_t amx_sums_ld;
  int64_t wt_pack, wr_pack, amx_pack, dh, dc, dpre, dpbf, amx_sums, dh_direct, dht, scratch,
      proj_scratch, bytes;
  explicit BwdLayout(const RecurrenceBwdParams& p) {
    const int64_t H = p.hidden, P = p.state, B = p.batch, G = gate_count(C);
    const bool projected = has_cell_state(C) && P != H;
    cols_per_panel = kColVecs * W;
    panels = ceil_div(P, cols_per_panel);
    proj_panels = projected ? ceil_div(H, cols_per_panel) : 0;
    ld = padded_ld<T>(round_up(imax(H, P), cols_per_panel));
    ldg = padded_ld<T>(round_up(G * H, W));
    amx = kVnniBf16Build && p.dtype == DType::kBFloat16 && W == kAmxCols && amx_tiles_granted();
    amx_sums_ld = panels * cols_per_panel + W;  // + a line: see FwdLayout::pre_row_elems
    const int64_t e = sizeof(T), bf16 = 2;
    Carver carve;
    wt_pack = carve.take(amx ? 0 : panels * G * H * kColVecs * W * e);
    wr_pack = carve.take(proj_panels * P * kColVecs * W * e);
    amx_pack = carve.take(amx ? panels * amx_panel_elems(kColVecs, G * H) * bf16 : 0);
    dh = carve.take(B * ld * e);
    dc = carve.take(has_cell_state(C) ? B * ld * e : 0);
    dpre = carve.take(amx ? 0 : 2 * B * ldg * e);
    dpbf = carve.take(amx ? 2 * amx_rows(B) * amx_lda(G * H) * bf16 : 0);
    amx_sums = carve.take(amx ? amx_rows(B) * amx_sums_ld * e : 0);
    dh_direct = carve.take(C == CellKind::kGru ? B * ld * e : 0);
    dht = carve.take(projected ? B * ld * e : 0);
    scratch = carve.take(amx ? 0 : PanelGemm<T, kColVecs>::scratch_elems(panels, B, G * H) * e);
    proj_scratch = carve.take(PanelGemm<T, kColVecs>::scratch_elems(proj_panels, B, P) * e);
    bytes = carve.total();
  }
};

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
