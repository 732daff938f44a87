// How many rows of each RDMA ring an internode dispatch cycles through, and the sender's round (the config's ring
// and send chunk, or fewer rows where ranks share a GPU and so its L2); the same on every rank, since all must index
// the rings alike. The intranode counterpart is intranode_rings.hpp.
#pragma once

#include <cstdint>

namespace deep_ep {

struct InternodeDispatchRing {
  int num_rows;      // rows per ring, at most the config's num_max_rdma_chunked_recv_tokens
  int round_tokens;  // tokens a sender writes per round, at most the config's num_max_rdma_chunked_send_tokens
};

// All `capacity` rows (config.num_max_rdma_chunked_recv_tokens) where every rank has its GPU
// (max_ranks_per_device <= 1). Where ranks share one, all their rings share its L2: a row written to a slot
// whose line left L2 costs HBM traffic twice (the old line written back, the new one read by the receivers
// from HBM), so the op cycles through about 2 x l2_bytes over every ring of every rank on the GPU
// (max_ranks_per_device x num_nodes x num_channels rings of row_stride-byte rows), never fewer than 32 rows,
// the send chunk or the smallest ring, and never more than `capacity`. On one H100 (2 nodes x 8 ranks, 8
// channels, 14 KB rows) that is 32 rows: BF16 dispatch 6.5 ms, against 10.0 with 128-row rings, 7.0 with 64
// and 7.0 with 24.
// A round is the send chunk, or half the rows if that is fewer: V1's rule (send chunk <= half the ring), which
// its configs keep on a GPU of its own, kept on the shrunken ring too, so a round's rows land while the receivers
// still scan the previous round's. On one H100 (2 x 8 ranks, V1's chunk of 20, 32 rows) the BF16 dispatch took
// about 4750 us with rounds of 16 against about 5300 with rounds of 20.
InternodeDispatchRing internode_dispatch_ring(int max_ranks_per_device, int capacity, int num_nodes, int num_channels,
                                              int64_t row_stride, int send_chunk, int64_t l2_bytes);

}  // namespace deep_ep
