// The ops of the extension: schemas (one list, used for the dispatcher registration and the
// pybind11 module alike) and their implementations, written once against a backend runner
// (run_cpu in ops_cpu.cpp, run_cuda in ops_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "core/dispatch.h"
#include "torch_glue.h"

// X(name, schema). Scalar arguments "float x, Tensor? x_tensor" mean x, times the tensor's
// value when it is given (a device scalar: lr tensors, ε). Adam/Adagrad steps: "step" times,
// per tensor, "steps[t]" (a 1-D device tensor: capturable/fused optimisers keep the step on the
// device) and "host_steps[t]" (host values that differ per tensor; empty when unused).
#define SAMA_EXT_OPS(X)                                                                                       \
  X(adam_adapt,                                                                                               \
    "adam_adapt(Tensor[] d, Tensor[] grads, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor[] max_exp_avg_sq, " \
    "Tensor[] params, Tensor(a!)[] out, float lr, Tensor? lr_tensor, float step, Tensor? steps, float beta1, " \
    "float beta2, float eps, float weight_decay, bool maximize, int safeguard, float[] host_steps=[]) "       \
    "-> Tensor")                                                                                              \
  X(const_adapt, "const_adapt(Tensor[] d, Tensor(a!)[] out, float lr, Tensor? lr_tensor, float factor) -> Tensor")  \
  X(rmsprop_adapt,                                                                                            \
    "rmsprop_adapt(Tensor[] d, Tensor[] grads, Tensor[] square_avg, Tensor[] grad_avg, Tensor[] params, "      \
    "Tensor[] momentum_buffer, Tensor(a!)[] out, float lr, Tensor? lr_tensor, float alpha, float eps, "        \
    "float weight_decay, bool maximize, int safeguard) -> Tensor")                                           \
  X(adagrad_adapt,                                                                                            \
    "adagrad_adapt(Tensor[] d, Tensor[] grads, Tensor[] state_sum, Tensor[] params, Tensor(a!)[] out, "       \
    "float lr, Tensor? lr_tensor, float step, Tensor? steps, float lr_decay, float eps, float weight_decay, "  \
    "bool maximize, int safeguard, float[] host_steps=[]) -> Tensor")                                         \
  X(perturb_, "perturb_(Tensor(a!)[] params, Tensor[] vectors, float scale, Tensor? scale_tensor) -> ()")     \
  X(perturb_from_,                                                                                            \
    "perturb_from_(Tensor(a!)[] params, Tensor[] sources, Tensor[] vectors, float scale, Tensor? scale_tensor) " \
    "-> ()")                                                                                                  \
  X(perturb_save_,                                                                                            \
    "perturb_save_(Tensor(a!)[] params, Tensor[] vectors, Tensor(b!)[] backups, float scale, "                \
    "Tensor? scale_tensor) -> ()")                                                                            \
  X(perturb_from_measured_,                                                                                   \
    "perturb_from_measured_(Tensor(a!)[] params, Tensor[] sources, Tensor[] vectors, float scale, "            \
    "Tensor? scale_tensor, bool stochastic, int seed, int offset) -> Tensor")                                 \
  X(perturb_save_measured_,                                                                                   \
    "perturb_save_measured_(Tensor(a!)[] params, Tensor[] vectors, Tensor(b!)[] backups, float scale, "       \
    "Tensor? scale_tensor, bool stochastic, int seed, int offset) -> Tensor")                                 \
  X(combine_,                                                                                                 \
    "combine_(Tensor(a!)[] out, Tensor[] g_minus, Tensor[] g_plus, Tensor eps, float scale, bool accumulate) " \
    "-> ()")

