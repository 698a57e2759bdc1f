// The per-element math of every fused kernel, written once for the CPU loops and the CUDA
// kernels alike (DESIGN §2, §4).
//
// A functor describes one element-wise op over kIn input lists and kOut output lists:
//   prepare(a, b)      per-tensor constants from the two scalar arguments, resolved by the
//                      launcher (a host value, optionally times a device value: lr tensors,
//                      per-tensor Adam steps, ε);
//   apply(ctx, x, y)   reads x[kIn], writes y[kOut] (pre-loaded when kLoadsOut) and returns
//                      v, whose square is summed (in double) over all elements when kReduces;
// or, for the kIndexed functors (the measured perturbations),
//   apply_at<Tout>(ctx, x, y, tensor, index)  rounds y[kOut] to the storage type itself
//                      (stochastically if asked, which needs the element's identity; y stays
//                      in the math type, exactly representable in Tout) and returns kSums (2)
//                      per-element terms to sum.
// Math runs in A = float for fp32/bf16/fp16 storage and double for fp64 storage.
#pragma once

#include <cmath>
#include <type_traits>

#include "dtypes.h"
#include "stochastic_round.h"

namespace sama {

// The per-element terms of a reduction (kSums of them are used) and their sums.
struct Sums {
  double a = 0.0, b = 0.0;
};

template <typename A> SAMA_HD A fused_mul_add(A a, A b, A c);
template <> SAMA_HD float fused_mul_add<float>(float a, float b, float c) { return fmaf(a, b, c); }
template <> SAMA_HD double fused_mul_add<double>(double a, double b, double c) { return fma(a, b, c); }

template <typename A> SAMA_HD A math_sqrt(A x) { return sqrt(x); }
template <> SAMA_HD float math_sqrt<float>(float x) { return sqrtf(x); }

// How adapt treats coordinates whose second moment is exactly zero (never-seen inputs),
// where Adam's exact diagonal is lr(1-β1)/(bc1·eps) and dominates ‖v‖ (DESIGN §2).
enum Safeguard : int { kSafeguardNone = 0, kSafeguardZeroUnseen = 1 };

// ---------------------------------------------------------------- Adam / AdamW
// Post-step state m = exp_avg, q = exp_avg_sq (q_max under AMSGrad), step t:
//   h = sqrt(q/bc2), D = h + eps, g_e = s·g + wd·θ (wd: coupled decay only)
//   du/dg_e = lr·[(1-β1)/bc1 / D − (m/bc1)·(1-β2)·g_e/(bc2·h·D²)]   (second term 0 at h = 0)
// and v = s·du/dg_e·d. Under AMSGrad the second term only exists where this step set the max.
// Coupled decay used the pre-step θ, which step() overwrote; it is recovered exactly from the
// post-step state: θ_pre = θ + lr·(m/bc1)/D (the update itself). Using θ instead would be off by
// O(lr·wd/eps) at step 1, where the two terms of the diagonal nearly cancel.
template <bool kAmsgrad, bool kCoupledDecay>
struct AdamDiag {
  static constexpr int kIn = 4 + kAmsgrad + kCoupledDecay;  // d, g, m, q, [q_max], [θ]
  static constexpr int kOut = 1;                              // v
  static constexpr bool kLoadsOut = false;
  static constexpr bool kReduces = true;
  static constexpr int kSums = 1;
  static constexpr bool kIndexed = false;

  double beta1, beta2, eps, weight_decay, sign;
  int safeguard;

  template <typename A> struct Ctx { A lr, first_num, inv_bc1, r_coef, inv_sqrt_bc2, eps, wd, sign; bool first; };

