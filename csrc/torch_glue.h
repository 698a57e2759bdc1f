// Torch-facing plumbing shared by the CPU and CUDA registrations: checks the tensor lists
// of a call, groups tensors by dtype, and turns them into the core's raw-pointer Lists.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/cpu_apply.h"
#include "core/dispatch.h"

namespace sama {

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// A scalar argument of an op: a host value, optionally multiplied by a device tensor
// (0-dim, or 1-D with one entry per tensor when per_tensor).
struct ScalarIn {
  double value;
  std::optional<at::Tensor> tensor;
  bool per_tensor = false;
};

inline DType to_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, "sama_ext.", op, ": unsupported dtype ", t,
                  " (supported: float32, float64, bfloat16, float16)");
  }
}

// One dtype group of a call: the tensor indices in it, their pointers laid out for Lists.
struct Group {
  DType in_dtype, out_dtype;
  std::vector<int64_t> index;       // global tensor index of each member
  std::vector<const void*> in;      // [k * size + i]
  std::vector<void*> out;
  std::vector<int64_t> numel;
  Lists lists() const {
    Lists l;
    l.n_tensors = int64_t(index.size());
    l.in = in.data();
    l.out = out.data();
    l.numel = numel.data();
    l.tensor_id = index.data();
    return l;
  }
};

struct CheckedCall {
  at::Device device = at::kCPU;
  int64_t n = 0;
  std::vector<Group> groups;  // in order of first appearance: deterministic
  std::vector<at::Tensor> scalar_storage;  // keeps converted scalar tensors alive
  ScalarArg s0, s1;
};

// Validates every list (length, device, numel, dtype, layout) and builds the dtype groups.
// Tensors need not be contiguous, but each must be dense and non-overlapping with the same
// strides in every list, so that the kernels may treat it as flat memory.
inline CheckedCall check_call(const char* op, const std::vector<NamedList>& ins,
                              const std::vector<NamedList>& outs, const ScalarIn& s0, const ScalarIn& s1,
                              bool out_dtype_may_differ = false) {
  TORCH_CHECK(!ins.empty() && !outs.empty(), "sama_ext.", op, ": internal error, no lists");
  CheckedCall c;
  c.n = int64_t(ins[0].tensors.size());
  TORCH_CHECK(c.n > 0, "sama_ext.", op, ": '", ins[0].name, "' is an empty list; pass at least one tensor");
  for (const auto* group : {&ins, &outs})
    for (const NamedList& l : *group)
      TORCH_CHECK(int64_t(l.tensors.size()) == c.n, "sama_ext.", op, ": '", l.name, "' has ", l.tensors.size(),
                  " tensors but '", ins[0].name, "' has ", c.n, "; all lists must have the same length");
  c.device = ins[0].tensors[0].device();
  std::map<std::pair<int, int>, size_t> group_of;
  for (int64_t t = 0; t < c.n; ++t) {
    const at::Tensor& ref = ins[0].tensors[t];
    auto check = [&](const NamedList& l) {
      const at::Tensor& x = l.tensors[t];
      TORCH_CHECK(x.defined(), "sama_ext.", op, ": '", l.name, "'[", t, "] is undefined (None)");
      TORCH_CHECK(x.device() == c.device, "sama_ext.", op, ": '", l.name, "'[", t, "] is on ", x.device(),
                  " but '", ins[0].name, "'[0] is on ", c.device, "; move all tensors to one device");
      TORCH_CHECK(x.sizes().equals(ref.sizes()), "sama_ext.", op, ": '", l.name, "'[", t, "] has shape ",
                  x.sizes(), " but '", ins[0].name, "'[", t, "] has shape ", ref.sizes());
      TORCH_CHECK(x.is_non_overlapping_and_dense(), "sama_ext.", op, ": '", l.name, "'[", t,
                  "] must be dense and non-overlapping (got shape ", x.sizes(), ", strides ", x.strides(),
                  "); call .contiguous() on it");
      TORCH_CHECK(x.strides().equals(ref.strides()), "sama_ext.", op, ": '", l.name, "'[", t,
                  "] must have the same strides as '", ins[0].name, "'[", t, "] (got ", x.strides(), " vs ",
                  ref.strides(), "); call .contiguous() on both");
      TORCH_CHECK(!x.is_sparse() && x.layout() == at::kStrided, "sama_ext.", op, ": '", l.name, "'[", t,
                  "] must be a strided (dense) tensor");
    };
    for (const NamedList& l : ins) {
      check(l);
      TORCH_CHECK(l.tensors[t].scalar_type() == ref.scalar_type(), "sama_ext.", op, ": '", l.name, "'[", t,
                  "] is ", l.tensors[t].scalar_type(), " but '", ins[0].name, "'[", t, "] is ", ref.scalar_type(),
                  "; the lists of one tensor must share a dtype");
    }
    for (const NamedList& l : outs) {
      check(l);
      TORCH_CHECK(out_dtype_may_differ || l.tensors[t].scalar_type() == ref.scalar_type(), "sama_ext.", op,
                  ": '", l.name, "'[", t, "] is ", l.tensors[t].scalar_type(), " but '", ins[0].name, "'[", t,
                  "] is ", ref.scalar_type());
    }
    const DType din = to_dtype(op, ref.scalar_type());
    const DType dout = to_dtype(op, outs[0].tensors[t].scalar_type());
    auto key = std::make_pair(int(din), int(dout));
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      it = group_of.emplace(key, c.groups.size()).first;
      c.groups.push_back(Group{din, dout, {}, {}, {}, {}});
    }
    c.groups[it->second].index.push_back(t);
  }
  for (Group& g : c.groups) {
    const size_t m = g.index.size();
    g.in.resize(ins.size() * m);
    g.out.resize(outs.size() * m);
    g.numel.resize(m);
    for (size_t i = 0; i < m; ++i) {
      const int64_t t = g.index[i];
      for (size_t k = 0; k < ins.size(); ++k) g.in[k * m + i] = ins[k].tensors[t].data_ptr();
      for (size_t k = 0; k < outs.size(); ++k) g.out[k * m + i] = outs[k].tensors[t].data_ptr();
      g.numel[i] = ins[0].tensors[t].numel();
    }
  }
  auto convert = [&](const ScalarIn& s, const char* what) {
    ScalarArg a;
    a.value = s.value;
    if (s.tensor.has_value() && s.tensor->defined()) {
      const at::Tensor& x = *s.tensor;
      TORCH_CHECK(x.device() == c.device, "sama_ext.", op, ": ", what, " tensor is on ", x.device(),
                  " but the tensors are on ", c.device);
      if (s.per_tensor) {
        TORCH_CHECK(x.dim() == 1 && x.numel() == c.n, "sama_ext.", op, ": ", what, " tensor must be 1-D with ",
                    c.n, " entries (one per tensor), got shape ", x.sizes());
      } else {
        TORCH_CHECK(x.numel() == 1, "sama_ext.", op, ": ", what, " tensor must have one element, got shape ",
                    x.sizes());
      }
      at::Tensor d = x.to(at::kDouble).contiguous();  // device op, no host sync
      c.scalar_storage.push_back(d);
      a.ptr = d.const_data_ptr<double>();
      a.per_tensor = s.per_tensor;
    }
    return a;
  };
  c.s0 = convert(s0, "first scalar");
  c.s1 = convert(s1, "second scalar");
  return c;
}

}  // namespace sama
