#include "runtime/internode_rings.hpp"

#include <algorithm>

#include "protocol/internode_layout.hpp"

namespace deep_ep {

InternodeDispatchRing internode_dispatch_ring(int max_ranks_per_device, int capacity, int num_nodes, int num_channels,
                                              int64_t row_stride, int send_chunk, int64_t l2_bytes) {
  int num_rows = capacity;
  if (max_ranks_per_device > 1) {
    const int64_t rings_bytes_per_row =
        static_cast<int64_t>(max_ranks_per_device) * num_nodes * num_channels * std::max<int64_t>(row_stride, 1);
    const int64_t rows = 2 * l2_bytes / rings_bytes_per_row;
    const int64_t floor = std::max<int64_t>({32, internode::kMinRingSlots, send_chunk});
    num_rows = static_cast<int>(std::min<int64_t>(std::max(rows, floor), capacity));
  }
  return {num_rows, std::max(1, std::min(send_chunk, num_rows / 2))};
}

}  // namespace deep_ep
