// Single-thread microbenchmark of the CPU kernels' inner loop (csrc/core/cpu_apply.h: cpu_chunk),
// against an alternative, on one 32K-element chunk (the size cpu_apply hands a thread).
// It is the evidence behind the vectorisation notes in docs/benchmarks.md. CMake builds it
// (sama_bench_cpu_loop, with the core test's flags); nothing runs it automatically.
//
//   c++ -Icsrc -std=c++17 -O3 -fopenmp -march=native -fno-math-errno -fno-trapping-math
//       -o /tmp/cpu_loop_bench cuda_bench/cpu_loop_bench.cpp && /tmp/cpu_loop_bench 32768 300
//   (one line; the flags are those sama_ext/_build.py uses for the JIT build)
//
// Prints ns per element (best of the repeats) for the repo's loop ("current") and the alternative
// ("proposed"), out of place and in place (out aliasing the first input, as perturb_ runs), then
// checks that both write bit-identical outputs (and whether Σv² matches: it need not, the
// alternative's summation order is the compiler's vector width, the repo's is fixed). With -DONLY_CURRENT it times the
// repo's loop alone (to measure an older csrc/core, whose functors had another return convention).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "core/cpu_apply.h"
#include "core/functors.h"

using namespace sama;

#ifndef ONLY_CURRENT
// The alternative: one `#pragma omp simd reduction` over the whole chunk, around the same
// per-element function as the repo's loop (cpu_element). It is what the repo's loop was proposed
// to become (docs/benchmarks.md); the repo kept fixed 16-lane blocks instead, so that Σv²'s
// summation order does not depend on the vector width the compiler picks for the machine.
template <typename Op, typename Tin, typename Tout, typename A>
double proposed_chunk(const Op& op, const typename Op::template Ctx<A>& ctx, const Lists& l, int64_t t,
                      int64_t begin, int64_t end) {
  const ChunkPointers<Op, Tin, Tout> p(l, t, begin);
  const Tin* const* in = p.in;
  Tout* const* out = p.out;
  const int64_t len = end - begin;
  const Op f = op;
  const auto c = ctx;
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) {
    const double r = double(cpu_element<Op, Tin, Tout, A>(f, c, in, out, i));
    if (Op::kReduces) acc += r * r;
  }
  return acc;
}
#endif

template <typename Op, typename T>
struct Bench {
  const char* name;
  Op op;
  double a, b;
  int64_t n;
  std::vector<std::vector<T>> bufs;
  explicit Bench(const char* nm, Op o, double a_, double b_, int64_t n_) : name(nm), op(o), a(a_), b(b_), n(n_) {
    std::mt19937 rng(0);
    std::normal_distribution<float> g(0.f, 1.f);
    bufs.assign(Op::kIn + Op::kOut, std::vector<T>(size_t(n)));
    for (int k = 0; k < Op::kIn + Op::kOut; ++k)
      for (auto& x : bufs[size_t(k)]) {
        float v = g(rng);
        if (k == 3) v = rng() % 50 == 0 ? 0.f : v * v * 1e-3f;  // Adam's q: positive, a few exact zeros
        x = from_math<T>(v);
      }
  }
  template <bool kProposed>
  double pass(bool in_place, std::vector<std::vector<T>>& outs) {
    std::vector<const void*> in;
    std::vector<void*> out;
    for (int k = 0; k < Op::kIn; ++k) in.push_back(bufs[size_t(k)].data());
    for (int k = 0; k < Op::kOut; ++k) out.push_back(outs[size_t(k)].data());
    if (in_place) out[0] = const_cast<void*>(in[0]);
    int64_t numel = n;
    const Lists l{1, in.data(), out.data(), &numel, nullptr};
    const auto ctx = op.template prepare<float>(a, b);
    double s = 0;
    for (int64_t c0 = 0; c0 < n; c0 += kCpuChunk) {
      const int64_t c1 = c0 + kCpuChunk < n ? c0 + kCpuChunk : n;
#ifndef ONLY_CURRENT
      if (kProposed) {
        s += proposed_chunk<Op, T, T, float>(op, ctx, l, 0, c0, c1);
        continue;
      }
#endif
      s += cpu_chunk<Op, T, T, float>(op, ctx, l, 0, c0, c1).a;  // Σ of the first reduction (Σv²)
    }
    return s;
  }
  template <bool kProposed>
  void time(bool in_place, int reps) {
    std::vector<std::vector<T>> outs(Op::kOut, std::vector<T>(size_t(n)));
    std::vector<std::vector<T>> saved = bufs;  // in place drifts the input: restore after timing
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      pass<kProposed>(in_place, outs);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    bufs = saved;
    std::printf("%-9s %-8s %-5s %-12s %7.3f ns/element\n", kProposed ? "proposed" : "current", name,
                sizeof(T) == 4 ? "fp32" : "bf16", in_place ? "in place" : "out of place", best / double(n) * 1e9);
  }
#ifndef ONLY_CURRENT
  void check() {
    std::vector<std::vector<T>> o1(Op::kOut, std::vector<T>(size_t(n))), o2 = o1;
    const double s1 = pass<false>(false, o1), s2 = pass<true>(false, o2);
    const bool same_sum = s1 == s2 || (s1 != s1 && s2 != s2);
    bool same = true;
    for (int k = 0; k < Op::kOut; ++k)
      same = same && std::memcmp(o1[size_t(k)].data(), o2[size_t(k)].data(), size_t(n) * sizeof(T)) == 0;
    std::printf("check %-8s %-5s: outputs %s, sum %s (rel. diff %.1e)\n", name, sizeof(T) == 4 ? "fp32" : "bf16",
                same ? "bit-identical" : "DIFFER", same_sum ? "identical" : "differs",
                s1 == s2 ? 0.0 : (s1 - s2) / s1);
  }
#endif
};

