// State of a Buffer shared by its op implementations (csrc/runtime/*_op.cpp). Not public API.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"
#include "deep_ep/topology.hpp"
#include "deep_ep/transport.hpp"
#include "kernels/common/control_region.hpp"
#include "kernels/common/diagnostics.hpp"
#include "kernels/common/host_counts.hpp"

namespace deep_ep {

// Pinned host memory mapped into the device: the kernels write, the host polls.
struct HostMapped {
  DeviceDiagnostics diagnostics;
  // Notify publishes the rows this rank will receive, then the per-local-expert counts, and last
  // `counts_ready = epoch` (system-scope release). The host polls counts_ready.
  volatile int counts_ready;
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kMaxLocalExperts];
};

class NcclCommunicator;  // runtime/nccl_comm.hpp, GIN builds only

struct Buffer::Internals {
  // [ControlRegion | nvl payload | rdma payload] in one cudaMalloc, shared through one IPC handle.
  char* local_base = nullptr;
  int64_t nvl_payload_offset = kControlRegionBytes;
  int64_t rdma_payload_offset = 0;
  int64_t total_bytes = 0;
  std::vector<char*> peer_bases;         // [R]; own entry is local_base
  std::vector<bool> peer_is_ipc;         // opened through cudaIpcOpenMemHandle (to close on release)
  char** peer_bases_device = nullptr;    // device copy of peer_bases
  HostMapped* host = nullptr;            // host view
  HostMapped* host_device = nullptr;     // device view of the same memory
  int counts_epoch = 0;                  // grows by one per notify
  Topology topology;                     // nodes of the group (deep_ep/topology.hpp)
  int64_t timeout_ns = 0;
  // Low-latency mode: the half the next op uses, and whether a hooked receive of an op on each half
  // has not been launched yet (a new op on that half would overwrite what it has still to read).
  int ll_next_half = 0;
  bool ll_receive_pending[2] = {false, false};
  bool poisoned = false;
  std::string poison_message;
  // The network side of the transport choice (runtime/network.cpp): set up only when a peer is on
  // another host, in GIN builds. `network` carries gin_compiled, nccl_available, nccl_reports_gin.
  std::shared_ptr<NcclCommunicator> nccl;
  TransportChoiceInputs network;

  // Where the next notify publishes its counts, with the next epoch.
  HostCounts next_host_counts() {
    return {&host_device->num_recv_tokens, host_device->num_recv_tokens_per_expert, &host_device->counts_ready,
            ++counts_epoch};
  }
  // Waits for the counts a notify kernel publishes (counts_ready == counts_epoch). The host waits
  // longer than the device: a device-side timeout, which names the peer, wins.
  void wait_for_notify_counts(Buffer& buffer, const char* op);

  // The first peer whose buffer is not mapped here (another host: reachable only over a network
  // transport), or -1 when every peer is reachable by load/store.
  int first_unmapped_peer() const {
    for (size_t r = 0; r < peer_bases.size(); ++r)
      if (peer_bases[r] == nullptr) return static_cast<int>(r);
    return -1;
  }

  // The transport from this rank to `peer` by the rule of deep_ep/transport.hpp; a ValueError naming
  // what is missing when nothing reaches it.
  TransportKind transport_to(int rank, int peer) const {
    TransportChoiceInputs inputs = network;
    inputs.peer_reachable_by_load_store = peer_bases[peer] != nullptr;
    return choose_transport(inputs, rank, peer);
  }

  // Raises unless every peer is reachable over a transport the kernels can drive from this Buffer: P2P
  // (mapped memory, emulated nodes included). A peer on another host would need GIN, and the Buffer
  // does not yet register its RDMA payload as an NCCL window (that needs cuMem memory): the error says
  // which peer and why (transport_to names what is missing when nothing reaches it at all).
  void require_p2p_reach(int rank, const char* op) const {
    const int peer = first_unmapped_peer();
    if (peer < 0) return;
    const TransportKind kind = transport_to(rank, peer);
    DEEP_EP_CHECK(kind == TransportKind::kP2p, op, ": rank ", rank, " reaches peer rank ", peer, " only through ",
                  transport_name(kind), " (NCCL reports GIN), but this Buffer does not register its RDMA buffer as ",
                  "an NCCL window yet, so the kernels cannot run over it");
  }

  ControlRegion* peer_control(int rank) const { return reinterpret_cast<ControlRegion*>(peer_bases[rank]); }
  DeviceDiagnostics* device_diagnostics() const { return &host_device->diagnostics; }
};

// Collective, from the Buffer constructor once peers are mapped: where a peer is on another host and
// this build has GIN, obtains the NCCL communicator (adopted from options.nccl_comm_address, else
// created over the group) and its device communicator, and records whether NCCL reports GIN.
// Otherwise it only records gin_compiled. Runs on every rank or none: hosts are the same for all.
void connect_network(Buffer::Internals& in, Group& group, const BufferOptions& options, int num_nodes,
                     int num_device_sms);

}  // namespace deep_ep
