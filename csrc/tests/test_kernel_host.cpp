// The CUDA kernel's own code (csrc/core/kernel_body.h: fill_meta, block_work, block_context,
// thread_work), executed on the CPU over a simulated grid: every launch of the plan, every
// block of every launch, every thread index 0..kCudaThreads-1 in turn; each block's partial
// Σv² summed in the kernel's warp-shuffle order, the partials summed as sum_partials_kernel
// does. Compared with cpu_apply (itself checked against scalar oracles by test_core) for every
// functor and storage-type pair: aligned tensors, tensors shifted by the same odd offset in
// every list (DDP bucket views: scalar prologue, then 128-bit access), lists out of phase
// with each other (scalar only), sizes around the 64K chunk, hundreds of tensors (several
// launches by the slot limit), a tensor split across launches by the block limit, empty
// tensors and an all-empty call.
//
// Built with -ffp-contract=off, so cpu_apply and the kernel body, running the same functor
// in the same program, must agree bit for bit for every functor (without contraction the
// vector and scalar loops round alike). Also checked: inputs and the guard elements between
// tensors unchanged; outputs that the op does not read start as NaN (an unwritten element
// fails); every partial written once, inside its call's range, equal to its chunk's Σv²; the
// number of 128-bit accesses equals what the layout allows (counted from the layout here, not
// by the kernel's own logic); a misaligned vector access aborts the test (kernel_body.h).
//
// What this cannot show: anything about the GPU memory model, warps running concurrently
// (a missing __syncthreads, a race), streams, real launch limits, the device's own float
// conversions and FMA contraction, or pow() on the device. test_cuda.cu does that on a GPU.
#define SAMA_COUNT_VECTOR_ACCESS 1
#include "core/kernel_body.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "test_common.h"

using namespace sama;
using namespace sama_test;

namespace {

// ---------------------------------------------------------------- the simulated reductions
// __shfl_down_sync(x, off) then x += it, for all 32 lanes at once: lanes past the warp's end
// read their own value.
void warp_tree(double* lane) {
  for (int off = 16; off > 0; off >>= 1) {
    double next[32];
    for (int l = 0; l < 32; ++l) next[l] = lane[l] + (l + off < 32 ? lane[l + off] : lane[l]);
    std::copy(next, next + 32, lane);
  }
}

// multi_tensor.cu's block_sum: each warp's tree, warp sums through shared memory, the tree
// again in warp 0; the result is thread 0's.
double block_sum(const std::vector<double>& per_thread) {
  const int n = int(per_thread.size());
  std::vector<double> x = per_thread;
  double shared[32];
  for (int w = 0; w < n / 32; ++w) {
    warp_tree(&x[size_t(w) * 32]);
    shared[w] = x[size_t(w) * 32];
  }
  double lane[32];
  for (int l = 0; l < 32; ++l) lane[l] = l < n / 32 ? shared[l] : 0.0;
  warp_tree(lane);
  return lane[0];
}

// sum_partials_kernel: thread t adds partials t, t + blockDim, ... then block_sum.
double sum_partials(const double* p, int64_t n) {
  std::vector<double> acc(size_t(kCudaThreads), 0.0);
  for (int t = 0; t < kCudaThreads; ++t)
    for (int64_t i = t; i < n; i += kCudaThreads) acc[size_t(t)] += p[i];
  return block_sum(acc);
}

// One launch: every block, every thread; the block's Σv² into partials[partial_base + block]
// (and, for the measured perturbations, the second sum into partials_b likewise).
template <typename Op, typename Tin, typename Tout>
void simulate_launch(const Meta<Op::kIn, Op::kOut>& meta, int n_blocks, const Op& op, const ScalarArg& s0,
                     const ScalarArg& s1, std::vector<double>* partials, std::vector<double>* partials_b,
                     long& double_writes) {
  using A = math_t<Tin>;
  std::vector<double> acc(size_t(kCudaThreads), 0.0), acc_b(size_t(kCudaThreads), 0.0);
  for (int b = 0; b < n_blocks; ++b) {
    const BlockWork w = block_work(meta, b);
    const auto ctx = block_context<Op, A>(op, w, s0, s1);  // thread 0's, shared with all
    for (int t = 0; t < kCudaThreads; ++t) {
      const Sums s = thread_sums<Op, Tin, Tout>(meta, op, ctx, w, t, kCudaThreads);
      acc[size_t(t)] = s.a;
      acc_b[size_t(t)] = s.b;
    }
    for (int k = 0; k < Op::kSums; ++k) {
      std::vector<double>& p = k == 0 ? *partials : *partials_b;
      const int64_t at = meta.partial_base + b;
      if (at < 0 || at >= int64_t(p.size())) {
        ++double_writes;
        continue;
      }
      if (!std::isnan(p[size_t(at)])) ++double_writes;
      p[size_t(at)] = block_sum(k == 0 ? acc : acc_b);
    }
  }
}

// ---------------------------------------------------------------- memory layout
// One buffer per list, 64-byte aligned, tensors at offsets with guard elements between them.
template <typename T> struct Buffer {
  std::unique_ptr<unsigned char[]> raw;
  T* data = nullptr;
  size_t n = 0;
  explicit Buffer(size_t count) : raw(new unsigned char[count * sizeof(T) + 64]), n(count) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw.get());
    data = reinterpret_cast<T*>(raw.get() + (64 - a % 64) % 64);
  }
  Buffer(const Buffer& o) : Buffer(o.n) { std::memcpy(data, o.data, n * sizeof(T)); }
};

