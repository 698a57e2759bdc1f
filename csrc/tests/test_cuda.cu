// The CUDA launcher (csrc/cuda/multi_tensor.cu: cuda_run, cuda_sum_partials) against the CPU
// loop (cpu_apply.h) on the same random inputs: every functor, every storage type, hundreds
// of tensors of odd sizes (several launches), 64K-chunk boundaries, a tensor split across
// launches, sub-pointers misaligned alike in every list (scalar prologue, then 128-bit access)
// or out of phase (the scalar path), per-tensor device scalars. Usage: sama_test_cuda [quick].
//
// What must agree exactly: Axpy, AxpySave, Combine and ConstDiag outputs (explicit fma or a
// lone multiply/subtract, exactly rounded on both sides; the 16-bit conversions are RNE on
// both; NaN payloads may differ). The adapt diagonals (Adam, RMSprop, Adagrad) agree to
// rounding only: nvcc and the host compiler fuse a*b+c into FMAs in different places, and
// device pow() may differ from glibc's by an ulp. Reductions: to 1e-9 relative where the
// elements agree exactly or the math is fp64; otherwise to 1e-5 — and, for fp32/fp64 storage,
// to 1e-9 against Σ(device output)² squared in double, which is what the device sums.
// Outputs the op does not read start as NaN, so an element left unwritten cannot pass.
//
// No GPU: prints why and exits with 77 (ctest: SKIP_RETURN_CODE 77).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "core/cuda_api.h"
#include "test_common.h"

using namespace sama;
using namespace sama_test;

