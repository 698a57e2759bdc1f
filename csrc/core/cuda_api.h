// The host-side interface of the CUDA kernels. Free of torch and of CUDA headers, so the
// torch glue (compiled by the host compiler) and the C++ tests can include it.
#pragma once

#include <cstdint>

#include "cpu_apply.h"  // ScalarArg, Lists
#include "dispatch.h"
#include "launch_plan.h"

namespace sama {

constexpr int64_t kCudaChunk = 1 << 16;  // elements per block (64K, as torch's foreach kernels)
constexpr int32_t kCudaMaxItems = 1024;  // blocks per launch (bounded by the kernel-argument table)
constexpr int kCudaThreads = 512;

// How many tensors one launch can address for an op with n_lists = kIn + kOut lists: the
// metadata (pointers, sizes, block table) travels in the kernel argument (≤ 32 KB since
// CUDA 12.1 on sm_70+), so hundreds of tensors go in one launch.
constexpr int32_t cuda_max_slots(int n_lists) {
  const int64_t budget = 30000 - int64_t(kCudaMaxItems) * 6;
  const int64_t per_slot = int64_t(n_lists) * 8 + 12;
  const int64_t s = budget / per_slot;
  return int32_t(s < 512 ? s : 512);
}

struct CudaCall {
  OpSpec spec;
  DType in_dtype = DType::f32, out_dtype = DType::f32;
  Lists lists;                  // host arrays of device pointers
  ScalarArg s0, s1;             // .ptr are device pointers
  const Plan* plan = nullptr;   // made with kCudaChunk, cuda_max_slots(), kCudaMaxItems
  double* partials = nullptr;   // device; one slot per work item when the op reduces
  double* partials_b = nullptr; // device; the same for the second sum (ops with kSums == 2)
  int64_t partial_offset = 0;   // where this call's items start in partials
};

// Launches the kernels of one call on the given stream (a cudaStream_t). Throws
// std::runtime_error with the CUDA error string if a launch fails.
void cuda_run(const CudaCall& call, void* stream);

// out[0] = Σ partials[0..n) in a fixed order (deterministic), on the given stream.
void cuda_sum_partials(const double* partials, int64_t n, double* out, void* stream);

}  // namespace sama
