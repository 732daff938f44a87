// Launchers of the low-latency kernels over the GIN transport (gin_transport.cuh): the same kernels and
// arguments as low_latency.hpp, with transport peers reached through NCCL's device API. Apart so that
// host code compiled without nccl_device.h keeps including low_latency.hpp only; empty unless
// DEEP_EP_ENABLE_GIN.
#pragma once

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN

#include "kernels/low_latency/low_latency.hpp"
#include "transport/gin_transport.cuh"

namespace deep_ep::low_latency {

// `gin` reaches every rank of the group by its rank in `peers`. Its offset 0 is the active half of this
// rank's buffer (local_ptr(0) == peers.bases[rank] + peers.half_offset: the window spans the buffer and
// base_offset points at the half), laid out by `layout`, and its signals cover layout.num_signals() for
// that half. The two halves need their own signal range; every call on a half passes the same one, and
// every rank the same context_idx (a signal's adders and its owner post on one context). Those signals
// must be zero wherever the half's memory from signals_offset is (first use, clean_low_latency_buffer):
// count and arrivals signals count across ops against the mirrors and consumed counters kept there.
// peers.bases must map this rank and the ranks reached by load/store (same node, allow_nvlink); the
// other entries may be null.
void launch_dispatch(const Peers& peers, const HalfLayout& layout, const DispatchArgs& args,
                     const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream);
void launch_combine(const Peers& peers, const HalfLayout& layout, const CombineArgs& args,
                    const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream);

// Zeroes GIN signals [0, num_signals) of `gin` (clean_low_latency_buffer, between barriers: no peer
// adds to them meanwhile).
void launch_reset_signals(const transport::GinTransport& gin, int num_signals, cudaStream_t stream);

}  // namespace deep_ep::low_latency

#endif  // DEEP_EP_ENABLE_GIN
