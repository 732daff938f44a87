// How a Buffer splits the GIN signals of its device communicator among its ops (GIN builds ask NCCL
// for total() of them): the internode ops' signals first, then one range per low-latency half. Each
// range fits the largest layout the Buffer can run (internode: a channel per SM; low-latency:
// kMaxLocalExperts local experts), so no range depends on an op's arguments: signals count across
// ops, and an op with other arguments must find its signals where the last one left them.
#pragma once

#include "deep_ep/config.hpp"
#include "protocol/internode_layout.hpp"
#include "protocol/low_latency_layout.hpp"

namespace deep_ep {

struct GinSignalPlan {
  int internode_start, internode_count;
  int low_latency_start[2];
  int low_latency_count;  // per half
  int total() const { return low_latency_start[1] + low_latency_count; }
};

// num_nodes: nodes of the group; num_device_sms: SMs of the device, the most channels an op can use.
inline GinSignalPlan gin_signal_plan(int num_ranks, int num_nodes, int num_device_sms) {
  GinSignalPlan plan{};
  plan.internode_start = 0;
  plan.internode_count = internode::Layout::signals_for(num_nodes, num_device_sms);
  plan.low_latency_count = low_latency::HalfLayout::signals_for(kMaxLocalExperts, num_ranks);
  plan.low_latency_start[0] = plan.internode_start + plan.internode_count;
  plan.low_latency_start[1] = plan.low_latency_start[0] + plan.low_latency_count;
  return plan;
}

}  // namespace deep_ep
