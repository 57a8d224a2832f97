// A direction's batch rows [b0, b1) as a problem of its own. Every row of a recurrence is
// independent of the others (they share only the read-only weights; the weight gradients are
// torch GEMMs after the call), so the threads of a direction can split its rows instead of its
// hidden units: each runs the whole recurrence of its rows alone, with no barrier per step.
// recurrence_dispatch.cpp decides which split a call takes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedrnn/cell_kind.h"
#include "fusedrnn/params.h"

namespace fusedrnn::cpu {

namespace row_groups_detail {

inline SeqTensor from_row(SeqTensor s, int64_t b0, int64_t elem) {
  if (s.data != nullptr) s.data = static_cast<char*>(s.data) + b0 * s.stride_b * elem;
  return s;
}

// A [B, width] row-major tensor from row b0 (null stays null).
template <typename Ptr>
Ptr from_row(Ptr p, int64_t b0, int64_t width, int64_t elem) {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Ptr>>, const char, char>;
  return p == nullptr ? p : static_cast<Ptr>(static_cast<Byte*>(p) + b0 * width * elem);
}

}  // namespace row_groups_detail

inline RecurrenceFwdParams rows_of(const RecurrenceFwdParams& p, int64_t b0, int64_t b1) {
  using row_groups_detail::from_row;
  const int64_t e = dtype_bytes(p.dtype);
  RecurrenceFwdParams q = p;
  q.batch = b1 - b0;
  q.lengths = p.lengths != nullptr ? p.lengths + b0 : nullptr;
  q.xproj = from_row(p.xproj, b0, e);
  q.out = from_row(p.out, b0, e);
  q.gates = from_row(p.gates, b0, e);
  q.c_seq = from_row(p.c_seq, b0, e);
  q.r_seq = from_row(p.r_seq, b0, e);
  q.h0 = from_row(p.h0, b0, p.state, e);
  q.c0 = from_row(p.c0, b0, p.hidden, e);
  q.hn = from_row(p.hn, b0, p.state, e);
  q.cn = from_row(p.cn, b0, p.hidden, e);
  return q;
}

inline RecurrenceBwdParams rows_of(const RecurrenceBwdParams& p, int64_t b0, int64_t b1) {
  using row_groups_detail::from_row;
  const int64_t e = dtype_bytes(p.dtype);
  RecurrenceBwdParams q = p;
  q.batch = b1 - b0;
  q.lengths = p.lengths != nullptr ? p.lengths + b0 : nullptr;
  q.h0 = from_row(p.h0, b0, p.state, e);
  q.c0 = from_row(p.c0, b0, p.hidden, e);
  q.out = from_row(p.out, b0, e);
  q.gates = from_row(p.gates, b0, e);
  q.c_seq = from_row(p.c_seq, b0, e);
  q.d_out = from_row(p.d_out, b0, e);
  q.d_hn = from_row(p.d_hn, b0, p.state, e);
  q.d_cn = from_row(p.d_cn, b0, p.hidden, e);
  q.d_xproj = from_row(p.d_xproj, b0, e);
  q.d_hproj = from_row(p.d_hproj, b0, e);
  q.d_h_seq = from_row(p.d_h_seq, b0, e);
  q.d_h0 = from_row(p.d_h0, b0, p.state, e);
  q.d_c0 = from_row(p.d_c0, b0, p.hidden, e);
  return q;
}

}  // namespace fusedrnn::cpu
