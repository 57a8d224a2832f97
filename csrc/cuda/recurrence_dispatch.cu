// Runtime dispatch of the CUDA recurrence entry points on cell kind and dtype, and the workspace
// sizes. The kernels themselves are instantiated in recurrence_<dtype>.cu.
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "launch_compat.h"
#include "recurrence_launch.h"

namespace fusedrnn::cuda {

LaunchOptions& launch_options() {
  static LaunchOptions options;
  return options;
}

namespace {

int64_t elem_bytes(DType dtype) {
  if (const int64_t bytes = dtype_bytes(dtype)) return bytes;
  throw std::invalid_argument("fusedrnn: unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

int64_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

template <typename T>
struct TypeTag {
  using type = T;
};

// The kernels count steps, rows and units in 32-bit ints (recurrence_*_kernel.cuh): a larger
// size would wrap and run a wrong number of steps or rows without any error. (Offsets into the
// sequences, states and workspace are 64-bit. A few products of sizes are formed in int, e.g.
// g * H + unit for a bias or saved-gate row: they stay below 2^31 for any H < 2^29, and an H
// that large has a W_hh of 2^60 elements.)
template <typename Params>
void check_counts_fit_int(const std::vector<Params>& dirs) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  for (const Params& p : dirs) {
    const std::pair<const char*, int64_t> counts[] = {
        {"seq_len", p.seq_len}, {"batch", p.batch}, {"hidden", p.hidden}, {"state", p.state}};
    for (const auto& [name, value] : counts) {
      if (value > kMax) {
        throw std::invalid_argument(std::string("fusedrnn: the CUDA kernels take ") + name +
                                    " up to " + std::to_string(kMax) + ", got " +
                                    std::to_string(value));
      }
    }
  }
}

template <typename Params>
int64_t workspace_bytes(const std::vector<Params>& dirs, bool backward) {
  if (dirs.empty()) throw std::invalid_argument("fusedrnn: expected 1 or 2 directions, got 0");
  check_counts_fit_int(dirs);
  const Params& p = dirs.front();
  const WorkspaceLayout layout = make_workspace_layout(backward, p.cell, p.batch, p.hidden, p.state,
                                                       elem_bytes(p.dtype), acc_bytes(p.dtype));
  return layout.per_direction * static_cast<int64_t>(dirs.size());
}

// Calls launcher<Cell, T> for the cell and dtype of `p`.
template <template <class, typename> class Launcher, typename Params>
void dispatch(const std::vector<Params>& dirs, RecurrenceGeometry* plan_only) {
  if (dirs.empty()) throw std::invalid_argument("fusedrnn: expected 1 or 2 directions, got 0");
  check_counts_fit_int(dirs);
  const Params& p = dirs.front();
  auto by_cell = [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    switch (p.cell) {
      case CellKind::kLstm: return Launcher<LstmTraits, T>::run(dirs, plan_only);
      case CellKind::kLstmCifg: return Launcher<CifgTraits, T>::run(dirs, plan_only);
      case CellKind::kGru: return Launcher<GruTraits, T>::run(dirs, plan_only);
      case CellKind::kRnnTanh:
      case CellKind::kRnnRelu: return Launcher<RnnTraits, T>::run(dirs, plan_only);
    }
    throw std::invalid_argument("fusedrnn: unknown cell code " +
                                std::to_string(static_cast<int>(p.cell)));
  };
  switch (p.dtype) {
    case DType::kFloat32: return by_cell(TypeTag<float>{});
    case DType::kFloat64: return by_cell(TypeTag<double>{});
    case DType::kFloat16: return by_cell(TypeTag<__half>{});
    case DType::kBFloat16: return by_cell(TypeTag<__nv_bfloat16>{});
  }
  throw std::invalid_argument("fusedrnn: unknown dtype code " +
                              std::to_string(static_cast<int>(p.dtype)));
}

template <class Cell, typename T>
struct ForwardLauncher {
  static void run(const std::vector<RecurrenceFwdParams>& d, RecurrenceGeometry* plan) {
    launch_forward<Cell, T>(d, plan);
  }
};
template <class Cell, typename T>
struct BackwardLauncher {
  static void run(const std::vector<RecurrenceBwdParams>& d, RecurrenceGeometry* plan) {
    launch_backward<Cell, T>(d, plan);
  }
};

}  // namespace

int64_t forward_workspace_bytes(const std::vector<RecurrenceFwdParams>& dirs) {
  return workspace_bytes(dirs, false);
}
int64_t backward_workspace_bytes(const std::vector<RecurrenceBwdParams>& dirs) {
  return workspace_bytes(dirs, true);
}

void forward(const std::vector<RecurrenceFwdParams>& dirs) { dispatch<ForwardLauncher>(dirs, nullptr); }
void backward(const std::vector<RecurrenceBwdParams>& dirs) { dispatch<BackwardLauncher>(dirs, nullptr); }

RecurrenceGeometry plan_forward(const std::vector<RecurrenceFwdParams>& dirs) {
  RecurrenceGeometry g;
  dispatch<ForwardLauncher>(dirs, &g);
  return g;
}
RecurrenceGeometry plan_backward(const std::vector<RecurrenceBwdParams>& dirs) {
  RecurrenceGeometry g;
  dispatch<BackwardLauncher>(dirs, &g);
  return g;
}

}  // namespace fusedrnn::cuda
