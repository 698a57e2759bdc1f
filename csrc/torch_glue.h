// Torch-facing plumbing shared by the CPU and CUDA registrations: checks the tensor lists
// of a call, groups tensors by dtype (and per-tensor host scalars), and turns them into the
// core's raw-pointer Lists.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/cpu_apply.h"
#include "core/dispatch.h"

namespace sama {

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// A scalar argument of an op, named in error messages (lr, step, scale, eps): a host value,
// optionally times per-tensor host factors (`host`, one per tensor: Adam steps that differ, known
// on the host) and times a device tensor (0-dim, or 1-D with one entry per tensor when
// per_tensor). Host factors travel in the per-group constants, never through device memory:
// tensors whose factors differ go to different groups (launches), so no host-to-device copy is
// needed (it would synchronise, and is illegal during CUDA-graph capture).
struct ScalarIn {
  const char* name;
  double value;
  std::optional<at::Tensor> tensor;
  bool per_tensor = false;
  c10::ArrayRef<double> host = {};
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

// One group of a call: tensors sharing a dtype pair and the same host factors of both scalars.
// The tensor indices in it, their pointers laid out for Lists, and its resolved scalars.
struct Group {
  DType in_dtype, out_dtype;
  double host0 = 1.0, host1 = 1.0;  // the group's per-tensor host factors (1 when none)
  ScalarArg s0, s1;                 // set by bind_scalars
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
  std::optional<at::Tensor> t0, t1;        // the scalars' device tensors, checked
  double v0 = 0.0, v1 = 0.0;               // the scalars' host values
  bool per_tensor0 = false, per_tensor1 = false;
  std::vector<at::Tensor> scalar_storage;  // keeps converted scalar tensors alive
};

// Throws, naming the op and a tensor, if `spec` has no kernel for the dtype pair (in, out):
// checked for every group before anything runs, so an error never leaves earlier groups
// written.
inline void check_dtype_pair(const char* op, const OpSpec& spec, DType in, DType out, const NamedList& in_list,
                             const NamedList& out_list, int64_t t) {
  try {
    with_functor(spec, [&](auto f) { with_types<decltype(f)>(in, out, [](auto, auto) {}); });
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, "sama_ext.", op, ": '", out_list.name, "'[", t, "] is ", dtype_name(out), " but '",
                in_list.name, "'[", t, "] is ", dtype_name(in), ": ", e.what());
  }
}

// Validates every list (length, device, numel, dtype and dtype pair, layout) and the scalars,
// and builds the groups; launches nothing (bind_scalars, called by the runners, does the one
// device-side conversion). Tensors need not be contiguous, but each must be dense and
// non-overlapping with the same strides in every list, so that the kernels may treat it as
// flat memory.
inline CheckedCall check_call(const char* op, const OpSpec& spec, const std::vector<NamedList>& ins,
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
  for (const ScalarIn* s : {&s0, &s1})
    TORCH_CHECK(s->host.empty() || int64_t(s->host.size()) == c.n, "sama_ext.", op, ": per-tensor ", s->name,
                " has ", s->host.size(), " entries but '", ins[0].name, "' has ", c.n, " tensors");
  // Key: dtype pair and the bits of both host factors (bits, so that NaN keys compare equal).
  using Key = std::tuple<int, int, uint64_t, uint64_t>;
  auto bits = [](double x) {
    uint64_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
  };
  std::map<Key, size_t> group_of;
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
    const double h0 = s0.host.empty() ? 1.0 : s0.host[size_t(t)];
    const double h1 = s1.host.empty() ? 1.0 : s1.host[size_t(t)];
    const Key key{int(din), int(dout), bits(h0), bits(h1)};
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      check_dtype_pair(op, spec, din, dout, ins[0], outs[0], t);
      it = group_of.emplace(key, c.groups.size()).first;
      Group g;
      g.in_dtype = din;
      g.out_dtype = dout;
      g.host0 = h0;
      g.host1 = h1;
      c.groups.push_back(std::move(g));
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
  auto check_scalar = [&](const ScalarIn& s) {
    if (!s.tensor.has_value() || !s.tensor->defined()) return std::optional<at::Tensor>();
    const at::Tensor& x = *s.tensor;
    TORCH_CHECK(x.device() == c.device, "sama_ext.", op, ": ", s.name, " tensor is on ", x.device(),
                " but the tensors are on ", c.device);
    TORCH_CHECK(at::isFloatingType(x.scalar_type()) || at::isIntegralType(x.scalar_type(), /*includeBool=*/false),
                "sama_ext.", op, ": ", s.name, " tensor must be a real number, got ", x.scalar_type());
    if (s.per_tensor) {
      TORCH_CHECK(x.dim() == 1 && x.numel() == c.n, "sama_ext.", op, ": ", s.name, " tensor must be 1-D with ",
                  c.n, " entries (one per tensor), got shape ", x.sizes());
    } else {
      TORCH_CHECK(x.numel() == 1, "sama_ext.", op, ": ", s.name, " tensor must have one element, got shape ",
                  x.sizes());
    }
    return std::optional<at::Tensor>(x);
  };
  c.t0 = check_scalar(s0);
  c.t1 = check_scalar(s1);
  c.v0 = s0.value;
  c.v1 = s1.value;
  c.per_tensor0 = s0.per_tensor;
  c.per_tensor1 = s1.per_tensor;
  return c;
}

// The scalars of every group: value × the group's host factor, times the device tensor (cast
// to float64 once, on the device: no host sync). Called by the runners, after all checks.
inline void bind_scalars(CheckedCall& c) {
  auto device_ptr = [&](const std::optional<at::Tensor>& t) -> const double* {
    if (!t.has_value()) return nullptr;
    at::Tensor d = t->to(at::kDouble).contiguous();
    c.scalar_storage.push_back(d);
    return d.const_data_ptr<double>();
  };
  const double* p0 = device_ptr(c.t0);
  const double* p1 = device_ptr(c.t1);
  for (Group& g : c.groups) {
    g.s0 = ScalarArg{c.v0 * g.host0, p0, p0 != nullptr && c.per_tensor0};
    g.s1 = ScalarArg{c.v1 * g.host1, p1, p1 != nullptr && c.per_tensor1};
  }
}

}  // namespace sama
