// Launchers of the internode kernels over the GIN transport (gin_transport.cuh): the same kernels and
// arguments as internode.hpp, with other nodes reached through NCCL's device API. Apart so that host
// code compiled without nccl_device.h keeps including internode.hpp only; empty unless
// DEEP_EP_ENABLE_GIN.
#pragma once

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN

#include "kernels/internode/internode.hpp"
#include "transport/gin_transport.cuh"

namespace deep_ep::internode {

// `gin` reaches every rank of the group by its rank in `peers`; its offset 0 is the RDMA payload of this
// rank's buffer (local_ptr(0) == peers.bases[rank] + peers.rdma_offset), laid out by `layout`, and its
// signals cover layout.num_signals(). The done signal counts across ops, so every call of a Buffer passes
// the same signals and context_idx, zeroed before the first op. peers.bases must map this rank and the
// ranks of its node.
void launch_notify(const Peers& peers, const Layout& layout, const NotifyArgs& args, const transport::GinTransport& gin,
                   cudaStream_t stream);
void launch_cached_notify(const Peers& peers, const Layout& layout, const transport::GinTransport& gin,
                          cudaStream_t stream);
void launch_dispatch(const Peers& peers, const Layout& layout, const DispatchArgs& args,
                     const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream);
void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args,
                    const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream);

}  // namespace deep_ep::internode

#endif  // DEEP_EP_ENABLE_GIN