namespace {

#define CUDA_OK(expr)                                                                                   \
  do {                                                                                                  \
    const cudaError_t err_ = (expr);                                                                    \
    if (err_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                     \
    }                                                                                                   \
  } while (0)

template <typename T> struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { CUDA_OK(cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T))); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), n(o.n) { o.ptr = nullptr; }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void upload(const std::vector<T>& h) { CUDA_OK(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

// Which functors the device must reproduce bit for bit (see the header comment).
template <typename Op> using ExactOnDevice = ContractionFree<Op>;

struct CaseDesc {
  const char* name;
  OpSpec spec;
  DType in, out;
  bool in_place = false;  // Axpy: y aliases x
  bool big = false;       // one tensor of > kCudaMaxItems chunks: split across launches
};

std::vector<int64_t> gpu_sizes(Rng& r, bool big) {
  std::vector<int64_t> s{0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 511, 512, 513, 4095, 65535, 65536, 65537,
                         131071, 131073, 200001, 0, 1};
  const size_t n = big ? 120 : 720;  // 720 > any launch's slot budget: several launches
  while (s.size() < n) s.push_back(r.chance(0.1) ? 0 : 1 + r.below(3000));
  for (size_t i = s.size() - 1; i > 0; --i) std::swap(s[i], s[size_t(r.below(int64_t(i) + 1))]);
  if (big) s.insert(s.begin() + 60, int64_t(kCudaMaxItems + 77) * kCudaChunk + 12345);
  return s;
}

template <typename Op, typename Tin, typename Tout>
void run_case(const Op& op, const CaseDesc& desc, uint64_t seed) {
  using A = math_t<Tin>;
  char what[160];
  std::snprintf(what, sizeof what, "%s %s->%s%s%s", desc.name, StorageName<Tin>::value, StorageName<Tout>::value,
                desc.in_place ? " in-place" : "", desc.big ? " big" : "");
  Rng r(seed);
  const std::vector<int64_t> sizes = gpu_sizes(r, desc.big);
  const int64_t n = int64_t(sizes.size());
  constexpr int kGuard = 5;
  constexpr int W_in = 16 / int(sizeof(Tin)), W_out = 16 / int(sizeof(Tout));

  // Layout: per list, tensors at 16-byte aligned offsets; some shifted by the same few elements
  // in every list (as DDP bucket views: the kernel's scalar prologue, then 128-bit access), some
  // shifted independently per list (out of phase: the scalar path).
  constexpr int W_kernel = 16 / int(sizeof(Tin) > sizeof(Tout) ? sizeof(Tin) : sizeof(Tout));
  std::vector<int> common_shift(size_t(n), 0), independent(size_t(n), 0);
  for (int64_t t = 0; t < n; ++t) {
    const double u = r.uniform();
    if (u < 0.25 && W_kernel > 1) common_shift[size_t(t)] = int(1 + r.below(W_kernel - 1));
    else if (u < 0.45) independent[size_t(t)] = 1;
  }
  std::vector<std::vector<int64_t>> in_off(Op::kIn), out_off(Op::kOut);
  std::vector<int64_t> in_total(Op::kIn, 0), out_total(Op::kOut, 0);
  auto place = [&](std::vector<int64_t>& off, int64_t& total, int W) {
    for (int64_t t = 0; t < n; ++t) {
      int64_t o = (total + 15) / 16 * 16 + common_shift[size_t(t)];
      if (W > 1 && independent[size_t(t)]) o += 1 + r.below(W - 1);
      off.push_back(o);
      total = o + sizes[size_t(t)] + kGuard;
    }
  };
  for (int k = 0; k < Op::kIn; ++k) place(in_off[size_t(k)], in_total[size_t(k)], W_in);
  for (int k = 0; k < Op::kOut; ++k) place(out_off[size_t(k)], out_total[size_t(k)], W_out);

  std::vector<std::vector<Tin>> in(Op::kIn);
  std::vector<std::vector<Tout>> out(Op::kOut);
  for (int k = 0; k < Op::kIn; ++k) in[size_t(k)].assign(size_t(in_total[size_t(k)]), store<Tin>(-7.25));
  for (int k = 0; k < Op::kOut; ++k) out[size_t(k)].assign(size_t(out_total[size_t(k)]), store<Tout>(-7.25));
  {
    double x[8], y0[8];
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < sizes[size_t(t)]; ++i) {
        for (double& v : y0) v = 0.0;
        gen(op, r, x, y0);
        for (int k = 0; k < Op::kIn; ++k) in[size_t(k)][size_t(in_off[size_t(k)][size_t(t)] + i)] = store<Tin>(x[k]);
        // outputs the op does not read start as NaN: an element it fails to write shows up
        for (int k = 0; k < Op::kOut; ++k)
          out[size_t(k)][size_t(out_off[size_t(k)][size_t(t)] + i)] =
              store<Tout>(Op::kLoadsOut ? y0[k] : std::numeric_limits<double>::quiet_NaN());
      }
  }
  std::vector<int64_t> ids;
  const bool with_ids = seed % 2 == 1;
  const int64_t n_ids = with_ids ? n + 3 : n;
  if (with_ids)
    for (int64_t t = 0; t < n; ++t) ids.push_back((t * 53 + 7) % n_ids);
  Scalars sc = make_scalars<Op>(r, n_ids);

  // ---- CPU reference on host copies
  std::vector<std::vector<Tin>> hin = in;
  std::vector<std::vector<Tout>> hout = out;
  std::vector<const void*> h_in_ptr(size_t(Op::kIn * n));
  std::vector<void*> h_out_ptr(size_t(Op::kOut * n));
  for (int k = 0; k < Op::kIn; ++k)
    for (int64_t t = 0; t < n; ++t) h_in_ptr[size_t(k * n + t)] = hin[size_t(k)].data() + in_off[size_t(k)][size_t(t)];
  for (int k = 0; k < Op::kOut; ++k)
    for (int64_t t = 0; t < n; ++t)
      h_out_ptr[size_t(k * n + t)] = (desc.in_place && k == 0)
                                         ? const_cast<void*>(h_in_ptr[size_t(t)])
                                         : static_cast<void*>(hout[size_t(k)].data() + out_off[size_t(k)][size_t(t)]);
  Lists hl;
  hl.n_tensors = n;
  hl.in = h_in_ptr.data();
  hl.out = h_out_ptr.data();
  hl.numel = sizes.data();
  hl.tensor_id = with_ids ? ids.data() : nullptr;
  const Sums cpu_sums =
      cpu_apply_sums<Op, Tin, Tout>(op, hl, sc.s0, sc.s1, [](int64_t b, int64_t e, const auto& fn) { fn(b, e); });
  const double cpu_sum = cpu_sums.a;

  // ---- device
  std::vector<DeviceBuffer<Tin>> din;
  std::vector<DeviceBuffer<Tout>> dout;
  for (int k = 0; k < Op::kIn; ++k) {
    din.emplace_back(in[size_t(k)].size());
    din.back().upload(in[size_t(k)]);
  }
  for (int k = 0; k < Op::kOut; ++k) {
    dout.emplace_back(out[size_t(k)].size());
    dout.back().upload(out[size_t(k)]);
  }
  std::vector<const void*> d_in_ptr(size_t(Op::kIn * n));
  std::vector<void*> d_out_ptr(size_t(Op::kOut * n));
  for (int k = 0; k < Op::kIn; ++k)
    for (int64_t t = 0; t < n; ++t) d_in_ptr[size_t(k * n + t)] = din[size_t(k)].ptr + in_off[size_t(k)][size_t(t)];
  for (int k = 0; k < Op::kOut; ++k)
    for (int64_t t = 0; t < n; ++t)
      d_out_ptr[size_t(k * n + t)] = (desc.in_place && k == 0)
                                         ? const_cast<void*>(d_in_ptr[size_t(t)])
                                         : static_cast<void*>(dout[size_t(k)].ptr + out_off[size_t(k)][size_t(t)]);
  DeviceBuffer<double> d_a(sc.a.size()), d_b(sc.b.size());
  d_a.upload(sc.a);
  d_b.upload(sc.b);
  ScalarArg ds0 = sc.s0, ds1 = sc.s1;
  if (ds0.ptr) ds0.ptr = d_a.ptr;
  if (ds1.ptr) ds1.ptr = d_b.ptr;

  const Plan plan = make_plan(sizes.data(), n, kCudaChunk, cuda_max_slots(Op::kIn + Op::kOut), kCudaMaxItems);
  const int64_t n_items = int64_t(plan.items.size());
  const int64_t partial_offset = 3, partial_tail = 2;
  const std::vector<double> sentinel(size_t(partial_offset + n_items + partial_tail),
                                     std::numeric_limits<double>::quiet_NaN());
  DeviceBuffer<double> d_partials(sentinel.size()), d_partials_b(sentinel.size()), d_sum(2);
  d_partials.upload(sentinel);
  d_partials_b.upload(sentinel);

  CudaCall call;
  call.spec = desc.spec;
  call.in_dtype = desc.in;
  call.out_dtype = desc.out;
  call.lists.n_tensors = n;
  call.lists.in = d_in_ptr.data();
  call.lists.out = d_out_ptr.data();
  call.lists.numel = sizes.data();
  call.lists.tensor_id = with_ids ? ids.data() : nullptr;
  call.s0 = ds0;
  call.s1 = ds1;
  call.plan = &plan;
  call.partials = Op::kReduces ? d_partials.ptr : nullptr;  // non-reducing ops must not touch it
  call.partials_b = Op::kSums > 1 ? d_partials_b.ptr : nullptr;
  call.partial_offset = partial_offset;
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cuda_run(call, stream);
  if (Op::kReduces) cuda_sum_partials(d_partials.ptr + partial_offset, n_items, d_sum.ptr, stream);
  if (Op::kSums > 1) cuda_sum_partials(d_partials_b.ptr + partial_offset, n_items, d_sum.ptr + 1, stream);
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaStreamDestroy(stream));

  // ---- compare
  const std::vector<double> partials = d_partials.download(), partials_b = d_partials_b.download();
  const double gpu_sum = d_sum.download()[0], gpu_sum_b = d_sum.download()[1];
  std::vector<std::vector<Tin>> gin;
  std::vector<std::vector<Tout>> gout;
  for (auto& b : din) gin.push_back(b.download());
  for (auto& b : dout) gout.push_back(b.download());

  long bad = 0, inexact = 0;
  double max_rel = 0.0;
  // Σ(device v)² in double: the device's own reduction up to summation order, where the
  // stored output is v itself (fp32/fp64 storage)
  constexpr bool kStoresV = std::is_same<Tin, Tout>::value &&
                            (std::is_same<Tout, float>::value || std::is_same<Tout, double>::value);
  double sumsq_gpu_out = 0.0;
  for (int k = 0; k < Op::kOut; ++k) {
    const bool aliased = desc.in_place && k == 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t numel = sizes[size_t(t)];
      const int64_t off = aliased ? in_off[0][size_t(t)] : out_off[size_t(k)][size_t(t)];
      auto cpu_at = [&](int64_t i) -> Tout {
        if constexpr (std::is_same<Tin, Tout>::value) {
          if (aliased) return hin[0][size_t(off + i)];
        }
        return hout[size_t(k)][size_t(off + i)];
      };
      auto gpu_at = [&](int64_t i) -> Tout {
        if constexpr (std::is_same<Tin, Tout>::value) {
          if (aliased) return gin[0][size_t(off + i)];
        }
        return gout[size_t(k)][size_t(off + i)];
      };
      double scale = 0.0;
      if (!ExactOnDevice<Op>::value) {
        std::vector<double> vals;
        for (int64_t i = 0; i < numel; ++i) vals.push_back(as_double(cpu_at(i)));
        scale = median_abs(std::move(vals));
      }
      for (int64_t i = 0; i < numel + kGuard; ++i) {
        const Tout c = cpu_at(i), g = gpu_at(i);
        const bool guard = i >= numel;
        if (!guard && k == 0 && Op::kSums == 1 && kStoresV) sumsq_gpu_out += as_double(g) * as_double(g);
        if (same_value(c, g)) continue;
        bool ok = false;
        if (!ExactOnDevice<Op>::value && !guard) {
          ++inexact;
          const double cd = as_double(c), gd = as_double(g);
          ok = close_to(g, c, std::is_same<A, double>::value ? 1e-10 : 1e-4, scale);
          if (std::isfinite(cd) && cd != 0) max_rel = std::max(max_rel, std::fabs(cd - gd) / std::fabs(cd));
        }
        if (!ok && ++bad <= 4)
          CHECK_MSG(false, "%s: out %d tensor %lld (numel %lld) elem %lld%s: device %.9g, cpu %.9g", what, k,
                    (long long)t, (long long)numel, (long long)i, guard ? " (guard)" : "", as_double(g),
                    as_double(c));
      }
    }
  }
  // inputs untouched (except an aliased output), guards included
  for (int k = 0; k < Op::kIn; ++k) {
    if (desc.in_place && k == 0) continue;
    for (size_t i = 0; i < in[size_t(k)].size(); ++i)
      if (bits_of(gin[size_t(k)][i]) != bits_of(in[size_t(k)][i]) && ++bad <= 4)
        CHECK_MSG(false, "%s: device changed input %d at %zu", what, k, i);
  }
  CHECK_MSG(bad == 0, "%s: %ld mismatching elements", what, bad);

  // partials: one per work item, nothing written outside [offset, offset + n_items)
  for (int64_t i = 0; i < int64_t(partials.size()); ++i) {
    const bool inside = i >= partial_offset && i < partial_offset + n_items;
    const bool written = !std::isnan(partials[size_t(i)]);
    if (Op::kReduces && inside) CHECK_MSG(written, "%s: partial %lld not written", what, (long long)i);
    else CHECK_MSG(!written, "%s: partial %lld written outside this call's range", what, (long long)i);
    const bool written_b = !std::isnan(partials_b[size_t(i)]);
    if (Op::kSums > 1 && inside) CHECK_MSG(written_b, "%s: second partial %lld not written", what, (long long)i);
    else CHECK_MSG(!written_b, "%s: second partial %lld written outside this call's range", what, (long long)i);
  }
  if (Op::kSums > 1) {  // measured perturbations: the same elements (checked above), summed in another order
    CHECK_MSG(rel_diff(gpu_sum, cpu_sum) <= 1e-9, "%s: device dot %.17g vs cpu %.17g", what, gpu_sum, cpu_sum);
    CHECK_MSG(gpu_sum_b == cpu_sums.b && cpu_sums.b > 0, "%s: device count %.17g vs cpu %.17g", what, gpu_sum_b,
              cpu_sums.b);
  } else if (Op::kReduces) {
    const bool exact = ExactOnDevice<Op>::value || std::is_same<A, double>::value;
    const double d_cpu = rel_diff(gpu_sum, cpu_sum);
    CHECK_MSG(d_cpu <= (exact ? 1e-9 : 1e-5), "%s: device sum %.17g vs cpu %.17g (rel %.3g)", what, gpu_sum, cpu_sum,
              d_cpu);
    if (kStoresV)
      CHECK_MSG(rel_diff(gpu_sum, sumsq_gpu_out) <= 1e-9, "%s: device sum %.17g vs Σ(device v)² %.17g", what,
                gpu_sum, sumsq_gpu_out);
    CHECK_MSG(std::isfinite(cpu_sum) && cpu_sum > 0, "%s: degenerate sum", what);
  }
  std::printf("  %-40s %4lld tensors %3zu launches %5lld blocks: %s", what, (long long)n, plan.launches.size(),
              (long long)n_items, bad ? "FAILED" : "ok");
  if (!ExactOnDevice<Op>::value) std::printf(" (%ld elements differ by rounding, max rel %.2g)", inexact, max_rel);
  std::printf("\n");
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