  // a = lr, b = step
  template <typename A> SAMA_HD Ctx<A> prepare(double lr, double step) const {
    const double bc1 = 1.0 - pow(beta1, step);
    const double bc2 = 1.0 - pow(beta2, step);
    return Ctx<A>{A(lr), A((1.0 - beta1) / bc1), A(1.0 / bc1), A((1.0 - beta2) / bc2),
                  A(1.0 / sqrt(bc2)), A(eps), A(weight_decay), A(sign), step == 1.0};
  }

  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    const A d = x[0], g = x[1], m = x[2], q = x[3];
    const A q_used = kAmsgrad ? x[4] : q;
    const A h = math_sqrt(q_used) * c.inv_sqrt_bc2;
    const A D = h + c.eps;
    const A theta_pre = kCoupledDecay ? x[4 + kAmsgrad] + c.lr * (m * c.inv_bc1) / D : A(0);
    const A ge = c.sign * g + c.wd * theta_pre;
    const bool curved = h > A(0) && (!kAmsgrad || q == q_used);
    // Grouped as (m/bc1 / D)·((1-β2)/bc2·g_e/h / D): both factors stay O(1), no underflow.
    // Computed for every lane with a safe divisor, then selected: a division under a branch
    // keeps compilers (trapping-math semantics) from vectorising the CPU loop.
    const A h_safe = curved ? h : A(1);
    const A second_all = (m * c.inv_bc1 / D) * (c.r_coef * ge / h_safe / D);
    const A second = curved ? second_all : A(0);
    // At step 1 the pre-step moments are zero (torch initialises them so), m̂ = g_e and h = |g_e|:
    // the bracket is 1/D − |g_e|/D² = eps/D² exactly. Written as the difference it is two nearly
    // equal terms whose float32 rounding (of q, h and both terms) swamps eps/D² once |g_e| ≫ eps.
    // (A step counter reset by hand over non-zero moments is not a first step; it is not detected.)
    const A diag_first = c.lr * c.eps / (D * D);
    const bool first = c.first && (!kAmsgrad || q == q_used);
    A diag = first ? diag_first : c.lr * (c.first_num / D - second);
    if (safeguard == kSafeguardZeroUnseen && q_used == A(0)) diag = A(0);
    const A v = c.sign * diag * d;
    y[0] = v;
    return v;
  }
};

// ---------------------------------------------------------------- SGD (and any constant diagonal)
// v = c·d with c = s·lr·k, k from momentum/dampening/nesterov (chosen on the host).
struct ConstDiag {
  static constexpr int kIn = 1, kOut = 1;  // d -> v
  static constexpr bool kLoadsOut = false, kReduces = true;
  static constexpr int kSums = 1;
  static constexpr bool kIndexed = false;
  double factor;  // s·k

  template <typename A> struct Ctx { A c; };
  template <typename A> SAMA_HD Ctx<A> prepare(double lr, double) const { return Ctx<A>{A(lr * factor)}; }
  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    const A v = c.c * x[0];
    y[0] = v;
    return v;
  }
};

// ---------------------------------------------------------------- RMSprop
// Post-step square_avg S (and grad_avg G when centered): R = sqrt(S) or sqrt(S − G²),
// D = R + eps, update lr·g_e/D (momentum only integrates it, same derivative):
//   du/dg_e = lr·[1/D − (g_e/D)·(dR/dg_e)/D],  dR/dg_e = (1-α)(g_e − G)/R  (G = 0 uncentered)
// Coupled decay (kDecay): θ_pre is recovered from the post-step state — θ + lr·buf with momentum
// (kDecay = 2, buf an input), else solving θ = θ_pre − lr·(s·g + wd·θ_pre)/D (kDecay = 1).
enum Decay : int { kNoDecay = 0, kDecayPlain = 1, kDecayMomentum = 2 };

template <bool kCentered, int kDecay>
struct RmspropDiag {
  static constexpr int kIn = 3 + kCentered + (kDecay != kNoDecay) + (kDecay == kDecayMomentum);
  // d, g, S, [G], [θ], [buf]
  static constexpr int kOut = 1;
  static constexpr bool kLoadsOut = false, kReduces = true;
  static constexpr int kSums = 1;
  static constexpr bool kIndexed = false;
  double alpha, eps, weight_decay, sign;
  int safeguard;

  template <typename A> struct Ctx { A lr, one_m_alpha, eps, wd, sign; };
  template <typename A> SAMA_HD Ctx<A> prepare(double lr, double) const {
    return Ctx<A>{A(lr), A(1.0 - alpha), A(eps), A(weight_decay), A(sign)};
  }
  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    const A d = x[0], g = x[1], S = x[2];
    const A G = kCentered ? x[3] : A(0);
    const A R = math_sqrt(kCentered ? S - G * G : S);
    const A D = R + c.eps;
    A theta_pre = A(0);
    if (kDecay == kDecayPlain) theta_pre = (x[3 + kCentered] + c.lr * c.sign * g / D) / (A(1) - c.lr * c.wd / D);
    if (kDecay == kDecayMomentum) theta_pre = x[3 + kCentered] + c.lr * x[4 + kCentered];
    const A ge = c.sign * g + c.wd * theta_pre;
    const A R_safe = R > A(0) ? R : A(1);  // divide unconditionally, select after (vectorises)
    const A second_all = (ge / D) * (c.one_m_alpha * (ge - G) / R_safe / D);
    const A second = R > A(0) ? second_all : A(0);
    A diag = c.lr * (A(1) / D - second);
    if (safeguard == kSafeguardZeroUnseen && S == A(0)) diag = A(0);
    const A v = c.sign * diag * d;
    y[0] = v;
    return v;
  }
};

