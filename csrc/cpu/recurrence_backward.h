// The backward recurrence (backpropagation through time) of one direction (the architecture:
// recurrence_impl.h).
#pragma once

#ifndef FUSEDRNN_CPU_ISA
#error "recurrence_backward.h is included by the per-ISA translation units only"
#endif

#include <cstdint>
#include <cstring>

#include "amx_tiles.h"
#include "panel_gemm.h"
#include "recurrence_common.h"
#include "recurrence_layouts.h"
#include "thread_team.h"

namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA {

// ------------------------------------------------------------------------------ backward
// T, S: as forward_impl's (the carried d_h, d_c and d_pre stay in T).
template <typename T, CellKind C, typename S>
void backward_impl(const RecurrenceBwdParams& p, const Team& team) {
  constexpr int W = kWidth<T>;
  constexpr int G = gate_count(C);
  using L = BwdLayout<T, C>;
  using V = Vec<T, W>;
  const L lay(p);
  const int64_t seq_len = p.seq_len, B = p.batch, H = p.hidden, P = p.state, ld = lay.ld;
  const int64_t ldg = lay.ldg;
  const bool projected = has_cell_state(C) && P != H;
  const Steps steps{p.lengths, seq_len, p.reverse};
  const int64_t cpp = lay.cols_per_panel;

  char* ws = aligned_base(p.workspace);
  T* wt_pack = reinterpret_cast<T*>(ws + lay.wt_pack);
  T* wr_pack = reinterpret_cast<T*>(ws + lay.wr_pack);
  T* dh_state = reinterpret_cast<T*>(ws + lay.dh);
  T* dc_state = reinterpret_cast<T*>(ws + lay.dc);
  // The product's d_pre in float (null with the tiles, which read dpbf_buf instead).
  T* dpre_buf[2] = {nullptr, nullptr};
  if (!lay.amx) {
    dpre_buf[0] = reinterpret_cast<T*>(ws + lay.dpre);
    dpre_buf[1] = dpre_buf[0] + B * ldg;
  }
  // The AMX product's bfloat16 copies of d_pre (BwdLayout::amx; null otherwise), amx_ld apart,
  // and its sums.
  const int64_t amx_ld = amx_lda(G * H), amx_row_count = amx_rows(B);
  BFloat16* dpbf_buf[2] = {nullptr, nullptr};
  if (lay.amx) {
    dpbf_buf[0] = reinterpret_cast<BFloat16*>(ws + lay.dpbf);
    dpbf_buf[1] = dpbf_buf[0] + amx_row_count * amx_ld;
  }
  BFloat16* amx_pack = reinterpret_cast<BFloat16*>(ws + lay.amx_pack);
  T* amx_sums = reinterpret_cast<T*>(ws + lay.amx_sums);
  T* dh_direct = reinterpret_cast<T*>(ws + lay.dh_direct);
  T* dht = reinterpret_cast<T*>(ws + lay.dht);
  T* scratch = reinterpret_cast<T*>(ws + lay.scratch);
  T* proj_scratch = reinterpret_cast<T*>(ws + lay.proj_scratch);
  const S* w_hh = static_cast<const S*>(p.w_hh);
  const S* w_hr = static_cast<const S*>(p.w_hr);
  const S* peephole = static_cast<const S*>(p.peephole);

  // Panels over state columns (the product d_pre W_hh); without projection also the units of
  // the pointwise part. Projected: units come from the panels over H of the d_h W_hr product.
  int64_t pan_begin, pan_end, upan_begin = 0, upan_end = 0;
  split_range(lay.panels, team.rank, team.size, pan_begin, pan_end);
  const int64_t col_begin = imin(pan_begin * cpp, P), col_end = imin(pan_end * cpp, P);
  int64_t unit_begin = col_begin, unit_end = col_end;
  if (projected) {
    split_range(lay.proj_panels, team.rank, team.size, upan_begin, upan_end);
    unit_begin = imin(upan_begin * cpp, H);
    unit_end = imin(upan_end * cpp, H);
  }

  // As in the forward: this thread's panels, and its AMX tiles while it runs.
  AmxTileScope tiles(lay.amx);
  if (lay.amx) {
    if constexpr (std::is_same_v<S, BFloat16>) {
      for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
        pack_amx_panel_by_rows<kColVecs>(amx_pack + pan * amx_panel_elems(kColVecs, G * H), w_hh,
                                         P, G * H, pan * cpp, imin(cpp, P - pan * cpp));
      }
    }
  } else {
    pack_panels<T, kColVecs>(wt_pack, w_hh, G * H, 1, P, pan_begin, pan_end,
                             [&](int64_t pan, int v, int w) -> int64_t {
                               const int64_t col = (pan * kColVecs + v) * W + w;
                               return col < P ? col : -1;
                             });
  }
  if (projected) {
    pack_panels<T, kColVecs>(wr_pack, w_hr, P, 1, H, upan_begin, upan_end,
                             [&](int64_t pan, int v, int w) -> int64_t {
                               const int64_t col = (pan * kColVecs + v) * W + w;
                               return col < H ? col : -1;
                             });
  }
  if (team.rank == 0) {
    std::memset(dh_state, 0, sizeof(T) * B * ld);
    if (p.d_hn) {
      for (int64_t b = 0; b < B; ++b) {
        convert_row(dh_state + b * ld, static_cast<const S*>(p.d_hn) + b * P, P);
      }
    }
    if constexpr (has_cell_state(C)) {
      std::memset(dc_state, 0, sizeof(T) * B * ld);
      if (p.d_cn) {
        for (int64_t b = 0; b < B; ++b) {
          convert_row(dc_state + b * ld, static_cast<const S*>(p.d_cn) + b * H, H);
        }
      }
    }
    if constexpr (C == CellKind::kGru) std::memset(dh_direct, 0, sizeof(T) * B * ld);
    if (lay.amx) {  // padding k and rows: zeros, as in the forward's hbf
      std::memset(static_cast<void*>(dpbf_buf[0]), 0,
                  sizeof(BFloat16) * 2 * amx_row_count * amx_ld);
    } else {
      std::memset(dpre_buf[0], 0, sizeof(T) * 2 * B * ldg);
    }
  }
  team.sync();

  // The cell backward for row b at step s, units [u, u + n): d is the gradient w.r.t. h_t
  // (w.r.t. r_t = o tanh(c_t) for a projected LSTM). Writes d_pre (for the product), d_xproj,
  // d_hproj and the carried states.
  BFloat16* dpbf = nullptr;  // this step's bfloat16 d_pre (BwdLayout::amx), else null
  // d_pre of gate g, units [u, u + n) of row b, for the product: into this step's float dpre,
  // or into its bfloat16 copy where the tiles read that instead.
  auto publish_dpre = [&](T* dpre, int64_t b, int g, int64_t u, const V& x, int n) {
    if constexpr (std::is_same_v<T, float>) {
      if (dpbf) {
        store_as(dpbf + b * amx_ld + g * H + u, x, n);
        return;
      }
    }
    x.store_partial(dpre + b * ldg + g * H + u, n);
  };
  auto cell_backward = [&](int64_t b, int64_t s, int64_t u, int n, V d, T* dpre) {
    const int64_t t = steps.time(b, s);
    S* dx = row_of<S>(p.d_xproj, t, b);
    S* dhp = p.d_hproj.data ? row_of<S>(p.d_hproj, t, b) : nullptr;
    if constexpr (has_cell_state(C)) {
      const S* saved = row_of<const S>(p.gates, t, b);
      const V c = load_as<V>(row_of<const S>(p.c_seq, t, b) + u, n);
      V c_prev = V::zero();
      if (s > 0) {
        c_prev = load_as<V>(row_of<const S>(p.c_seq, steps.prev_time(b, s), b) + u, n);
      } else if (p.c0) {
        c_prev = load_as<V>(static_cast<const S*>(p.c0) + b * H + u, n);
      }
      const V d_c = V::load(dc_state + b * ld + u);
      auto publish = [&](const V* parts) {
        for (int g = 0; g < G; ++g) {
          store_as(dx + g * H + u, parts[g], n);
          publish_dpre(dpre, b, g, u, parts[g], n);
          if (dhp) store_as(dhp + g * H + u, parts[g], n);
        }
      };
      if constexpr (C == CellKind::kLstmCifg) {
        const auto gate = load_saved_cifg_gates<V>(saved, H, u, n);
        const auto grad =
            peephole ? cifg_backward(gate.f, gate.g, gate.o, c, c_prev, d, d_c,
                                     load_peephole<C, V>(peephole, H, u, n))
                     : cifg_backward(gate.f, gate.g, gate.o, c, c_prev, d, d_c);
        grad.d_c_prev.store(dc_state + b * ld + u);
        const V parts[3] = {grad.d_f, grad.d_g, grad.d_o};
        publish(parts);
      } else {
        const auto gate = load_saved_lstm_gates<V>(saved, H, u, n);
        const auto grad = peephole ? lstm_backward(gate, c, c_prev, d, d_c,
                                                   load_peephole<C, V>(peephole, H, u, n))
                                   : lstm_backward(gate, c, c_prev, d, d_c);
        grad.d_c_prev.store(dc_state + b * ld + u);
        const V parts[4] = {grad.d_i, grad.d_f, grad.d_g, grad.d_o};
        publish(parts);
      }
    } else if constexpr (C == CellKind::kGru) {
      const auto gate = load_saved_gru_gates<V>(row_of<const S>(p.gates, t, b), H, u, n);
      V h_prev = V::zero();
      if (s > 0) {
        h_prev = load_as<V>(row_of<const S>(p.out, steps.prev_time(b, s), b) + u, n);
      } else if (p.h0) {
        h_prev = load_as<V>(static_cast<const S*>(p.h0) + b * P + u, n);
      }
      const auto grad = gru_backward(gate, h_prev, d);
      grad.d_h_prev_direct.store(dh_direct + b * ld + u);
      const V dxs[3] = {grad.dx_r, grad.dx_z, grad.dx_n};
      const V dhs[3] = {grad.dh_r, grad.dh_z, grad.dh_n};
      for (int g = 0; g < 3; ++g) {
        store_as(dx + g * H + u, dxs[g], n);
        store_as(dhp + g * H + u, dhs[g], n);
        publish_dpre(dpre, b, g, u, dhs[g], n);
      }
    } else {
      const V h_next = load_as<V>(row_of<const S>(p.out, t, b) + u, n);
      V pre;
      for (int w = 0; w < W; ++w) {
        pre.v[w] = rnn_backward(p.cell, Vec<T, 1>(h_next.v[w]), Vec<T, 1>(d.v[w])).v;
      }
      store_as(dx + u, pre, n);
      publish_dpre(dpre, b, 0, u, pre, n);
      if (dhp) store_as(dhp + u, pre, n);
    }
  };

  // Zero gradient rows of padded steps, for this thread's units (and columns).
  auto zero_padded = [&](int64_t b, int64_t s) {
    for (int g = 0; g < G; ++g) {
      zero_row(row_of<S>(p.d_xproj, s, b) + g * H + unit_begin, unit_end - unit_begin);
      if (p.d_hproj.data) {
        zero_row(row_of<S>(p.d_hproj, s, b) + g * H + unit_begin, unit_end - unit_begin);
      }
    }
  };

  for (int64_t s = seq_len - 1; s >= 0; --s) {
    T* dpre = dpre_buf[s & 1];
    dpbf = dpbf_buf[s & 1];
    const int64_t rows = steps.rows_needed(s, B);
    if (!projected) {
      for (int64_t b = 0; b < B; ++b) {
        if (!steps.active(b, s)) {
          zero_padded(b, s);
          continue;
        }
        const S* d_out = p.d_out.data ? row_of<const S>(p.d_out, steps.time(b, s), b) : nullptr;
        for (int64_t u = unit_begin; u < unit_end; u += W) {
          const int n = static_cast<int>(imin(W, unit_end - u));
          V d = V::load(dh_state + b * ld + u);
          if (d_out) d += load_as<V>(d_out + u, n);
          cell_backward(b, s, u, n, d, dpre);
        }
      }
    } else {
      // d_h_t = carried + d_out, over this thread's state columns.
      for (int64_t b = 0; b < B; ++b) {
        if (!steps.active(b, s)) {
          zero_row(row_of<S>(p.d_h_seq, s, b) + col_begin, col_end - col_begin);
          continue;
        }
        const int64_t t = steps.time(b, s);
        const S* d_out = p.d_out.data ? row_of<const S>(p.d_out, t, b) : nullptr;
        S* dhs = row_of<S>(p.d_h_seq, t, b);
        for (int64_t c = col_begin; c < col_end; c += W) {
          const int n = static_cast<int>(imin(W, col_end - c));
          V d = V::load(dh_state + b * ld + c);
          if (d_out) d += load_as<V>(d_out + c, n);
          d.store(dht + b * ld + c);
          store_as(dhs + c, d, n);
        }
      }
      team.sync();  // d_h_t complete
      auto proj_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
        for (int i = 0; i < m; ++i) {
          const int64_t b = r0 + i;
          if (!steps.active(b, s)) continue;
          for (int v = 0; v < kColVecs; ++v) {
            const int64_t u = (pan * kColVecs + v) * W;
            if (u >= H) break;
            cell_backward(b, s, u, static_cast<int>(imin(W, H - u)), acc[i][v], dpre);
          }
        }
      };
      PanelGemm<T, kColVecs>::run(dht, ld, rows, P, wr_pack, nullptr, upan_begin, upan_end,
                                  proj_scratch, proj_epilogue);
      for (int64_t b = 0; b < B; ++b) {
        if (!steps.active(b, s)) zero_padded(b, s);
      }
    }
    team.sync();  // d_pre complete

    // d_h_{t-1} = d_pre W_hh (+ the direct part of a GRU), for the rows active at s.
    auto carry_epilogue = [&](int64_t pan, int64_t r0, int m, auto& acc) {
      for (int i = 0; i < m; ++i) {
        const int64_t b = r0 + i;
        if (!steps.active(b, s)) continue;
        for (int v = 0; v < kColVecs; ++v) {
          const int64_t col = (pan * kColVecs + v) * W;
          if (col >= P) break;
          V d = acc[i][v];
          if constexpr (C == CellKind::kGru) d += V::load(dh_direct + b * ld + col);
          d.store(dh_state + b * ld + col);
        }
      }
    };
    if (lay.amx) {
      if constexpr (std::is_same_v<T, float>) {
        const int64_t sums_ld = lay.amx_sums_ld;
        for (int64_t pan = pan_begin; pan < pan_end; ++pan) {
          amx_panel_product<kColVecs>(dpbf, amx_ld, rows,
                                      amx_pack + pan * amx_panel_elems(kColVecs, G * H),
                                      amx_chunks(G * H), amx_sums + pan * cpp, sums_ld);
          for (int64_t b = 0; b < rows; ++b) {
            V sums[1][kColVecs];
            for (int v = 0; v < kColVecs; ++v) {
              sums[0][v] = V::load(amx_sums + b * sums_ld + pan * cpp + v * W);
            }
            carry_epilogue(pan, b, 1, sums);
          }
        }
      }
    } else {
      PanelGemm<T, kColVecs>::run(dpre, ldg, rows, G * H, wt_pack, nullptr, pan_begin, pan_end,
                                  scratch, carry_epilogue);
    }
  }

  for (int64_t b = 0; b < B; ++b) {
    convert_row(static_cast<S*>(p.d_h0) + b * P + col_begin, dh_state + b * ld + col_begin,
                col_end - col_begin);
    if constexpr (has_cell_state(C)) {
      if (p.d_c0) {
        convert_row(static_cast<S*>(p.d_c0) + b * H + unit_begin, dc_state + b * ld + unit_begin,
                    unit_end - unit_begin);
      }
    }
  }
}

}  // namespace fusedrnn::cpu::FUSEDRNN_CPU_ISA
