// The forward recurrence of one direction (the architecture: recurrence_impl.h).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "recurrence_forward.h is included by the per-ISA translation units only"
#endif

#include <cstdint>
#include <cstring>

#include "amx_tiles.h"
#include "in_place_dots.h"
#include "panel_gemm.h"
#include "recurrence_common.h"
#include "recurrence_layouts.h"
#include "thread_team.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// ------------------------------------------------------------------------------ forward
// T: the compute type; S: what the tensors hold (storage.h: T itself, or bfloat16 with T float).
// kPeephole: an LSTM (plain or CIFG) with peephole weights (params.h). A template flag, not a
// branch in the cell update: the branch cost the plain LSTM's batched inference 1-3% on Zen 4
// (same-process A/B).
template <typename T, CellKind C, typename S, bool kPeephole = false>
void forward_impl(const RecurrenceFwdParams& p, const Team& team) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using L = FwdLayout<T, C>;
  using V = Vec<T, W>;
  constexpr int NV = L::NV;
  constexpr int UV = L::UV;
  const L lay(p);
  const int64_t seq_len = p.seq_len, B = p.batch, H = p.hidden, P = p.state, ld = lay.ld;
  const bool projected = has_cell_state(C) && P != H;
  const Steps steps{p.lengths, seq_len, p.reverse};

  char* ws = aligned_base(p.workspace);
  T* w_pack = reinterpret_cast<T*>(ws + lay.w_pack);
  T* bias_pack = p.b_hh && !lay.in_place ? reinterpret_cast<T*>(ws + lay.bias_pack) : nullptr;
  T* wr_pack = reinterpret_cast<T*>(ws + lay.wr_pack);
  T* hbuf[2] = {reinterpret_cast<T*>(ws + lay.h), reinterpret_cast<T*>(ws + lay.h) + B * ld};
  // The AMX product's bfloat16 copies of h (FwdLayout::amx; null otherwise), amx_ld apart.
  const int64_t amx_ld = amx_lda(P), amx_row_count = amx_rows(B);
  BFloat16* hbf[2] = {nullptr, nullptr};
  if (lay.amx) {
    hbf[0] = reinterpret_cast<BFloat16*>(ws + lay.hbf);
    hbf[1] = hbf[0] + amx_row_count * amx_ld;
  }
  BFloat16* amx_pack = reinterpret_cast<BFloat16*>(ws + lay.amx_pack);
  T* cbuf = reinterpret_cast<T*>(ws + lay.c);
  T* rbuf = reinterpret_cast<T*>(ws + lay.r);
  T* scratch = reinterpret_cast<T*>(ws + lay.scratch);
  T* proj_scratch = reinterpret_cast<T*>(ws + lay.proj_scratch);
  T* pre = reinterpret_cast<T*>(ws + lay.pre);
  const S* w_hh = static_cast<const S*>(p.w_hh);
  const S* b_hh = static_cast<const S*>(p.b_hh);
  const S* w_hr = static_cast<const S*>(p.w_hr);
  const S* peephole = static_cast<const S*>(p.peephole);

  // This thread's panels: units [unit_begin, unit_end) and, projected, state columns.
  int64_t pan_begin, pan_end, ppan_begin = 0, ppan_end = 0;
  split_range(lay.panels, team.rank, team.size, pan_begin, pan_end);
  if (projected) split_range(lay.proj_panels, team.rank, team.size, ppan_begin, ppan_end);
  // (Clamped: a thread with no panels gets an empty range.)
  const int64_t unit_begin = imin(pan_begin * lay.units_per_panel, H);
  const int64_t unit_end = imin(pan_end * lay.units_per_panel, H);
  const int64_t col_begin = imin(ppan_begin * kColVecs * W, P);
  const int64_t col_end = imin(ppan_end * kColVecs * W, P);
  const bool deferred =
      lay.amx || (lay.can_defer && (unit_end - unit_begin) * static_cast<int64_t>(sizeof(T)) >=
                                       kDeferredMinRowBytes);

  // Each thread packs the panels it will read (they stay in its own cache), and configures its
  // AMX tiles for them (FwdLayout::amx) until it returns.
  AmxTileScope tiles(lay.amx);
  const int64_t upp = lay.units_per_panel;
  auto gate_row = [&](int64_t pan, int v, int w) -> int64_t {
    const int64_t g = v / UV, u = pan * upp + (v % UV) * W + w;
    return u < H ? g * H + u : -1;
  };
  if (lay.amx) {
    if constexpr (std::is_same_v<S, BFloat16>) {
      for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
        pack_amx_panel<NV>(amx_pack + pan * amx_panel_elems(NV, P), w_hh, P, P,
                           [&](int v, int w) { return gate_row(pan, v, w); });
      }
    }
  } else if (!lay.in_place) {
    pack_panels<T, NV>(w_pack, w_hh, P, P, 1, pan_begin, pan_end, gate_row);
  }
  if (bias_pack) pack_panels<T, NV>(bias_pack, b_hh, 1, 1, 0, pan_begin, pan_end, gate_row);
  if (projected && !lay.proj_in_place) {
    pack_panels<T, kColVecs>(
        wr_pack, w_hr, H, H, 1, ppan_begin, ppan_end, [&](int64_t pan, int v, int w) -> int64_t {
          const int64_t col = (pan * kColVecs + v) * W + w;
          return col < P ? col : -1;
        });
  }
  if (team.rank == 0) {
    std::memset(hbuf[0], 0, sizeof(T) * 2 * B * ld);
    if (p.h0) {
      for (int64_t b = 0; b < B; ++b) {
        convert_row(hbuf[0] + b * ld, static_cast<const S*>(p.h0) + b * P, P);
      }
    }
    if (lay.amx) {
      // Zeros past P and past B: a padding k must not meet a NaN (0 x NaN), and the sums of
      // padding rows are never read.
      std::memset(static_cast<void*>(hbf[0]), 0, sizeof(BFloat16) * 2 * amx_row_count * amx_ld);
      if (p.h0) {
        for (int64_t b = 0; b < B; ++b) {
          std::memcpy(static_cast<void*>(hbf[0] + b * amx_ld),
                      static_cast<const char*>(p.h0) + b * P * sizeof(S), sizeof(S) * P);
        }
      }
    }
    if constexpr (has_cell_state(C)) {
      std::memset(cbuf, 0, sizeof(T) * B * ld);
      if (p.c0) {
        for (int64_t b = 0; b < B; ++b) {
          convert_row(cbuf + b * ld, static_cast<const S*>(p.c0) + b * H, H);
        }
      }
    }
  }
  team.sync();

  S* gates_data = static_cast<S*>(p.gates.data);
  S* c_seq_data = static_cast<S*>(p.c_seq.data);
  S* r_seq_data = static_cast<S*>(p.r_seq.data);

  for (int64_t s = 0; s < seq_len; ++s) {
    const T* h_prev = hbuf[s & 1];
    T* h_next = hbuf[(s + 1) & 1];
    BFloat16* hbf_next = hbf[(s + 1) & 1];
    const int64_t rows = steps.rows_needed(s, B);
    // h_t of row b, units (or a projected LSTM's state columns) [u, u + n), to the next step's
    // product (and its bfloat16 operand).
    auto publish_h = [&](int64_t b, int64_t u, const V& h, int n) {
      h.store(h_next + b * ld + u);
      if constexpr (std::is_same_v<T, float>) {
        if (hbf_next) store_as(hbf_next + b * amx_ld + u, h, n);
      }
    };
    // A padded row b: h_{t-1} carries over for columns [begin, end) (and its bfloat16 copy),
    // the output row is zero.
    auto keep_h = [&](int64_t b, int64_t begin, int64_t end) {
      std::memcpy(h_next + b * ld + begin, h_prev + b * ld + begin, sizeof(T) * (end - begin));
      if (hbf_next) {
        std::memcpy(static_cast<void*>(hbf_next + b * amx_ld + begin),
                    hbf[s & 1] + b * amx_ld + begin, sizeof(BFloat16) * (end - begin));
      }
      zero_row(row_of<S>(p.out, s, b) + begin, end - begin);
    };

    auto cell_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
      for (int i = 0; i < m; ++i) {
        const int64_t b = r0 + i;
        if (!steps.active(b, s)) continue;
        const int64_t t = steps.time(b, s);
        const S* x = row_of<const S>(p.xproj, t, b);
        S* out = row_of<S>(p.out, t, b);
        for (int uv = 0; uv < UV; ++uv) {
          const int64_t u = pan * upp + uv * W;
          if (u >= H) break;
          const int n = static_cast<int>(imin(W, H - u));
          if constexpr (has_cell_state(C)) {
            const V c_prev = V::load(cbuf + b * ld + u);
            V c_next, r;
            const auto peephole_weights = [&] {
              if constexpr (kPeephole) {
                return load_peephole<C, V>(peephole, H, u, n);
              } else {
                return NoPeephole{};
              }
            }();
            // (Set in the branches: returned from a lambda called in place, the gates cost the
            // plain LSTM's batched inference 3%, B=32 H=256, same-process A/B on Zen 4.)
            LstmGates<V> gate;
            if constexpr (C == CellKind::kLstmCifg) {
              gate = cifg_forward(acc[i][0] + load_as<V>(x + u, n),
                                  acc[i][1] + load_as<V>(x + H + u, n),
                                  acc[i][2] + load_as<V>(x + 2 * H + u, n), c_prev, c_next, r,
                                  peephole_weights);
            } else {
              gate = lstm_forward(acc[i][0] + load_as<V>(x + u, n),
                                  acc[i][1] + load_as<V>(x + H + u, n),
                                  acc[i][2] + load_as<V>(x + 2 * H + u, n),
                                  acc[i][3] + load_as<V>(x + 3 * H + u, n), c_prev, c_next, r,
                                  peephole_weights);
            }
            c_next.store(cbuf + b * ld + u);
            if (projected) {
              r.store(rbuf + b * ld + u);
              if (r_seq_data) store_as(row_of<S>(p.r_seq, t, b) + u, r, n);
            } else {
              publish_h(b, u, r, n);
              store_as(out + u, r, n);
            }
            if (gates_data) {
              S* saved = row_of<S>(p.gates, t, b);
              if constexpr (C == CellKind::kLstmCifg) {
                store_saved_cifg_gates(gate, saved, H, u, n);
              } else {
                store_saved_gates(gate, saved, H, u, n);
              }
            }
            if (c_seq_data) store_as(row_of<S>(p.c_seq, t, b) + u, c_next, n);
          } else if constexpr (C == CellKind::kGru) {
            V h;
            const auto gate = gru_forward(
                load_as<V>(x + u, n), load_as<V>(x + H + u, n), load_as<V>(x + 2 * H + u, n),
                acc[i][0], acc[i][1], acc[i][2], V::load(h_prev + b * ld + u), h);
            publish_h(b, u, h, n);
            store_as(out + u, h, n);
            if (gates_data) store_saved_gates(gate, row_of<S>(p.gates, t, b), H, u, n);
          } else {
            const V h = rnn_forward(p.cell, acc[i][uv] + load_as<V>(x + u, n));
            publish_h(b, u, h, n);
            store_as(out + u, h, n);
          }
        }
      }
    };
    auto cell_prefetch = [&](int64_t pan, int64_t r0, int m) {
      for (int i = 0; i < m; ++i) {
        const int64_t b = r0 + i;
        if (!steps.active(b, s)) continue;
        const int64_t t = steps.time(b, s);
        const S* x = row_of<const S>(p.xproj, t, b) + pan * upp;
        S* gs = gates_data ? row_of<S>(p.gates, t, b) + pan * upp : nullptr;
        for (int g = 0; g < G; ++g) {
          for (int64_t e = 0; e < upp; e += 64 / static_cast<int64_t>(sizeof(S))) {
            __builtin_prefetch(x + g * H + e, 0, 3);
            if (gs) __builtin_prefetch(gs + g * H + e, 1, 3);
          }
        }
      }
    };
    // Serpentine panel order (odd steps backwards): W_hh of a small layer is a little larger
    // than L1 (LSTM H=64 fp32: 64 KB against 48 KB), and the turn keeps most of it there. The
    // in-place product gains as much (B=1, one thread: H=64 0.71 against 0.88 us a step, H=512
    // 111 against 148 us).
    if (lay.in_place) {
      InPlaceDots<T>::template run<NV, UV>(h_prev, ld, rows, P, w_hh, b_hh, H, pan_begin,
                                           pan_end, cell_epilogue, cell_prefetch, (s & 1) != 0);
    } else if (deferred) {
      // The product parks its sums in `pre`; then each row's cell update walks the row's units
      // in order (kDeferredMinStepBytes says why). Each thread parks and reads only its own
      // panels.
      const int64_t pre_ld = lay.pre_row_elems();
      auto park = [&](int64_t pan, int64_t r0, int m, auto& acc) {
        for (int i = 0; i < m; ++i) {
          T* row = pre + (r0 + i) * pre_ld + pan * NV * W;
          for (int v = 0; v < NV; ++v) acc[i][v].store(row + v * W);
        }
      };
      if (lay.amx) {
        // The tiles leave the bias out: it joins the sums as they come back from `pre`. Each
        // panel's product first asks for the lines of xproj (and saved gates) that the update
        // after the product will touch for its units: the tiles do not wait on them, and
        // otherwise the update waited on each (DRAM: xproj was written long before).
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
            cell_prefetch(pan, 0, static_cast<int>(rows));
            amx_panel_product<NV>(hbf[s & 1], amx_ld, rows,
                                  amx_pack + pan * amx_panel_elems(NV, P), amx_chunks(P),
                                  pre + pan * NV * W, pre_ld);
          }
        }
      } else {
        PanelGemm<T, NV>::run(h_prev, ld, rows, P, w_pack, bias_pack, pan_begin, pan_end,
                              scratch, park, [](int64_t, int64_t, int) {}, (s & 1) != 0);
      }
      const T* amx_bias = lay.amx ? bias_pack : nullptr;
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
          V sums[1][NV];
          for (int v = 0; v < NV; ++v) {
            sums[0][v] = V::load(pre + b * pre_ld + (pan * NV + v) * W);
            if (amx_bias) sums[0][v] += V::load(amx_bias + (pan * NV + v) * W);
          }
          cell_epilogue(pan, b, 1, sums);
        }
      }
    } else {
      PanelGemm<T, NV>::run(h_prev, ld, rows, P, w_pack, bias_pack, pan_begin, pan_end, scratch,
                            cell_epilogue, cell_prefetch, (s & 1) != 0);
    }

    // Padded rows: the state stays, the output row is zero.
    if (p.lengths) {
      for (int64_t b = 0; b < B; ++b) {
        if (steps.active(b, s)) continue;
        if (!projected) keep_h(b, unit_begin, unit_end);
      }
    }

    if (projected) {
      team.sync();  // r_t complete
      auto proj_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
        for (int i = 0; i < m; ++i) {
          const int64_t b = r0 + i;
          if (!steps.active(b, s)) continue;
          S* out = row_of<S>(p.out, steps.time(b, s), b);
          for (int v = 0; v < kColVecs; ++v) {
            const int64_t col = (pan * kColVecs + v) * W;
            if (col >= P) break;
            const int n = static_cast<int>(imin(W, P - col));
            publish_h(b, col, acc[i][v], n);
            store_as(out + col, acc[i][v], n);
          }
        }
      };
      if (lay.proj_in_place) {
        InPlaceDots<T>::template run<kColVecs, kColVecs>(
            rbuf, ld, rows, H, w_hr, static_cast<const S*>(nullptr), P, ppan_begin, ppan_end,
            proj_epilogue,
            [](int64_t, int64_t, int) {}, false);
      } else {
        PanelGemm<T, kColVecs>::run(rbuf, ld, rows, H, wr_pack, nullptr, ppan_begin, ppan_end,
                                    proj_scratch, proj_epilogue);
      }
      if (p.lengths) {
        for (int64_t b = 0; b < B; ++b) {
          if (steps.active(b, s)) continue;
          keep_h(b, col_begin, col_end);
        }
      }
    }
    team.sync();  // h_t complete
  }

  // Final states: each thread copies what it owns.
  const T* h_last = hbuf[seq_len & 1];
  const int64_t own_begin = projected ? col_begin : unit_begin;
  const int64_t own_end = projected ? col_end : unit_end;
  for (int64_t b = 0; b < B; ++b) {
    convert_row(static_cast<S*>(p.hn) + b * P + own_begin, h_last + b * ld + own_begin,
                own_end - own_begin);
    if constexpr (has_cell_state(C)) {
      convert_row(static_cast<S*>(p.cn) + b * H + unit_begin, cbuf + b * ld + unit_begin,
                  unit_end - unit_begin);
    }
  }
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
