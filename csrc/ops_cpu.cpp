// Op schemas (TORCH_LIBRARY) and the CPU backend.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include "core/cpu_apply.h"
#include "ops_impl.h"

namespace sama {

at::Tensor run_cpu(const OpSpec& spec, CheckedCall& c, bool reduce) {
  auto parallel = [](int64_t begin, int64_t end, auto&& fn) { at::parallel_for(begin, end, 1, fn); };
  bind_scalars(c);
  Sums total;
  for (const Group& g : c.groups) {  // group order is fixed: the sum is deterministic
    const Lists l = g.lists();
    with_functor(spec, [&](auto op) {
      using Op = decltype(op);
      with_types<Op>(g.in_dtype, g.out_dtype, [&](auto tin, auto tout) {
        using Tin = typename decltype(tin)::type;
        using Tout = typename decltype(tout)::type;
        const Sums s = cpu_apply_sums<Op, Tin, Tout>(op, l, g.s0, g.s1, parallel);
        total.a += s.a;
        total.b += s.b;
      });
    });
  }
  if (!reduce) return at::Tensor();
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  if (n_sums(spec) < 2) return at::scalar_tensor(total.a, opts);
  at::Tensor out = at::empty({2}, opts);  // [Σ (θ_new − θ_src)·v, #moved]
  out.data_ptr<double>()[0] = total.a;
  out.data_ptr<double>()[1] = total.b;
  return out;
}

}  // namespace sama

TORCH_LIBRARY(sama_ext, m) {
#define SAMA_DEF(name, schema) m.def(schema);
  SAMA_EXT_OPS(SAMA_DEF)
#undef SAMA_DEF
}

TORCH_LIBRARY_IMPL(sama_ext, CPU, m) {
#define SAMA_IMPL(name, schema) m.impl(#name, &sama::name<sama::run_cpu>);
  SAMA_EXT_OPS(SAMA_IMPL)
#undef SAMA_IMPL
}
