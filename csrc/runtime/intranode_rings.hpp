// How many slots of each intranode dispatch ring a call cycles through, and the sender's batch (the config's
// ring and batch, or fewer slots where ranks share a GPU and so its L2); the same on every rank, since each
// receiver indexes its peers' rings with its own figure.
#pragma once

#include <cstdint>

namespace deep_ep {

struct IntranodeDispatchRing {
  int num_slots;   // slots per channel ring, at most the config's num_max_nvl_chunked_recv_tokens
  int send_chunk;  // tokens a sender stages per batch, at most the config's num_max_nvl_chunked_send_tokens
};

// All `capacity` slots (config.num_max_nvl_chunked_recv_tokens) where every rank has its GPU
// (max_ranks_per_device <= 1). Where ranks share one, the staged rows are read back by the other ranks'
// receivers from L2 only while every ring of the GPU (max_ranks_per_device x num_channels rings of
// row_stride-byte slots) fits in about 30% of it, the rest being taken by the inputs read and the received rows
// written: the slot count is that share divided by the rings' bytes per slot (rows only; scales, top-k and
// metadata add a few percent), rounded down to an even number, between 2 and `capacity` (odd if `capacity` is).
// The batch is the config's, at most half the slots, so that a sender stages the next batch while the
// receivers copy the last. On one H100 (8 ranks, 4096 tokens, hidden 7168) that gives 8 slots for BF16 rows at
// 16 channels (231 GB/s per rank, against 213 with 16 slots and 184 with 32), 16 for FP8 rows at 16 channels
// and for BF16 rows at 8, 32 for FP8 rows at 8.
IntranodeDispatchRing intranode_dispatch_ring(int max_ranks_per_device, int capacity, int send_chunk, int num_channels,
                                              int64_t row_stride, int64_t l2_bytes);

}  // namespace deep_ep
