// Arguments of the low-latency (decode) ops of Buffer (docs/compatibility.md section 8). Torch-free, like buffer.hpp.
//
// A low-latency op has two halves: the send, which every call launches, and the receive, which the
// call launches right after the send, or which the caller launches later through the pending receive
// the call returns (return_recv_hook=True). Neither half waits on the CPU; both are CUDA-graph safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "deep_ep/tensor.hpp"

namespace deep_ep {

// What dispatch returns in V1's handle, and combine needs back.
//   src_info: int32 [L, S], the source token index of each valid row. The dispatch allocates it as
//     the first plane of an int32 [2, L, S] tensor; the second plane, right after it in memory, holds
//     the row's top-k slot on the source token, which combine needs to place the row. Combine reads
//     both planes, so src_info must be the tensor dispatch returned (not a copy of it).
//   layout_range: int64 [L, R], (begin << 32) | count of each source rank's rows of each expert.
struct LowLatencyHandle {
  TensorView src_info;
  TensorView layout_range;
  int num_max_dispatch_tokens_per_rank = 0;
  int hidden = 0;
  int num_experts = 0;
};

// Outputs allocated through the Allocator, by name:
//   recv_x         bf16 [L, S, H], or float8_e4m3fn [L, S, H] with use_fp8
//   recv_x_scales  use_fp8 only: float32 [L, H / 128, S], or with use_ue8m0 int32 [L, H / 512, S]
//                  (storage of V1's column-major [L, S, *] scales; the caller transposes the view)
//   recv_count     int32 [L]
//   src_info       int32 [2, L, S] (see LowLatencyHandle)
//   layout_range   int64 [L, R]
struct LowLatencyDispatchArgs {
  TensorView x;         // bf16 [T, H], T <= num_max_dispatch_tokens_per_rank
  TensorView topk_idx;  // int64 [T, K], -1 = no expert
  int num_max_dispatch_tokens_per_rank = 0;
  int num_experts = 0;
  std::optional<TensorView> cumulative_local_expert_recv_stats;  // int32 [L], += rows received per expert
  std::optional<TensorView> dispatch_wait_recv_cost_stats;       // int64 [R], += cycles waited per source
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
  bool return_recv_hook = false;
};

// Output allocated through the Allocator unless `out` is given: combined_x bf16 [T, H].
struct LowLatencyCombineArgs {
  TensorView x;             // bf16 [L, S, H] expert outputs in dispatch's row layout (rows may be strided)
  TensorView topk_idx;      // int64 [T, K] of this rank's dispatch
  TensorView topk_weights;  // float32 [T, K]
  LowLatencyHandle handle;
  bool use_logfmt = false;
  bool zero_copy = false;  // x is the view next_low_latency_combine_buffer returned
  bool return_recv_hook = false;
  std::optional<TensorView> out;                           // bf16 [T, H]
  std::optional<TensorView> combine_wait_recv_cost_stats;  // int64 [R]
};

// A receive half not launched yet. Launch it once, with Buffer::low_latency_receive.
class LowLatencyPendingReceive {
 public:
  virtual ~LowLatencyPendingReceive() = default;
};

}  // namespace deep_ep
