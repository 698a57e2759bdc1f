// Shared helpers of the torch-free C++ tests (test_core.cpp, test_cuda.cu): a failure-counting
// CHECK, a seeded RNG, bit access to the storage types, and per-functor random inputs that
// stay inside each functor's domain (second moments >= 0, AMSGrad max >= current, ...).
#pragma once

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/cpu_apply.h"
#include "core/dispatch.h"
#include "core/dtypes.h"
#include "core/functors.h"
#include "core/launch_plan.h"

namespace sama_test {

using namespace sama;

// ---------------------------------------------------------------- failure counting
inline long long& n_checks() { static long long n = 0; return n; }
inline long long& n_failures() { static long long n = 0; return n; }
constexpr long long kMaxReported = 40;

#define CHECK_MSG(cond, ...)                                                            \
  do {                                                                                  \
    ++::sama_test::n_checks();                                                          \
    if (!(cond)) {                                                                      \
      if (++::sama_test::n_failures() <= ::sama_test::kMaxReported) {                   \
        std::fprintf(stderr, "FAIL %s:%d: CHECK(%s): ", __FILE__, __LINE__, #cond);     \
        std::fprintf(stderr, __VA_ARGS__);                                              \
        std::fprintf(stderr, "\n");                                                     \
      }                                                                                 \
    }                                                                                   \
  } while (0)
#define CHECK(cond) CHECK_MSG(cond, "%s", "")

inline int summary(const char* name) {
  std::printf("%s: %lld checks, %lld failures\n", name, n_checks(), n_failures());
  if (n_failures() > kMaxReported)
    std::printf("(only the first %lld failures were printed)\n", kMaxReported);
  return n_failures() == 0 ? 0 : 1;
}

// ---------------------------------------------------------------- RNG (splitmix64)
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return uint32_t(next() >> 32); }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double a, double b) { return a + (b - a) * uniform(); }
  bool chance(double p) { return uniform() < p; }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }
  // |x| log-uniform in [2^lo, 2^hi), random sign
  double logu(double lo, double hi) {
    const double x = std::exp2(uniform(lo, hi));
    return chance(0.5) ? -x : x;
  }
};

// ---------------------------------------------------------------- storage types
template <typename T> struct StorageName;
template <> struct StorageName<float> { static constexpr const char* value = "f32"; };
template <> struct StorageName<double> { static constexpr const char* value = "f64"; };
template <> struct StorageName<bf16> { static constexpr const char* value = "bf16"; };
template <> struct StorageName<fp16> { static constexpr const char* value = "f16"; };

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::f32; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::f64; };
template <> struct DTypeOf<bf16> { static constexpr DType value = DType::bf16; };
template <> struct DTypeOf<fp16> { static constexpr DType value = DType::f16; };

