// Which op kinds' state the RDMA payload holds. A Buffer made with low_latency_mode=True runs both
// internode normal ops and low-latency ops, as DeepEP V1 allows (one Buffer for prefill and decode).
// Both keep state in the RDMA payload, in different layouts, so each finds the other's leftovers there:
// - a low-latency op after internode ops needs clean_low_latency_buffer first, as in V1; here that is
//   an error naming the fix rather than a read of garbage counters;
// - an internode op after low-latency ops (or a clean, which zeroes areas internode ops also use)
//   first restores its signals (Buffer::prepare_internode_state), between two group barriers.
// A fresh payload is all zero, which is valid state for both kinds.
#pragma once

#include "deep_ep/error.hpp"

namespace deep_ep {

class RdmaPayloadUsers {
 public:
  // Before a low-latency dispatch or combine.
  void check_low_latency_op(const char* op) const {
    DEEP_EP_CHECK(low_latency_state_valid_, op,
                  ": internode normal ops ran on this Buffer since the last "
                  "low-latency op; call clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, "
                  "num_experts) between them (DeepEP V1 requires it too)");
  }
  void low_latency_op_launched() { internode_state_valid_ = false; }
  void low_latency_buffer_cleaned() {
    low_latency_state_valid_ = true;
    internode_state_valid_ = false;
  }

  // Before an internode op: whether the internode signals must be restored first.
  bool internode_state_needs_reset() const { return !internode_state_valid_; }
  void internode_state_reset() { internode_state_valid_ = true; }
  void internode_op_launched() { low_latency_state_valid_ = false; }

 private:
  bool low_latency_state_valid_ = true;
  bool internode_state_valid_ = true;
};

}  // namespace deep_ep
