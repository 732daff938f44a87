// How the push dispatch finds the other ranks' outputs without the host: each rank exports the allocations of
// its dispatch outputs like the pull combine's inputs (protocol/pull_inputs.hpp: slots, generations, the import
// table), and its kernel publishes where this call's outputs live (ControlRegion::push_outputs) before it tells
// the peers it is ready. Plain data shared by host and device code.
#pragma once

#include <cstdint>

#include "protocol/pull_inputs.hpp"

namespace deep_ep {

// The outputs a sender writes at the destination, in PushOutputs::refs order.
enum PushOutput : int {
  kPushRecvX = 0,        // [num_rows, row_bytes]
  kPushRecvScales,       // [num_rows, num_scales] float32 (FP8 only)
  kPushRecvTopkIdx,      // [num_rows, K] int64, renumbered to the destination's local experts
  kPushRecvTopkWeights,  // [num_rows, K] float32
  kPushRecvSrcIdx,       // [num_rows] int32 (non-cached only: a cached call's handle already holds it)
  kNumPushOutputs,
};

// One rank's outputs of one push dispatch: slot -1 where an output is absent (no FP8 scales, no top-k, a cached
// call's source indices, or no rows). num_rows: the rows allocated; a sender drops rows past it and the owner
// reports the overflow (num_worst_tokens too small).
struct PushOutputs {
  InputRef refs[kNumPushOutputs];
  int32_t num_rows;
  int32_t pad;
};

}  // namespace deep_ep
