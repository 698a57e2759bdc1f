// Stochastic rounding of θ ± εv to 16-bit storage, driven by a counter-based generator, and
// the one definition of both (the pure-PyTorch reference, sama_ext/reference.py, restates the
// same integer and float steps; the tests hold them to bit equality).
//
// Random bits: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), keyed by a 64-bit seed, counter (element index within its tensor: 64 bits, tensor
// index, offset). One 32-bit word per element, so an element's draw depends on nothing but
// (seed, offset, tensor, index): not on the launch geometry, the thread count, the chunking
// or the backend.
//
// Rounding: y = x + a·v is formed in double (a·v of two floats is exact there, the sum is
// rounded once, 2^-53 relative). With q the exponent of the target's ulp at |y| (subnormals
// included), s = |y|·2^-q = n + f (n an integer, f in [0, 1), both exact), the result is
// sign(y)·(n + [u < f·2^32])·2^q with u the 32-bit draw: exactly representable in the target,
// and E[result] = y up to 2^-32 of an ulp (the draw's resolution). Every step is exact
// (multiplications by powers of two, floor, one comparison), so any IEEE implementation gets
// the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dtypes.h"

namespace sama {

struct Philox4x32 {
  uint32_t c[4];
};

SAMA_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(p >> 32);
  *lo = uint32_t(p);
}

// Philox4x32-10 of counter (c0, c1, c2, c3) and key (k0, k1).
SAMA_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC unroll 10  // unrolled before vectorisation: a loop inside the CPU loop's body blocks it
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    philox_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The draw of element `index` of tensor `tensor` for (seed, offset).
SAMA_HD uint32_t rounding_draw(uint64_t seed, uint64_t offset, int64_t tensor, int64_t index) {
  return philox4x32_10(uint32_t(uint64_t(index)), uint32_t(uint64_t(index) >> 32), uint32_t(tensor),
                       uint32_t(offset), uint32_t(seed), uint32_t(seed >> 32))
      .c[0];
}

SAMA_HD double pow2(int k) {  // 2^k for -1022 <= k <= 1023, built from its bits
  const uint64_t b = uint64_t(int64_t(k) + 1023) << 52;
  double d;
#if defined(__CUDA_ARCH__)
  d = __longlong_as_double((long long)b);
#else
  std::memcpy(&d, &b, sizeof d);
#endif
  return d;
}

// Significand bits after the point and least normal exponent of the 16-bit formats.
template <typename T> struct Format16;
template <> struct Format16<bf16> { static constexpr int kMant = 7, kEmin = -126; };
template <> struct Format16<fp16> { static constexpr int kMant = 10, kEmin = -14; };

// y rounded stochastically to T (bf16 or fp16) with the 32-bit draw u (see the top of the file).
template <typename T>
SAMA_HD T round_stochastic(double y, uint32_t u) {
  uint64_t b;
#if defined(__CUDA_ARCH__)
  b = uint64_t(__double_as_longlong(y));
#else
  std::memcpy(&b, &y, sizeof b);
#endif
  // Branch-free (selects, no early return), so that the CPU loop vectorises.
  const int e = int((b >> 52) & 0x7ff) - 1023;  // floor(log2|y|) for normal y; below any emin otherwise
  const int q = (e < Format16<T>::kEmin ? Format16<T>::kEmin : e) - Format16<T>::kMant;
  const int qc = q > 1016 ? 1016 : q;  // inf/NaN (e = 1024): any q; the select below returns y
  const double s = (y < 0 ? -y : y) * pow2(-qc);
  const double n = floor(s);
  const double up = double(u) < (s - n) * 4294967296.0 ? 1.0 : 0.0;
  const double r = (n + up) * pow2(qc);
  const double signed_r = (b >> 63) ? -r : r;  // keeps −0
  return from_math<T>(y - y == 0.0 ? signed_r : y);  // exact (a representable value; past the range: inf)
}

}  // namespace sama
