// The Buffer's kernels over the GIN transport (GIN builds, when the buffer is an NCCL window because the
// group spans hosts and NCCL reports GIN; see Buffer::Internals::gin_window). Each call builds the op's
// GinTransport from the Buffer's NCCL communicator (its device communicator, the window over the whole
// buffer, context 0, the op's signal range of Internals::gin_signals) and launches the kernel's GIN
// variant. Declared with plain types, so that host code compiled without NCCL's device headers calls them.
#pragma once

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN

#include <cuda_runtime_api.h>

#include <vector>

#include "kernels/internode/internode.hpp"
#include "kernels/low_latency/low_latency.hpp"
#include "runtime/buffer_internals.hpp"

namespace deep_ep::gin_ops {

// Collective over the group (window registration): registers the whole buffer as the communicator's
// window and returns, per rank, its buffer as mapped here through NCCL's load/store (LSA) team: the own
// buffer for this rank, NCCL's peer pointer for the ranks NCCL reaches by load/store, null for the others.
std::vector<char*> register_buffer(Buffer::Internals& in, int rank, int num_ranks);

// Internode ops: offset 0 of the transport is the RDMA payload.
void internode_notify(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                      const internode::NotifyArgs& args, cudaStream_t stream);
void internode_dispatch(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                        const internode::DispatchArgs& args, cudaStream_t stream);
void internode_combine(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                       const internode::CombineArgs& args, cudaStream_t stream);

// Low-latency ops on peers.half: offset 0 of the transport is that half.
void low_latency_dispatch(const Buffer::Internals& in, const low_latency::Peers& peers,
                          const low_latency::HalfLayout& layout, const low_latency::DispatchArgs& args, int phases,
                          int num_blocks, cudaStream_t stream);
void low_latency_combine(const Buffer::Internals& in, const low_latency::Peers& peers,
                         const low_latency::HalfLayout& layout, const low_latency::CombineArgs& args, int phases,
                         int num_blocks, cudaStream_t stream);
// Zeroes both halves' signal ranges (clean_low_latency_buffer, between its barriers).
void reset_low_latency_signals(const Buffer::Internals& in, cudaStream_t stream);

}  // namespace deep_ep::gin_ops

#endif  // DEEP_EP_ENABLE_GIN