template <typename Op, typename T>
void bench(const char* name, Op op, double a, double b, int64_t n, int reps, bool in_place_too) {
  Bench<Op, T> B(name, op, a, b, n);
  B.template time<false>(false, reps);
#ifndef ONLY_CURRENT
  B.template time<true>(false, reps);
#endif
  if (in_place_too) {
    B.template time<false>(true, reps);
#ifndef ONLY_CURRENT
    B.template time<true>(true, reps);
#endif
  }
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? atoll(argv[1]) : kCpuChunk;
  const int reps = argc > 2 ? atoi(argv[2]) : 300;
  const AdamDiag<false, false> adam{0.9, 0.999, 1e-8, 0.0, 1.0, 0};
  bench<AdamDiag<false, false>, float>("adam", adam, 1e-3, 10, n, reps, false);
  bench<AdamDiag<false, false>, bf16>("adam", adam, 1e-3, 10, n, reps, false);
  bench<ConstDiag, float>("const", ConstDiag{0.9}, 1e-3, 0, n, reps, false);
  bench<ConstDiag, bf16>("const", ConstDiag{0.9}, 1e-3, 0, n, reps, false);
  bench<Axpy, float>("axpy", Axpy{}, 1e-3, 0, n, reps, true);
  bench<Axpy, bf16>("axpy", Axpy{}, 1e-3, 0, n, reps, true);
  bench<AxpySave, float>("axpysave", AxpySave{}, 1e-3, 0, n, reps, true);
  bench<AxpySave, bf16>("axpysave", AxpySave{}, 1e-3, 0, n, reps, true);
  bench<Combine<false>, float>("combine", Combine<false>{}, 1.0, 0.01, n, reps, false);
  bench<Combine<false>, bf16>("combine", Combine<false>{}, 1.0, 0.01, n, reps, false);
#ifndef ONLY_CURRENT
  Bench<AdamDiag<false, false>, float>("adam", adam, 1e-3, 10, 1000003).check();
  Bench<AdamDiag<false, false>, bf16>("adam", adam, 1e-3, 10, 1000003).check();
  Bench<ConstDiag, float>("const", ConstDiag{0.9}, 1e-3, 0, 1000003).check();
  Bench<Axpy, bf16>("axpy", Axpy{}, 1e-3, 0, 1000003).check();
  Bench<AxpySave, float>("axpysave", AxpySave{}, 1e-3, 0, 1000003).check();
  Bench<Combine<false>, float>("combine", Combine<false>{}, 1.0, 0.01, 1000003).check();
#endif
  return 0;
}
