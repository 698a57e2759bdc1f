// How a list of tensors is cut into work items (one CUDA block / one CPU task each) and
// grouped into launches whose metadata fits in one kernel argument.
//
// Plain C++ with no CUDA or torch: the CPU backend uses the same plan (one "launch"), and
// the C++ and Python tests check it on the host, so the GPU path's bookkeeping is not
// tested only on GPUs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace sama {

struct WorkItem {
  int32_t slot;   // index into the launch's tensor slots
  int32_t chunk;  // chunk index within that tensor: elements [chunk·C, min(n, (chunk+1)·C))
};

struct Launch {
  int32_t first_slot, n_slots;  // into Plan::slots
  int32_t first_item, n_items;  // into Plan::items (= CUDA blocks)
};

struct Plan {
  int64_t chunk_size = 0;
  std::vector<int32_t> slots;    // global tensor index of each slot, launch after launch
  std::vector<WorkItem> items;   // all work items, launch after launch (global item order)
  std::vector<Launch> launches;
};

// Empty tensors get no slot. A tensor whose chunks do not fit in the current launch
// continues in the next one, where it takes a slot again.
inline Plan make_plan(const int64_t* numel, int64_t n_tensors, int64_t chunk_size,
                      int32_t max_slots, int32_t max_items) {
  if (chunk_size <= 0 || max_slots <= 0 || max_items <= 0)
    throw std::invalid_argument("make_plan: chunk_size, max_slots and max_items must be positive");
  Plan plan;
  plan.chunk_size = chunk_size;
  Launch cur{0, 0, 0, 0};
  auto flush = [&] {
    if (cur.n_items > 0) plan.launches.push_back(cur);
    cur = Launch{int32_t(plan.slots.size()), 0, int32_t(plan.items.size()), 0};
  };
  for (int64_t t = 0; t < n_tensors; ++t) {
    if (numel[t] < 0) throw std::invalid_argument("make_plan: negative numel for tensor " + std::to_string(t));
    if (numel[t] == 0) continue;
    const int64_t n_chunks = (numel[t] + chunk_size - 1) / chunk_size;
    if (n_chunks > INT32_MAX)
      throw std::invalid_argument("make_plan: tensor " + std::to_string(t) + " has too many chunks");
    int64_t chunk = 0;
    while (chunk < n_chunks) {
      if (cur.n_slots == max_slots) flush();
      plan.slots.push_back(int32_t(t));
      const int32_t slot = cur.n_slots++;
      const int64_t take = std::min<int64_t>(n_chunks - chunk, max_items - cur.n_items);
      for (int64_t k = 0; k < take; ++k) plan.items.push_back(WorkItem{slot, int32_t(chunk + k)});
      cur.n_items += int32_t(take);
      chunk += take;
      if (cur.n_items == max_items) flush();
    }
  }
  flush();
  return plan;
}

// Element range of a work item.
inline void item_range(const Plan& plan, const WorkItem& it, int64_t numel, int64_t* begin, int64_t* end) {
  *begin = int64_t(it.chunk) * plan.chunk_size;
  *end = std::min(numel, *begin + plan.chunk_size);
}

}  // namespace sama
