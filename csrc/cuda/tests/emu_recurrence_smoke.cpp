// A small emulated forward + backward of the persistent recurrence kernels, without Python, for the
// sanitizer runs (ASan+UBSan, TSan: csrc/emu/run_sanitizers.sh) and as a CTest.
//
// Covers every cell (the CIFG LSTM too), a bidirectional layer with per-sequence lengths, a
// projected LSTM, peephole connections and both weight placements, on shapes that give several
// blocks per direction. The forward output is
// compared with a plain loop over cell_math.h; backward is checked to write every element it owns
// (outputs are poisoned with NaN first) with finite values. Numerical gradient checks live in the
// Python tests (tests/test_cuda_emu.py).
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "launch_compat.h"  // first: the emulator defines __host__ / __device__
#include "fusedrnn/cell_math.h"
#include "recurrence_launch.h"

namespace {

using fusedrnn::CellKind;
using fusedrnn::RecurrenceBwdParams;
using fusedrnn::RecurrenceFwdParams;
using fusedrnn::SeqTensor;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Case {
  CellKind cell;
  int T, B, H, P, dirs;
  bool lengths;
  bool streaming;
  bool peephole = false;  // LSTM (plain or CIFG) with peephole weights (params.h)
};

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

template <typename T>
SeqTensor seq(std::vector<T>& v, int B, int X) {
  return SeqTensor{v.data(), int64_t{B} * X, X};
}

template <typename T>
constexpr fusedrnn::DType dtype_of() {
  if constexpr (std::is_same_v<T, double>) return fusedrnn::DType::kFloat64;
  else if constexpr (std::is_same_v<T, float>) return fusedrnn::DType::kFloat32;
  else if constexpr (std::is_same_v<T, __half>) return fusedrnn::DType::kFloat16;
  else return fusedrnn::DType::kBFloat16;
}

// Largest forward error against the float64 loop (inputs are the same T-rounded values): float64
// agrees to the last bits; the others within a few roundings of T per step at these sizes.
template <typename T>
constexpr double forward_tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  else if constexpr (std::is_same_v<T, float>) return 1e-5;
  else if constexpr (std::is_same_v<T, __half>) return 1e-2;
  else return 6e-2;
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, double>) out[i] = v[i];
    else out[i] = static_cast<double>(static_cast<float>(v[i]));
  }
  return out;
}

// Plain forward of one direction (float64) over cell_math.h, for the comparison.
void reference_forward(const Case& c, bool reverse, const std::vector<double>& xproj,
                       const std::vector<double>& w_hh, const std::vector<double>& b_hh,
                       const std::vector<double>& w_hr, const std::vector<double>& h0,
                       const std::vector<double>& c0, const std::vector<double>& peephole,
                       const std::vector<int64_t>& len, std::vector<double>& out) {
  const int G = fusedrnn::gate_count(c.cell), H = c.H, P = c.P;
  out.assign(static_cast<size_t>(c.T) * c.B * P, 0.0);
  for (int b = 0; b < c.B; ++b) {
    std::vector<double> h(h0.begin() + b * P, h0.begin() + (b + 1) * P);
    std::vector<double> cell(c0.begin() + b * H, c0.begin() + (b + 1) * H);
    for (int s = 0; s < len[b]; ++s) {
      const int t = reverse ? static_cast<int>(len[b]) - 1 - s : s;
      std::vector<double> hh(G * H), r(H), h_next(P);
      for (int j = 0; j < G * H; ++j) {
        double acc = b_hh[j];
        for (int k = 0; k < P; ++k) acc += w_hh[j * P + k] * h[k];
        hh[j] = acc;
      }
      const double* x = &xproj[(static_cast<size_t>(t) * c.B + b) * G * H];
      for (int u = 0; u < H; ++u) {
        if (c.cell == CellKind::kLstmCifg) {  // gates f, g, o; peephole rows w_cf, w_co
          double c_next, r_u;
          const double pre[3] = {x[u] + hh[u], x[H + u] + hh[H + u], x[2 * H + u] + hh[2 * H + u]};
          if (c.peephole) {
            const auto w = fusedrnn::cifg_peephole(peephole[u], peephole[H + u]);
            fusedrnn::cifg_forward(pre[0], pre[1], pre[2], cell[u], c_next, r_u, w);
          } else {
            fusedrnn::cifg_forward(pre[0], pre[1], pre[2], cell[u], c_next, r_u);
          }
          cell[u] = c_next;
          r[u] = r_u;
        } else if (c.cell == CellKind::kLstm) {
          double c_next, r_u;
          const double pre[4] = {x[u] + hh[u], x[H + u] + hh[H + u], x[2 * H + u] + hh[2 * H + u],
                                 x[3 * H + u] + hh[3 * H + u]};
          if (c.peephole) {
            const fusedrnn::LstmPeephole<double> w{peephole[u], peephole[H + u],
                                                   peephole[2 * H + u]};
            fusedrnn::lstm_forward(pre[0], pre[1], pre[2], pre[3], cell[u], c_next, r_u, w);
          } else {
            fusedrnn::lstm_forward(pre[0], pre[1], pre[2], pre[3], cell[u], c_next, r_u);
          }
          cell[u] = c_next;
          r[u] = r_u;
        } else if (c.cell == CellKind::kGru) {
          fusedrnn::gru_forward(x[u], x[H + u], x[2 * H + u], hh[u], hh[H + u], hh[2 * H + u],
                                h[u], r[u]);
        } else {
          r[u] = fusedrnn::rnn_forward(c.cell, x[u] + hh[u]);
        }
      }
      if (P != H) {
        for (int p = 0; p < P; ++p) {
          double acc = 0;
          for (int k = 0; k < H; ++k) acc += w_hr[p * H + k] * r[k];
          h_next[p] = acc;
        }
      } else {
        h_next = r;
      }
      h = h_next;
      for (int p = 0; p < P; ++p) out[(static_cast<size_t>(t) * c.B + b) * P + p] = h[p];
    }
  }
}

