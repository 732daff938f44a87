// How the 16 warps of an internode dispatch or combine block split into roles (internode::WarpSplit):
// the defaults for the node size, or a DEEP_EP_INTERNODE_WARPS override (a tuning aid), checked against
// what the roles need before any launch.
#pragma once

#include "kernels/internode/internode.hpp"

namespace deep_ep {

// override_text: "senders,producers,forwarders" or null/empty for the defaults. Raises ValueError naming
// the variable when the text does not parse or a role gets too few or too many warps.
internode::WarpSplit internode_warp_split(int num_ranks_per_node, const char* override_text);

// The smallest RDMA ring (num_max_rdma_chunked_recv_tokens) a combine with this split streams through: a
// home round (one token per home warp) and a forwarder batch (one position per forwarder warp) must fit
// one ring of partials together, or each would wait for the other.
int internode_combine_min_ring_slots(const internode::WarpSplit& split);

}  // namespace deep_ep
