// pybind11 glue shared by every native module (_cpu, _cuda, _emu): the Python classes FwdParams and
// BwdParams over fusedrnn::RecurrenceFwdParams / RecurrenceBwdParams, and the validation every
// backend runs before it touches memory.
//
// Backend-neutral on purpose (the CUDA module includes it): nothing here dereferences a pointer of
// the params, because on CUDA they are device pointers. Checks that need the data (lengths in
// [1, T]) or the backend's own limits (supported dtypes, workspace size) belong to the backend.
//
// Python view of the fields (python/fusedrnn/_backend.py fills them):
//   pointers   -> int (0 = null)
//   SeqTensor  -> (data_ptr, stride_t, stride_b), strides in elements
//   cell/dtype -> int codes of fusedrnn::CellKind / fusedrnn::DType
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/params.h"

namespace fusedrnn {

namespace py = pybind11;

// The dtypes an entry point runs besides float32 and float64: CUDA runs both half types; the CPU
// recurrence runs bfloat16 tensors (widened to float inside, csrc/cpu/storage.h).
struct DTypeSupport {
  bool float16;
  bool bfloat16;
};
inline constexpr DTypeSupport kEveryDType{true, true};
inline constexpr DTypeSupport kCpuDTypes{false, true};

namespace binding_detail {

using SeqTuple = std::tuple<uintptr_t, int64_t, int64_t>;

inline SeqTuple seq_to_tuple(const SeqTensor& s) {
  return {reinterpret_cast<uintptr_t>(s.data), s.stride_t, s.stride_b};
}

inline SeqTensor seq_from_tuple(const SeqTuple& t) {
  SeqTensor s;
  s.data = reinterpret_cast<void*>(std::get<0>(t));
  s.stride_t = std::get<1>(t);
  s.stride_b = std::get<2>(t);
  return s;
}

// The RecurrenceShape fields, which both all-fields constructors take first and in this order.
inline void set_shape(RecurrenceShape& p, int32_t cell, int32_t dtype, int64_t seq_len,
                      int64_t batch, int64_t hidden, int64_t state, bool reverse,
                      uintptr_t lengths) {
  p.cell = static_cast<CellKind>(cell);
  p.dtype = static_cast<DType>(dtype);
  p.seq_len = seq_len;
  p.batch = batch;
  p.hidden = hidden;
  p.state = state;
  p.reverse = reverse;
  p.lengths = reinterpret_cast<const int64_t*>(lengths);
}

// Read/write attribute for a pointer field, seen from Python as an int (0 = null).
template <typename Class, typename Struct, typename Ptr>
void def_pointer(Class& cls, const char* name, Ptr Struct::*field) {
  cls.def_property(
      name, [field](const Struct& p) { return reinterpret_cast<uintptr_t>(p.*field); },
      [field](Struct& p, uintptr_t value) { p.*field = reinterpret_cast<Ptr>(value); });
}

template <typename Class, typename Struct>
void def_seq(Class& cls, const char* name, SeqTensor Struct::*field) {
  cls.def_property(
      name, [field](const Struct& p) { return seq_to_tuple(p.*field); },
      [field](Struct& p, const SeqTuple& value) { p.*field = seq_from_tuple(value); });
}

// The RecurrenceShape fields, common to both classes.
template <typename Struct, typename Class>
void def_shape_fields(Class& cls) {
  cls.def_property(
      "cell", [](const Struct& p) { return static_cast<int32_t>(p.cell); },
      [](Struct& p, int32_t code) { p.cell = static_cast<CellKind>(code); });
  cls.def_property(
      "dtype", [](const Struct& p) { return static_cast<int32_t>(p.dtype); },
      [](Struct& p, int32_t code) { p.dtype = static_cast<DType>(code); });
  cls.def_property(
      "seq_len", [](const Struct& p) { return p.seq_len; },
      [](Struct& p, int64_t v) { p.seq_len = v; });
  cls.def_property(
      "batch", [](const Struct& p) { return p.batch; }, [](Struct& p, int64_t v) { p.batch = v; });
  cls.def_property(
      "hidden", [](const Struct& p) { return p.hidden; },
      [](Struct& p, int64_t v) { p.hidden = v; });
  cls.def_property(
      "state", [](const Struct& p) { return p.state; }, [](Struct& p, int64_t v) { p.state = v; });
  cls.def_property(
      "reverse", [](const Struct& p) { return p.reverse; },
      [](Struct& p, bool v) { p.reverse = v; });
  cls.def_property(
      "lengths", [](const Struct& p) { return reinterpret_cast<uintptr_t>(p.lengths); },
      [](Struct& p, uintptr_t v) { p.lengths = reinterpret_cast<const int64_t*>(v); });
}

template <typename Struct, typename Class>
void def_execution_fields(Class& cls) {
  cls.def_readwrite("num_threads", &Struct::num_threads);
  cls.def_readwrite("cuda_stream", &Struct::cuda_stream);
  def_pointer(cls, "workspace", &Struct::workspace);
  cls.def_readwrite("workspace_bytes", &Struct::workspace_bytes);
}

[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw std::invalid_argument("fusedrnn: " + where + ": " + what);
}

inline std::string direction_name(size_t index) {
  return "direction " + std::to_string(index);
}

inline void require_pointer(const void* ptr, const std::string& where, const char* field,
                            const char* why) {
  if (ptr == nullptr) fail(where, std::string(field) + " is null; expected " + why);
}

inline void require_null(const void* ptr, const std::string& where, const char* field,
                         const char* why) {
  if (ptr != nullptr) fail(where, std::string(field) + " must be null (0) " + why);
}

inline void check_seq_strides(const SeqTensor& s, const std::string& where, const char* field) {
  if (s.data == nullptr) return;
  if (s.stride_t < 0 || s.stride_b < 0) {
    fail(where, std::string(field) + " strides must be non-negative, got (stride_t=" +
                    std::to_string(s.stride_t) + ", stride_b=" + std::to_string(s.stride_b) + ")");
  }
}

inline void check_shape(const RecurrenceShape& p, const std::string& where, DTypeSupport dtypes) {
  const auto cell = static_cast<int32_t>(p.cell);
  if (!is_cell_code(cell)) {
    fail(where,
         "cell must be 0 (lstm), 1 (gru), 2 (rnn_tanh), 3 (rnn_relu) or 4 (lstm_cifg), got " +
             std::to_string(cell));
  }
  const auto dtype = static_cast<int32_t>(p.dtype);
  const bool supported = dtype == 0 || dtype == 1 || (dtype == 2 && dtypes.float16) ||
                         (dtype == 3 && dtypes.bfloat16);
  if (!supported) {
    fail(where, std::string("dtype must be 0 (float32), 1 (float64)") +
                    (dtypes.float16 ? ", 2 (float16)" : "") +
                    (dtypes.bfloat16 ? ", 3 (bfloat16)" : "") + " here, got " +
                    std::to_string(dtype));
  }
  auto positive = [&](int64_t v, const char* field) {
    if (v < 1) fail(where, std::string(field) + " must be >= 1, got " + std::to_string(v));
  };
  positive(p.seq_len, "seq_len");
  positive(p.batch, "batch");
  positive(p.hidden, "hidden");
  positive(p.state, "state");
  if (has_cell_state(p.cell)) {
    if (p.state > p.hidden) {
      fail(where, "state (proj_size) must be <= hidden (" + std::to_string(p.hidden) + ") for " +
                      cell_name(p.cell) + ", got " + std::to_string(p.state));
    }
  } else if (p.state != p.hidden) {
    fail(where, std::string("state must equal hidden (") + std::to_string(p.hidden) + ") for " +
                    cell_name(p.cell) + ", got " + std::to_string(p.state));
  }
}

template <typename Params>
void check_execution(const Params& p, const std::string& where) {
  if (p.num_threads < 1) {
    fail(where, "num_threads must be >= 1, got " + std::to_string(p.num_threads));
  }
  if (p.workspace_bytes < 0) {
    fail(where, "workspace_bytes must be >= 0, got " + std::to_string(p.workspace_bytes));
  }
  if (p.workspace_bytes > 0 && p.workspace == nullptr) {
    fail(where, "workspace is null but workspace_bytes is " + std::to_string(p.workspace_bytes));
  }
}

template <typename Params>
void check_directions_agree(const std::vector<Params>& dirs, const char* entry) {
  if (dirs.empty() || dirs.size() > 2) {
    throw std::invalid_argument(std::string("fusedrnn: ") + entry +
                                " expects a list of 1 or 2 directions, got " +
                                std::to_string(dirs.size()));
  }
  if (dirs.size() == 2) {
    const auto& a = dirs[0];
    const auto& b = dirs[1];
    auto same = [&](bool ok, const char* field) {
      if (!ok) fail("direction 1", std::string(field) + " differs from direction 0");
    };
    same(a.cell == b.cell, "cell");
    same(a.dtype == b.dtype, "dtype");
    same(a.seq_len == b.seq_len, "seq_len");
    same(a.batch == b.batch, "batch");
    same(a.hidden == b.hidden, "hidden");
    same(a.state == b.state, "state");
    same(a.lengths == b.lengths, "lengths");
    same((a.peephole == nullptr) == (b.peephole == nullptr), "peephole (set or null)");
  }
}

}  // namespace binding_detail

// Defines FwdParams and BwdParams on `m`.
inline void bind_params(py::module_& m) {
  using namespace binding_detail;
  using Fwd = RecurrenceFwdParams;
  using Bwd = RecurrenceBwdParams;

  // module_local: _cpu, _cuda and _emu each bind the same C++ structs; without it the second
  // module imported fails with "type is already registered".
  py::class_<Fwd> fwd(m, "FwdParams", py::module_local(),
                      "fusedrnn::RecurrenceFwdParams: one layer, one direction, forward "
                      "(see csrc/include/fusedrnn/params.h)");
  fwd.def(py::init<>());
  // Every field in one call (workspace and peephole left null): the Python front builds a struct
  // per direction per call, and ~22 attribute stores cost more than the native call at small
  // sizes.
  fwd.def(py::init([](int32_t cell, int32_t dtype, int64_t seq_len, int64_t batch, int64_t hidden,
                      int64_t state, bool reverse, uintptr_t lengths, const SeqTuple& xproj,
                      uintptr_t w_hh, uintptr_t b_hh, uintptr_t w_hr, uintptr_t h0, uintptr_t c0,
                      const SeqTuple& out, uintptr_t hn, uintptr_t cn, const SeqTuple& gates,
                      const SeqTuple& c_seq, const SeqTuple& r_seq, int64_t num_threads,
                      int64_t cuda_stream) {
            Fwd p;
            set_shape(p, cell, dtype, seq_len, batch, hidden, state, reverse, lengths);
            p.xproj = seq_from_tuple(xproj);
            p.w_hh = reinterpret_cast<const void*>(w_hh);
            p.b_hh = reinterpret_cast<const void*>(b_hh);
            p.w_hr = reinterpret_cast<const void*>(w_hr);
            p.h0 = reinterpret_cast<const void*>(h0);
            p.c0 = reinterpret_cast<const void*>(c0);
            p.out = seq_from_tuple(out);
            p.hn = reinterpret_cast<void*>(hn);
            p.cn = reinterpret_cast<void*>(cn);
            p.gates = seq_from_tuple(gates);
            p.c_seq = seq_from_tuple(c_seq);
            p.r_seq = seq_from_tuple(r_seq);
            p.num_threads = num_threads;
            p.cuda_stream = cuda_stream;
            return p;
          }));
  def_shape_fields<Fwd>(fwd);
  def_seq(fwd, "xproj", &Fwd::xproj);
  def_pointer(fwd, "w_hh", &Fwd::w_hh);
  def_pointer(fwd, "b_hh", &Fwd::b_hh);
  def_pointer(fwd, "w_hr", &Fwd::w_hr);
  def_pointer(fwd, "peephole", &Fwd::peephole);
  def_pointer(fwd, "h0", &Fwd::h0);
  def_pointer(fwd, "c0", &Fwd::c0);
  def_seq(fwd, "out", &Fwd::out);
  def_pointer(fwd, "hn", &Fwd::hn);
  def_pointer(fwd, "cn", &Fwd::cn);
  def_seq(fwd, "gates", &Fwd::gates);
  def_seq(fwd, "c_seq", &Fwd::c_seq);
  def_seq(fwd, "r_seq", &Fwd::r_seq);
  def_execution_fields<Fwd>(fwd);

  py::class_<Bwd> bwd(m, "BwdParams", py::module_local(),
                      "fusedrnn::RecurrenceBwdParams: one layer, one direction, backward "
                      "(see csrc/include/fusedrnn/params.h)");
  bwd.def(py::init<>());
  bwd.def(py::init([](int32_t cell, int32_t dtype, int64_t seq_len, int64_t batch, int64_t hidden,
                      int64_t state, bool reverse, uintptr_t lengths, uintptr_t w_hh,
                      uintptr_t b_hh, uintptr_t w_hr, uintptr_t h0, uintptr_t c0,
                      const SeqTuple& out, const SeqTuple& gates, const SeqTuple& c_seq,
                      const SeqTuple& d_out, uintptr_t d_hn, uintptr_t d_cn,
                      const SeqTuple& d_xproj, const SeqTuple& d_hproj, const SeqTuple& d_h_seq,
                      uintptr_t d_h0, uintptr_t d_c0, int64_t num_threads, int64_t cuda_stream) {
            Bwd p;
            set_shape(p, cell, dtype, seq_len, batch, hidden, state, reverse, lengths);
            p.w_hh = reinterpret_cast<const void*>(w_hh);
            p.b_hh = reinterpret_cast<const void*>(b_hh);
            p.w_hr = reinterpret_cast<const void*>(w_hr);
            p.h0 = reinterpret_cast<const void*>(h0);
            p.c0 = reinterpret_cast<const void*>(c0);
            p.out = seq_from_tuple(out);
            p.gates = seq_from_tuple(gates);
            p.c_seq = seq_from_tuple(c_seq);
            p.d_out = seq_from_tuple(d_out);
            p.d_hn = reinterpret_cast<const void*>(d_hn);
            p.d_cn = reinterpret_cast<const void*>(d_cn);
            p.d_xproj = seq_from_tuple(d_xproj);
            p.d_hproj = seq_from_tuple(d_hproj);
            p.d_h_seq = seq_from_tuple(d_h_seq);
            p.d_h0 = reinterpret_cast<void*>(d_h0);
            p.d_c0 = reinterpret_cast<void*>(d_c0);
            p.num_threads = num_threads;
            p.cuda_stream = cuda_stream;
            return p;
          }));
  def_shape_fields<Bwd>(bwd);
  def_pointer(bwd, "w_hh", &Bwd::w_hh);
  def_pointer(bwd, "b_hh", &Bwd::b_hh);
  def_pointer(bwd, "w_hr", &Bwd::w_hr);
  def_pointer(bwd, "peephole", &Bwd::peephole);
  def_pointer(bwd, "h0", &Bwd::h0);
  def_pointer(bwd, "c0", &Bwd::c0);
  def_seq(bwd, "out", &Bwd::out);
  def_seq(bwd, "gates", &Bwd::gates);
  def_seq(bwd, "c_seq", &Bwd::c_seq);
  def_seq(bwd, "d_out", &Bwd::d_out);
  def_pointer(bwd, "d_hn", &Bwd::d_hn);
  def_pointer(bwd, "d_cn", &Bwd::d_cn);
  def_seq(bwd, "d_xproj", &Bwd::d_xproj);
  def_seq(bwd, "d_hproj", &Bwd::d_hproj);
  def_seq(bwd, "d_h_seq", &Bwd::d_h_seq);
  def_pointer(bwd, "d_h0", &Bwd::d_h0);
  def_pointer(bwd, "d_c0", &Bwd::d_c0);
  def_execution_fields<Bwd>(bwd);
}

// Throws std::invalid_argument (Python: ValueError) naming the direction and the field.
// dtypes: what the backend's entry point runs besides float32/float64.
inline void validate_forward(const std::vector<RecurrenceFwdParams>& dirs, DTypeSupport dtypes) {
  using namespace binding_detail;
  check_directions_agree(dirs, "forward");
  for (size_t d = 0; d < dirs.size(); ++d) {
    const auto& p = dirs[d];
    const std::string where = direction_name(d);
    check_shape(p, where, dtypes);
    const bool lstm = has_cell_state(p.cell);
    const bool projected = lstm && p.state != p.hidden;
    require_pointer(p.xproj.data, where, "xproj", "the [T, B, G*H] input projection");
    require_pointer(p.w_hh, where, "w_hh", "the [G*H, P] recurrent weight");
    require_pointer(p.out.data, where, "out", "the [T, B, P] output");
    require_pointer(p.hn, where, "hn", "the [B, P] final state");
    if (lstm) require_pointer(p.cn, where, "cn", "the [B, H] final cell state of an lstm");
    if (projected) {
      require_pointer(p.w_hr, where, "w_hr", "the [P, H] projection (state != hidden)");
    } else {
      require_null(p.w_hr, where, "w_hr", "unless an lstm has state (proj_size) < hidden");
    }
    if (!lstm) require_null(p.peephole, where, "peephole", "unless the cell is an lstm");
    // Saved tensors: all set (training) or all null (inference).
    if (p.gates.data != nullptr || p.c_seq.data != nullptr || p.r_seq.data != nullptr) {
      if (lstm || p.cell == CellKind::kGru) {
        require_pointer(p.gates.data, where, "gates", "set with the other saved tensors");
      }
      if (lstm) require_pointer(p.c_seq.data, where, "c_seq", "set when gates is (training)");
      if (projected) {
        require_pointer(p.r_seq.data, where, "r_seq", "set when gates is (projected training)");
      }
    }
    check_seq_strides(p.xproj, where, "xproj");
    check_seq_strides(p.out, where, "out");
    check_seq_strides(p.gates, where, "gates");
    check_seq_strides(p.c_seq, where, "c_seq");
    check_seq_strides(p.r_seq, where, "r_seq");
    check_execution(p, where);
  }
}

inline void validate_backward(const std::vector<RecurrenceBwdParams>& dirs, DTypeSupport dtypes) {
  using namespace binding_detail;
  check_directions_agree(dirs, "backward");
  for (size_t d = 0; d < dirs.size(); ++d) {
    const auto& p = dirs[d];
    const std::string where = direction_name(d);
    check_shape(p, where, dtypes);
    const bool lstm = has_cell_state(p.cell);
    const bool projected = lstm && p.state != p.hidden;
    require_pointer(p.w_hh, where, "w_hh", "the [G*H, P] recurrent weight");
    require_pointer(p.out.data, where, "out", "the [T, B, P] forward output");
    require_pointer(p.d_xproj.data, where, "d_xproj", "the [T, B, G*H] gradient output");
    require_pointer(p.d_h0, where, "d_h0", "the [B, P] gradient output");
    if (lstm || p.cell == CellKind::kGru) {
      require_pointer(p.gates.data, where, "gates", "the [T, B, S*H] gates saved by forward");
    }
    if (lstm) require_pointer(p.c_seq.data, where, "c_seq", "the [T, B, H] cell states of forward");
    if (p.cell == CellKind::kGru) {
      require_pointer(p.d_hproj.data, where, "d_hproj",
                      "the [T, B, G*H] recurrent-product gradient of a gru");
    }
    if (projected) {
      require_pointer(p.w_hr, where, "w_hr", "the [P, H] projection (state != hidden)");
      require_pointer(p.d_h_seq.data, where, "d_h_seq",
                      "the [T, B, P] state gradient of a projected lstm");
    } else {
      require_null(p.w_hr, where, "w_hr", "unless an lstm has state (proj_size) < hidden");
    }
    if (!lstm) require_null(p.peephole, where, "peephole", "unless the cell is an lstm");
    check_seq_strides(p.out, where, "out");
    check_seq_strides(p.gates, where, "gates");
    check_seq_strides(p.c_seq, where, "c_seq");
    check_seq_strides(p.d_out, where, "d_out");
    check_seq_strides(p.d_xproj, where, "d_xproj");
    check_seq_strides(p.d_hproj, where, "d_hproj");
    check_seq_strides(p.d_h_seq, where, "d_h_seq");
    check_execution(p, where);
  }
}

}  // namespace fusedrnn