template <typename Elem>
void run_case(const Case& c, std::mt19937& rng) {
  const std::string name = std::string(fusedrnn::cell_name(c.cell)) + " " +
                           fusedrnn::dtype_name(dtype_of<Elem>()) + + " T" + std::to_string(c.T) +
                           " B" + std::to_string(c.B) + " H" + std::to_string(c.H) + " P" +
                           std::to_string(c.P) + (c.dirs == 2 ? " bidir" : "") +
                           (c.lengths ? " lengths" : "") + (c.streaming ? " streaming" : "") +
                           (c.peephole ? " peephole" : "");
  std::uniform_real_distribution<double> uni(-0.5, 0.5);
  auto randv = [&](size_t n) {
    std::vector<Elem> v(n);
    for (Elem& x : v) x = Elem(static_cast<float>(uni(rng)));
    return v;
  };
  auto nanv = [&](size_t n) { return std::vector<Elem>(n, Elem(static_cast<float>(kNaN))); };
  const int G = fusedrnn::gate_count(c.cell), S = fusedrnn::saved_gate_count(c.cell);
  const int T = c.T, B = c.B, H = c.H, P = c.P;
  const bool lstm = fusedrnn::has_cell_state(c.cell), proj = P != H;
  std::vector<int64_t> len(B, T);
  if (c.lengths) {
    for (int b = 0; b < B; ++b) len[b] = 1 + static_cast<int64_t>(rng() % T);
    len[0] = T;
  }
  fusedrnn::cuda::launch_options().force_streaming = c.streaming;

  struct Dir {
    std::vector<Elem> xproj, w_hh, b_hh, w_hr, peephole, h0, c0, out, hn, cn, gates, c_seq, r_seq;
    std::vector<Elem> d_out, d_hn, d_cn, d_xproj, d_hproj, d_h_seq, d_h0, d_c0;
  };
  std::vector<Dir> dirs(c.dirs);
  std::vector<RecurrenceFwdParams> fwd(c.dirs);
  for (int d = 0; d < c.dirs; ++d) {
    Dir& v = dirs[d];
    v.xproj = randv(size_t(T) * B * G * H);
    v.w_hh = randv(size_t(G) * H * P);
    v.b_hh = randv(size_t(G) * H);
    v.w_hr = proj ? randv(size_t(P) * H) : std::vector<Elem>();
    const int peephole_rows = c.cell == CellKind::kLstmCifg ? 2 : 3;
    v.peephole = c.peephole ? randv(size_t(peephole_rows) * H) : std::vector<Elem>();
    v.h0 = randv(size_t(B) * P);
    v.c0 = lstm ? randv(size_t(B) * H) : std::vector<Elem>(size_t(B) * H, Elem(0.0f));
    v.out = nanv(size_t(T) * B * P);
    v.hn = nanv(size_t(B) * P);
    v.cn = nanv(size_t(B) * H);
    v.gates = nanv(size_t(T) * B * std::max(S, 1) * H);
    v.c_seq = nanv(size_t(T) * B * H);
    v.r_seq = nanv(size_t(T) * B * H);
    RecurrenceFwdParams& p = fwd[d];
    p.cell = c.cell;
    p.dtype = dtype_of<Elem>();
    p.seq_len = T;
    p.batch = B;
    p.hidden = H;
    p.state = P;
    p.reverse = d == 1;
    p.lengths = c.lengths ? len.data() : nullptr;
    p.xproj = seq(v.xproj, B, G * H);
    p.w_hh = v.w_hh.data();
    p.b_hh = v.b_hh.data();
    p.w_hr = proj ? v.w_hr.data() : nullptr;
    p.peephole = c.peephole ? v.peephole.data() : nullptr;
    p.h0 = v.h0.data();
    p.c0 = lstm ? v.c0.data() : nullptr;
    p.out = seq(v.out, B, P);
    p.hn = v.hn.data();
    p.cn = lstm ? v.cn.data() : nullptr;
    if (S > 0) p.gates = seq(v.gates, B, S * H);
    if (lstm) p.c_seq = seq(v.c_seq, B, H);
    if (proj) p.r_seq = seq(v.r_seq, B, H);
  }
  const int64_t fwd_ws = fusedrnn::cuda::forward_workspace_bytes(fwd);
  std::vector<unsigned char> ws(static_cast<size_t>(fwd_ws), 0xFF);
  for (auto& p : fwd) {
    p.workspace = ws.data();
    p.workspace_bytes = fwd_ws;
  }
  fusedrnn::cuda::forward(fwd);

  for (int d = 0; d < c.dirs; ++d) {
    std::vector<double> ref;
    reference_forward(c, d == 1, widen(dirs[d].xproj), widen(dirs[d].w_hh), widen(dirs[d].b_hh),
                      widen(dirs[d].w_hr), widen(dirs[d].h0), widen(dirs[d].c0),
                      widen(dirs[d].peephole), len, ref);
    const std::vector<double> out = widen(dirs[d].out);
    double max_err = 0;
    bool finite = true;
    for (size_t i = 0; i < ref.size(); ++i) {
      finite &= std::isfinite(out[i]);
      max_err = std::max(max_err, std::fabs(out[i] - ref[i]));
    }
    expect(finite && max_err < forward_tolerance<Elem>(),
           name + ": forward out of direction " + std::to_string(d) + " differs from the loop by " +
               std::to_string(max_err));
  }

  std::vector<RecurrenceBwdParams> bwd(c.dirs);
  for (int d = 0; d < c.dirs; ++d) {
    Dir& v = dirs[d];
    v.d_out = randv(size_t(T) * B * P);
    v.d_hn = randv(size_t(B) * P);
    v.d_cn = randv(size_t(B) * H);
    v.d_xproj = nanv(size_t(T) * B * G * H);
    v.d_hproj = nanv(size_t(T) * B * G * H);
    v.d_h_seq = nanv(size_t(T) * B * P);
    v.d_h0 = nanv(size_t(B) * P);
    v.d_c0 = nanv(size_t(B) * H);
    RecurrenceBwdParams& p = bwd[d];
    static_cast<fusedrnn::RecurrenceShape&>(p) = fwd[d];
    p.w_hh = fwd[d].w_hh;
    p.b_hh = fwd[d].b_hh;
    p.w_hr = fwd[d].w_hr;
    p.peephole = fwd[d].peephole;
    p.h0 = fwd[d].h0;
    p.c0 = fwd[d].c0;
    p.out = fwd[d].out;
    p.gates = fwd[d].gates;
    p.c_seq = fwd[d].c_seq;
    p.d_out = seq(v.d_out, B, P);
    p.d_hn = v.d_hn.data();
    p.d_cn = lstm ? v.d_cn.data() : nullptr;
    p.d_xproj = seq(v.d_xproj, B, G * H);
    p.d_hproj = seq(v.d_hproj, B, G * H);
    p.d_h_seq = proj ? seq(v.d_h_seq, B, P) : SeqTensor{};
    p.d_h0 = v.d_h0.data();
    p.d_c0 = lstm ? v.d_c0.data() : nullptr;
  }
  const int64_t bwd_ws = fusedrnn::cuda::backward_workspace_bytes(bwd);
  std::vector<unsigned char> bws(static_cast<size_t>(bwd_ws), 0xFF);
  for (auto& p : bwd) {
    p.workspace = bws.data();
    p.workspace_bytes = bwd_ws;
  }
  fusedrnn::cuda::backward(bwd);
  for (int d = 0; d < c.dirs; ++d) {
    const Dir& v = dirs[d];
    auto all_finite = [](const std::vector<Elem>& x) {
      for (const Elem& e : x) {
        if (!std::isfinite(static_cast<float>(e))) return false;
      }
      return true;
    };
    const std::string where = name + " direction " + std::to_string(d) + ": ";
    expect(all_finite(v.d_xproj), where + "d_xproj has unwritten (NaN) elements");
    expect(all_finite(v.d_hproj), where + "d_hproj has unwritten (NaN) elements");
    expect(all_finite(v.d_h0), where + "d_h0 has unwritten (NaN) elements");
    if (lstm) expect(all_finite(v.d_c0), where + "d_c0 has unwritten (NaN) elements");
    if (proj) expect(all_finite(v.d_h_seq), where + "d_h_seq has unwritten (NaN) elements");
  }
  std::printf("%s: %s\n", failures == 0 ? "ok" : "checked", name.c_str());
}

