// The CUDA backend: the same op implementations, run through the CUDA multi-tensor
// launcher (csrc/cuda/multi_tensor.cu) on the current stream under a device guard.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "core/cuda_api.h"
#include "ops_impl.h"

namespace sama {

at::Tensor run_cuda(const OpSpec& spec, CheckedCall& c, bool reduce) {
  const c10::cuda::CUDAGuard guard(c.device);
  bind_scalars(c);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.device.index()).stream();
  const int32_t max_slots = cuda_max_slots(n_inputs(spec) + n_outputs(spec));
  std::vector<Plan> plans;
  int64_t n_items = 0;
  for (const Group& g : c.groups) {
    plans.push_back(make_plan(g.numel.data(), int64_t(g.index.size()), kCudaChunk, max_slots, kCudaMaxItems));
    n_items += int64_t(plans.back().items.size());
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(c.device);
  const int sums = reduce ? n_sums(spec) : 0;
  at::Tensor partials, result;
  if (reduce) {  // the second sum's partials (measured perturbations) after the first's
    partials = at::empty({std::max<int64_t>(n_items, 1) * sums}, opts);
    result = sums < 2 ? at::empty({}, opts) : at::empty({2}, opts);
  }
  int64_t offset = 0;
  for (size_t i = 0; i < c.groups.size(); ++i) {
    CudaCall call;
    call.spec = spec;
    call.in_dtype = c.groups[i].in_dtype;
    call.out_dtype = c.groups[i].out_dtype;
    call.lists = c.groups[i].lists();
    call.s0 = c.groups[i].s0;
    call.s1 = c.groups[i].s1;
    call.plan = &plans[i];
    call.partials = reduce ? partials.data_ptr<double>() : nullptr;
    call.partials_b = sums > 1 ? partials.data_ptr<double>() + n_items : nullptr;
    call.partial_offset = offset;
    cuda_run(call, stream);
    offset += int64_t(plans[i].items.size());
  }
  if (!reduce) return at::Tensor();
  cuda_sum_partials(partials.data_ptr<double>(), n_items, result.data_ptr<double>(), stream);
  if (sums > 1)
    cuda_sum_partials(partials.data_ptr<double>() + n_items, n_items, result.data_ptr<double>() + 1, stream);
  return result;
}

}  // namespace sama

TORCH_LIBRARY_IMPL(sama_ext, CUDA, m) {
#define SAMA_IMPL(name, schema) m.impl(#name, &sama::name<sama::run_cuda>);
  SAMA_EXT_OPS(SAMA_IMPL)
#undef SAMA_IMPL
}