enum class Phase { kAligned, kSameShift, kIndependent };

struct CaseDesc {
  const char* name;
  OpSpec spec;
  DType in, out;
  bool in_place = false;
  int sizes = 0;  // 0: the standard list; 1: a tensor split across launches by the block limit; 2: all empty
};

std::vector<int64_t> case_sizes(Rng& r, int kind) {
  if (kind == 2) return {0, 0, 0};
  if (kind == 1) {
    // 500 one-block tensors, then one of 600 blocks: the launch's 1024-block limit splits it
    std::vector<int64_t> s;
    for (int i = 0; i < 500; ++i) s.push_back(1 + r.below(40));
    s.push_back(599 * kCudaChunk + 1 + r.below(kCudaChunk - 1));
    for (int i = 0; i < 20; ++i) s.push_back(r.below(100));
    return s;
  }
  std::vector<int64_t> s{0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 511, 512, 513, 4095, 65535, 65536, 65537,
                         131071, 131073, 200001, 0, 1};
  while (s.size() < 720) s.push_back(r.chance(0.1) ? 0 : 1 + r.below(600));  // 720 > any launch's slots
  for (size_t i = s.size() - 1; i > 0; --i) std::swap(s[i], s[size_t(r.below(int64_t(i) + 1))]);
  return s;
}