// Every case in every one of the element types Elems, case by case (types in the order given).
template <typename... Elems, size_t N>
void run_cases(const Case (&cases)[N], std::mt19937& rng) {
  for (const Case& c : cases) (run_case<Elems>(c, rng), ...);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {
      {CellKind::kLstm, 3, 3, 5, 5, 2, true, false},
      {CellKind::kLstm, 2, 2, 6, 3, 1, true, false},
      {CellKind::kLstm, 3, 3, 5, 5, 2, true, true, true},
      {CellKind::kLstmCifg, 3, 3, 5, 5, 2, true, false, true},
      {CellKind::kGru, 3, 3, 5, 5, 2, true, true},
      {CellKind::kRnnTanh, 2, 1, 5, 5, 1, false, false},
      {CellKind::kRnnRelu, 2, 3, 4, 4, 1, true, true},
  };
  try {
    run_cases<double>(cases, rng);
    // The other dtypes (their vector widths and conversions) on a projected bidirectional LSTM
    // and a GRU, both weight placements.
    const Case mixed[] = {
        {CellKind::kLstm, 3, 3, 8, 4, 2, true, false},
        {CellKind::kLstm, 2, 3, 8, 4, 2, true, false, true},
        {CellKind::kLstmCifg, 2, 3, 8, 4, 2, true, true, true},
        {CellKind::kGru, 2, 3, 9, 9, 2, true, true},
    };
    run_cases<float, __half, __nv_bfloat16>(mixed, rng);
    // Streamed 16-bit weights with 16-byte rows: the forward stages row passes through shared
    // memory, the backward K ranges (cp.async into shared memory, tensor-core product).
    const Case staged[] = {
        {CellKind::kLstm, 3, 3, 16, 16, 2, true, true},
        {CellKind::kGru, 2, 17, 24, 24, 1, true, true},
    };
    run_cases<__half, __nv_bfloat16>(staged, rng);
    // The opt-in launch options: the forward's tagged exchange instead of its grid barrier
    // (blocks poll each other's words, and the sanitizers see what else they share: nothing
    // should be), and the inputs loaded a step ahead.
    fusedrnn::cuda::launch_options().tagged_exchange = true;
    fusedrnn::cuda::launch_options().inputs_ahead = true;
    const Case tagged[] = {
        {CellKind::kLstm, 3, 3, 5, 5, 2, true, false},
        {CellKind::kGru, 2, 3, 9, 9, 2, true, true},
    };
    run_cases<float, __nv_bfloat16>(tagged, rng);
    fusedrnn::cuda::launch_options().tagged_exchange = false;
    fusedrnn::cuda::launch_options().inputs_ahead = false;
    // The GPU's 8 warps per block (the emulator's default is one): what passes between warps
    // (shared-memory hand-offs, the tensor-core product's K-split sums) under the sanitizers
    // too. One block per direction keeps the live threads at 512.
    fusedrnn::cuda::launch_options().threads_per_block = fusedrnn::cuda::kMaxThreadsPerBlock;
    fusedrnn::cuda::launch_options().max_blocks_per_dir = 1;
    const Case eight_warps[] = {
        {CellKind::kLstm, 2, 3, 8, 4, 2, true, false},
        {CellKind::kGru, 2, 3, 9, 9, 1, true, true},
    };
    run_cases<float, __nv_bfloat16>(eight_warps, rng);
    fusedrnn::cuda::launch_options().threads_per_block = 0;
    fusedrnn::cuda::launch_options().max_blocks_per_dir = 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (failures > 0) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("emu_recurrence_smoke: all cases passed\n");
  return 0;
}
