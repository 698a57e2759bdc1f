// CUDA multi-tensor apply: one block per 64K-element chunk, up to hundreds of tensors per
// launch, their addresses in the kernel argument; 128-bit accesses where every list is
// aligned; deterministic two-stage reduction. The per-element math is csrc/core/functors.h.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../core/cuda_api.h"

namespace sama {
namespace {

template <int NIn, int NOut>
struct Meta {
  static constexpr int kSlots = cuda_max_slots(NIn + NOut);
  const void* in[NIn][kSlots];
  void* out[NOut][kSlots];
  int64_t numel[kSlots];
  int32_t tensor[kSlots];  // global tensor index, for per-tensor scalars
  uint16_t item_slot[kCudaMaxItems];
  int32_t item_chunk[kCudaMaxItems];
  int64_t partial_base;
};
static_assert(sizeof(Meta<6, 1>) < 31000, "kernel argument too large");
static_assert(sizeof(Meta<2, 2>) < 31000, "kernel argument too large");
static_assert(cuda_max_slots(8) <= 65535, "slot index is 16-bit");

template <typename T, int W>
struct alignas(sizeof(T) * W) Vec {
  T v[W];
};

__device__ __forceinline__ double block_sum(double x, double* shared) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    if (lane < int(blockDim.x >> 5)) x = shared[lane];
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;  // valid in thread 0
}

template <typename Op, typename Tin, typename Tout>
__global__ void __launch_bounds__(kCudaThreads)
    multi_tensor_kernel(const __grid_constant__ Meta<Op::kIn, Op::kOut> meta, const Op op, const ScalarArg s0,
                        const ScalarArg s1, double* __restrict__ partials) {
  using A = math_t<Tin>;
  constexpr int kWidest = sizeof(Tin) > sizeof(Tout) ? sizeof(Tin) : sizeof(Tout);
  constexpr int W = 16 / kWidest;  // elements per 128-bit access of the widest type

  const int slot = meta.item_slot[blockIdx.x];
  const int64_t begin = int64_t(meta.item_chunk[blockIdx.x]) * kCudaChunk;
  const int64_t rest = meta.numel[slot] - begin;
  const int len = int(rest < kCudaChunk ? rest : kCudaChunk);
  const int64_t t = meta.tensor[slot];
  const auto ctx = op.template prepare<A>(resolve(s0, t), resolve(s1, t));

  const Tin* in[Op::kIn];
  Tout* out[Op::kOut];
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < Op::kIn; ++k) {
    in[k] = static_cast<const Tin*>(meta.in[k][slot]) + begin;
    aligned &= reinterpret_cast<uintptr_t>(in[k]) % (sizeof(Tin) * W) == 0;
  }
#pragma unroll
  for (int k = 0; k < Op::kOut; ++k) {
    out[k] = static_cast<Tout*>(meta.out[k][slot]) + begin;
    aligned &= reinterpret_cast<uintptr_t>(out[k]) % (sizeof(Tout) * W) == 0;
  }

  double acc = 0.0;
  auto element = [&](int i) {
    A x[Op::kIn], y[Op::kOut];
#pragma unroll
    for (int k = 0; k < Op::kIn; ++k) x[k] = to_math(in[k][i]);
    if (Op::kLoadsOut) {
#pragma unroll
      for (int k = 0; k < Op::kOut; ++k) y[k] = to_math(out[k][i]);
    }
    const double r = double(op.apply(ctx, x, y));
    if (Op::kReduces) acc += r * r;
#pragma unroll
    for (int k = 0; k < Op::kOut; ++k) out[k][i] = from_math<Tout>(y[k]);
  };

