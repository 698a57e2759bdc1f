// The pybind11 face of the extension: every op of SAMA_EXT_OPS (called through the
// dispatcher, so CPU/CUDA selection is the dispatcher's) and its argument check alone
// (check_<op>), plus build facts and the launch planner for host-side tests of the CUDA
// bookkeeping.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "core/cuda_api.h"
#include "ops_impl.h"

namespace py = pybind11;

namespace {

// Python passes lists; the op signatures take ArrayRefs over them.
template <typename T> struct PyArg { using type = T; };
template <> struct PyArg<at::TensorList> { using type = std::vector<at::Tensor>; };
template <> struct PyArg<const std::optional<at::Tensor>&> { using type = std::optional<at::Tensor>; };
template <> struct PyArg<const at::Tensor&> { using type = at::Tensor; };
template <> struct PyArg<c10::ArrayRef<double>> { using type = std::vector<double>; };

template <typename Sig> struct ViaDispatcher;
template <typename R, typename... A> struct ViaDispatcher<R (*)(A...)> {
  static auto make(const char* name) {
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<R(A...)>();
    return [op](typename PyArg<A>::type... a) -> R {
      py::gil_scoped_release no_gil;
      return op.call(a...);
    };
  }
};

// The same op with a runner that runs nothing: every check of a call, no launch.
template <typename Sig, Sig Fn> struct CheckOnly;
template <typename R, typename... A, R (*Fn)(A...)> struct CheckOnly<R (*)(A...), Fn> {
  static void call(typename PyArg<A>::type... a) { Fn(a...); }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sama_ext compiled kernels (see sama_ext.ops for the Python API)";
#define SAMA_BIND(name, schema) \
  m.def(#name, ViaDispatcher<decltype(&sama::name<nullptr>)>::make("sama_ext::" #name));
  SAMA_EXT_OPS(SAMA_BIND)
#undef SAMA_BIND
#define SAMA_CHECK(name, schema)                                                                      \
  m.def("check_" #name,                                                                               \
        &CheckOnly<decltype(&sama::name<nullptr>), &sama::name<sama::run_check_only>>::call,          \
        "Checks the arguments of " #name " as the op does, running nothing.");
  SAMA_EXT_OPS(SAMA_CHECK)
#undef SAMA_CHECK

  m.def("with_cuda", [] {
#ifdef SAMA_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def(
      "make_plan",
      [](const std::vector<int64_t>& numel, int64_t chunk_size, int32_t max_slots, int32_t max_items) {
        const sama::Plan p = sama::make_plan(numel.data(), int64_t(numel.size()), chunk_size, max_slots, max_items);
        py::list launches;
        for (const sama::Launch& L : p.launches) {
          py::list slots, items;
          for (int s = 0; s < L.n_slots; ++s) slots.append(p.slots[size_t(L.first_slot + s)]);
          for (int i = 0; i < L.n_items; ++i) {
            const sama::WorkItem& it = p.items[size_t(L.first_item + i)];
            items.append(py::make_tuple(it.slot, it.chunk));
          }
          launches.append(py::make_tuple(slots, items));
        }
        return launches;
      },
      "Cut tensors of the given sizes into launches: [(slots: global tensor ids, items: (slot, chunk))].");
  m.attr("CUDA_CHUNK") = sama::kCudaChunk;
  m.attr("CUDA_MAX_ITEMS") = sama::kCudaMaxItems;
  m.def("cuda_max_slots", &sama::cuda_max_slots, "Tensors per CUDA launch for an op with n_lists lists.");
}
