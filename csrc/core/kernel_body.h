// The CUDA multi-tensor kernel's own code, minus the CUDA-only parts: the kernel argument
// (Meta) and how the host fills it, the block's (slot, chunk) lookup, the per-tensor
// constants, and each thread's share of a chunk (alignment test, scalar prologue, 128-bit
// vector loop, tail, partial Σv²). csrc/cuda/multi_tensor.cu calls these on the device;
// csrc/tests/test_kernel_host.cpp runs the very same functions on the CPU over a simulated
// grid (every block of every launch, every thread index). What stays in the .cu file: the
// launch itself, shared memory, __syncthreads and the warp-shuffle reduction.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "cuda_api.h"

#if !defined(__CUDA_ARCH__)
#include <cstdio>
#include <cstdlib>
#endif

#if defined(__CUDA_ARCH__)
#define SAMA_UNROLL _Pragma("unroll")
#else
#define SAMA_UNROLL  // host passes: the bounds are compile-time constants, compilers unroll anyway
#endif

namespace sama {

// The kernel argument: up to kSlots tensors' addresses and sizes, and the block -> (slot,
// chunk) table. ~30 KB, which is why CUDA >= 12.1 and sm_70+ are needed (sama_ext/_build.py).
template <int NIn, int NOut>
struct Meta {
  static constexpr int kSlots = cuda_max_slots(NIn + NOut);
  const void* in[NIn][kSlots];
  void* out[NOut][kSlots];
  int64_t numel[kSlots];
  int32_t tensor[kSlots];  // global tensor index, for per-tensor scalars
  uint16_t item_slot[kCudaMaxItems];
  int32_t item_chunk[kCudaMaxItems];
  int64_t partial_base;  // partials index of this launch's block 0
};
static_assert(sizeof(Meta<6, 1>) < 31000, "kernel argument too large");
static_assert(sizeof(Meta<2, 2>) < 31000, "kernel argument too large");
static_assert(cuda_max_slots(8) <= 65535, "slot index is 16-bit");

// Host: the metadata of launch L of a plan over `lists`; one partial per block, this call's
// partials starting at partial_offset.
template <int NIn, int NOut>
void fill_meta(Meta<NIn, NOut>& meta, const Lists& lists, const Plan& plan, const Launch& L, int64_t partial_offset) {
  using M = Meta<NIn, NOut>;
  if (L.n_slots > M::kSlots || L.n_items > kCudaMaxItems)
    throw std::logic_error("sama_ext: launch plan exceeds the kernel metadata limits");
  const int64_t n = lists.n_tensors;
  for (int s = 0; s < L.n_slots; ++s) {
    const int32_t t = plan.slots[size_t(L.first_slot + s)];
    for (int k = 0; k < NIn; ++k) meta.in[k][s] = lists.in[k * n + t];
    for (int k = 0; k < NOut; ++k) meta.out[k][s] = lists.out[k * n + t];
    meta.numel[s] = lists.numel[t];
    meta.tensor[s] = int32_t(lists.id(t));
  }
  for (int i = 0; i < L.n_items; ++i) {
    const WorkItem& it = plan.items[size_t(L.first_item + i)];
    meta.item_slot[i] = uint16_t(it.slot);
    meta.item_chunk[i] = it.chunk;
  }
  meta.partial_base = partial_offset + L.first_item;
}

// What block `block` of a launch works on: elements [begin, begin + len) of slot `slot`.
struct BlockWork {
  int slot;
  int len;
  int64_t begin;
  int64_t tensor;  // for per-tensor scalars
};

template <int NIn, int NOut>
SAMA_HD BlockWork block_work(const Meta<NIn, NOut>& meta, int block) {
  BlockWork w;
  w.slot = meta.item_slot[block];
  w.begin = int64_t(meta.item_chunk[block]) * kCudaChunk;
  const int64_t rest = meta.numel[w.slot] - w.begin;
  w.len = int(rest < kCudaChunk ? rest : kCudaChunk);
  w.tensor = meta.tensor[w.slot];
  return w;
}

// The per-tensor constants (double pow/divisions for the adapt diagonals): computed once per
// block by one thread, which shares them through shared memory.
template <typename Op, typename A>
SAMA_HD typename Op::template Ctx<A> block_context(const Op& op, const BlockWork& w, const ScalarArg& s0,
                                                   const ScalarArg& s1) {
  return op.template prepare<A>(resolve(s0, w.tensor), resolve(s1, w.tensor));
}

template <typename T, int W>
struct alignas(sizeof(T) * W) Vec {
  T v[W];
};

#if defined(SAMA_COUNT_VECTOR_ACCESS) && !defined(__CUDA_ARCH__)
// Test hook: how many 128-bit loads and stores the host simulation performed.
inline int64_t& vector_accesses() {
  static int64_t n = 0;
  return n;
}
#endif

// On the device one 128-bit access. On the host (the simulation) the same bytes through
// memcpy, after checking the alignment the device instruction requires (a misaligned vector
// access is a fault there).
template <typename V, typename T>
SAMA_HD void check_vec_address(const T* p) {
#if !defined(__CUDA_ARCH__)
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) {
    std::fprintf(stderr, "sama: misaligned %zu-byte vector access at %p\n", sizeof(V), static_cast<const void*>(p));
    std::abort();
  }
#if defined(SAMA_COUNT_VECTOR_ACCESS)
  ++vector_accesses();
#endif
#else
  (void)p;
#endif
}

