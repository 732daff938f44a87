#include "runtime/intranode_rings.hpp"

#include <algorithm>

namespace deep_ep {

IntranodeDispatchRing intranode_dispatch_ring(int max_ranks_per_device, int capacity, int send_chunk, int num_channels,
                                              int64_t row_stride, int64_t l2_bytes) {
  if (max_ranks_per_device <= 1 || capacity <= 2) return {capacity, send_chunk};
  const int64_t rings_bytes_per_slot =
      static_cast<int64_t>(max_ranks_per_device) * std::max(num_channels, 1) * std::max<int64_t>(row_stride, 1);
  const int64_t share = l2_bytes * 3 / 10;
  const int64_t slots = std::clamp<int64_t>(share / rings_bytes_per_slot / 2 * 2, 2, capacity);
  return {static_cast<int>(slots), std::max(1, std::min(send_chunk, static_cast<int>(slots) / 2))};
}

}  // namespace deep_ep
