// From a runtime description of an op (which kernel, its variant flags, hyperparameters and
// dtypes) to the concrete functor and storage types. Both backends run through here, so the
// set of supported combinations is defined once.
#pragma once

#include <stdexcept>
#include <string>

#include "functors.h"

namespace sama {

enum class Kernel : int { kAdam = 0, kConst, kRmsprop, kAdagrad, kAxpy, kAxpySave, kCombine, kPerturbMeasured,
                          kPerturbSaveMeasured };

struct OpSpec {
  Kernel kernel = Kernel::kAxpy;
  bool flag_a = false;  // Adam: amsgrad · RMSprop: centered · Combine: accumulate
  bool flag_b = false;  // Adam, Adagrad: coupled weight decay (θ is an input)
  int decay = 0;        // RMSprop: kNoDecay, kDecayPlain (θ an input), kDecayMomentum (θ, buf)
  double h[5] = {0, 0, 0, 0, 0};
  int safeguard = kSafeguardNone;
  // Measured perturbations: stochastic rounding (flag_a) keyed by seed and offset.
  uint64_t seed = 0, offset = 0;
};

template <typename T> struct TypeTag { using type = T; };

// Only combine writes a dtype other than its inputs' (compressed communication buffers).
template <typename Op> struct MixedOutput { static constexpr bool value = false; };
template <bool B> struct MixedOutput<Combine<B>> { static constexpr bool value = true; };

// Calls fn(functor) with the concrete functor of spec. Hyperparameter slots per kernel:
//   Adam: β1, β2, eps, wd, sign · Const: factor · RMSprop: α, eps, wd, sign ·
//   Adagrad: lr_decay, eps, wd, sign · Axpy, AxpySave, Combine: none · the measured
//   perturbations: none (flag_a: stochastic rounding; seed, offset).
template <typename Fn> decltype(auto) with_functor(const OpSpec& s, Fn&& fn) {
  const double* h = s.h;
  switch (s.kernel) {
    case Kernel::kAdam:
#define SAMA_ADAM(AMS, WD) \
  if (s.flag_a == AMS && s.flag_b == WD) return fn(AdamDiag<AMS, WD>{h[0], h[1], h[2], h[3], h[4], s.safeguard});
      SAMA_ADAM(false, false) SAMA_ADAM(false, true) SAMA_ADAM(true, false) SAMA_ADAM(true, true)
#undef SAMA_ADAM
      break;
    case Kernel::kConst:
      return fn(ConstDiag{h[0]});
    case Kernel::kRmsprop:
#define SAMA_RMS(C, DEC) \
  if (s.flag_a == C && s.decay == DEC) return fn(RmspropDiag<C, DEC>{h[0], h[1], h[2], h[3], s.safeguard});
      SAMA_RMS(false, kNoDecay) SAMA_RMS(false, kDecayPlain) SAMA_RMS(false, kDecayMomentum)
      SAMA_RMS(true, kNoDecay) SAMA_RMS(true, kDecayPlain) SAMA_RMS(true, kDecayMomentum)
#undef SAMA_RMS
      break;
    case Kernel::kAdagrad:
      if (s.flag_b) return fn(AdagradDiag<true>{h[0], h[1], h[2], h[3], s.safeguard});
      return fn(AdagradDiag<false>{h[0], h[1], h[2], h[3], s.safeguard});
    case Kernel::kAxpy:
      return fn(Axpy{});
    case Kernel::kAxpySave:
      return fn(AxpySave{});
    case Kernel::kCombine:
      if (s.flag_a) return fn(Combine<true>{});
      return fn(Combine<false>{});
    case Kernel::kPerturbMeasured:
      if (s.flag_a) return fn(PerturbMeasured<false, true>{s.seed, s.offset});
      return fn(PerturbMeasured<false, false>{s.seed, s.offset});
    case Kernel::kPerturbSaveMeasured:
      if (s.flag_a) return fn(PerturbMeasured<true, true>{s.seed, s.offset});
      return fn(PerturbMeasured<true, false>{s.seed, s.offset});
  }
  throw std::invalid_argument("sama_ext: unknown kernel id " + std::to_string(int(s.kernel)));
}

inline int n_inputs(const OpSpec& s) {
  return with_functor(s, [](auto op) { return decltype(op)::kIn; });
}
inline int n_outputs(const OpSpec& s) {
  return with_functor(s, [](auto op) { return decltype(op)::kOut; });
}
inline int n_sums(const OpSpec& s) {
  return with_functor(s, [](auto op) { return decltype(op)::kSums; });
}

// Calls fn(TypeTag<Tin>, TypeTag<Tout>) for functor type Op. Outputs share the input dtype, except that combine
// may write fp32 results into a bf16/fp16 buffer (compressed communication).
template <typename Op, typename Fn> void with_types(DType in, DType out, Fn&& fn) {
  if (in == out) {
    switch (in) {
      case DType::f32: return fn(TypeTag<float>{}, TypeTag<float>{});
      case DType::f64: return fn(TypeTag<double>{}, TypeTag<double>{});
      case DType::bf16: return fn(TypeTag<bf16>{}, TypeTag<bf16>{});
      case DType::f16: return fn(TypeTag<fp16>{}, TypeTag<fp16>{});
    }
  } else if constexpr (MixedOutput<Op>::value) {
    if (in == DType::f32 && out == DType::bf16) return fn(TypeTag<float>{}, TypeTag<bf16>{});
    if (in == DType::f32 && out == DType::f16) return fn(TypeTag<float>{}, TypeTag<fp16>{});
    if (in == DType::f64 && out == DType::bf16) return fn(TypeTag<double>{}, TypeTag<bf16>{});
    if (in == DType::f64 && out == DType::f16) return fn(TypeTag<double>{}, TypeTag<fp16>{});
  }
  throw std::invalid_argument(std::string("sama_ext: unsupported dtype combination: inputs ") + dtype_name(in) +
                              ", outputs " + dtype_name(out) +
                              " (outputs must match inputs; combine may also write float32/float64 into bfloat16/float16)");
}

}  // namespace sama
