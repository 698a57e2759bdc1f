// Tests of the torch-free kernel core against independent oracles:
//   1. dtypes.h: fp16/bf16 <-> float conversions (the compiler's _Float16, closed forms);
//   2. launch_plan.h: coverage, limits and int64 ranges of make_plan;
//   3. cpu_apply.h: the multi-tensor loop vs a naive element loop for every functor and
//      storage type, and ‖v‖² summed in double; Axpy's single rounding; Combine's skips;
//   4. functors.h: the adapt diagonals vs finite differences of hand-written optimizer steps;
//   5. the measured perturbations: Philox known answers, round-to-nearest equal to Axpy, the
//      dot and count vs a long-double recount, partition independence, unbiased stochastic rounding.
// Exit status 0 iff every check passed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/cuda_api.h"  // host-side constants of the CUDA launcher (no CUDA headers)
#include "test_common.h"

using namespace sama;
using namespace sama_test;

namespace {

// Built with -ffp-contract=off and this macro (CMake: -DSAMA_TEST_NO_FP_CONTRACT=ON), the
// vectorized CPU loop must equal the scalar oracle bit for bit for every functor; with the
// compiler's default contraction, only for the contraction-free ones (the adapt diagonals up
// to rounding).
#if defined(SAMA_TEST_FP_CONTRACT_OFF)
constexpr bool kContractionOff = true;
#else
constexpr bool kContractionOff = false;
#endif

struct RoundingStats {
  long count = 0;
  double max_rel = 0.0;
  double max_sum_rel = 0.0;  // reductions vs the naive (long double) sum
} g_rounding;

// ================================================================ 1. conversions
uint16_t f16_bits(_Float16 h) { uint16_t u; std::memcpy(&u, &h, 2); return u; }
_Float16 f16_from_bits(uint16_t u) { _Float16 h; std::memcpy(&h, &u, 2); return h; }
float fbits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
uint32_t bitsf(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Closed-form value of a half bit pattern (finite only).
double fp16_value(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double mag = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -mag : mag;
}

// Closed-form value of a bf16 bit pattern's magnitude; exponent field 255 (reached only as
// "one past the largest finite") is taken as 2^128.
double bf16_magnitude(uint32_t h) {
  const int e = (h >> 7) & 0xff, m = h & 0x7f;
  return e == 0 ? std::ldexp(double(m), -133) : std::ldexp(double(128 + m), e - 134);
}

// float -> bf16 by round to nearest even, decided on exact distances in double (every
// difference of two bf16-or-float values in the same binade pair is exact there).
uint16_t bf16_oracle(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t u = bitsf(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  if (std::isinf(f)) return uint16_t(sign | 0x7f80u);
  const double x = std::fabs(double(f));
  const uint32_t lo = (u & 0x7fffffffu) >> 16;  // truncation toward zero
  const uint32_t hi = lo + 1;                   // next magnitude up (may be "2^128" -> inf)
  const double dlo = x - bf16_magnitude(lo), dhi = bf16_magnitude(hi) - x;
  uint32_t pick;
  if (dlo < dhi) pick = lo;
  else if (dhi < dlo) pick = hi;
  else pick = (lo & 1u) ? hi : lo;
  return uint16_t(sign | pick);  // hi == 0x7f80 is +inf: the correct overflow
}

void test_fp16_to_float() {
  long bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ours = fp16_to_float(uint16_t(h));
    const float ref = float(f16_from_bits(uint16_t(h)));
    const bool is_nan_pattern = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0;
    bool ok;
    if (is_nan_pattern) {
      // NaN: same sign, payload kept in the top mantissa bits (as c10::Half does).
      const uint32_t want = (uint32_t(h & 0x8000u) << 16) | 0x7f800000u | (uint32_t(h & 0x3ffu) << 13);
      ok = std::isnan(ref) && std::isnan(ours) && bitsf(ours) == want;
    } else {
      ok = bitsf(ours) == bitsf(ref);
      if (((h >> 10) & 0x1f) != 0x1f) ok = ok && double(ours) == fp16_value(uint16_t(h));
    }
    if (!ok && ++bad <= 5)
      std::fprintf(stderr, "fp16_to_float(0x%04x) = %a (0x%08x), _Float16 gives %a\n", h, double(ours),
                   bitsf(ours), double(ref));
    CHECK(ok);
  }
  // Round trip of every non-NaN half.
  for (uint32_t h = 0; h < 65536; ++h) {
    const bool nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0;
    if (!nan) CHECK_MSG(float_to_fp16(fp16_to_float(uint16_t(h))) == h, "half 0x%04x", h);
  }
}

// Checks float_to_fp16(f) against the compiler's conversion (RNE).
bool check_fp16(float f, bool report = true) {
  const uint16_t ours = float_to_fp16(f);
  const uint16_t ref = f16_bits(_Float16(f));
  bool ok;
  if (std::isnan(f)) {
    ok = ours == ((bitsf(f) >> 16 & 0x8000u) | 0x7e00u);  // canonical NaN, sign kept (as torch)
  } else {
    ok = ours == ref;
  }
  if (!ok && report)
    CHECK_MSG(false, "float_to_fp16(%a = 0x%08x) = 0x%04x, _Float16 gives 0x%04x", double(f), bitsf(f), ours, ref);
  return ok;
}

void test_float_to_fp16() {
  const float inf = std::numeric_limits<float>::infinity();
  const float edge[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, -65504.0f, 65519.99f, 65520.0f, -65520.0f,
                        65535.0f, 65536.0f, 1e30f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                        -std::numeric_limits<float>::quiet_NaN(), fbits(0x7f800001u) /* sNaN */,
                        fbits(0xffbfffffu), std::numeric_limits<float>::denorm_min(),
                        std::numeric_limits<float>::min(), 0x1p-14f, 0x1p-24f, 0x1p-25f,
                        0x1.000002p-25f, 0x1.8p-24f /* tie -> even 2^-23 */, 0x1.4p-24f, 0x1.cp-24f,
                        0x1.ffcp-15f, 0x1.ffep-15f /* tie at the normal boundary */, 0x1.ffdp-15f,
                        1.0009765625f /* 1 + 2^-10 */, 1.00048828125f /* tie, even -> 1 */,
                        1.00146484375f /* tie, odd -> up */, 2049.0f, 2051.0f, 4097.0f, 0.1f, 1.0f / 3.0f};
  for (float f : edge) check_fp16(f);
  CHECK(float_to_fp16(65519.99f) == 0x7bff);
  CHECK(float_to_fp16(65520.0f) == 0x7c00);
  CHECK(float_to_fp16(-0.0f) == 0x8000);
  CHECK(float_to_fp16(std::numeric_limits<float>::quiet_NaN()) == 0x7e00);
  CHECK(float_to_fp16(0x1p-25f) == 0x0000);  // exact tie with 0: even
  CHECK(float_to_fp16(0x1.000002p-25f) == 0x0001);

  // Exhaustive over every positive float whose half rounding is not trivially 0 or inf
  // ([2^-26, 2^17)), in both signs for a sample.
  long bad = 0;
  for (uint32_t u = 0x32800000u; u < 0x48000000u; ++u) {
    if (!check_fp16(fbits(u), false)) {
      if (++bad <= 5) check_fp16(fbits(u));
      else CHECK(false);
    }
    if ((u & 0xff) == 0x5a && !check_fp16(fbits(u | 0x80000000u), false)) {
      if (++bad <= 5) check_fp16(fbits(u | 0x80000000u));
      else CHECK(false);
    }
  }
  ++n_checks();
  std::printf("  float_to_fp16: exhaustive over [2^-26, 2^17): %ld mismatches\n", bad);
  // Random bit patterns (all exponents, NaNs included).
  Rng r(1);
  for (int i = 0; i < 4000000; ++i) check_fp16(fbits(r.u32()));
}

void test_bf16() {
  // bf16 -> float: closed form for every finite pattern; inf and NaN keep their bits.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    const int e = (h >> 7) & 0xff;
    if (e == 0xff) {
      CHECK_MSG(bitsf(f) == h << 16, "bf16 0x%04x", h);
      continue;
    }
    const double mag = bf16_magnitude(h & 0x7fffu);
    CHECK_MSG(double(f) == ((h & 0x8000u) ? -mag : mag) && (bitsf(f) >> 31) == (h >> 15), "bf16 0x%04x -> %a", h,
              double(f));
    // round trip
    CHECK_MSG(float_to_bf16(f) == h, "bf16 round trip 0x%04x", h);
  }
  // float -> bf16 vs the oracle: every top half with low halves around the rounding points.
  const uint32_t lows[] = {0x0000, 0x0001, 0x3fff, 0x7ffe, 0x7fff, 0x8000, 0x8001, 0xbfff, 0xfffe, 0xffff};
  long bad = 0;
  for (uint32_t top = 0; top < 65536; ++top) {
    for (uint32_t lo : lows) {
      const float f = fbits(top << 16 | lo);
      const uint16_t ours = float_to_bf16(f), ref = bf16_oracle(f);
      if (ours != ref && ++bad <= 5)
        std::fprintf(stderr, "float_to_bf16(0x%08x) = 0x%04x, oracle 0x%04x\n", bitsf(f), ours, ref);
      CHECK(ours == ref);
    }
  }
  Rng r(2);
  for (int i = 0; i < 4000000; ++i) {
    const float f = fbits(r.u32());
    CHECK_MSG(float_to_bf16(f) == bf16_oracle(f), "float_to_bf16(0x%08x)", bitsf(f));
  }
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(float_to_bf16(std::numeric_limits<float>::quiet_NaN()) == 0x7fc0);
  CHECK(float_to_bf16(-std::numeric_limits<float>::quiet_NaN()) == 0x7fc0);
  CHECK(float_to_bf16(fbits(0x7f800001u)) == 0x7fc0);
  CHECK(float_to_bf16(fbits(0xffffffffu)) == 0x7fc0);
  CHECK(float_to_bf16(inf) == 0x7f80 && float_to_bf16(-inf) == 0xff80);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds past the largest bf16
  CHECK(float_to_bf16(fbits(0x7f7f7fffu)) == 0x7f7f);
  CHECK(float_to_bf16(fbits(0x7f7f8000u)) == 0x7f80);  // tie, odd -> up -> inf
  CHECK(float_to_bf16(-0.0f) == 0x8000);
  CHECK(float_to_bf16(fbits(0x3f808000u)) == 0x3f80);  // tie, even -> down
  CHECK(float_to_bf16(fbits(0x3f818000u)) == 0x3f82);  // tie, odd -> up
  CHECK(float_to_bf16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(float_to_bf16(fbits(0x00008000u)) == 0x0000);  // tie with zero: even
  CHECK(float_to_bf16(fbits(0x00008001u)) == 0x0001);
}

// ================================================================ 2. launch plan
struct PlanCase {
  std::vector<int64_t> numel;
  int64_t chunk;
  int32_t max_slots, max_items;
};

void check_plan(const PlanCase& c, const char* what) {
  const Plan p = make_plan(c.numel.data(), int64_t(c.numel.size()), c.chunk, c.max_slots, c.max_items);
  CHECK(p.chunk_size == c.chunk);
  std::map<std::pair<int64_t, int64_t>, int> seen;  // (tensor, chunk) -> count
  int64_t slot_pos = 0, item_pos = 0;
  int64_t prev_tensor = -1, prev_chunk = -1;  // global order: tensor by tensor, chunk by chunk
  for (size_t li = 0; li < p.launches.size(); ++li) {
    const Launch& L = p.launches[li];
    CHECK_MSG(L.first_slot == slot_pos && L.first_item == item_pos, "%s: launch %zu not contiguous", what, li);
    CHECK_MSG(L.n_slots >= 1 && L.n_slots <= c.max_slots, "%s: launch %zu has %d slots", what, li, L.n_slots);
    CHECK_MSG(L.n_items >= 1 && L.n_items <= c.max_items, "%s: launch %zu has %d items", what, li, L.n_items);
    std::vector<int> used(size_t(std::max(L.n_slots, 0)), 0);
    for (int32_t i = 0; i < L.n_items; ++i) {
      const WorkItem& it = p.items[size_t(L.first_item + i)];
      if (it.slot < 0 || it.slot >= L.n_slots) {
        CHECK_MSG(false, "%s: item slot %d out of range", what, it.slot);
        continue;
      }
      used[size_t(it.slot)] = 1;
      const int64_t t = p.slots[size_t(L.first_slot + it.slot)];
      CHECK_MSG(t >= 0 && t < int64_t(c.numel.size()) && c.numel[size_t(t)] > 0, "%s: bad tensor %lld", what,
                (long long)t);
      if (t < 0 || t >= int64_t(c.numel.size())) continue;
      const int64_t n = c.numel[size_t(t)];
      CHECK_MSG(it.chunk >= 0 && int64_t(it.chunk) * c.chunk < n, "%s: chunk %d beyond tensor %lld", what, it.chunk,
                (long long)t);
      ++seen[{t, it.chunk}];
      // order: (tensor, chunk) strictly increasing over the global item list
      CHECK_MSG(t > prev_tensor || (t == prev_tensor && it.chunk == prev_chunk + 1), "%s: item order", what);
      if (t == prev_tensor && i == 0) {
        // continues a tensor of the previous launch: it is this launch's first slot
        CHECK_MSG(it.slot == 0, "%s: split tensor %lld not in slot 0 of launch %zu", what, (long long)t, li);
      }
      prev_tensor = t;
      prev_chunk = it.chunk;
      int64_t b, e;
      item_range(p, it, n, &b, &e);
      CHECK_MSG(b == int64_t(it.chunk) * c.chunk && e == std::min(n, b + c.chunk) && e > b, "%s: item_range", what);
    }
    for (size_t s = 0; s < used.size(); ++s) CHECK_MSG(used[s], "%s: launch %zu slot %zu has no item", what, li, s);
    // slots of one launch are distinct tensors
    std::vector<int32_t> ts(p.slots.begin() + L.first_slot, p.slots.begin() + L.first_slot + L.n_slots);
    std::sort(ts.begin(), ts.end());
    CHECK_MSG(std::adjacent_find(ts.begin(), ts.end()) == ts.end(), "%s: repeated tensor in launch", what);
    slot_pos += L.n_slots;
    item_pos += L.n_items;
  }
  CHECK_MSG(slot_pos == int64_t(p.slots.size()) && item_pos == int64_t(p.items.size()), "%s: totals", what);
  // exactly once
  int64_t expected = 0;
  for (size_t t = 0; t < c.numel.size(); ++t) {
    const int64_t n = c.numel[t];
    const int64_t chunks = (n + c.chunk - 1) / c.chunk;
    expected += chunks;
    for (int64_t k = 0; k < chunks; ++k) {
      auto f = seen.find({int64_t(t), k});
      CHECK_MSG(f != seen.end() && f->second == 1, "%s: (tensor %zu, chunk %lld) covered %d times", what, t,
                (long long)k, f == seen.end() ? 0 : f->second);
    }
  }
  CHECK_MSG(int64_t(p.items.size()) == expected, "%s: %zu items, expected %lld", what, p.items.size(),
            (long long)expected);
  // a slot per (launch, tensor) pair, and only for non-empty tensors
  for (int32_t t : p.slots) CHECK(c.numel[size_t(t)] > 0);
}

template <typename F> bool throws(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_launch_plan() {
  // hand cases
  check_plan({{}, 4, 2, 3}, "no tensors");
  CHECK(make_plan(nullptr, 0, 4, 2, 3).launches.empty());
  check_plan({{0, 0, 0}, 4, 2, 3}, "all empty");
  CHECK(make_plan(std::vector<int64_t>{0, 0}.data(), 2, 4, 2, 3).launches.empty());
  check_plan({{1}, 1, 1, 1}, "single element");
  check_plan({{10, 0, 3, 8, 0, 1}, 4, 2, 3}, "small");
  {
    // one tensor of 10 chunks with 3 items per launch: 4 launches, the tensor in slot 0 of each
    const std::vector<int64_t> n{40};
    const Plan p = make_plan(n.data(), 1, 4, 5, 3);
    CHECK(p.launches.size() == 4 && p.slots.size() == 4);
    for (const Launch& L : p.launches) CHECK(L.n_slots == 1);
    CHECK(p.launches.back().n_items == 1);
  }
  {
    // slot limit: 5 one-chunk tensors, 2 slots per launch -> 3 launches
    const std::vector<int64_t> n{1, 2, 3, 4, 5};
    const Plan p = make_plan(n.data(), 5, 8, 2, 100);
    CHECK(p.launches.size() == 3);
    CHECK(p.launches[2].n_slots == 1 && p.slots[4] == 4);
  }
  // random cases
  Rng r(3);
  for (int rep = 0; rep < 3000; ++rep) {
    PlanCase c;
    const int n = int(r.below(12));
    for (int i = 0; i < n; ++i) c.numel.push_back(r.chance(0.25) ? 0 : r.below(40));
    c.chunk = 1 + r.below(7);
    c.max_slots = int32_t(1 + r.below(5));
    c.max_items = int32_t(1 + r.below(9));
    check_plan(c, "random");
  }
  // the CUDA and CPU configurations on larger inputs
  {
    PlanCase c;
    for (int i = 0; i < 2000; ++i) c.numel.push_back(r.chance(0.1) ? 0 : r.below(300000));
    c.chunk = 1 << 16;
    c.max_slots = 350;
    c.max_items = 1024;
    check_plan(c, "cuda-like");
    c.chunk = kCpuChunk;
    c.max_slots = INT32_MAX;
    c.max_items = INT32_MAX;
    check_plan(c, "cpu-like");
  }
  // numel beyond 2^31: only the plan, no memory
  {
    const std::vector<int64_t> n{5, 3000000000LL, 0, 2147483649LL, 7};
    const int64_t C = 1 << 16;
    const Plan p = make_plan(n.data(), 5, C, 350, 1024);
    int64_t covered[5] = {0, 0, 0, 0, 0};
    int64_t last_end[5] = {0, 0, 0, 0, 0};
    for (const Launch& L : p.launches) {
      for (int32_t i = 0; i < L.n_items; ++i) {
        const WorkItem& it = p.items[size_t(L.first_item + i)];
        const int32_t t = p.slots[size_t(L.first_slot + it.slot)];
        int64_t b, e;
        item_range(p, it, n[size_t(t)], &b, &e);
        CHECK_MSG(b == last_end[t] && e > b && e - b <= C, "big: tensor %d range [%lld, %lld)", t, (long long)b,
                  (long long)e);
        last_end[t] = e;
        covered[t] += e - b;
      }
    }
    for (int t = 0; t < 5; ++t) CHECK_MSG(covered[t] == n[size_t(t)] && last_end[t] == n[size_t(t)], "big: tensor %d", t);
    const int64_t chunks_big = (3000000000LL + C - 1) / C;  // 45777
    CHECK(int64_t(p.items.size()) == 1 + chunks_big + (2147483649LL + C - 1) / C + 1);
    // the last chunk of the 3e9 tensor starts past 2^31
    int64_t b, e;
    item_range(p, WorkItem{0, int32_t(chunks_big - 1)}, 3000000000LL, &b, &e);
    CHECK(b == (chunks_big - 1) * C && e == 3000000000LL && b > (int64_t(1) << 31));
    check_plan({n, C, 350, 1024}, "3e9 elements");
  }
  // bad arguments
  const std::vector<int64_t> n{3, 4};
  CHECK(throws([&] { make_plan(n.data(), 2, 0, 1, 1); }));
  CHECK(throws([&] { make_plan(n.data(), 2, -4, 1, 1); }));
  CHECK(throws([&] { make_plan(n.data(), 2, 4, 0, 1); }));
  CHECK(throws([&] { make_plan(n.data(), 2, 4, -1, 1); }));
  CHECK(throws([&] { make_plan(n.data(), 2, 4, 1, 0); }));
  const std::vector<int64_t> neg{3, -1};
  CHECK(throws([&] { make_plan(neg.data(), 2, 4, 1, 1); }));
  const std::vector<int64_t> huge{int64_t(1) << 36};
  CHECK(throws([&] { make_plan(huge.data(), 1, 1, 1, 1); }));  // 2^36 chunks > INT32_MAX
  CHECK(!throws([&] { make_plan(huge.data(), 1, 1 << 16, 1, 1024); }));

  // the CUDA slot budget
  for (int lists = 2; lists <= 8; ++lists) {
    const int32_t s = cuda_max_slots(lists);
    CHECK_MSG(s >= 64 && s <= 512, "cuda_max_slots(%d) = %d", lists, s);
    CHECK(int64_t(s) * (lists * 8 + 12) + int64_t(kCudaMaxItems) * 6 <= 30000);
  }
}

// ================================================================ 3. cpu_apply
// A multi-tensor call over host memory: one buffer per list, tensors at offsets with guard
// elements between them (a write past a tensor's end shows up as a changed guard).
template <typename Tin, typename Tout> struct HostCall {
  static constexpr int kGuard = 3;
  int64_t n = 0, n_ids = 0;
  std::vector<int64_t> numel, offset, ids;
  std::vector<std::vector<Tin>> in;
  std::vector<std::vector<Tout>> out;
  std::vector<const void*> in_ptr;
  std::vector<void*> out_ptr;

  Lists lists() {
    in_ptr.assign(in.size() * size_t(n), nullptr);
    out_ptr.assign(out.size() * size_t(n), nullptr);
    for (size_t k = 0; k < in.size(); ++k)
      for (int64_t t = 0; t < n; ++t) in_ptr[k * size_t(n) + size_t(t)] = in[k].data() + offset[size_t(t)];
    for (size_t k = 0; k < out.size(); ++k)
      for (int64_t t = 0; t < n; ++t) out_ptr[k * size_t(n) + size_t(t)] = out[k].data() + offset[size_t(t)];
    Lists l;
    l.n_tensors = n;
    l.in = in_ptr.data();
    l.out = out_ptr.data();
    l.numel = numel.data();
    l.tensor_id = ids.empty() ? nullptr : ids.data();
    return l;
  }
  int64_t id(int64_t t) const { return ids.empty() ? t : ids[size_t(t)]; }
};

std::vector<int64_t> test_sizes(Rng& r) {
  // odd sizes around the 32K chunk, tiny ones, empties, and >= 300 tensors overall
  std::vector<int64_t> s{0, 1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 100, 127, 255, 1000, 4097,
                         32767, 32768, 32769, 65535, 65537, 98305, 0, 1};
  while (s.size() < 330) s.push_back(r.chance(0.1) ? 0 : 1 + r.below(300));
  // shuffle so that big and small tensors interleave
  for (size_t i = s.size() - 1; i > 0; --i) std::swap(s[i], s[size_t(r.below(int64_t(i) + 1))]);
  return s;
}

template <typename Op, typename Tin, typename Tout>
HostCall<Tin, Tout> make_call(const Op& op, Rng& r, const std::vector<int64_t>& sizes, bool with_ids) {
  HostCall<Tin, Tout> c;
  c.n = int64_t(sizes.size());
  c.numel = sizes;
  int64_t total = 0;
  for (int64_t s : sizes) {
    c.offset.push_back(total);
    total += s + HostCall<Tin, Tout>::kGuard;
  }
  if (with_ids) {  // per-tensor scalars looked up through a permutation-like map
    c.n_ids = c.n + 5;
    for (int64_t t = 0; t < c.n; ++t) c.ids.push_back((t * 37 + 11) % c.n_ids);
  } else {
    c.n_ids = c.n;
  }
  c.in.assign(Op::kIn, std::vector<Tin>(size_t(total)));
  c.out.assign(Op::kOut, std::vector<Tout>(size_t(total)));
  const Tin guard_in = store<Tin>(-7.25);
  const Tout guard_out = store<Tout>(-7.25);
  for (auto& v : c.in) std::fill(v.begin(), v.end(), guard_in);
  for (auto& v : c.out) std::fill(v.begin(), v.end(), guard_out);
  double x[8], y0[8];
  for (int64_t t = 0; t < c.n; ++t) {
    for (int64_t i = 0; i < sizes[size_t(t)]; ++i) {
      for (double& v : y0) v = 0.0;
      gen(op, r, x, y0);
      const size_t at = size_t(c.offset[size_t(t)] + i);
      for (int k = 0; k < Op::kIn; ++k) c.in[size_t(k)][at] = store<Tin>(x[k]);
      // outputs the op does not read start as NaN: an element it fails to write shows up
      for (int k = 0; k < Op::kOut; ++k)
        c.out[size_t(k)][at] = store<Tout>(Op::kLoadsOut ? y0[k] : std::numeric_limits<double>::quiet_NaN());
    }
  }
  return c;
}

// The oracle: one element at a time, the functor's apply() in the math type.
template <typename Op, typename Tin, typename Tout>
double naive_apply(const Op& op, HostCall<Tin, Tout>& c, const ScalarArg& s0, const ScalarArg& s1) {
  using A = math_t<Tin>;
  long double sum = 0.0L;  // a more accurate sum than the loop under test
  for (int64_t t = 0; t < c.n; ++t) {
    const auto ctx = op.template prepare<A>(scalar_value(s0, c.id(t)), scalar_value(s1, c.id(t)));
    for (int64_t i = 0; i < c.numel[size_t(t)]; ++i) {
      const size_t at = size_t(c.offset[size_t(t)] + i);
      A x[Op::kIn], y[Op::kOut];
      for (int k = 0; k < Op::kIn; ++k) x[k] = to_math(c.in[size_t(k)][at]);
      for (int k = 0; k < Op::kOut; ++k)
        y[k] = Op::kLoadsOut ? to_math(c.out[size_t(k)][at]) : std::numeric_limits<A>::quiet_NaN();
      const A r = op.apply(ctx, x, y);
      if (Op::kReduces) {
        CHECK_MSG(bits_of(r) == bits_of(y[0]) || (std::isnan(r) && std::isnan(y[0])),
                  "apply() must return the v it writes");
        const double r2 = double(r) * double(r);  // ‖v‖²: v squared in double
        sum += r2;
      }
      for (int k = 0; k < Op::kOut; ++k) c.out[size_t(k)][at] = from_math<Tout>(y[k]);
    }
  }
  return double(sum);
}

// parallel_for for the tests: one serial call (seed 0), or random pieces in a scrambled
// order (one type for both, so cpu_apply is instantiated once per case).
struct TestFor {
  uint64_t seed = 0;
  template <typename Fn> void operator()(int64_t b, int64_t e, const Fn& fn) const {
    if (seed == 0) {
      fn(b, e);
      return;
    }
    Rng r(seed);
    std::vector<std::pair<int64_t, int64_t>> pieces;
    for (int64_t x = b; x < e;) {
      const int64_t len = 1 + r.below(3);
      pieces.push_back({x, std::min(e, x + len)});
      x += len;
    }
    for (size_t i = pieces.size(); i > 1; --i) std::swap(pieces[i - 1], pieces[size_t(r.below(int64_t(i)))]);
    for (auto& p : pieces) fn(p.first, p.second);
  }
};

template <typename Op, typename Tin, typename Tout>
void test_cpu_apply_case(const Op& op, const char* name, uint64_t seed, bool in_place = false) {
  char what[128];
  std::snprintf(what, sizeof what, "%s %s->%s%s", name, StorageName<Tin>::value, StorageName<Tout>::value,
                in_place ? " in-place" : "");
  Rng r(seed);
  const std::vector<int64_t> sizes = test_sizes(r);
  const bool with_ids = seed % 2 == 0;
  HostCall<Tin, Tout> base = make_call<Op, Tin, Tout>(op, r, sizes, with_ids);
  Scalars sc = make_scalars<Op>(r, base.n_ids);

  HostCall<Tin, Tout> a = base, b = base, n = base;
  Lists la = a.lists(), lb = b.lists();
  if (in_place) {  // y aliases x (perturb_): out list 0 is in list 0
    for (HostCall<Tin, Tout>* c : {&a, &b}) {
      Lists& l = c == &a ? la : lb;
      for (int64_t t = 0; t < c->n; ++t)
        c->out_ptr[size_t(t)] = const_cast<void*>(c->in_ptr[size_t(t)]);
      l.out = c->out_ptr.data();
    }
  }
  const double sum_a = cpu_apply<Op, Tin, Tout>(op, la, sc.s0, sc.s1, TestFor{});
  const double sum_b = cpu_apply<Op, Tin, Tout>(op, lb, sc.s0, sc.s1, TestFor{seed * 7 + 1});
  // the oracle runs out of place; in place, its output is compared with input list 0
  const double sum_n = naive_apply<Op, Tin, Tout>(op, n, sc.s0, sc.s1);

  // reductions: the naive sum up to reassociation (Σ of n nonnegative terms in any order is
  // within (n-1)·2^-53 relative); the thread partition does not matter at all
  if (Op::kReduces) {
    int64_t n_elems = 0;
    for (int64_t s : sizes) n_elems += s;
    const double tol = std::max(1e-12, double(n_elems) * 0x1p-53);
    g_rounding.max_sum_rel = std::max(g_rounding.max_sum_rel, rel_diff(sum_a, sum_n));
    CHECK_MSG(rel_diff(sum_a, sum_n) <= tol, "%s: sum %.17g vs naive %.17g (rel %.3g > %.3g)", what, sum_a, sum_n,
              rel_diff(sum_a, sum_n), tol);
    CHECK_MSG(sum_n > 0 && std::isfinite(sum_n), "%s: degenerate sum %g", what, sum_n);
  } else {
    CHECK_MSG(sum_a == 0.0, "%s: non-reducing op returned %g", what, sum_a);
  }
  CHECK_MSG(bits_of(sum_a) == bits_of(sum_b), "%s: sum depends on the partition: %.17g vs %.17g", what, sum_a, sum_b);

  // outputs: bit for bit (NaN == NaN) where the math cannot be contracted differently in
  // vectorized and scalar code, else up to rounding; guards and inputs untouched
  const bool bit_exact = kContractionOff || ContractionFree<Op>::value;
  const double math_tol = std::is_same<math_t<Tin>, double>::value ? 1e-13 : 1e-5;
  long bad = 0;
  for (int k = 0; k < Op::kOut; ++k) {
    for (int64_t t = 0; t < base.n; ++t) {
      const int64_t off = base.offset[size_t(t)];
      double scale = 0.0;
      if (!bit_exact) {
        std::vector<double> vals;
        for (int64_t i = 0; i < base.numel[size_t(t)]; ++i) vals.push_back(as_double(n.out[size_t(k)][size_t(off + i)]));
        scale = median_abs(std::move(vals));
      }
      for (int64_t i = 0; i < base.numel[size_t(t)] + HostCall<Tin, Tout>::kGuard; ++i) {
        const size_t at = size_t(off + i);
        const bool guard = i >= base.numel[size_t(t)];
        if constexpr (std::is_same_v<Tin, Tout>) {
          if (in_place && k == 0) {
            const Tin got = a.in[0][at], got_b = b.in[0][at];
            const Tin want = guard ? base.in[0][at] : n.out[0][at];
            if (!(same_value(got, want) && same_value(got_b, want)) && ++bad <= 3)
              CHECK_MSG(false, "%s: tensor %lld elem %lld%s: %a vs %a", what, (long long)t, (long long)i,
                        guard ? " (guard)" : "", as_double(got), as_double(want));
            continue;
          }
        }
        const Tout want = guard ? base.out[size_t(k)][at] : n.out[size_t(k)][at];
        const Tout got = a.out[size_t(k)][at], got_b = b.out[size_t(k)][at];
        if (!same_value(got, got_b) && ++bad <= 3)  // the partition never changes a result
          CHECK_MSG(false, "%s: out %d tensor %lld elem %lld: %a vs %a with another partition", what, k,
                    (long long)t, (long long)i, as_double(got), as_double(got_b));
        bool ok = same_value(got, want);
        if (!ok && !bit_exact && !guard) {
          ok = close_to(got, want, math_tol, scale);
          g_rounding.count += 1;
          const double w = as_double(want);
          if (w != 0) g_rounding.max_rel = std::max(g_rounding.max_rel, std::fabs(as_double(got) - w) / std::fabs(w));
        }
        if (!ok && ++bad <= 3)
          CHECK_MSG(false, "%s: out %d tensor %lld elem %lld%s: %a / %a vs naive %a", what, k, (long long)t,
                    (long long)i, guard ? " (guard)" : "", as_double(got), as_double(got_b), as_double(want));
      }
    }
  }
  if (!in_place)
    for (int k = 0; k < Op::kIn; ++k)
      for (size_t i = 0; i < base.in[size_t(k)].size(); ++i)
        if (bits_of(a.in[size_t(k)][i]) != bits_of(base.in[size_t(k)][i]) && ++bad <= 3)
          CHECK_MSG(false, "%s: input %d changed at %zu", what, k, i);
  CHECK_MSG(bad == 0, "%s: %ld mismatching elements", what, bad);

  // semantic checks on the result
  if constexpr (KindOf<Op>::value == ScalarKind::kAxpy) {
    // scale 0: θ bit-identical, even where v is NaN/inf; AxpySave's backup is θ bit for bit
    long zero_tensors = 0, nonfinite_seen = 0;
    for (int64_t t = 0; t < base.n; ++t) {
      const double scale = scalar_value(sc.s0, base.id(t));
      const int64_t off = base.offset[size_t(t)];
      if (scale == 0.0) ++zero_tensors;
      for (int64_t i = 0; i < base.numel[size_t(t)]; ++i) {
        const size_t at = size_t(off + i);
        const uint64_t theta = bits_of(base.in[0][at]);
        const uint64_t got = in_place ? bits_of(a.in[0][at]) : bits_of(a.out[0][at]);
        if (scale == 0.0) {
          if (!std::isfinite(as_double(base.in[1][at]))) ++nonfinite_seen;
          CHECK_MSG(got == theta, "%s: scale 0 changed θ (tensor %lld elem %lld)", what, (long long)t, (long long)i);
        }
        if (Op::kOut == 2) CHECK_MSG(bits_of(a.out[Op::kOut - 1][at]) == theta, "%s: backup differs", what);
      }
    }
    CHECK_MSG(zero_tensors > 0 && nonfinite_seen > 0, "%s: test data lacks scale-0 tensors with non-finite v", what);
  }
  if constexpr (KindOf<Op>::value == ScalarKind::kCombine) {
    long skipped = 0;
    for (int64_t t = 0; t < base.n; ++t) {
      if (!combine_skips(scalar_value(sc.s1, base.id(t)))) continue;
      ++skipped;
      const int64_t off = base.offset[size_t(t)];
      for (int64_t i = 0; i < base.numel[size_t(t)]; ++i) {
        const size_t at = size_t(off + i);
        const uint64_t got = bits_of(a.out[0][at]);
        const uint64_t want = Op::kLoadsOut ? bits_of(base.out[0][at]) : bits_of(store<Tout>(0.0));
        CHECK_MSG(got == want, "%s: skipped ε changed the output (tensor %lld)", what, (long long)t);
      }
    }
    CHECK_MSG(skipped > 0, "%s: no skipped tensors in the data", what);
  }
}

template <typename Op> void test_cpu_apply_all_types(const Op& op, const char* name, uint64_t seed) {
  test_cpu_apply_case<Op, float, float>(op, name, seed);
  test_cpu_apply_case<Op, double, double>(op, name, seed + 1);
  test_cpu_apply_case<Op, bf16, bf16>(op, name, seed + 2);
  test_cpu_apply_case<Op, fp16, fp16>(op, name, seed + 3);
}

void test_cpu_apply() {
  test_cpu_apply_all_types(make_adam<false, false>(1.0, kSafeguardNone), "AdamDiag<0,0>", 100);
  test_cpu_apply_all_types(make_adam<false, true>(-1.0, kSafeguardNone), "AdamDiag<0,1>", 110);
  test_cpu_apply_all_types(make_adam<true, false>(1.0, kSafeguardZeroUnseen), "AdamDiag<1,0>", 120);
  test_cpu_apply_all_types(make_adam<true, true>(-1.0, kSafeguardZeroUnseen), "AdamDiag<1,1>", 130);
  test_cpu_apply_all_types(make_adam<false, false>(1.0, kSafeguardZeroUnseen), "AdamDiag<0,0> zero-unseen", 140);
  test_cpu_apply_all_types(ConstDiag{-0.9}, "ConstDiag", 200);
  test_cpu_apply_all_types(make_rmsprop<false, kNoDecay>(1.0, kSafeguardNone), "RmspropDiag<0,0>", 300);
  test_cpu_apply_all_types(make_rmsprop<false, kDecayPlain>(-1.0, kSafeguardZeroUnseen), "RmspropDiag<0,1>", 310);
  test_cpu_apply_all_types(make_rmsprop<false, kDecayMomentum>(1.0, kSafeguardNone), "RmspropDiag<0,2>", 320);
  test_cpu_apply_all_types(make_rmsprop<true, kNoDecay>(-1.0, kSafeguardZeroUnseen), "RmspropDiag<1,0>", 330);
  test_cpu_apply_all_types(make_rmsprop<true, kDecayPlain>(1.0, kSafeguardNone), "RmspropDiag<1,1>", 340);
  test_cpu_apply_all_types(make_rmsprop<true, kDecayMomentum>(-1.0, kSafeguardNone), "RmspropDiag<1,2>", 350);
  test_cpu_apply_all_types(make_adagrad<false>(1.0, kSafeguardNone), "AdagradDiag<0>", 400);
  test_cpu_apply_all_types(make_adagrad<true>(-1.0, kSafeguardZeroUnseen), "AdagradDiag<1>", 410);
  test_cpu_apply_all_types(Axpy{}, "Axpy", 500);
  test_cpu_apply_case<Axpy, float, float>(Axpy{}, "Axpy", 510, /*in_place=*/true);
  test_cpu_apply_case<Axpy, bf16, bf16>(Axpy{}, "Axpy", 512, /*in_place=*/true);
  test_cpu_apply_all_types(AxpySave{}, "AxpySave", 600);
  test_cpu_apply_all_types(Combine<false>{}, "Combine<0>", 700);
  test_cpu_apply_all_types(Combine<true>{}, "Combine<1>", 710);
  // combine writing fp32/fp64 results into 16-bit buffers
  test_cpu_apply_case<Combine<false>, float, bf16>(Combine<false>{}, "Combine<0>", 720);
  test_cpu_apply_case<Combine<true>, float, bf16>(Combine<true>{}, "Combine<1>", 722);
  test_cpu_apply_case<Combine<false>, float, fp16>(Combine<false>{}, "Combine<0>", 724);
  test_cpu_apply_case<Combine<true>, float, fp16>(Combine<true>{}, "Combine<1>", 726);
  test_cpu_apply_case<Combine<false>, double, bf16>(Combine<false>{}, "Combine<0>", 728);
  test_cpu_apply_case<Combine<true>, double, bf16>(Combine<true>{}, "Combine<1>", 730);
  test_cpu_apply_case<Combine<false>, double, fp16>(Combine<false>{}, "Combine<0>", 732);
  test_cpu_apply_case<Combine<true>, double, fp16>(Combine<true>{}, "Combine<1>", 734);
  std::printf("  reductions: max relative difference to the naive sum %.3g\n", g_rounding.max_sum_rel);
  if (kContractionOff)
    std::printf("  -ffp-contract=off: every output bit-identical to the scalar oracle\n");
  else
    std::printf("  contraction on: %ld adapt outputs differ from the scalar oracle by rounding (max rel %.3g)\n",
                g_rounding.count, g_rounding.max_rel);
}

// Axpy rounds x + a·v once. Oracle: the exact value (long double / __float128 hold it for
// the exponent spreads drawn here), rounded once to the storage type.
void test_axpy_rounding() {
  Rng r(9);
  const int n = 200000;
  // float: a·v is exact in 48 bits; x within 2^-30..2^12 of it keeps x + a·v within 64 bits.
  {
    std::vector<float> x(n), v(n), y(n);
    std::vector<double> scale(1);
    const float a = float(r.logu(-3, 3));
    for (int i = 0; i < n; ++i) {
      v[size_t(i)] = float(r.logu(-20, 20));
      const double p = double(a) * double(v[size_t(i)]);
      x[size_t(i)] = r.chance(0.05) ? float(-p * (1 + r.uniform(-1e-6, 1e-6)))  // cancellation
                                    : float(std::fabs(p) * r.logu(-30, 12));
    }
    const void* in[2] = {x.data(), v.data()};
    void* out[1] = {y.data()};
    const int64_t numel[1] = {n};
    Lists l;
    l.n_tensors = 1;
    l.in = in;
    l.out = out;
    l.numel = numel;
    cpu_apply<Axpy, float, float>(Axpy{}, l, ScalarArg{double(a)}, ScalarArg{}, TestFor{});
    long bad = 0;
    for (int i = 0; i < n; ++i) {
      const long double exact = (long double)x[size_t(i)] + (long double)a * (long double)v[size_t(i)];
      const float want = float(exact);
      if (bits_of(y[size_t(i)]) != bits_of(want) && ++bad <= 5)
        CHECK_MSG(false, "axpy f32: %a + %a*%a = %a, exact rounding %a", double(x[size_t(i)]), double(a),
                  double(v[size_t(i)]), double(y[size_t(i)]), double(want));
    }
    CHECK_MSG(bad == 0, "axpy f32: %ld of %d not correctly rounded", bad, n);
  }
  // double: a·v is exact in 106 bits; x within 2^-50..2^6 of it keeps the sum within 113.
  {
    std::vector<double> x(n), v(n), y(n);
    const double a = r.logu(-3, 3);
    for (int i = 0; i < n; ++i) {
      v[size_t(i)] = r.logu(-20, 20);
      const double p = a * v[size_t(i)];
      x[size_t(i)] = r.chance(0.05) ? -p * (1 + r.uniform(-1e-12, 1e-12)) : std::fabs(p) * r.logu(-50, 6);
    }
    const void* in[2] = {x.data(), v.data()};
    void* out[1] = {y.data()};
    const int64_t numel[1] = {n};
    Lists l;
    l.n_tensors = 1;
    l.in = in;
    l.out = out;
    l.numel = numel;
    cpu_apply<Axpy, double, double>(Axpy{}, l, ScalarArg{a}, ScalarArg{}, TestFor{});
    long bad = 0;
    for (int i = 0; i < n; ++i) {
      const __float128 exact = (__float128)x[size_t(i)] + (__float128)a * (__float128)v[size_t(i)];
      const double want = double(exact);
      if (bits_of(y[size_t(i)]) != bits_of(want) && ++bad <= 5)
        CHECK_MSG(false, "axpy f64: %a + %a*%a = %a, exact rounding %a", x[size_t(i)], a, v[size_t(i)],
                  y[size_t(i)], want);
    }
    CHECK_MSG(bad == 0, "axpy f64: %ld of %d not correctly rounded", bad, n);
  }
  // a == 0 with non-finite v, and tiny a that is 0 in float: x kept bit for bit
  {
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    std::vector<float> x{1.5f, -0.0f, 0.0f, 3.0f, -2.0f}, v{nan, inf, -inf, nan, 1.0f}, y(5, 9.0f);
    const void* in[2] = {x.data(), v.data()};
    void* out[1] = {y.data()};
    const int64_t numel[1] = {5};
    Lists l;
    l.n_tensors = 1;
    l.in = in;
    l.out = out;
    l.numel = numel;
    for (double a : {0.0, -0.0, 1e-300}) {
      cpu_apply<Axpy, float, float>(Axpy{}, l, ScalarArg{a}, ScalarArg{}, TestFor{});
      for (int i = 0; i < 5; ++i) CHECK_MSG(bits_of(y[size_t(i)]) == bits_of(x[size_t(i)]), "axpy a=%g elem %d", a, i);
    }
    // a device scalar that is zero
    const double zero = 0.0;
    cpu_apply<Axpy, float, float>(Axpy{}, l, ScalarArg{5.0, &zero, false}, ScalarArg{}, TestFor{});
    for (int i = 0; i < 5; ++i) CHECK(bits_of(y[size_t(i)]) == bits_of(x[size_t(i)]));
  }
}

// Combine: ε = 0 / ±inf / NaN contribute nothing, even with non-finite gradients.
void test_combine_skip() {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  for (double eps : {0.0, -0.0, inf, -inf, nan}) {
    for (bool acc : {false, true}) {
      const auto ctx_t = Combine<true>{}.prepare<float>(1.0, eps);
      const auto ctx_f = Combine<false>{}.prepare<float>(1.0, eps);
      const float x[2] = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity()};
      float y[1] = {0.25f};
      if (acc) {
        Combine<true>{}.apply(ctx_t, x, y);
        CHECK_MSG(y[0] == 0.25f, "combine acc eps=%g", eps);
      } else {
        Combine<false>{}.apply(ctx_f, x, y);
        CHECK_MSG(y[0] == 0.0f && !std::signbit(y[0]), "combine eps=%g", eps);
      }
    }
  }
  // without accumulation: a plain product, so a -0.0 difference stays -0.0
  {
    const auto c0 = Combine<false>{}.prepare<float>(1.0, 0.5);
    const float xz[2] = {-0.0f, 0.0f};
    float yz[1] = {7.0f};
    Combine<false>{}.apply(c0, xz, yz);
    CHECK_MSG(yz[0] == 0.0f && std::signbit(yz[0]), "combine -0.0: %g", double(yz[0]));
    const float xv[2] = {0.3f, 0.1f};
    Combine<false>{}.apply(c0, xv, yz);
    CHECK(yz[0] == 1.0f * (0.3f - 0.1f));
  }
  // a regular ε with accumulation: scale·(g⁻ − g⁺)/(2ε), one fma on top of base
  const auto ctx = Combine<true>{}.prepare<double>(3.0, 0.5);
  const double x[2] = {1.0, 0.25};
  double y[1] = {1.0};
  Combine<true>{}.apply(ctx, x, y);
  CHECK(y[0] == 1.0 + 3.0 * 0.75);
}

// ================================================================ 4. the math, by finite differences
// Central difference with one Richardson step: error O(h⁴).
double derivative(const std::function<double(double)>& u, double g, double h) {
  const double d1 = (u(g + h) - u(g - h)) / (2 * h);
  const double d2 = (u(g + h / 2) - u(g - h / 2)) / h;
  return (4 * d2 - d1) / 3;
}

// The same in long double: at Adam's first step du/dg = lr·eps/(|g|+eps)² is ~1e-7 of u/g, so
// in double the differences of u are rounding noise at the 1e-6 level.
long double derivative_ld(const std::function<long double(long double)>& u, long double g, long double h) {
  const long double d1 = (u(g + h) - u(g - h)) / (2 * h);
  const long double d2 = (u(g + h / 2) - u(g - h / 2)) / h;
  return (4 * d2 - d1) / 3;
}

struct AdamPoint {
  double lr, beta1, beta2, eps, wd, sign, step;
  double theta, m_prev, q_prev, qmax_prev, g, d;
};

// torch.optim.Adam, one step (maximize → −g; weight_decay couples into g; AMSGrad keeps
// the running max of exp_avg_sq). Returns what the step subtracts from θ, u(g).
template <typename T> struct AdamStepT {
  T m, q, qmax, u;
};
template <typename T> AdamStepT<T> adam_step_t(const AdamPoint& p, bool amsgrad, bool coupled, T g) {
  T grad = p.sign < 0 ? -g : g;
  if (coupled) grad = grad + T(p.wd) * T(p.theta);
  AdamStepT<T> s;
  s.m = T(p.beta1) * T(p.m_prev) + (1 - T(p.beta1)) * grad;          // exp_avg.lerp_(grad, 1-β1)
  s.q = T(p.beta2) * T(p.q_prev) + (1 - T(p.beta2)) * grad * grad;   // exp_avg_sq.mul_(β2).addcmul_(g, g, 1-β2)
  s.qmax = std::max(T(p.qmax_prev), s.q);                            // torch.maximum(max_exp_avg_sq, exp_avg_sq)
  const T bias_correction1 = 1 - std::pow(T(p.beta1), T(p.step));
  const T bias_correction2 = 1 - std::pow(T(p.beta2), T(p.step));
  const T step_size = T(p.lr) / bias_correction1;
  const T denom = std::sqrt(amsgrad ? s.qmax : s.q) / std::sqrt(bias_correction2) + T(p.eps);
  s.u = step_size * s.m / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  return s;
}
using AdamStep = AdamStepT<double>;
AdamStep adam_step(const AdamPoint& p, bool amsgrad, bool coupled, double g) {
  return adam_step_t<double>(p, amsgrad, coupled, g);
}

// The functor sees the state after step(): m, q, [q_max] and, with coupled decay, the
// updated θ = θ_pre − u (p.theta is θ_pre).
template <bool AMS, bool WD> void check_adam_point(const AdamPoint& p, const char* what, double h = 0.0) {
  const AdamDiag<AMS, WD> op{p.beta1, p.beta2, p.eps, p.wd, p.sign, kSafeguardNone};
  const AdamStep s = adam_step(p, AMS, WD, p.g);
  double x[6];
  x[0] = p.d;
  x[1] = p.g;
  x[2] = s.m;
  x[3] = s.q;
  if (AMS) x[4] = s.qmax;
  if (WD) x[4 + AMS] = p.theta - s.u;
  double y[1];
  const auto ctx = op.template prepare<double>(p.lr, p.step);
  const double r = op.apply(ctx, x, y);
  const long double h_ld = h > 0 ? h : 1e-3 * std::max(std::fabs(p.g), 1e-3);
  const double fd = double(
      derivative_ld([&](long double g) { return adam_step_t<long double>(p, AMS, WD, g).u; }, p.g, h_ld) * p.d);
  CHECK_MSG(std::fabs(y[0] - fd) <= 1e-6 * std::fabs(fd) && fd != 0.0, "AdamDiag<%d,%d> %s: v = %.12g, FD %.12g", AMS,
            WD, what, y[0], fd);
  CHECK(r == y[0]);  // apply returns v; the loops sum its square
}

void test_adam_fd() {
  //                    lr    β1   β2     eps   wd    sign step  θ     m_prev q_prev  qmax_prev g      d
  const AdamPoint base{1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 3.0, 0.5, 0.1, 0.02, 0.0, 0.3, 1.0};
  std::vector<std::pair<const char*, AdamPoint>> pts;
  pts.push_back({"base", base});
  AdamPoint p = base;
  p.g = -0.7; p.d = -2.5; pts.push_back({"negative g, d", p});
  // step 1: torch starts every moment at 0 (any other state at step 1 is unreachable)
  p = base; p.step = 1; p.m_prev = 0; p.q_prev = 0; pts.push_back({"step 1", p});
  p = base; p.step = 1000; p.beta2 = 0.99; pts.push_back({"step 1000", p});
  p = base; p.eps = 0.1; pts.push_back({"large eps", p});
  p = base; p.sign = -1.0; pts.push_back({"maximize", p});
  p = base; p.wd = 0.05; p.theta = -1.5; pts.push_back({"wd", p});
  p = base; p.wd = 0.05; p.sign = -1; p.g = 0.05; p.m_prev = -0.3; p.q_prev = 1e-5; pts.push_back({"wd maximize", p});
  // step 1 with a large lr·wd/eps: the regime where θ_pre ≠ θ matters most
  p = base; p.step = 1; p.wd = 0.1; p.theta = 2.0; p.lr = 0.1; p.eps = 1e-3; p.m_prev = 0; p.q_prev = 0;
  pts.push_back({"step 1, large wd", p});
  p = base; p.g = 3.0; p.q_prev = 1e-6; p.m_prev = 0.0; pts.push_back({"large g", p});
  for (auto& [name, pt] : pts) {
    check_adam_point<false, false>(pt, name);
    check_adam_point<false, true>(pt, name);
    // AMSGrad where this step sets the max (curved) ...
    AdamPoint a = pt;
    a.qmax_prev = 0.5 * adam_step(pt, true, false, pt.g).q;
    check_adam_point<true, false>(a, name);
    a.qmax_prev = 0.5 * adam_step(pt, true, true, pt.g).q;
    check_adam_point<true, true>(a, name);
    // ... and where an earlier max is kept (flat in g)
    a.qmax_prev = 2.0 * adam_step(pt, true, false, pt.g).q + 1e-3;
    check_adam_point<true, false>(a, name);
    a.qmax_prev = 2.0 * adam_step(pt, true, true, pt.g).q + 1e-3;
    check_adam_point<true, true>(a, name);
  }
  // never-seen coordinate: q = 0, the exact diagonal lr(1-β1)/(bc1·eps) (u = c·g/(k|g|+eps))
  p = base;
  p.m_prev = 0;
  p.q_prev = 0;
  p.g = 0;
  check_adam_point<false, false>(p, "unseen", 1e-9 * p.eps);
  {
    const AdamDiag<false, false> op{0.9, 0.999, 1e-8, 0.0, 1.0, kSafeguardNone};
    const double x[4] = {2.0, 0.0, 0.0, 0.0};
    double y[1];
    op.apply(op.prepare<double>(1e-3, 3.0), x, y);
    const double want = 2.0 * 1e-3 * 0.1 / (1 - std::pow(0.9, 3)) / 1e-8;
    CHECK_MSG(std::fabs(y[0] - want) <= 1e-12 * want, "unseen diag %g vs %g", y[0], want);
    const AdamDiag<false, false> safe{0.9, 0.999, 1e-8, 0.0, 1.0, kSafeguardZeroUnseen};
    safe.apply(safe.prepare<double>(1e-3, 3.0), x, y);
    CHECK(y[0] == 0.0);
  }
}

// RMSprop and Adagrad the same way (torch.optim.RMSprop / Adagrad, one step). With coupled
// decay the functor gets the post-step θ (and RMSprop's post-step momentum buffer).
template <bool C, int DEC> void check_rmsprop(double sign, double momentum) {
  const double lr = 1e-2, alpha = 0.99, eps = 1e-8, wd = DEC != kNoDecay ? 0.03 : 0.0;
  const double theta_pre = 0.8, S_prev = 0.04, G_prev = 0.05, buf_prev = -0.2, g0 = -0.35, d = 1.7;
  struct Out { double S, G, buf, theta, u; };
  auto step = [&](double g) {
    Out o;
    double grad = sign < 0 ? -g : g;                              // maximize
    if (DEC != kNoDecay) grad += wd * theta_pre;                  // grad.add(param, alpha=wd)
    o.S = alpha * S_prev + (1 - alpha) * grad * grad;             // square_avg
    o.G = alpha * G_prev + (1 - alpha) * grad;                    // grad_avg (centered)
    const double avg = (C ? std::sqrt(o.S - o.G * o.G) : std::sqrt(o.S)) + eps;
    if (DEC == kDecayMomentum) {
      o.buf = momentum * buf_prev + grad / avg;                   // buf.mul_(m).addcdiv_(grad, avg)
      o.u = lr * o.buf;                                           // param.add_(buf, alpha=-lr)
    } else {
      o.buf = 0;
      o.u = lr * grad / avg;                                      // param.addcdiv_(grad, avg, value=-lr)
    }
    o.theta = theta_pre - o.u;
    return o;
  };
  const Out o = step(g0);
  const double fd = derivative([&](double g) { return step(g).u; }, g0, 1e-4) * d;
  double x[6] = {d, g0, o.S, 0, 0, 0}, y[1] = {0.0};
  int k = 3;
  if (C) x[k++] = o.G;
  if (DEC != kNoDecay) x[k++] = o.theta;
  if (DEC == kDecayMomentum) x[k++] = o.buf;
  const RmspropDiag<C, DEC> op{alpha, eps, wd, sign, kSafeguardNone};
  const double r = op.apply(op.template prepare<double>(lr, 0.0), x, y);
  CHECK_MSG(std::fabs(y[0] - fd) <= 1e-6 * std::fabs(fd), "RmspropDiag<%d,%d> sign %g: %.12g vs FD %.12g", C, DEC,
            sign, y[0], fd);
  CHECK(r == y[0]);
}

template <bool WD> void check_adagrad(double sign, double lr, double eps) {
  const double lr_decay = 0.01, t = 7, wd = WD ? 0.03 : 0.0, theta_pre = -0.6, sum_prev = 0.3, g0 = 0.45, d = -0.9;
  struct Out { double sum, theta, u; };
  auto step = [&](double g) {
    Out o;
    double grad = sign < 0 ? -g : g;
    if (WD) grad += wd * theta_pre;
    const double clr = lr / (1 + (t - 1) * lr_decay);
    o.sum = sum_prev + grad * grad;                   // state_sum.addcmul_(grad, grad, value=1)
    o.u = clr * grad / (std::sqrt(o.sum) + eps);      // param.addcdiv_(grad, std, value=-clr)
    o.theta = theta_pre - o.u;
    return o;
  };
  const Out o = step(g0);
  const double fd = derivative([&](double g) { return step(g).u; }, g0, 1e-4) * d;
  double x[4] = {d, g0, o.sum, o.theta}, y[1] = {0.0};
  const AdagradDiag<WD> op{lr_decay, eps, wd, sign, kSafeguardNone};
  const double r = op.apply(op.template prepare<double>(lr, t), x, y);
  CHECK_MSG(std::fabs(y[0] - fd) <= 1e-6 * std::fabs(fd), "AdagradDiag<%d> sign %g lr %g: %.12g vs FD %.12g", WD, sign,
            lr, y[0], fd);
  CHECK(r == y[0]);
}

void test_rmsprop_adagrad_fd() {
  for (double sign : {1.0, -1.0}) {
    check_rmsprop<false, kNoDecay>(sign, 0.0);
    check_rmsprop<false, kDecayPlain>(sign, 0.0);
    check_rmsprop<false, kDecayMomentum>(sign, 0.9);
    check_rmsprop<true, kNoDecay>(sign, 0.0);
    check_rmsprop<true, kDecayPlain>(sign, 0.0);
    check_rmsprop<true, kDecayMomentum>(sign, 0.5);
    for (double lr : {1e-2, 0.5}) {
      check_adagrad<false>(sign, lr, 1e-8);
      check_adagrad<true>(sign, lr, 1e-8);
      check_adagrad<true>(sign, lr, 0.3);
    }
  }
  // safeguard: never-seen coordinates (S = 0 / Σ = 0) get a zero diagonal
  {
    const RmspropDiag<false, kNoDecay> op{0.99, 1e-8, 0.0, 1.0, kSafeguardZeroUnseen};
    const double x[3] = {1.0, 0.0, 0.0};
    double y[1] = {1.0};
    op.apply(op.prepare<double>(1e-2, 0.0), x, y);
    CHECK(y[0] == 0.0);
    const RmspropDiag<false, kNoDecay> plain{0.99, 1e-8, 0.0, 1.0, kSafeguardNone};
    plain.apply(plain.prepare<double>(1e-2, 0.0), x, y);
    CHECK_MSG(std::fabs(y[0] - 1e-2 / 1e-8) <= 1e-9 * 1e6, "rmsprop unseen diag %g", y[0]);
  }
  {
    const AdagradDiag<false> op{0.0, 1e-8, 0.0, 1.0, kSafeguardZeroUnseen};
    const double x[3] = {1.0, 0.0, 0.0};
    double y[1] = {1.0};
    op.apply(op.prepare<double>(1e-2, 1.0), x, y);
    CHECK(y[0] == 0.0);
  }
}

// ================================================================ dispatch
// ================================================================ 5. measured perturbations
// Philox4x32-10 against the known-answer vectors published with Random123 (kat_vectors).
void test_philox_kat() {
  const Philox4x32 a = philox4x32_10(0, 0, 0, 0, 0, 0);
  const Philox4x32 b = philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  const Philox4x32 c = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  const uint32_t want[3][4] = {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
                               {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
                               {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
  const Philox4x32* got[3] = {&a, &b, &c};
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 4; ++k)
      CHECK_MSG(got[i]->c[k] == want[i][k], "philox KAT %d word %d: %08x, want %08x", i, k, got[i]->c[k], want[i][k]);
}

// One call of a measured perturbation over one tensor of n elements (x, v -> y[, backup]).
template <typename T, bool kSave, bool kStochastic>
Sums run_measured(const PerturbMeasured<kSave, kStochastic>& op, const std::vector<T>& x, const std::vector<T>& v,
                  std::vector<T>* y, std::vector<T>* backup, double scale, uint64_t parallel_seed) {
  const int64_t n = int64_t(x.size());
  const void* in[2] = {x.data(), v.data()};
  void* out[2] = {y->data(), backup ? static_cast<void*>(backup->data()) : nullptr};
  Lists l;
  l.n_tensors = 1;
  l.in = in;
  l.out = out;
  l.numel = &n;
  return cpu_apply_sums<PerturbMeasured<kSave, kStochastic>, T, T>(op, l, ScalarArg{scale}, ScalarArg{},
                                                        TestFor{parallel_seed});
}

template <typename T>
void test_measured_type(uint64_t seed) {
  const char* name = StorageName<T>::value;
  Rng r(seed);
  const int64_t n = 3 * kCpuChunk + 1234;  // several chunks, a partial last one
  std::vector<T> x(static_cast<size_t>(n)), v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    x[size_t(i)] = store<T>(r.uniform(-3, 3));
    v[size_t(i)] = store<T>(r.uniform(-1, 1) * std::pow(10.0, -r.uniform(0, 3)));
  }
  const double scale = -0.0123;
  // round-to-nearest: bit for bit what Axpy writes (itself checked against the naive loop)
  std::vector<T> y_axpy(static_cast<size_t>(n)), y(static_cast<size_t>(n)), backup(static_cast<size_t>(n));
  {
    const void* in[2] = {x.data(), v.data()};
    void* out[1] = {y_axpy.data()};
    Lists l;
    l.n_tensors = 1;
    l.in = in;
    l.out = out;
    l.numel = &n;
    cpu_apply<Axpy, T, T>(Axpy{}, l, ScalarArg{scale}, ScalarArg{}, TestFor{});
  }
  auto check = [&](auto op) {
    constexpr bool stochastic = decltype(op)::kStochasticRounding;
    const Sums s = run_measured<T>(op, x, v, &y, &backup, scale, 0);
    long bad = 0;
    long double dot = 0.0L;
    double count = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (bits_of(backup[size_t(i)]) != bits_of(x[size_t(i)])) ++bad;
      if (!stochastic && bits_of(y[size_t(i)]) != bits_of(y_axpy[size_t(i)])) ++bad;
      const long double d = (long double)as_double(y[size_t(i)]) - (long double)as_double(x[size_t(i)]);
      if (d != 0) {
        dot += d * (long double)as_double(v[size_t(i)]);
        count += 1;
      }
    }
    CHECK_MSG(bad == 0, "measured %s%s: %ld elements differ from Axpy / the backup", name,
              stochastic ? " stochastic" : "", bad);
    CHECK_MSG(s.b == count, "measured %s: count %.17g vs %.17g", name, s.b, count);
    CHECK_MSG(rel_diff(s.a, double(dot)) <= 1e-12, "measured %s: dot %.17g vs %.17g", name, s.a, double(dot));
    // the thread partition changes nothing, bits included
    std::vector<T> y2(static_cast<size_t>(n)), b2(static_cast<size_t>(n));
    const Sums s2 = run_measured<T>(op, x, v, &y2, &b2, scale, seed * 3 + 1);
    long diff = 0;
    for (int64_t i = 0; i < n; ++i) diff += bits_of(y2[size_t(i)]) != bits_of(y[size_t(i)]);
    CHECK_MSG(diff == 0 && bits_of(s2.a) == bits_of(s.a) && s2.b == s.b, "measured %s: depends on the partition",
              name);
    // a zero scale leaves θ as it is, even where v is not finite
    std::vector<T> vn = v;
    vn[0] = store<T>(std::numeric_limits<double>::quiet_NaN());
    vn[1] = store<T>(std::numeric_limits<double>::infinity());
    const Sums z = run_measured<T>(op, x, vn, &y2, &b2, 0.0, 0);
    long moved = 0;
    for (int64_t i = 0; i < n; ++i) moved += bits_of(y2[size_t(i)]) != bits_of(x[size_t(i)]);
    CHECK_MSG(moved == 0 && z.a == 0.0 && z.b == 0.0, "measured %s: zero scale moved %ld elements", name, moved);
  };
  check(PerturbMeasured<true, false>{99, 5});
  check(PerturbMeasured<true, true>{99, 5});
}

// Stochastic rounding is unbiased: x on the grid, a·v of x's sign and below one grid step, so
// that every result must be x or its neighbour away from zero; the mean over many draws
// (different offsets) is the exact x + a·v (long double) within 5 standard errors. (Round-to-
// nearest fails this: its mean sits on one neighbour, tens of standard errors away.)
template <typename T>
void test_stochastic_unbiased(std::initializer_list<double> xs) {
  const char* name = StorageName<T>::value;
  const int kDraws = 20000;
  for (double x0 : xs) {
    const T xt = store<T>(x0);
    const double xd = as_double(xt);
    const double xn = as_double(T{uint16_t(xt.bits + 1)});  // the next grid point away from zero
    for (double frac : {0.3, 0.04}) {
      const T vt = store<T>(1.0);
      const double a = double(float(frac * (xn - xd)));  // the kernels take the scale in float
      const long double exact = (long double)xd + (long double)a;
      const double p = double((exact - xd) / ((long double)xn - xd));
      long double sum = 0.0L;
      int other = 0;
      for (int k = 0; k < kDraws; ++k) {
        const PerturbMeasured<false, true> op{2024, uint64_t(k)};
        std::vector<T> x(1, xt), v(1, vt), y(1);
        run_measured<T>(op, x, v, &y, nullptr, a, 0);
        const double got = as_double(y[0]);
        sum += got;
        other += got != xd && got != xn;
      }
      const long double mean = sum / kDraws;
      const double se = std::fabs(xn - xd) * std::sqrt(p * (1 - p) / kDraws);
      CHECK_MSG(p > 0 && p < 1, "stochastic %s x=%g: bad case p=%g", name, x0, p);
      CHECK_MSG(other == 0, "stochastic %s x=%g: %d results are neither x nor its neighbour", name, x0, other);
      CHECK_MSG(std::fabs(double(mean - exact)) <= 5 * se, "stochastic %s x=%g p=%.3f: mean %.12Lg vs exact %.12Lg "
                "(%.2f standard errors)", name, x0, p, mean, exact, std::fabs(double(mean - exact)) / se);
    }
  }
}

void test_perturb_measured() {
  test_philox_kat();
  test_measured_type<float>(1);
  test_measured_type<double>(2);
  test_measured_type<bf16>(3);
  test_measured_type<fp16>(4);
  test_stochastic_unbiased<bf16>({1.0, -2.5, 1e-3, 1e-39 /* subnormal */, 3e30});
  test_stochastic_unbiased<fp16>({1.0, -2.5, 1e-3, -3e-6 /* subnormal */, 6e4});
}

void test_dispatch() {
  const Kernel kernels[] = {Kernel::kAdam, Kernel::kConst, Kernel::kRmsprop, Kernel::kAdagrad,
                            Kernel::kAxpy, Kernel::kAxpySave, Kernel::kCombine};
  const int ins[] = {4, 1, 3, 3, 2, 2, 2}, outs[] = {1, 1, 1, 1, 1, 2, 1};
  for (int i = 0; i < 7; ++i) {
    OpSpec s;
    s.kernel = kernels[i];
    CHECK_MSG(n_inputs(s) == ins[i] && n_outputs(s) == outs[i], "kernel %d lists", i);
  }
  OpSpec s;
  s.kernel = Kernel::kAdam;
  s.flag_a = s.flag_b = true;
  CHECK(n_inputs(s) == 6);
  s.kernel = Kernel::kRmsprop;  // d, g, S, G, θ, buf
  s.decay = kDecayMomentum;
  CHECK(n_inputs(s) == 6);
  s.decay = kDecayPlain;
  CHECK(n_inputs(s) == 5);
  s.flag_a = false;
  CHECK(n_inputs(s) == 4);
  s.decay = kNoDecay;
  CHECK(n_inputs(s) == 3);
  s.kernel = Kernel::kAdagrad;
  s.flag_b = true;
  CHECK(n_inputs(s) == 4);
  s.kernel = Kernel(99);
  CHECK(throws([&] { n_inputs(s); }));
  // dtype combinations: same dtype everywhere; combine may also write f32 into 16 bits
  auto ok = [](DType in, DType out, bool combine) {
    try {
      if (combine) with_types<Combine<true>>(in, out, [](auto, auto) {});
      else with_types<Axpy>(in, out, [](auto, auto) {});
      return true;
    } catch (const std::invalid_argument&) {
      return false;
    }
  };
  const DType all[] = {DType::f32, DType::f64, DType::bf16, DType::f16};
  for (DType a : all)
    for (DType b : all) {
      CHECK(ok(a, b, false) == (a == b));
      // combine: also fp32/fp64 results into 16-bit buffers (compressed communication)
      const bool mixed_ok =
          a == b || ((a == DType::f32 || a == DType::f64) && (b == DType::bf16 || b == DType::f16));
      CHECK_MSG(ok(a, b, true) == mixed_ok, "combine %s -> %s", dtype_name(a), dtype_name(b));
    }
  // hyperparameter slots reach the right functor fields
  {
    OpSpec a;
    a.kernel = Kernel::kAdam;
    a.flag_a = true;
    a.h[0] = 0.8; a.h[1] = 0.99; a.h[2] = 1e-7; a.h[3] = 0.1; a.h[4] = -1.0;
    a.safeguard = kSafeguardZeroUnseen;
    int hit = 0;
    with_functor(a, [&](auto op) {
      if constexpr (std::is_same_v<decltype(op), AdamDiag<true, false>>)
        hit = op.beta1 == 0.8 && op.beta2 == 0.99 && op.eps == 1e-7 && op.weight_decay == 0.1 && op.sign == -1.0 &&
              op.safeguard == kSafeguardZeroUnseen ? 1 : 2;
    });
    CHECK_MSG(hit == 1, "Adam spec -> functor: %d", hit);
    OpSpec rm;
    rm.kernel = Kernel::kRmsprop;
    rm.flag_a = true;
    rm.decay = kDecayMomentum;
    rm.h[0] = 0.9; rm.h[1] = 1e-5; rm.h[2] = 0.2; rm.h[3] = -1.0;
    rm.safeguard = kSafeguardZeroUnseen;
    hit = 0;
    with_functor(rm, [&](auto op) {
      if constexpr (std::is_same_v<decltype(op), RmspropDiag<true, kDecayMomentum>>)
        hit = op.alpha == 0.9 && op.eps == 1e-5 && op.weight_decay == 0.2 && op.sign == -1.0 &&
              op.safeguard == kSafeguardZeroUnseen ? 1 : 2;
    });
    CHECK_MSG(hit == 1, "RMSprop spec -> functor: %d", hit);
    OpSpec ag;
    ag.kernel = Kernel::kAdagrad;
    ag.flag_b = true;
    ag.h[0] = 0.01; ag.h[1] = 1e-9; ag.h[2] = 0.3; ag.h[3] = -1.0;
    ag.safeguard = kSafeguardZeroUnseen;
    hit = 0;
    with_functor(ag, [&](auto op) {
      if constexpr (std::is_same_v<decltype(op), AdagradDiag<true>>)
        hit = op.lr_decay == 0.01 && op.eps == 1e-9 && op.weight_decay == 0.3 && op.sign == -1.0 &&
              op.safeguard == kSafeguardZeroUnseen ? 1 : 2;
    });
    CHECK_MSG(hit == 1, "Adagrad spec -> functor: %d", hit);
    OpSpec cs;
    cs.kernel = Kernel::kConst;
    cs.h[0] = 0.7;
    hit = 0;
    with_functor(cs, [&](auto op) {
      if constexpr (std::is_same_v<decltype(op), ConstDiag>) hit = op.factor == 0.7 ? 1 : 2;
    });
    CHECK_MSG(hit == 1, "Const spec -> functor: %d", hit);
  }
  CHECK(dtype_size(DType::f32) == 4 && dtype_size(DType::f64) == 8 && dtype_size(DType::bf16) == 2 &&
        dtype_size(DType::f16) == 2);
}

}  // namespace

int main() {
  struct Section {
    const char* name;
    void (*fn)();
  } sections[] = {
      {"fp16 -> float", test_fp16_to_float},     {"float -> fp16", test_float_to_fp16},
      {"bf16", test_bf16},                       {"launch plan", test_launch_plan},
      {"cpu_apply", test_cpu_apply},             {"axpy rounding", test_axpy_rounding},
      {"combine skip", test_combine_skip},       {"adam finite differences", test_adam_fd},
      {"rmsprop/adagrad finite differences", test_rmsprop_adagrad_fd},
      {"dispatch", test_dispatch},               {"measured perturbations", test_perturb_measured},
  };
  for (const Section& s : sections) {
    const long long before = n_failures();
    try {
      s.fn();
    } catch (const std::exception& e) {
      CHECK_MSG(false, "%s threw: %s", s.name, e.what());
    }
    std::printf("[%s] %s\n", n_failures() == before ? "ok" : "FAILED", s.name);
    std::fflush(stdout);
  }
  return summary("test_core");
}
