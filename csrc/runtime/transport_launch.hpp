// The ops' kernel launches over the transport the Buffer chose (Buffer::Internals::uses_gin): the
// kernels' P2P launchers, or in GIN builds, when the buffer is an NCCL window and some peer is reached
// only through GIN, their GIN launchers. A GIN launch gets the op's GinTransport from the Buffer's NCCL
// communicator: its device communicator, the window over the whole buffer (offset 0 at the op's region),
// context 0 and the op's range of Internals::gin_signals. Declared with plain types, so that host code
// compiled without NCCL's device headers calls them.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "kernels/internode/internode.hpp"
#include "kernels/low_latency/low_latency.hpp"
#include "runtime/buffer_internals.hpp"

namespace deep_ep::transport_launch {

void internode_notify(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                      const internode::NotifyArgs& args, cudaStream_t stream);
// The start barrier of a cached dispatch or a combine.
void internode_cached_notify(const Buffer::Internals& in, const internode::Peers& peers,
                             const internode::Layout& layout, cudaStream_t stream);
void internode_dispatch(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                        const internode::DispatchArgs& args, const LaunchShape& shape, cudaStream_t stream);
void internode_combine(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                       const internode::CombineArgs& args, const LaunchShape& shape, cudaStream_t stream);

// On peers.half.
void low_latency_dispatch(const Buffer::Internals& in, const low_latency::Peers& peers,
                          const low_latency::HalfLayout& layout, const low_latency::DispatchArgs& args,
                          const LaunchShape& shape, cudaStream_t stream);
void low_latency_combine(const Buffer::Internals& in, const low_latency::Peers& peers,
                         const low_latency::HalfLayout& layout, const low_latency::CombineArgs& args,
                         const LaunchShape& shape, cudaStream_t stream);
// The low-latency signals that are not memory (GIN's, both halves) back to zero; nothing otherwise, as
// clean_low_latency_buffer zeroes the memory ones. Between its barriers.
void reset_low_latency_transport_signals(const Buffer::Internals& in, cudaStream_t stream);

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
// Collective over the group (window registration): registers the whole buffer as the communicator's
// window and returns, per rank, its buffer as mapped here through NCCL's load/store (LSA) team: the own
// buffer for this rank, NCCL's peer pointer for the ranks NCCL reaches by load/store, null for the others.
std::vector<char*> register_buffer(Buffer::Internals& in, int rank, int num_ranks);
#endif

}  // namespace deep_ep::transport_launch