template <typename Op, typename Tin, typename Tout>
void run_case(const Op& op, const CaseDesc& desc, uint64_t seed) {
  constexpr int W = kVecWidth<Tin, Tout>;
  char what[160];
  std::snprintf(what, sizeof what, "%s %s->%s%s", desc.name, StorageName<Tin>::value, StorageName<Tout>::value,
                desc.in_place ? " in-place" : "");
  Rng r(seed);
  const std::vector<int64_t> sizes = case_sizes(r, desc.sizes);
  const int64_t n = int64_t(sizes.size());
  constexpr int kGuard = 5;

  // offsets (in elements) of each tensor in each list's buffer
  std::vector<Phase> phase(size_t(n), Phase::kAligned);
  std::vector<std::vector<int64_t>> in_off(Op::kIn), out_off(Op::kOut);
  {
    std::vector<int64_t> in_total(Op::kIn, 0), out_total(Op::kOut, 0);
    for (int64_t t = 0; t < n; ++t) {
      const double u = r.uniform();
      phase[size_t(t)] = u < 0.55 ? Phase::kAligned : u < 0.85 ? Phase::kSameShift : Phase::kIndependent;
      const int64_t shift = 1 + r.below(W - 1 > 0 ? W - 1 : 1);
      auto place = [&](std::vector<int64_t>& off, int64_t& total) {
        int64_t o = (total + 7) / 8 * 8;  // 8 elements: 16 bytes of the narrowest type, a vector of any
        if (W > 1 && phase[size_t(t)] == Phase::kSameShift) o += shift;
        if (W > 1 && phase[size_t(t)] == Phase::kIndependent) o += r.below(W);
        off.push_back(o);
        total = o + sizes[size_t(t)] + kGuard;
      };
      for (int k = 0; k < Op::kIn; ++k) place(in_off[size_t(k)], in_total[size_t(k)]);
      for (int k = 0; k < Op::kOut; ++k) place(out_off[size_t(k)], out_total[size_t(k)]);
    }
    for (int k = 0; k < Op::kIn; ++k) in_off[size_t(k)].push_back(in_total[size_t(k)]);  // total at the end
    for (int k = 0; k < Op::kOut; ++k) out_off[size_t(k)].push_back(out_total[size_t(k)]);
  }
  std::vector<Buffer<Tin>> in;
  std::vector<Buffer<Tout>> out;
  for (int k = 0; k < Op::kIn; ++k) {
    in.emplace_back(size_t(in_off[size_t(k)].back()));
    std::fill(in.back().data, in.back().data + in.back().n, store<Tin>(-7.25));
  }
  for (int k = 0; k < Op::kOut; ++k) {
    out.emplace_back(size_t(out_off[size_t(k)].back()));
    std::fill(out.back().data, out.back().data + out.back().n, store<Tout>(-7.25));
  }
  {
    double x[8], y0[8];
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < sizes[size_t(t)]; ++i) {
        for (double& v : y0) v = 0.0;
        gen(op, r, x, y0);
        for (int k = 0; k < Op::kIn; ++k) in[size_t(k)].data[in_off[size_t(k)][size_t(t)] + i] = store<Tin>(x[k]);
        for (int k = 0; k < Op::kOut; ++k)
          out[size_t(k)].data[out_off[size_t(k)][size_t(t)] + i] =
              store<Tout>(Op::kLoadsOut ? y0[k] : std::numeric_limits<double>::quiet_NaN());
      }
  }
  std::vector<int64_t> ids;
  const bool with_ids = seed % 2 == 1;
  const int64_t n_ids = with_ids ? n + 3 : n;
  if (with_ids)
    for (int64_t t = 0; t < n; ++t) ids.push_back((t * 53 + 7) % n_ids);
  const Scalars sc = make_scalars<Op>(r, n_ids);

  // Two copies of the data: one for cpu_apply, one for the simulated kernel.
  struct Side {
    std::vector<Buffer<Tin>> in;
    std::vector<Buffer<Tout>> out;
    std::vector<const void*> in_ptr;
    std::vector<void*> out_ptr;
  };
  auto make_side = [&]() {
    Side s{in, out, {}, {}};
    s.in_ptr.resize(size_t(Op::kIn * n));
    s.out_ptr.resize(size_t(Op::kOut * n));
    for (int k = 0; k < Op::kIn; ++k)
      for (int64_t t = 0; t < n; ++t) s.in_ptr[size_t(k * n + t)] = s.in[size_t(k)].data + in_off[size_t(k)][size_t(t)];
    for (int k = 0; k < Op::kOut; ++k)
      for (int64_t t = 0; t < n; ++t)
        s.out_ptr[size_t(k * n + t)] = (desc.in_place && k == 0)
                                           ? const_cast<void*>(s.in_ptr[size_t(t)])
                                           : static_cast<void*>(s.out[size_t(k)].data + out_off[size_t(k)][size_t(t)]);
    return s;
  };
  Side cpu = make_side(), sim = make_side();
  auto lists_of = [&](Side& s) {
    Lists l;
    l.n_tensors = n;
    l.in = s.in_ptr.data();
    l.out = s.out_ptr.data();
    l.numel = sizes.data();
    l.tensor_id = with_ids ? ids.data() : nullptr;
    return l;
  };

  // ---- reference
  const Sums cpu_sums = cpu_apply_sums<Op, Tin, Tout>(op, lists_of(cpu), sc.s0, sc.s1,
                                                       [](int64_t b, int64_t e, const auto& fn) { fn(b, e); });
  const double cpu_sum = cpu_sums.a;

  // ---- the kernel's code over the simulated grid, launch by launch as run_typed does
  const Lists sl = lists_of(sim);
  const Plan plan = make_plan(sizes.data(), n, kCudaChunk, cuda_max_slots(Op::kIn + Op::kOut), kCudaMaxItems);
  const int64_t n_items = int64_t(plan.items.size());
  const int64_t partial_offset = 3, partial_tail = 2;
  std::vector<double> partials(size_t(partial_offset + n_items + partial_tail), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> partials_b = partials;
  long bad_partial_writes = 0;
  vector_accesses() = 0;
  auto meta = std::make_unique<Meta<Op::kIn, Op::kOut>>();
  for (const Launch& L : plan.launches) {
    fill_meta(*meta, sl, plan, L, partial_offset);
    simulate_launch<Op, Tin, Tout>(*meta, L.n_items, op, sc.s0, sc.s1, &partials, &partials_b, bad_partial_writes);
  }
  const int64_t vec_done = vector_accesses();
  const double sim_sum = Op::kReduces ? sum_partials(partials.data() + partial_offset, n_items) : 0.0;
  const double sim_sum_b = Op::kSums > 1 ? sum_partials(partials_b.data() + partial_offset, n_items) : 0.0;

  // ---- compare: every element of every buffer, guards included, bit for bit
  long bad = 0;
  auto report = [&](const char* list, int k, size_t i, double s, double c) {
    if (++bad <= 4) CHECK_MSG(false, "%s: %s %d at %zu: kernel body %.9g, cpu_apply %.9g", what, list, k, i, s, c);
  };
  for (int k = 0; k < Op::kIn; ++k)
    for (size_t i = 0; i < in[size_t(k)].n; ++i) {
      const Tin s = sim.in[size_t(k)].data[i], c = cpu.in[size_t(k)].data[i];
      if (!same_value(s, c)) report("input", k, i, as_double(s), as_double(c));
      if (!(desc.in_place && k == 0) && bits_of(s) != bits_of(in[size_t(k)].data[i]))
        report("input changed", k, i, as_double(s), as_double(in[size_t(k)].data[i]));
    }
  for (int k = 0; k < Op::kOut; ++k)
    for (size_t i = 0; i < out[size_t(k)].n; ++i) {
      const Tout s = sim.out[size_t(k)].data[i], c = cpu.out[size_t(k)].data[i];
      if (!same_value(s, c)) report("output", k, i, as_double(s), as_double(c));
    }
  // every output element written (outputs not loaded started as NaN; the functors here never
  // produce NaN from finite inputs except Axpy/AxpySave from a non-finite direction v)
  constexpr bool kNaNFree = !std::is_same<Op, Axpy>::value && !std::is_same<Op, AxpySave>::value && !Op::kIndexed;
  if (!Op::kLoadsOut && kNaNFree)
    for (int k = 0; k < Op::kOut; ++k) {
      const bool aliased = desc.in_place && k == 0;
      for (int64_t t = 0; t < n && !aliased; ++t)
        for (int64_t i = 0; i < sizes[size_t(t)]; ++i)
          if (is_nan(sim.out[size_t(k)].data[out_off[size_t(k)][size_t(t)] + i]) && ++bad <= 4)
            CHECK_MSG(false, "%s: out %d tensor %lld elem %lld never written", what, k, (long long)t, (long long)i);
    }
  CHECK_MSG(bad == 0, "%s: %ld mismatching elements", what, bad);

  // partials: one per block, written once, none outside [offset, offset + n_items)
  CHECK_MSG(bad_partial_writes == 0, "%s: %ld partials written twice or out of range", what, bad_partial_writes);
  for (int64_t i = 0; i < int64_t(partials.size()); ++i) {
    const bool inside = i >= partial_offset && i < partial_offset + n_items;
    const bool written = !std::isnan(partials[size_t(i)]);
    CHECK_MSG(written == (Op::kReduces && inside), "%s: partial %lld %s", what, (long long)i,
              written ? "written outside the call's range" : "not written");
    const bool written_b = !std::isnan(partials_b[size_t(i)]);
    CHECK_MSG(written_b == (Op::kSums > 1 && inside), "%s: second partial %lld %s", what, (long long)i,
              written_b ? "written outside the call's range" : "not written");
  }
  // Each partial is its own chunk's Σv²: where the stored output is v itself (fp32/fp64, not
  // in place over an input of another meaning), Σ(stored v)² over the chunk in long double.
  constexpr bool kStoresV = std::is_same<Tin, Tout>::value &&
                            (std::is_same<Tout, float>::value || std::is_same<Tout, double>::value);
  if (Op::kSums == 1 && kStoresV) {
    for (int64_t it = 0; it < n_items; ++it) {
      const WorkItem& wi = plan.items[size_t(it)];
      int64_t launch = 0;
      while (plan.launches[size_t(launch)].first_item + plan.launches[size_t(launch)].n_items <= it) ++launch;
      const int64_t t = plan.slots[size_t(plan.launches[size_t(launch)].first_slot + wi.slot)];
      int64_t b, e;
      item_range(plan, wi, sizes[size_t(t)], &b, &e);
      long double ref = 0.0L;
      for (int64_t i = b; i < e; ++i) {
        const long double v = (long double)as_double(cpu.out[0].data[out_off[0][size_t(t)] + i]);
        ref += v * v;
      }
      const double got = partials[size_t(partial_offset + it)];
      if (rel_diff(got, double(ref)) > 1e-12 && ++bad <= 4)
        CHECK_MSG(false, "%s: partial of block %lld (tensor %lld, chunk %d) %.17g vs its chunk's Σv² %.17g", what,
                  (long long)it, (long long)t, wi.chunk, got, double(ref));
    }
  }
  if (Op::kSums > 1) {  // Σ (θ_new − θ_src)·v: same terms, another order; the count is exact
    const double d = rel_diff(sim_sum, cpu_sum);
    CHECK_MSG(d <= 1e-12, "%s: simulated dot %.17g vs cpu_apply %.17g (rel %.3g)", what, sim_sum, cpu_sum, d);
    CHECK_MSG(sim_sum_b == cpu_sums.b, "%s: simulated count %.17g vs cpu_apply %.17g", what, sim_sum_b, cpu_sums.b);
    CHECK_MSG(n_items == 0 || (cpu_sums.b > 0 && cpu_sums.b < double(n_items) * kCudaChunk),
              "%s: degenerate count %g", what, cpu_sums.b);
  } else if (Op::kReduces) {
    const double d = rel_diff(sim_sum, cpu_sum);
    CHECK_MSG(d <= 1e-12, "%s: simulated Σv² %.17g vs cpu_apply %.17g (rel %.3g)", what, sim_sum, cpu_sum, d);
    CHECK_MSG(n_items == 0 ? sim_sum == 0.0 : std::isfinite(sim_sum) && sim_sum > 0, "%s: degenerate sum %g", what,
              sim_sum);
  }

  // 128-bit accesses: from the layout alone, the chunks whose lists share one phase do
  // floor((len - head) / W) vectors per list access (loads of inputs, of outputs when the op
  // reads them, stores of outputs).
  int64_t vec_want = 0;
  constexpr int kAccessPerVec = Op::kIn + Op::kOut * (Op::kLoadsOut ? 2 : 1);
  for (int64_t t = 0; t < n; ++t) {
    auto mis_of = [&](int64_t o) { return int(o % W); };
    const int64_t in0 = in_off[0][size_t(t)];
    bool same = true;
    for (int k = 0; k < Op::kIn; ++k) same &= mis_of(in_off[size_t(k)][size_t(t)]) == mis_of(in0);
    for (int k = 0; k < Op::kOut; ++k) {
      const int64_t o = (desc.in_place && k == 0) ? in0 : out_off[size_t(k)][size_t(t)];
      same &= mis_of(o) == mis_of(in0);
    }
    if (!same) continue;
    const int head = (W - mis_of(in0)) % W;
    for (int64_t b = 0; b < sizes[size_t(t)]; b += kCudaChunk) {
      const int64_t len = std::min<int64_t>(kCudaChunk, sizes[size_t(t)] - b);
      if (head < len) vec_want += (len - head) / W * kAccessPerVec;
    }
  }
  CHECK_MSG(vec_done == vec_want, "%s: %lld 128-bit accesses, the layout allows %lld", what, (long long)vec_done,
            (long long)vec_want);

  std::printf("  %-36s %4lld tensors %2zu launches %5lld blocks %9lld vector accesses: %s\n", what, (long long)n,
              plan.launches.size(), (long long)n_items, (long long)vec_done, bad ? "FAILED" : "ok");
  std::fflush(stdout);
}

