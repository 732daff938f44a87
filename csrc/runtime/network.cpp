// The network side of a Buffer (docs/design.md decision 4): for groups that span hosts, the NCCL
// communicator that the GIN transport runs over, and whether NCCL reports GIN for it. Builds without
// GIN only record that, so the transport choice names the missing piece.
#include <algorithm>

#include "deep_ep/error.hpp"
#include "protocol/control_region.hpp"
#include "runtime/buffer_internals.hpp"
#include "runtime/env_switches.hpp"
#include "runtime/gin_signals.hpp"

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
#include "runtime/nccl_comm.hpp"
#endif

namespace deep_ep {

bool force_nccl_window_from_env() {
  const bool forced = two_setting_switch(kForceNcclWindowEnv, false, false, true, "the transport as chosen",
                                         "NCCL-window memory on one host");
  DEEP_EP_CHECK(!forced || gin_compiled(), kForceNcclWindowEnv, "=1 needs a build with DEEP_EP_ENABLE_GIN=ON");
  return forced;
}

void connect_network(Buffer::Internals& in, Group& group, const BufferOptions& options, bool needs_network,
                     int num_nodes, int num_device_sms, bool ask_for_gin) {
  in.network = TransportChoiceInputs{};
  in.network.gin_compiled = gin_compiled();
  if (!needs_network) return;  // every peer by load/store: no network
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  const int64_t address = options.nccl_comm_address ? options.nccl_comm_address() : 0;
  std::unique_ptr<NcclCommunicator> comm =
      address != 0 ? NcclCommunicator::adopt(address, group) : NcclCommunicator::create(group);
  // One context for now: every kernel posts on context 0, so adders and owners of a signal agree.
  in.gin_signals = gin_signal_plan(group.size(), num_nodes, num_device_sms);
  if (ask_for_gin) {
    comm->create_device_comm(in.gin_signals.total(), 1);
  } else {
    comm->create_device_comm(0, 0);  // a device communicator without GIN (one host needs none)
  }
  in.nccl = std::move(comm);
  fill_nccl_transport_inputs(in.nccl.get(), in.network);
#else
  (void)ask_for_gin;
  (void)group;
  (void)options;
  (void)num_nodes;
  (void)num_device_sms;
#endif
}

}  // namespace deep_ep
