// The CPU multi-tensor loop: runs a functor over all tensors of a call, chunk by chunk, in
// parallel, with a deterministic reduction (per-chunk partials in double, summed in order,
// so the result does not depend on the thread count).
#pragma once

#include <vector>

#include "dtypes.h"
#include "functors.h"
#include "launch_plan.h"

namespace sama {

// A device-or-host scalar: value, times ptr[0] (or ptr[tensor] when per_tensor) if ptr is set.
struct ScalarArg {
  double value = 0.0;
  const double* ptr = nullptr;
  bool per_tensor = false;
};

SAMA_HD double resolve(const ScalarArg& s, int64_t tensor) {
  return s.ptr ? s.value * s.ptr[s.per_tensor ? tensor : 0] : s.value;
}

// Raw pointers of one call: in[k * n_tensors + t] is input list k, tensor t (same for out).
struct Lists {
  int64_t n_tensors = 0;
  const void* const* in = nullptr;
  void* const* out = nullptr;
  const int64_t* numel = nullptr;
  const int64_t* tensor_id = nullptr;  // index for per-tensor scalars (default: t itself)
  int64_t id(int64_t t) const { return tensor_id ? tensor_id[t] : t; }
};

constexpr int64_t kCpuChunk = 1 << 15;  // 32K elements: several per thread, fits in L2

constexpr int kCpuLanes = 16;  // independent partial sums: two AVX2 vectors of fp32 math per block

// One element: load the inputs (and outputs the functor reads), apply, store; returns v.
// A separate always-inlined function rather than code in the loop body: GCC lowers
// `omp simd` before inlining, and arrays declared directly in an `omp simd` body become
// per-lane "simd arrays" whose strided accesses need scatters (AVX2 has none), which keeps the
// loop scalar; arrays in an inlined callee are scalarised instead.
template <typename Op, typename Tin, typename Tout, typename A>
SAMA_HD A cpu_element(const Op& f, const typename Op::template Ctx<A>& c, const Tin* const* in,
                      Tout* const* out, int64_t i) {
  A x[Op::kIn];
  A y[Op::kOut];
  for (int k = 0; k < Op::kIn; ++k) x[k] = to_math(in[k][i]);
  if (Op::kLoadsOut)
    for (int k = 0; k < Op::kOut; ++k) y[k] = to_math(out[k][i]);
  const A r = f.apply(c, x, y);
  for (int k = 0; k < Op::kOut; ++k) out[k][i] = from_math<Tout>(y[k]);
  return r;
}

// Tensor t's input and output pointers, offset to the chunk starting at element `begin`.
template <typename Op, typename Tin, typename Tout>
struct ChunkPointers {
  const Tin* in[Op::kIn];
  Tout* out[Op::kOut];
  ChunkPointers(const Lists& l, int64_t t, int64_t begin) {
    for (int k = 0; k < Op::kIn; ++k) in[k] = static_cast<const Tin*>(l.in[k * l.n_tensors + t]) + begin;
    for (int k = 0; k < Op::kOut; ++k) out[k] = static_cast<Tout*>(l.out[k * l.n_tensors + t]) + begin;
  }
};

// One element as a reduction term: the functor's v squared (in double: ‖v‖² without fp32
// rounding of v²), or the kIndexed functors' own terms (they also get the element's tensor id
// and its index within the tensor).
template <typename Op, typename Tin, typename Tout, typename A>
SAMA_HD Sums element_sums(const Op& f, const typename Op::template Ctx<A>& c, const Tin* const* in,
                          Tout* const* out, int64_t i, int64_t tensor, int64_t index) {
  if constexpr (Op::kIndexed) {
    A x[Op::kIn];
    A y[Op::kOut];
    for (int k = 0; k < Op::kIn; ++k) x[k] = to_math(in[k][i]);
    const Sums s = f.template apply_at<Tout>(c, x, y, tensor, index);
    for (int k = 0; k < Op::kOut; ++k) out[k][i] = from_math<Tout>(y[k]);
    return s;
  } else {
    const double r = double(cpu_element<Op, Tin, Tout, A>(f, c, in, out, i));
    return Sums{Op::kReduces ? r * r : 0.0, 0.0};
  }
}

template <typename Op, typename Tin, typename Tout, typename A>
Sums cpu_chunk(const Op& op, const typename Op::template Ctx<A>& ctx, const Lists& l, int64_t t,
               int64_t begin, int64_t end) {
  const ChunkPointers<Op, Tin, Tout> p(l, t, begin);
  const Tin* const* in = p.in;
  Tout* const* out = p.out;
  const int64_t len = end - begin;
  const int64_t tensor = l.id(t);
  // Local copies: stores through out[] could alias the functor's and context's float fields
  // as far as the compiler knows.
  const Op f = op;
  const auto c = ctx;
  // Element j of each block of kCpuLanes goes to partial sum j, so the reduction order is
  // fixed by the source, not by the vector width the compiler picks. `omp simd` on the block
  // asserts what the compiler cannot prove: element i's stores never feed another element's
  // loads (in place, out[0] == in[0], only at the same index).
  double lane[kCpuLanes] = {}, lane_b[kCpuLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kCpuLanes <= len; i0 += kCpuLanes) {
#pragma omp simd
    for (int j = 0; j < kCpuLanes; ++j) {
      const Sums r = element_sums<Op, Tin, Tout, A>(f, c, in, out, i0 + j, tensor, begin + i0 + j);
      if (Op::kSums > 0) lane[j] += r.a;
      if (Op::kSums > 1) lane_b[j] += r.b;
    }
  }
  Sums acc;
  for (int64_t i = i0; i < len; ++i) {
    const Sums r = element_sums<Op, Tin, Tout, A>(f, c, in, out, i, tensor, begin + i);
    if (Op::kSums > 0) acc.a += r.a;
    if (Op::kSums > 1) acc.b += r.b;
  }
  for (int j = 0; j < kCpuLanes; ++j) {
    acc.a += lane[j];
    acc.b += lane_b[j];
  }
  return acc;
}

// parallel_for(begin, end, fn(b, e)) is supplied by the caller (at::parallel_for in the
// torch glue, a serial loop in the C++ tests), keeping this file free of any runtime.
template <typename Op, typename Tin, typename Tout, typename ParallelFor>
Sums cpu_apply_sums(const Op& op, const Lists& l, ScalarArg s0, ScalarArg s1, ParallelFor&& parallel_for) {
  using A = math_t<Tin>;
  const Plan plan = make_plan(l.numel, l.n_tensors, kCpuChunk, INT32_MAX, INT32_MAX);
  const int64_t n_items = int64_t(plan.items.size());
  std::vector<Sums> partial(static_cast<size_t>(n_items));
  parallel_for(int64_t(0), n_items, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const WorkItem& it = plan.items[size_t(i)];
      const int64_t t = plan.slots[size_t(it.slot)];  // one launch: slots are global
      int64_t begin, end;
      item_range(plan, it, l.numel[t], &begin, &end);
      const auto ctx = op.template prepare<A>(resolve(s0, l.id(t)), resolve(s1, l.id(t)));
      partial[size_t(i)] = cpu_chunk<Op, Tin, Tout, A>(op, ctx, l, t, begin, end);
    }
  });
  Sums sum;
  for (const Sums& p : partial) {
    sum.a += p.a;
    sum.b += p.b;
  }
  return sum;
}

// The first sum (Σv² of the adapt functors; 0 for the perturbations and combine).
template <typename Op, typename Tin, typename Tout, typename ParallelFor>
double cpu_apply(const Op& op, const Lists& l, ScalarArg s0, ScalarArg s1, ParallelFor&& parallel_for) {
  return cpu_apply_sums<Op, Tin, Tout>(op, l, s0, s1, parallel_for).a;
}

}  // namespace sama
