// Helpers shared by the operators that take a list of tensors and work on all of them in one pass
// (one parallel loop on the CPU, one launch on CUDA): memory layouts and the mapping from a global
// element or block index to the tensor it falls in.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace maml_fast {

// Whether `tensor` has `strides` in every dimension of size > 1 (the others are never stepped).
inline bool has_strides(const at::Tensor& tensor, at::IntArrayRef strides) {
  for (std::int64_t dim = 0; dim < tensor.dim(); ++dim) {
    if (tensor.size(dim) > 1 && tensor.stride(dim) != strides[dim]) {
      return false;
    }
  }
  return true;
}

// `tensor`'s values in the memory layout of `like` (same shape, dense): `tensor` itself when it
// already has that layout, else a copy.
inline at::Tensor in_layout_of(const at::Tensor& tensor, const at::Tensor& like) {
  return has_strides(tensor, like.strides()) ? tensor : at::empty_like(like).copy_(tensor);
}

// One parallel loop over `sizes[0] + sizes[1] + ...` elements laid end to end: calls
// `body(i, begin, end)` for the part [begin, end) of list entry i (indices inside entry i) that a
// thread's range covers. Every size must be positive.
template <typename Body>
void parallel_for_entries(const std::vector<std::int64_t>& sizes, std::int64_t grain_size, const Body& body) {
  std::vector<std::int64_t> starts(sizes.size() + 1, 0);
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    starts[i + 1] = starts[i] + sizes[i];
  }
  at::parallel_for(0, starts.back(), grain_size, [&](std::int64_t begin, std::int64_t end) {
    // `starts` is strictly increasing, so this finds begin's entry.
    std::size_t entry = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    while (begin < end) {
      const std::int64_t stop = std::min(end, starts[entry + 1]);
      body(entry, begin - starts[entry], stop - starts[entry]);
      begin = stop;
      ++entry;
    }
  });
}

// In a launch over a table of tensors, the last entry whose `first_block` is <= `block` (entries
// hold increasing first blocks, the first one 0).
template <typename Entry>
C10_HOST_DEVICE inline int entry_of_block(const Entry* entries, int count, std::int32_t block) {
  int low = 0;
  int high = count - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (entries[middle].first_block <= block) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

// The launches of a kernel that takes its tensors in a table passed by value (no host-to-device copy,
// so the launches can be captured in a CUDA graph): `entries` in groups of at most `capacity`, one
// table each. `add(table, entry, first_block)` appends an entry and returns its number of blocks;
// `launch(table, blocks)` launches the table's grid. The number of launches never depends on the
// number of tasks.
template <typename Table, typename Entry, typename Add, typename Launch>
void launch_per_table(
    const std::vector<Entry>& entries, std::size_t capacity, const Table& empty_table, const char* op,
    const Add& add, const Launch& launch) {
  for (std::size_t group = 0; group < entries.size(); group += capacity) {
    const std::size_t group_end = std::min(entries.size(), group + capacity);
    Table table = empty_table;
    std::int64_t blocks = 0;
    for (std::size_t i = group; i < group_end; ++i) {
      blocks += add(table, entries[i], static_cast<std::int32_t>(blocks));
    }
    TORCH_CHECK(
        blocks <= std::numeric_limits<std::int32_t>::max(), op, ": too many elements for one launch (", blocks,
        " blocks)");
    launch(table, static_cast<unsigned int>(blocks));
  }
}

}  // namespace maml_fast