OpSpec spec_of(Kernel k, bool a, bool b, std::initializer_list<double> h, int safeguard = kSafeguardNone) {
  OpSpec s;
  s.kernel = k;
  s.flag_a = a;
  s.flag_b = b;
  int i = 0;
  for (double v : h) s.h[i++] = v;
  s.safeguard = safeguard;
  return s;
}

OpSpec rmsprop_spec(bool centered, std::initializer_list<double> h, int decay, int safeguard = kSafeguardNone) {
  OpSpec s = spec_of(Kernel::kRmsprop, centered, false, h, safeguard);
  s.decay = decay;
  return s;
}

// quick: fp32 and bf16 only, no split-across-launches tensor (for compute-sanitizer, whose
// instrumentation makes every access many times slower).
void test_launcher(bool quick) {
  const DType all[] = {DType::f32, DType::f64, DType::bf16, DType::f16};
  std::vector<CaseDesc> cases;
  auto all_types = [&](const char* name, OpSpec s) {
    for (DType t : all)
      if (!quick || t == DType::f32 || t == DType::bf16) cases.push_back(CaseDesc{name, s, t, t});
  };
  //                                                  β1   β2     eps   wd    sign
  all_types("AdamDiag<0,0>", spec_of(Kernel::kAdam, false, false, {0.9, 0.999, 1e-6, 0.0, 1.0}));
  all_types("AdamDiag<0,1>", spec_of(Kernel::kAdam, false, true, {0.9, 0.999, 1e-6, 0.01, -1.0}));
  all_types("AdamDiag<1,0>", spec_of(Kernel::kAdam, true, false, {0.9, 0.999, 1e-6, 0.0, 1.0}, kSafeguardZeroUnseen));
  all_types("AdamDiag<1,1>", spec_of(Kernel::kAdam, true, true, {0.9, 0.999, 1e-6, 0.01, -1.0}));
  all_types("ConstDiag", spec_of(Kernel::kConst, false, false, {-0.9}));
  //                                             centered   α     eps   wd    sign     decay
  all_types("RmspropDiag<0,0>", rmsprop_spec(false, {0.99, 1e-6, 0.0, 1.0}, kNoDecay));
  all_types("RmspropDiag<0,1>", rmsprop_spec(false, {0.99, 1e-6, 0.01, -1.0}, kDecayPlain, kSafeguardZeroUnseen));
  all_types("RmspropDiag<0,2>", rmsprop_spec(false, {0.99, 1e-6, 0.01, 1.0}, kDecayMomentum));
  all_types("RmspropDiag<1,0>", rmsprop_spec(true, {0.99, 1e-6, 0.0, 1.0}, kNoDecay));
  all_types("RmspropDiag<1,1>", rmsprop_spec(true, {0.99, 1e-6, 0.01, 1.0}, kDecayPlain));
  all_types("RmspropDiag<1,2>", rmsprop_spec(true, {0.99, 1e-6, 0.01, -1.0}, kDecayMomentum));
  //                                                        decay eps   wd    sign
  all_types("AdagradDiag<0>", spec_of(Kernel::kAdagrad, false, false, {0.01, 1e-8, 0.0, 1.0}));
  all_types("AdagradDiag<1>", spec_of(Kernel::kAdagrad, false, true, {0.01, 1e-8, 0.02, -1.0}, kSafeguardZeroUnseen));
  all_types("Axpy", spec_of(Kernel::kAxpy, false, false, {}));
  all_types("AxpySave", spec_of(Kernel::kAxpySave, false, false, {}));
  for (bool sr : {false, true}) {  // measured perturbations: device bits equal the CPU's, stochastic included
    OpSpec m = spec_of(Kernel::kPerturbMeasured, sr, false, {});
    m.seed = 0xfedcba9876543210ull;
    m.offset = 3;
    all_types(sr ? "PerturbMeasured<0> stochastic" : "PerturbMeasured<0>", m);
    m.kernel = Kernel::kPerturbSaveMeasured;
    all_types(sr ? "PerturbMeasured<1> stochastic" : "PerturbMeasured<1>", m);
  }
  all_types("Combine<0>", spec_of(Kernel::kCombine, false, false, {}));
  all_types("Combine<1>", spec_of(Kernel::kCombine, true, false, {}));
  for (bool acc : {false, true})  // fp32/fp64 results into 16-bit buffers
    for (DType i : {DType::f32, DType::f64})
      for (DType o : {DType::bf16, DType::f16})
        cases.push_back(CaseDesc{acc ? "Combine<1>" : "Combine<0>", spec_of(Kernel::kCombine, acc, false, {}), i, o});
  for (DType t : {DType::f32, DType::bf16}) {
    CaseDesc d{"Axpy", spec_of(Kernel::kAxpy, false, false, {}), t, t};
    d.in_place = true;
    cases.push_back(d);
  }
  if (!quick) {
    CaseDesc d{"ConstDiag", spec_of(Kernel::kConst, false, false, {0.3}), DType::f32, DType::f32};
    d.big = true;
    cases.push_back(d);
    d = CaseDesc{"Axpy", spec_of(Kernel::kAxpy, false, false, {}), DType::bf16, DType::bf16};
    d.big = true;
    cases.push_back(d);
  }
  uint64_t seed = 1000;
  for (const CaseDesc& d : cases) run_desc(d, seed++);
}