// ---------------------------------------------------------------- Adagrad
// Post-step sum Σ, step t: clr = lr/(1 + (t−1)·lr_decay), R = sqrt(Σ), D = R + eps:
//   du/dg_e = clr·[1/D − (g_e/D)·(g_e/R)/D] = clr·(Σ − g_e² + eps·R)/(R·D²)
// Coupled decay: θ_pre from θ = θ_pre − clr·(s·g + wd·θ_pre)/D.
template <bool kCoupledDecay>
struct AdagradDiag {
  static constexpr int kIn = 3 + kCoupledDecay;  // d, g, Σ, [θ]
  static constexpr int kOut = 1;
  static constexpr bool kLoadsOut = false, kReduces = true;
  static constexpr int kSums = 1;
  static constexpr bool kIndexed = false;
  double lr_decay, eps, weight_decay, sign;
  int safeguard;

  template <typename A> struct Ctx { A clr, eps, wd, sign; };
  // a = lr, b = step
  template <typename A> SAMA_HD Ctx<A> prepare(double lr, double step) const {
    return Ctx<A>{A(lr / (1.0 + (step - 1.0) * lr_decay)), A(eps), A(weight_decay), A(sign)};
  }
  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    const A d = x[0], g = x[1], sum = x[2];
    const A R = math_sqrt(sum);
    const A D = R + c.eps;
    const A theta_pre = kCoupledDecay ? (x[3] + c.clr * c.sign * g / D) / (A(1) - c.clr * c.wd / D) : A(0);
    const A ge = c.sign * g + c.wd * theta_pre;
    // 1/D − g_e²/(R·D²) = (Σ_pre + eps·R)/(R·D²) with Σ_pre = Σ − g_e²: no difference of nearly
    // equal terms where Σ_pre ≪ g_e² (a first step with initial_accumulator_value 0). g_e² is
    // rounded on its own, as the optimiser's Σ + g² rounded it, so that Σ_pre is exactly 0 there;
    // the fma with a zero addend keeps the compiler from contracting it into the subtraction.
    const A R_safe = R > A(0) ? R : A(1);  // divide unconditionally, select after (vectorises)
    const A sum_pre = sum - fused_mul_add(ge, ge, A(0));
    const A curved_diag = c.clr * ((sum_pre + c.eps * R) / (R_safe * D)) / D;
    A diag = R > A(0) ? curved_diag : c.clr / D;
    if (safeguard == kSafeguardZeroUnseen && sum == A(0)) diag = A(0);
    const A v = c.sign * diag * d;
    y[0] = v;
    return v;
  }
};

// ---------------------------------------------------------------- perturbations
// y = x + a·v with one rounding (fma). a == 0 leaves x exactly as it was, even where v is
// not finite: a skipped meta step (ε = 0) must never write NaN into θ.
struct Axpy {
  static constexpr int kIn = 2, kOut = 1;  // x, v -> y (y may alias x)
  static constexpr bool kLoadsOut = false, kReduces = false;
  static constexpr int kSums = 0;
  static constexpr bool kIndexed = false;

  template <typename A> struct Ctx { A a; };
  // a = scale (host value × optional device scalar)
  template <typename A> SAMA_HD Ctx<A> prepare(double a, double) const { return Ctx<A>{A(a)}; }
  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    y[0] = c.a == A(0) ? x[0] : fused_mul_add(c.a, x[1], x[0]);
    return A(0);
  }
};

// Same, and keeps the original x: the exact restore copies it back bit for bit.
struct AxpySave {
  static constexpr int kIn = 2, kOut = 2;  // x, v -> y, backup
  static constexpr bool kLoadsOut = false, kReduces = false;
  static constexpr int kSums = 0;
  static constexpr bool kIndexed = false;

