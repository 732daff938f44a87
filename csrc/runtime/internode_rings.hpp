// How many rows of each RDMA ring an internode dispatch cycles through (the config's ring, or fewer where
// ranks share a GPU and so its L2); the same on every rank, since all must index the rings alike.
#pragma once

#include <cstdint>

namespace deep_ep {

// All `capacity` rows (config.num_max_rdma_chunked_recv_tokens) where every rank has its GPU
// (max_ranks_per_device <= 1). Where ranks share one, all their rings share its L2: a row written to a slot
// whose line left L2 costs HBM traffic twice (the old line written back, the new one read by the receivers
// from HBM), so the op cycles through about 2 x l2_bytes over every ring of every rank on the GPU
// (max_ranks_per_device x num_nodes x num_channels rings of row_stride-byte rows), never fewer than 32 rows,
// the send chunk or the smallest ring, and never more than `capacity`. On one H100 (2 nodes x 8 ranks, 8
// channels, 14 KB rows) that is 32 rows: BF16 dispatch 6.5 ms, against 10.0 with 128-row rings, 7.0 with 64
// and 7.0 with 24.
int internode_dispatch_ring_rows(int max_ranks_per_device, int capacity, int num_nodes, int num_channels,
                                 int64_t row_stride, int send_chunk, int64_t l2_bytes);

// Tokens a dispatch sender writes per round: the config's send chunk, or half the ring rows the op cycles through
// if that is fewer. With at most half the ring per round, a round's rows land while the receivers still scan the
// previous round's, as V1's rule (send chunk <= half the RDMA ring) keeps them on a GPU of its own; where the L2
// rule above shrinks the ring, a larger round would wait for part of the previous one first. On one H100 (2 nodes
// x 8 ranks, 8 channels, V1's chunk of 20 and a 32-row ring) the BF16 dispatch took about 4750 us with rounds of
// 16 against about 5300 with rounds of 20.
int internode_dispatch_round_tokens(int ring_rows, int send_chunk);

}  // namespace deep_ep