void test_sum_partials() {
  Rng r(77);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(31), int64_t(513), int64_t(100003)}) {
    std::vector<double> h(static_cast<size_t>(n));
    for (double& v : h) v = r.uniform(0, 10) * std::exp2(double(r.below(20)));
    double ref = 0.0;
    for (double v : h) ref += v;
    DeviceBuffer<double> d(h.size()), out(1);
    if (n) d.upload(h);
    double first = 0.0;
    for (int rep = 0; rep < 2; ++rep) {
      cuda_sum_partials(d.ptr, n, out.ptr, stream);
      CUDA_OK(cudaStreamSynchronize(stream));
      const double got = out.download()[0];
      CHECK_MSG(rel_diff(got, ref) <= 1e-12, "sum_partials n=%lld: %.17g vs %.17g", (long long)n, got, ref);
      if (rep == 0) first = got;
      else CHECK_MSG(bits_of(got) == bits_of(first), "sum_partials n=%lld not deterministic", (long long)n);
    }
  }
  CUDA_OK(cudaStreamDestroy(stream));
}

}  // namespace

// Usage: sama_test_cuda [quick]
int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("test_cuda: skipped: no usable CUDA device (%s)\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount returned 0");
    return 77;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("test_cuda: device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  try {
    std::printf("[cuda_sum_partials]\n");
    test_sum_partials();
    std::printf("[cuda_run vs cpu_apply]\n");
    test_launcher(quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_cuda: exception: %s\n", e.what());
    if (std::string(e.what()).find("no kernel image") != std::string::npos)
      std::fprintf(stderr, "test_cuda: the kernels were not built for sm_%d%d: reconfigure with "
                           "-DCMAKE_CUDA_ARCHITECTURES=%d%d\n", prop.major, prop.minor, prop.major, prop.minor);
    return 1;
  }
  return summary("test_cuda");
}