inline uint64_t bits_of(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline uint64_t bits_of(double x) { uint64_t u; std::memcpy(&u, &x, 8); return u; }
inline uint64_t bits_of(bf16 x) { return x.bits; }
inline uint64_t bits_of(fp16 x) { return x.bits; }

template <typename T> double as_double(T x) { return double(to_math(x)); }
template <typename T> bool is_nan(T x) { return std::isnan(as_double(x)); }

// Storage value nearest to a double (through the math type, as the kernels store).
template <typename T> T store(double x) { return from_math<T>(math_t<T>(x)); }

// Same bits, or both NaN (payloads of NaNs differ between host and device conversions).
template <typename T> bool same_value(T a, T b) {
  return bits_of(a) == bits_of(b) || (is_nan(a) && is_nan(b));
}

// Relative distance of two reductions; 0 when both are equal (including both infinite).
inline double rel_diff(double a, double b) {
  if (a == b) return 0.0;
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::infinity();
  const double den = std::fmax(std::fabs(a), std::fabs(b));
  return std::fabs(a - b) / den;
}

// Relative width of one unit in the last place of a 16-bit storage type (0 for fp32/fp64,
// whose rounding differences the math tolerance covers).
template <typename T> constexpr double storage_ulp() {
  if (std::is_same<T, bf16>::value) return 0x1p-7;
  if (std::is_same<T, fp16>::value) return 0x1p-10;
  return 0.0;
}

// Functors whose result does not depend on floating-point contraction: their only products
// are explicit fma() calls or stand alone (Axpy, AxpySave, Combine, ConstDiag). The adapt
// diagonals contain a*b+c patterns the compiler may fuse (GCC: -ffp-contract=fast, the default
// even with -std=c++17; nvcc: --fmad=true), differently in vectorized and scalar code.
template <typename Op> struct ContractionFree { static constexpr bool value = true; };
template <bool A, bool B> struct ContractionFree<AdamDiag<A, B>> { static constexpr bool value = false; };
template <bool A, int B> struct ContractionFree<RmspropDiag<A, B>> { static constexpr bool value = false; };
template <bool B> struct ContractionFree<AdagradDiag<B>> { static constexpr bool value = false; };

// Whether two results of an adapt diagonal agree up to rounding: relative math_tol (plus one
// unit of a 16-bit storage type), or math_tol times a typical |v| of the tensor (scale: the
// median, robust to the huge v of never-seen coordinates), which absorbs cancellation in
// 1/D − second.
template <typename T> bool close_to(T got, T want, double math_tol, double scale) {
  const double g = as_double(got), w = as_double(want);
  if (!std::isfinite(g) || !std::isfinite(w)) return false;
  return std::fabs(g - w) <= (storage_ulp<T>() + math_tol) * std::fabs(w) + math_tol * scale;
}

// Median of |x| over the finite values (0 when there are none).
inline double median_abs(std::vector<double> v) {
  std::vector<double> a;
  a.reserve(v.size());
  for (double x : v)
    if (std::isfinite(x)) a.push_back(std::fabs(x));
  if (a.empty()) return 0.0;
  std::nth_element(a.begin(), a.begin() + a.size() / 2, a.end());
  return a[a.size() / 2];
}

// ---------------------------------------------------------------- per-functor inputs
// gen(op, rng, x, y0): one element's inputs x[kIn] (and initial outputs y0[kOut] for ops that
// load their outputs), in double, inside the functor's domain.
template <bool AMS, bool WD>
void gen(const AdamDiag<AMS, WD>&, Rng& r, double* x, double*) {
  x[0] = r.uniform(-1, 1);  // d
  x[1] = r.uniform(-1, 1);  // g
  x[2] = r.uniform(-0.1, 0.1);  // m
  x[3] = r.chance(0.05) ? 0.0 : r.uniform(0.0, 0.01);  // q (some never-seen coordinates)
  if (AMS) x[4] = r.chance(0.5) ? x[3] : 2.0 * x[3] + 1e-4;  // q_max >= q; = q where this step set it
  if (WD) x[4 + AMS] = r.uniform(-1, 1);  // θ
}
template <bool C, int DEC>
void gen(const RmspropDiag<C, DEC>&, Rng& r, double* x, double*) {
  x[0] = r.uniform(-1, 1);
  x[1] = r.uniform(-1, 1);
  if (C) {
    const double G = r.uniform(-0.1, 0.1);
    x[2] = 1.5 * G * G + r.uniform(1e-4, 0.01);  // S > G² even after rounding to 16 bits
    x[3] = G;
  } else {
    x[2] = r.chance(0.05) ? 0.0 : r.uniform(0.0, 0.01);
  }
  int k = 3 + C;
  if (DEC != kNoDecay) x[k++] = r.uniform(-1, 1);            // θ (post-step)
  if (DEC == kDecayMomentum) x[k++] = r.uniform(-0.5, 0.5);  // momentum buffer (post-step)
}
template <bool WD>
void gen(const AdagradDiag<WD>&, Rng& r, double* x, double*) {
  x[0] = r.uniform(-1, 1);
  x[1] = r.uniform(-1, 1);
  x[2] = r.chance(0.05) ? 0.0 : r.uniform(0.0, 3.0);
  if (WD) x[3] = r.uniform(-1, 1);
}
inline void gen(const ConstDiag&, Rng& r, double* x, double*) { x[0] = r.uniform(-2, 2); }
inline double gen_direction(Rng& r) {  // v of a perturbation, with some non-finite entries
  const double u = r.uniform();
  if (u < 0.02) return std::numeric_limits<double>::quiet_NaN();
  if (u < 0.03) return std::numeric_limits<double>::infinity();
  if (u < 0.04) return -std::numeric_limits<double>::infinity();
  return r.uniform(-1, 1);
}
inline void gen(const Axpy&, Rng& r, double* x, double*) {
  x[0] = r.uniform(-3, 3);
  x[1] = gen_direction(r);
}
inline void gen(const AxpySave&, Rng& r, double* x, double*) {
  x[0] = r.uniform(-3, 3);
  x[1] = gen_direction(r);
}
// |v| spread over decades, so that many 16-bit elements do not move at all; finite (a NaN
// partial sum would read as "never written" in the kernel-body test)
template <bool S, bool R>
void gen(const PerturbMeasured<S, R>&, Rng& r, double* x, double*) {
  x[0] = r.uniform(-3, 3);
  x[1] = r.uniform(-1, 1) * std::pow(10.0, -r.uniform(0, 3));
}
template <bool ACC>
void gen(const Combine<ACC>&, Rng& r, double* x, double* y0) {
  x[0] = r.uniform(-1, 1);
  x[1] = r.chance(0.01) ? std::numeric_limits<double>::infinity() : r.uniform(-1, 1);
  y0[0] = r.uniform(-1, 1);
}

// The functor values used by the tests (hyperparameters as DESIGN's optimizers would pass).
template <bool AMS, bool WD> AdamDiag<AMS, WD> make_adam(double sign, int safeguard) {
  return AdamDiag<AMS, WD>{0.9, 0.999, 1e-6, WD ? 0.01 : 0.0, sign, safeguard};
}
template <bool C, int DEC> RmspropDiag<C, DEC> make_rmsprop(double sign, int safeguard) {
  return RmspropDiag<C, DEC>{0.99, 1e-6, DEC != kNoDecay ? 0.01 : 0.0, sign, safeguard};
}
template <bool WD> AdagradDiag<WD> make_adagrad(double sign, int safeguard) {
  return AdagradDiag<WD>{0.01, 1e-8, WD ? 0.02 : 0.0, sign, safeguard};
}

// Per-tensor scalars for each functor: value (host) times ptr[id] (per tensor) or ptr[0].
// `a` and `b` hold the arrays the ScalarArgs point to (host memory).
struct Scalars {
  std::vector<double> a, b;
  ScalarArg s0, s1;
};

enum class ScalarKind { kAdamLike, kConst, kAxpy, kCombine };
template <typename Op> struct KindOf;
template <bool A, bool B> struct KindOf<AdamDiag<A, B>> { static constexpr ScalarKind value = ScalarKind::kAdamLike; };
template <bool A, int B> struct KindOf<RmspropDiag<A, B>> { static constexpr ScalarKind value = ScalarKind::kAdamLike; };
template <bool B> struct KindOf<AdagradDiag<B>> { static constexpr ScalarKind value = ScalarKind::kAdamLike; };
template <> struct KindOf<ConstDiag> { static constexpr ScalarKind value = ScalarKind::kConst; };
template <> struct KindOf<Axpy> { static constexpr ScalarKind value = ScalarKind::kAxpy; };
template <> struct KindOf<AxpySave> { static constexpr ScalarKind value = ScalarKind::kAxpy; };
template <bool S, bool R> struct KindOf<PerturbMeasured<S, R>> { static constexpr ScalarKind value = ScalarKind::kAxpy; };
template <bool B> struct KindOf<Combine<B>> { static constexpr ScalarKind value = ScalarKind::kCombine; };

// n_ids: size of the per-tensor arrays (indexed by Lists::tensor_id).
template <typename Op> Scalars make_scalars(Rng& r, int64_t n_ids) {
  Scalars s;
  s.a.resize(size_t(n_ids));
  s.b.resize(size_t(n_ids));
  switch (KindOf<Op>::value) {
    case ScalarKind::kAdamLike:  // lr = 1e-3 · per-tensor factor, step = per-tensor step
      for (auto& v : s.a) v = r.uniform(0.5, 2.0);
      for (auto& v : s.b) v = double(1 + r.below(50));
      s.s0 = ScalarArg{1e-3, s.a.data(), true};
      s.s1 = ScalarArg{1.0, s.b.data(), true};
      break;
    case ScalarKind::kConst:  // lr = 0.1 · one device scalar
      s.a[0] = 0.37;
      s.s0 = ScalarArg{0.1, s.a.data(), false};
      s.s1 = ScalarArg{0.0, nullptr, false};
      break;
    case ScalarKind::kAxpy:  // scale = -0.01 · per-tensor factor, some exactly zero
      for (auto& v : s.a) v = r.chance(0.2) ? 0.0 : r.uniform(-3, 3);
      s.s0 = ScalarArg{-0.01, s.a.data(), true};
      s.s1 = ScalarArg{0.0, nullptr, false};
      break;
    case ScalarKind::kCombine:  // scale = 0.5, ε per tensor: some 0, inf, NaN (skipped)
      for (auto& v : s.b) {
        const double u = r.uniform();
        v = u < 0.1 ? 0.0
            : u < 0.15 ? std::numeric_limits<double>::infinity()
            : u < 0.2 ? std::numeric_limits<double>::quiet_NaN()
            : r.uniform(1e-3, 1e-1);
      }
      s.s0 = ScalarArg{0.5, nullptr, false};
      s.s1 = ScalarArg{1.0, s.b.data(), true};
      break;
  }
  return s;
}

// Independent of sama::resolve: value, times the array entry when there is one.
inline double scalar_value(const ScalarArg& s, int64_t id) {
  if (s.ptr == nullptr) return s.value;
  return s.value * (s.per_tensor ? s.ptr[id] : s.ptr[0]);
}

// Whether a Combine ε skips the tensor (0 or not finite).
inline bool combine_skips(double eps) { return eps == 0.0 || !std::isfinite(eps); }

}  // namespace sama_test
