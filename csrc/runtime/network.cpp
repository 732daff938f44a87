// The network side of a Buffer (design.md decision 4): for groups that span hosts, the NCCL
// communicator that the GIN transport runs over, and whether NCCL reports GIN for it. Builds without
// GIN only record that, so the transport choice names the missing piece.
#include <algorithm>

#include "deep_ep/error.hpp"
#include "kernels/common/control_region.hpp"
#include "runtime/buffer_internals.hpp"

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
#include "runtime/nccl_comm.hpp"
#endif

namespace deep_ep {

namespace {

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
// GIN signals the kernels may use, numbered from 0: the internode ops' 1 + N * (1 + 2C) (C = channels,
// at most one per SM), then two low-latency halves of 2 * (L + 1) * R each (L local experts, at most
// kMaxLocalExperts).
int gin_signals_needed(int num_ranks, int num_nodes, int num_device_sms) {
  const int internode = 1 + num_nodes * (1 + 2 * num_device_sms);
  const int low_latency_half = 2 * (kMaxLocalExperts + 1) * num_ranks;
  return internode + 2 * low_latency_half;
}
#endif

}  // namespace

void connect_network(Buffer::Internals& in, Group& group, const BufferOptions& options, int num_nodes,
                     int num_device_sms) {
  in.network = TransportChoiceInputs{};
  in.network.gin_compiled = gin_compiled();
  if (in.first_unmapped_peer() < 0) return;  // every peer by load/store: no network
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  const int64_t address = options.nccl_comm_address ? options.nccl_comm_address() : 0;
  std::unique_ptr<NcclCommunicator> comm =
      address != 0 ? NcclCommunicator::adopt(address, group) : NcclCommunicator::create(group);
  // One context for now: every kernel posts on context 0, so adders and owners of a signal agree.
  comm->create_device_comm(gin_signals_needed(group.size(), num_nodes, num_device_sms), 1);
  in.nccl = std::move(comm);
  fill_nccl_transport_inputs(in.nccl.get(), in.network);
#else
  (void)group;
  (void)options;
  (void)num_nodes;
  (void)num_device_sms;
#endif
}

}  // namespace deep_ep