  int tail = 0;
  if (aligned) {
    const int n_vec = len / W;
    for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
      Vec<Tin, W> xin[Op::kIn];
      Vec<Tout, W> yout[Op::kOut];
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) xin[k] = reinterpret_cast<const Vec<Tin, W>*>(in[k])[v];
      if (Op::kLoadsOut) {
#pragma unroll
        for (int k = 0; k < Op::kOut; ++k) yout[k] = reinterpret_cast<const Vec<Tout, W>*>(out[k])[v];
      }
#pragma unroll
      for (int j = 0; j < W; ++j) {
        A x[Op::kIn], y[Op::kOut];
#pragma unroll
        for (int k = 0; k < Op::kIn; ++k) x[k] = to_math(xin[k].v[j]);
        if (Op::kLoadsOut) {
#pragma unroll
          for (int k = 0; k < Op::kOut; ++k) y[k] = to_math(yout[k].v[j]);
        }
        const double r = double(op.apply(ctx, x, y));
        if (Op::kReduces) acc += r * r;
#pragma unroll
        for (int k = 0; k < Op::kOut; ++k) yout[k].v[j] = from_math<Tout>(y[k]);
      }
#pragma unroll
      for (int k = 0; k < Op::kOut; ++k) reinterpret_cast<Vec<Tout, W>*>(out[k])[v] = yout[k];
    }
    tail = n_vec * W;
  }
  for (int i = tail + threadIdx.x; i < len; i += blockDim.x) element(i);

  if (Op::kReduces) {
    __shared__ double shared[kCudaThreads / 32];
    const double s = block_sum(acc, shared);
    if (threadIdx.x == 0) partials[meta.partial_base + blockIdx.x] = s;
  }
}

__global__ void __launch_bounds__(kCudaThreads) sum_partials_kernel(const double* __restrict__ partials, int64_t n,
                                                                    double* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  __shared__ double shared[kCudaThreads / 32];
  const double s = block_sum(acc, shared);
  if (threadIdx.x == 0) out[0] = s;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sama_ext: CUDA launch of ") + what + " failed: " + cudaGetErrorString(err));
}

template <typename Op, typename Tin, typename Tout>
void run_typed(const Op& op, const CudaCall& c, cudaStream_t stream) {
  using M = Meta<Op::kIn, Op::kOut>;
  static_assert(sizeof(M) + sizeof(Op) + 2 * sizeof(ScalarArg) + sizeof(double*) <= 32764,
                "kernel arguments exceed the 32 KB limit");
  const Plan& plan = *c.plan;
  const int64_t n = c.lists.n_tensors;
  for (const Launch& L : plan.launches) {
    if (L.n_slots > M::kSlots || L.n_items > kCudaMaxItems)
      throw std::logic_error("sama_ext: launch plan exceeds the kernel metadata limits");
    M meta;
    for (int s = 0; s < L.n_slots; ++s) {
      const int32_t t = plan.slots[size_t(L.first_slot + s)];
      for (int k = 0; k < Op::kIn; ++k) meta.in[k][s] = c.lists.in[k * n + t];
      for (int k = 0; k < Op::kOut; ++k) meta.out[k][s] = c.lists.out[k * n + t];
      meta.numel[s] = c.lists.numel[t];
      meta.tensor[s] = int32_t(c.lists.id(t));
    }
    for (int i = 0; i < L.n_items; ++i) {
      const WorkItem& it = plan.items[size_t(L.first_item + i)];
      meta.item_slot[i] = uint16_t(it.slot);
      meta.item_chunk[i] = it.chunk;
    }
    meta.partial_base = c.partial_offset + L.first_item;
    multi_tensor_kernel<Op, Tin, Tout><<<L.n_items, kCudaThreads, 0, stream>>>(meta, op, c.s0, c.s1, c.partials);
    check_launch("multi_tensor_kernel");
  }
}

}  // namespace

void cuda_run(const CudaCall& call, void* stream) {
  with_functor(call.spec, [&](auto op) {
    with_types<decltype(op)>(call.in_dtype, call.out_dtype, [&](auto tin, auto tout) {
      using Tin = typename decltype(tin)::type;
      using Tout = typename decltype(tout)::type;
      run_typed<decltype(op), Tin, Tout>(op, call, static_cast<cudaStream_t>(stream));
    });
  });
}

void cuda_sum_partials(const double* partials, int64_t n, double* out, void* stream) {
  sum_partials_kernel<<<1, kCudaThreads, 0, static_cast<cudaStream_t>(stream)>>>(partials, n, out);
  check_launch("sum_partials_kernel");
}

}  // namespace sama