void run_desc(const CaseDesc& d, uint64_t seed) {
  with_functor(d.spec, [&](auto op) {
    with_types<decltype(op)>(d.in, d.out, [&](auto tin, auto tout) {
      using Tin = typename decltype(tin)::type;
      using Tout = typename decltype(tout)::type;
      run_case<decltype(op), Tin, Tout>(op, d, seed);
    });
  });
}

OpSpec spec_of(Kernel k, bool a, bool b, std::initializer_list<double> h, int safeguard = kSafeguardNone,
               int decay = kNoDecay) {
  OpSpec s;
  s.kernel = k;
  s.flag_a = a;
  s.flag_b = b;
  int i = 0;
  for (double v : h) s.h[i++] = v;
  s.safeguard = safeguard;
  s.decay = decay;
  return s;
}

// Unit checks of the simulated reductions against plain sums (they must be sums at all,
// whatever their order), and of head_of.
void test_pieces() {
  Rng r(5);
  for (int n_threads : {32, 64, 512}) {
    std::vector<double> x(size_t(n_threads), 0.0);
    long double ref = 0.0L;
    for (double& v : x) {
      v = r.uniform(0, 4);
      ref += v;
    }
    CHECK_MSG(rel_diff(block_sum(x), double(ref)) <= 1e-14, "block_sum of %d threads", n_threads);
  }
  std::vector<double> p(3000);
  long double ref = 0.0L;
  for (double& v : p) {
    v = r.uniform(0, 4);
    ref += v;
  }
  CHECK(rel_diff(sum_partials(p.data(), 3000), double(ref)) <= 1e-14);
  CHECK(sum_partials(p.data(), 0) == 0.0);
  alignas(16) float f[8] = {};
  CHECK(head_of<4>(f) == 0 && head_of<4>(f + 1) == 3 && head_of<4>(f + 3) == 1 && head_of<4>(f + 4) == 0);
  alignas(16) uint16_t h[16] = {};
  CHECK(head_of<8>(reinterpret_cast<bf16*>(h) + 5) == 3);
  CHECK(head_of<4>(reinterpret_cast<const float*>(reinterpret_cast<const char*>(f) + 2)) == -1);
}