  template <typename A> struct Ctx { A a; };
  template <typename A> SAMA_HD Ctx<A> prepare(double a, double) const { return Ctx<A>{A(a)}; }
  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    y[0] = c.a == A(0) ? x[0] : fused_mul_add(c.a, x[1], x[0]);
    y[1] = x[0];
    return A(0);
  }
};

// ---------------------------------------------------------------- measured perturbations
// y = x + a·v as Axpy (kSave: and backup = x, as AxpySave), and from the same pass what the
// stored y really moved (issue 18, docs/precision.md): Σ (y − x)·v in double over the
// elements with y ≠ x (a.k.a. the realized ⟨Δθ, v⟩), and how many such elements (NaN counts as
// moved). y − x of two floats of one storage type is exact in double (up to float64 storage).
// With `stochastic`, bfloat16/float16 storage is rounded stochastically (stochastic_round.h:
// E[y] = x + a·v); float32/float64 storage always rounds to nearest, exactly as Axpy. a == 0
// leaves x exactly as it was, even where v is not finite.
// kStochastic is a template parameter, not a flag: the round-to-nearest instantiation must
// vectorise like Axpy, which a (never taken) branch into the generator would prevent.
template <bool kSave, bool kStochastic>
struct PerturbMeasured {
  static constexpr int kIn = 2, kOut = 1 + kSave;  // x, v -> y[, backup]
  static constexpr bool kLoadsOut = false, kReduces = true;
  static constexpr int kSums = 2;  // Σ (y − x)·v, #(y ≠ x)
  static constexpr bool kIndexed = true;
  static constexpr bool kStochasticRounding = kStochastic;
  uint64_t seed, offset;

  template <typename A> struct Ctx { A a; };
  template <typename A> SAMA_HD Ctx<A> prepare(double a, double) const { return Ctx<A>{A(a)}; }
  // y[k] are the stored values, as A (exactly representable in Tout).
  template <typename Tout, typename A>
  SAMA_HD Sums apply_at(const Ctx<A>& c, const A* x, A* y, int64_t tensor, int64_t index) const {
    A out = to_math(from_math<Tout>(c.a == A(0) ? x[0] : fused_mul_add(c.a, x[1], x[0])));  // as Axpy
    if constexpr (kStochastic && (std::is_same<Tout, bf16>::value || std::is_same<Tout, fp16>::value)) {
      const A sr = to_math(round_stochastic<Tout>(double(x[0]) + double(c.a) * double(x[1]),
                                                  rounding_draw(seed, offset, tensor, index)));
      out = c.a == A(0) ? out : sr;
    }
    y[0] = out;
    if constexpr (kSave) y[1] = x[0];
    // No select on the product (it keeps GCC from vectorising the CPU loop): an element that did
    // not move has diff = 0 and a finite v, hence a zero term — except at a == 0, where v may be
    // anything and is replaced by 0.
    const double diff = double(out) - double(x[0]);
    const double prod = diff * double(c.a == A(0) ? A(0) : x[1]);
    return Sums{prod, double(diff != 0.0)};
  }
};

// ---------------------------------------------------------------- combine
// out (+)= scale·(g⁻ − g⁺)/(2ε). ε = 0 (a skipped step) or non-finite contributes nothing.
template <bool kAccumulate>
struct Combine {
  static constexpr int kIn = 2, kOut = 1;  // g⁻, g⁺ -> out
  static constexpr bool kLoadsOut = kAccumulate, kReduces = false;
  static constexpr int kSums = 0;
  static constexpr bool kIndexed = false;

  template <typename A> struct Ctx { A c; bool skip; };
  // a = scale, b = ε
  template <typename A> SAMA_HD Ctx<A> prepare(double scale, double eps) const {
    const bool skip = !(eps != 0.0 && eps - eps == 0.0);  // x − x == 0 iff x is finite
    return Ctx<A>{skip ? A(0) : A(scale / (2.0 * eps)), skip};
  }
  template <typename A> SAMA_HD A apply(const Ctx<A>& c, const A* x, A* y) const {
    const A base = kAccumulate ? y[0] : A(0);
    const A diff = x[0] - x[1];
    y[0] = c.skip ? base : (kAccumulate ? fused_mul_add(c.c, diff, base) : c.c * diff);
    return A(0);
  }
};

}  // namespace sama