template <typename V, typename T>
SAMA_HD V load_vec(const T* p) {
  check_vec_address<V>(p);
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(p);
#else
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <typename V, typename T>
SAMA_HD void store_vec(T* p, const V& v) {
  check_vec_address<V>(p);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(V));
#endif
}

// Elements per 128-bit access of the widest storage type of an op.
template <typename Tin, typename Tout>
constexpr int kVecWidth = 16 / int(sizeof(Tin) > sizeof(Tout) ? sizeof(Tin) : sizeof(Tout));

// How many leading elements to do one by one so that every list's pointer is aligned for
// vector access from there on (0..W-1), or -1 when the lists are out of phase with each
// other (then the whole chunk runs scalar). A DDP bucket view at an odd offset is in phase
// with its fellow views of same-offset buffers, so only its first few elements run scalar.
template <int W, typename T>
SAMA_HD int head_of(const T* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return -1;  // not even element-aligned
  const int mis = int((a / sizeof(T)) % W);
  return mis == 0 ? 0 : W - mis;
}

// One thread's share of its block's chunk: loads, functor, stores, and the partial sums (in
// double) of the elements it did (Σv²; for the measured perturbations their two sums). Thread
// `thread` of `n_threads` takes vector v = thread, thread + n_threads, ... and the scalar
// elements likewise, so consecutive threads touch consecutive addresses (coalesced).
template <typename Op, typename Tin, typename Tout>
SAMA_HD Sums thread_sums(const Meta<Op::kIn, Op::kOut>& meta, const Op& op,
                         const typename Op::template Ctx<math_t<Tin>>& ctx, const BlockWork& w, int thread,
                         int n_threads) {
  constexpr int W = kVecWidth<Tin, Tout>;
  using VIn = Vec<Tin, W>;
  using VOut = Vec<Tout, W>;

  const Tin* in[Op::kIn];
  Tout* out[Op::kOut];
  int head = 0;
SAMA_UNROLL
  for (int k = 0; k < Op::kIn; ++k) {
    in[k] = static_cast<const Tin*>(meta.in[k][w.slot]) + w.begin;
    const int h = head_of<W>(in[k]);
    head = (k == 0 || h == head) ? h : -1;
  }
SAMA_UNROLL
  for (int k = 0; k < Op::kOut; ++k) {
    out[k] = static_cast<Tout*>(meta.out[k][w.slot]) + w.begin;
    const int h = head_of<W>(out[k]);
    head = (h == head) ? h : -1;
  }
  const int len = w.len;
  Sums acc;
  auto add = [&](const Sums& r) {
    if (Op::kSums > 0) acc.a += r.a;
    if (Op::kSums > 1) acc.b += r.b;
  };
  auto element = [&](int i) {
    add(element_sums<Op, Tin, Tout, math_t<Tin>>(op, ctx, in, out, i, w.tensor, w.begin + i));
  };

  int scalar_from = 0;  // elements [0, head) and [scalar_from, len) run one at a time
  if (head >= 0 && head < len) {
    for (int i = thread; i < head; i += n_threads) element(i);
    const int n_vec = (len - head) / W;
    for (int v = thread; v < n_vec; v += n_threads) {
      const int at = head + v * W;
      VIn xin[Op::kIn];
      VOut yout[Op::kOut];
SAMA_UNROLL
      for (int k = 0; k < Op::kIn; ++k) xin[k] = load_vec<VIn>(in[k] + at);
      if (Op::kLoadsOut) {
SAMA_UNROLL
        for (int k = 0; k < Op::kOut; ++k) yout[k] = load_vec<VOut>(out[k] + at);
      }
SAMA_UNROLL
      for (int j = 0; j < W; ++j) {
        math_t<Tin> x[Op::kIn], y[Op::kOut];
SAMA_UNROLL
        for (int k = 0; k < Op::kIn; ++k) x[k] = to_math(xin[k].v[j]);
        if constexpr (Op::kIndexed) {
          add(op.template apply_at<Tout>(ctx, x, y, w.tensor, w.begin + at + j));
SAMA_UNROLL
          for (int k = 0; k < Op::kOut; ++k) yout[k].v[j] = from_math<Tout>(y[k]);
        } else {
          if (Op::kLoadsOut) {
SAMA_UNROLL
            for (int k = 0; k < Op::kOut; ++k) y[k] = to_math(yout[k].v[j]);
          }
          const double r = double(op.apply(ctx, x, y));
          add(Sums{Op::kReduces ? r * r : 0.0, 0.0});
SAMA_UNROLL
          for (int k = 0; k < Op::kOut; ++k) yout[k].v[j] = from_math<Tout>(y[k]);
        }
      }
SAMA_UNROLL
      for (int k = 0; k < Op::kOut; ++k) store_vec(out[k] + at, yout[k]);
    }
    scalar_from = head + n_vec * W;
  }
  for (int i = scalar_from + thread; i < len; i += n_threads) element(i);
  return acc;
}

// The first partial sum alone (Σv² of the adapt functors).
template <typename Op, typename Tin, typename Tout>
SAMA_HD double thread_work(const Meta<Op::kIn, Op::kOut>& meta, const Op& op,
                           const typename Op::template Ctx<math_t<Tin>>& ctx, const BlockWork& w, int thread,
                           int n_threads) {
  return thread_sums<Op, Tin, Tout>(meta, op, ctx, w, thread, n_threads).a;
}

}  // namespace sama