void test_kernel_body() {
  const DType all[] = {DType::f32, DType::f64, DType::bf16, DType::f16};
  std::vector<CaseDesc> cases;
  auto all_types = [&](const char* name, OpSpec s) {
    for (DType t : all) cases.push_back(CaseDesc{name, s, t, t});
  };
  //                                                  β1   β2     eps   wd    sign
  all_types("AdamDiag<0,0>", spec_of(Kernel::kAdam, false, false, {0.9, 0.999, 1e-6, 0.0, 1.0}));
  all_types("AdamDiag<0,1>", spec_of(Kernel::kAdam, false, true, {0.9, 0.999, 1e-6, 0.01, -1.0}));
  all_types("AdamDiag<1,0>", spec_of(Kernel::kAdam, true, false, {0.9, 0.999, 1e-6, 0.0, 1.0}, kSafeguardZeroUnseen));
  all_types("AdamDiag<1,1>", spec_of(Kernel::kAdam, true, true, {0.9, 0.999, 1e-6, 0.01, -1.0}));
  all_types("ConstDiag", spec_of(Kernel::kConst, false, false, {-0.9}));
  //                                                    centered   α     eps   wd    sign
  all_types("RmspropDiag<0,0>", spec_of(Kernel::kRmsprop, false, false, {0.99, 1e-6, 0.0, 1.0}));
  all_types("RmspropDiag<0,1>", spec_of(Kernel::kRmsprop, false, false, {0.99, 1e-6, 0.01, -1.0}, kSafeguardZeroUnseen,
                                        kDecayPlain));
  all_types("RmspropDiag<0,2>", spec_of(Kernel::kRmsprop, false, false, {0.99, 1e-6, 0.01, 1.0}, kSafeguardNone,
                                        kDecayMomentum));
  all_types("RmspropDiag<1,0>", spec_of(Kernel::kRmsprop, true, false, {0.99, 1e-6, 0.0, 1.0}));
  all_types("RmspropDiag<1,1>", spec_of(Kernel::kRmsprop, true, false, {0.99, 1e-6, 0.01, 1.0}, kSafeguardNone,
                                        kDecayPlain));
  all_types("RmspropDiag<1,2>", spec_of(Kernel::kRmsprop, true, false, {0.99, 1e-6, 0.01, -1.0}, kSafeguardNone,
                                        kDecayMomentum));
  //                                                        decay eps   wd    sign
  all_types("AdagradDiag<0>", spec_of(Kernel::kAdagrad, false, false, {0.01, 1e-8, 0.0, 1.0}));
  all_types("AdagradDiag<1>", spec_of(Kernel::kAdagrad, false, true, {0.01, 1e-8, 0.02, -1.0}, kSafeguardZeroUnseen));
  all_types("Axpy", spec_of(Kernel::kAxpy, false, false, {}));
  all_types("AxpySave", spec_of(Kernel::kAxpySave, false, false, {}));
  for (bool sr : {false, true}) {  // measured perturbations, round-to-nearest and stochastic
    OpSpec m = spec_of(Kernel::kPerturbMeasured, sr, false, {});
    m.seed = 0x0123456789abcdefull;
    m.offset = 77;
    all_types(sr ? "PerturbMeasured<0> stochastic" : "PerturbMeasured<0>", m);
    m.kernel = Kernel::kPerturbSaveMeasured;
    all_types(sr ? "PerturbMeasured<1> stochastic" : "PerturbMeasured<1>", m);
    for (DType t : all) {
      CaseDesc d{sr ? "PerturbMeasured<0> stochastic" : "PerturbMeasured<0>", m, t, t};
      d.spec.kernel = Kernel::kPerturbMeasured;
      d.in_place = true;
      cases.push_back(d);
    }
  }
  all_types("Combine<0>", spec_of(Kernel::kCombine, false, false, {}));
  all_types("Combine<1>", spec_of(Kernel::kCombine, true, false, {}));
  for (bool acc : {false, true})  // fp32/fp64 results into 16-bit buffers (compressed communication)
    for (DType i : {DType::f32, DType::f64})
      for (DType o : {DType::bf16, DType::f16})
        cases.push_back(CaseDesc{acc ? "Combine<1>" : "Combine<0>", spec_of(Kernel::kCombine, acc, false, {}), i, o});
  for (DType t : all) {  // θ += a·v in place (out aliases the first input)
    CaseDesc d{"Axpy", spec_of(Kernel::kAxpy, false, false, {}), t, t};
    d.in_place = true;
    cases.push_back(d);
  }
  {
    CaseDesc d{"ConstDiag (block limit)", spec_of(Kernel::kConst, false, false, {0.3}), DType::bf16, DType::bf16};
    d.sizes = 1;
    cases.push_back(d);
    d = CaseDesc{"AdamDiag<1,1> (all empty)", spec_of(Kernel::kAdam, true, true, {0.9, 0.999, 1e-6, 0.01, 1.0}),
                 DType::f32, DType::f32};
    d.sizes = 2;
    cases.push_back(d);
  }
  uint64_t seed = 2000;
  for (const CaseDesc& d : cases) run_desc(d, seed++);
}

}  // namespace

int main() {
#if !defined(SAMA_TEST_FP_CONTRACT_OFF)
  std::printf("test_kernel_host: must be built with -ffp-contract=off (CMakeLists.txt does)\n");
  return 1;
#endif
  try {
    std::printf("[simulated reductions]\n");
    test_pieces();
    std::printf("[kernel body on a simulated grid vs cpu_apply]\n");
    test_kernel_body();
  } catch (const std::exception& e) {
    CHECK_MSG(false, "exception: %s", e.what());
  }
  return summary("test_kernel_host");
}