namespace sama {

using Runner = at::Tensor (*)(const OpSpec& spec, CheckedCall& call, bool reduce);
using OptTensor = std::optional<at::Tensor>;

// A runner that runs nothing: the ops instantiated with it only check their arguments (the
// Python wrappers check every device's call before launching any, see sama_ext/ops.py).
inline at::Tensor run_check_only(const OpSpec&, CheckedCall&, bool) { return at::Tensor(); }

inline double sign_of(bool maximize) { return maximize ? -1.0 : 1.0; }

// Optional inputs (AMSGrad's max, θ for coupled decay, RMSprop's grad_avg) are passed as
// empty lists when unused; a non-empty list switches the variant on.
inline void add_optional(std::vector<NamedList>& ins, const char* name, at::TensorList l) {
  if (!l.empty()) ins.push_back(NamedList{name, l});
}

template <Runner Run>
at::Tensor adam_adapt(at::TensorList d, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                      at::TensorList max_exp_avg_sq, at::TensorList params, at::TensorList out, double lr,
                      const OptTensor& lr_tensor, double step, const OptTensor& steps, double beta1, double beta2,
                      double eps, double weight_decay, bool maximize, int64_t safeguard,
                      c10::ArrayRef<double> host_steps) {
  TORCH_CHECK(weight_decay == 0.0 || !params.empty(), "sama_ext.adam_adapt: coupled weight_decay=", weight_decay,
              " needs the params list (θ enters the gradient the optimiser used)");
  TORCH_CHECK(safeguard == kSafeguardNone || safeguard == kSafeguardZeroUnseen,
              "sama_ext.adam_adapt: unknown safeguard ", safeguard);
  std::vector<NamedList> ins{{"d", d}, {"grads", grads}, {"exp_avg", exp_avg}, {"exp_avg_sq", exp_avg_sq}};
  add_optional(ins, "max_exp_avg_sq", max_exp_avg_sq);
  if (weight_decay != 0.0) ins.push_back(NamedList{"params", params});
  OpSpec spec;
  spec.kernel = Kernel::kAdam;
  spec.flag_a = !max_exp_avg_sq.empty();
  spec.flag_b = weight_decay != 0.0;
  const double h[5] = {beta1, beta2, eps, weight_decay, sign_of(maximize)};
  std::copy(h, h + 5, spec.h);
  spec.safeguard = int(safeguard);
  CheckedCall c = check_call("adam_adapt", spec, ins, {{"out", out}}, {"lr", lr, lr_tensor},
                             {"step", step, steps, true, host_steps});
  return Run(spec, c, true);
}

template <Runner Run>
at::Tensor const_adapt(at::TensorList d, at::TensorList out, double lr, const OptTensor& lr_tensor, double factor) {
  OpSpec spec;
  spec.kernel = Kernel::kConst;
  spec.h[0] = factor;
  CheckedCall c =
      check_call("const_adapt", spec, {{"d", d}}, {{"out", out}}, {"lr", lr, lr_tensor}, {"unused", 0.0, std::nullopt});
  return Run(spec, c, true);
}

// Coupled weight decay needs θ (params); with momentum also the buffer (θ_pre = θ + lr·buf).
template <Runner Run>
at::Tensor rmsprop_adapt(at::TensorList d, at::TensorList grads, at::TensorList square_avg, at::TensorList grad_avg,
                         at::TensorList params, at::TensorList momentum_buffer, at::TensorList out, double lr,
                         const OptTensor& lr_tensor, double alpha, double eps, double weight_decay, bool maximize,
                         int64_t safeguard) {
  TORCH_CHECK(weight_decay == 0.0 || !params.empty(), "sama_ext.rmsprop_adapt: weight_decay=", weight_decay,
              " needs the params list");
  std::vector<NamedList> ins{{"d", d}, {"grads", grads}, {"square_avg", square_avg}};
  add_optional(ins, "grad_avg", grad_avg);
  OpSpec spec;
  spec.decay = kNoDecay;
  if (weight_decay != 0.0) {
    ins.push_back(NamedList{"params", params});
    spec.decay = kDecayPlain;
    if (!momentum_buffer.empty()) {
      ins.push_back(NamedList{"momentum_buffer", momentum_buffer});
      spec.decay = kDecayMomentum;
    }
  }
  spec.kernel = Kernel::kRmsprop;
  spec.flag_a = !grad_avg.empty();
  const double h[4] = {alpha, eps, weight_decay, sign_of(maximize)};
  std::copy(h, h + 4, spec.h);
  spec.safeguard = int(safeguard);
  CheckedCall c =
      check_call("rmsprop_adapt", spec, ins, {{"out", out}}, {"lr", lr, lr_tensor}, {"unused", 0.0, std::nullopt});
  return Run(spec, c, true);
}

template <Runner Run>
at::Tensor adagrad_adapt(at::TensorList d, at::TensorList grads, at::TensorList state_sum, at::TensorList params,
                         at::TensorList out, double lr, const OptTensor& lr_tensor, double step,
                         const OptTensor& steps, double lr_decay, double eps, double weight_decay, bool maximize,
                         int64_t safeguard, c10::ArrayRef<double> host_steps) {
  TORCH_CHECK(weight_decay == 0.0 || !params.empty(), "sama_ext.adagrad_adapt: weight_decay=", weight_decay,
              " needs the params list");
  std::vector<NamedList> ins{{"d", d}, {"grads", grads}, {"state_sum", state_sum}};
  if (weight_decay != 0.0) ins.push_back(NamedList{"params", params});
  OpSpec spec;
  spec.kernel = Kernel::kAdagrad;
  spec.flag_b = weight_decay != 0.0;
  const double h[4] = {lr_decay, eps, weight_decay, sign_of(maximize)};
  std::copy(h, h + 4, spec.h);
  spec.safeguard = int(safeguard);
  CheckedCall c = check_call("adagrad_adapt", spec, ins, {{"out", out}}, {"lr", lr, lr_tensor},
                             {"step", step, steps, true, host_steps});
  return Run(spec, c, true);
}

template <Runner Run>
void perturb_(at::TensorList params, at::TensorList vectors, double scale, const OptTensor& scale_tensor) {
  OpSpec spec;
  spec.kernel = Kernel::kAxpy;
  CheckedCall c = check_call("perturb_", spec, {{"params", params}, {"vectors", vectors}}, {{"params", params}},
                             {"scale", scale, scale_tensor}, {"unused", 0.0, std::nullopt});
  Run(spec, c, false);
}

template <Runner Run>
void perturb_from_(at::TensorList params, at::TensorList sources, at::TensorList vectors, double scale,
                   const OptTensor& scale_tensor) {
  OpSpec spec;
  spec.kernel = Kernel::kAxpy;
  CheckedCall c = check_call("perturb_from_", spec, {{"sources", sources}, {"vectors", vectors}},
                             {{"params", params}}, {"scale", scale, scale_tensor}, {"unused", 0.0, std::nullopt});
  Run(spec, c, false);
}

template <Runner Run>
void perturb_save_(at::TensorList params, at::TensorList vectors, at::TensorList backups, double scale,
                   const OptTensor& scale_tensor) {
  OpSpec spec;
  spec.kernel = Kernel::kAxpySave;
  CheckedCall c = check_call("perturb_save_", spec, {{"params", params}, {"vectors", vectors}},
                             {{"params", params}, {"backups", backups}}, {"scale", scale, scale_tensor},
                             {"unused", 0.0, std::nullopt});
  Run(spec, c, false);
}

// The measured perturbations (issue 18): perturb_from_ / perturb_save_ that also return, as a
// float64 tensor [Σ (θ_new − θ_src)·v, #(θ_new ≠ θ_src)], and optionally round bfloat16/float16
// θ stochastically (E[θ_new] = θ_src + scale·v), keyed by seed, offset, the tensor's index in
// the lists and the element's index within it (csrc/core/stochastic_round.h).
inline OpSpec measured_spec(Kernel k, bool stochastic, int64_t seed, int64_t offset) {
  OpSpec spec;
  spec.kernel = k;
  spec.flag_a = stochastic;
  spec.seed = uint64_t(seed);
  spec.offset = uint64_t(offset);
  return spec;
}

template <Runner Run>
at::Tensor perturb_from_measured_(at::TensorList params, at::TensorList sources, at::TensorList vectors, double scale,
                                  const OptTensor& scale_tensor, bool stochastic, int64_t seed, int64_t offset) {
  const OpSpec spec = measured_spec(Kernel::kPerturbMeasured, stochastic, seed, offset);
  CheckedCall c = check_call("perturb_from_measured_", spec, {{"sources", sources}, {"vectors", vectors}},
                             {{"params", params}}, {"scale", scale, scale_tensor}, {"unused", 0.0, std::nullopt});
  return Run(spec, c, true);
}

template <Runner Run>
at::Tensor perturb_save_measured_(at::TensorList params, at::TensorList vectors, at::TensorList backups, double scale,
                                  const OptTensor& scale_tensor, bool stochastic, int64_t seed, int64_t offset) {
  const OpSpec spec = measured_spec(Kernel::kPerturbSaveMeasured, stochastic, seed, offset);
  CheckedCall c = check_call("perturb_save_measured_", spec, {{"params", params}, {"vectors", vectors}},
                             {{"params", params}, {"backups", backups}}, {"scale", scale, scale_tensor},
                             {"unused", 0.0, std::nullopt});
  return Run(spec, c, true);
}

template <Runner Run>
void combine_(at::TensorList out, at::TensorList g_minus, at::TensorList g_plus, const at::Tensor& eps, double scale,
              bool accumulate) {
  OpSpec spec;
  spec.kernel = Kernel::kCombine;
  spec.flag_a = accumulate;
  CheckedCall c = check_call("combine_", spec, {{"g_minus", g_minus}, {"g_plus", g_plus}}, {{"out", out}},
                             {"scale", scale, std::nullopt}, {"eps", 1.0, eps}, /*out_dtype_may_differ=*/true);
  Run(spec, c, false);
}

}  // namespace sama
