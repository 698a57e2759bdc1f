// CUDA multi-tensor apply: one block per 64K-element chunk, up to hundreds of tensors per
// launch, their addresses in the kernel argument; 128-bit accesses where the lists are in
// phase (after a scalar prologue); deterministic two-stage reduction. The per-element math is
// csrc/core/functors.h; the per-block and per-thread work, csrc/core/kernel_body.h (also run
// on the CPU by the C++ tests).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../core/kernel_body.h"

namespace sama {
namespace {

// Sums x over the block in a fixed order: a shuffle-down tree within each warp, the warps'
// sums through shared memory, the same tree again in warp 0. The host simulation in
// csrc/tests/test_kernel_host.cpp reproduces this order.
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

// One block per work item; the per-thread work is thread_work() in csrc/core/kernel_body.h.
template <typename Op, typename Tin, typename Tout>
__global__ void __launch_bounds__(kCudaThreads)
    multi_tensor_kernel(const __grid_constant__ Meta<Op::kIn, Op::kOut> meta, const Op op, const ScalarArg s0,
                        const ScalarArg s1, double* __restrict__ partials, double* __restrict__ partials_b) {
  using Ctx = typename Op::template Ctx<math_t<Tin>>;
  const BlockWork w = block_work(meta, int(blockIdx.x));
  // The per-tensor constants (double pow()s and divisions for Adam) once per block, not per thread.
  __shared__ Ctx ctx_shared;
  if (threadIdx.x == 0) ctx_shared = block_context<Op, math_t<Tin>>(op, w, s0, s1);
  __syncthreads();
  const Ctx ctx = ctx_shared;
  const Sums acc = thread_sums<Op, Tin, Tout>(meta, op, ctx, w, int(threadIdx.x), int(blockDim.x));
  if (Op::kSums > 0) {
    __shared__ double shared[kCudaThreads / 32];
    const double s = block_sum(acc.a, shared);
    if (threadIdx.x == 0) partials[meta.partial_base + blockIdx.x] = s;
  }
  if (Op::kSums > 1) {  // its own shared array: warp 0 may still be reading the first
    __shared__ double shared_b[kCudaThreads / 32];
    const double s = block_sum(acc.b, shared_b);
    if (threadIdx.x == 0) partials_b[meta.partial_base + blockIdx.x] = s;
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
  static_assert(sizeof(M) + sizeof(Op) + 2 * sizeof(ScalarArg) + 2 * sizeof(double*) <= 32764,
                "kernel arguments exceed the 32 KB limit");
  const Plan& plan = *c.plan;
  for (const Launch& L : plan.launches) {
    M meta;
    fill_meta(meta, c.lists, plan, L, c.partial_offset);
    multi_tensor_kernel<Op, Tin, Tout><<<L.n_items, kCudaThreads, 0, stream>>>(meta, op, c.s0, c.s1, c.partials,
                                                                                  c.partials_b);
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
