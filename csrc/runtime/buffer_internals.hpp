// State of a Buffer shared by its op implementations (csrc/runtime/*_op.cpp). Not public API.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"
#include "deep_ep/topology.hpp"
#include "deep_ep/transport.hpp"
#include "protocol/control_region.hpp"
#include "protocol/diagnostics.hpp"
#include "protocol/host_counts.hpp"
#include "runtime/env_switches.hpp"
#include "runtime/gin_signals.hpp"
#include "runtime/input_exports.hpp"
#include "runtime/peer_tensor_map.hpp"
#include "runtime/rdma_payload_users.hpp"

namespace deep_ep {

// Pinned host memory mapped into the device: the kernels write, the host polls.
struct HostMapped {
  DeviceDiagnostics diagnostics;
  // Notify publishes the rows this rank will receive, then the per-local-expert counts, and last
  // `counts_ready = epoch` (system-scope release). The host polls counts_ready.
  volatile int counts_ready;
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kMaxLocalExperts];
  int num_rdma_recv_tokens;  // internode: rows this rank receives over the network, as its node's forwarder
};

class NcclCommunicator;  // runtime/nccl_comm.hpp, GIN builds only

struct Buffer::Internals {
  // [ControlRegion | nvl payload | rdma payload] in one allocation: a cudaMalloc shared through one IPC
  // handle (or a fabric pool), or, when gin_window, NCCL window memory (below).
  char* local_base = nullptr;
  int64_t nvl_payload_offset = kControlRegionBytes;
  int64_t rdma_payload_offset = 0;
  int64_t total_bytes = 0;
  std::vector<char*> peer_bases;       // [R]; own entry is local_base
  std::vector<bool> peer_is_ipc;       // opened through cudaIpcOpenMemHandle (to close on release)
  char** peer_bases_device = nullptr;  // device copy of peer_bases
  HostMapped* host = nullptr;          // host view
  HostMapped* host_device = nullptr;   // device view of the same memory
  int counts_epoch = 0;                // grows by one per notify
  Topology topology;                   // nodes of the group (deep_ep/topology.hpp)
  int64_t timeout_ns = 0;
  // Agreed by every rank at creation: the most ranks any GPU of the group holds, the smallest L2 among them.
  int max_ranks_per_device = 1;
  int64_t min_l2_bytes = 0;
  // Low-latency mode: the half the next op uses, and whether a hooked receive of an op on each half
  // has not been launched yet (a new op on that half would overwrite what it has still to read).
  int ll_next_half = 0;
  bool ll_receive_pending[2] = {false, false};
  PeerTensorMap peer_tensors;  // other ranks' pull-combine inputs, mapped here
  // DEEP_EP_INTERNODE_IN_PLACE unset or not 0 at creation, the same on every rank: internode combines read the
  // node's inputs in place where input_exports (over each node's ranks) exists (CombineArgs::in_place).
  bool internode_in_place = false;
  // DEEP_EP_INTERNODE_OWN_NODE_PUSH at creation, the same on every rank: which internode dispatches store rows for the
  // own node straight into its ranks' outputs, where input_exports (over each node's ranks) exists
  // (DispatchArgs::own_node_push).
  OwnNodePush internode_own_node_push = OwnNodePush::kNone;
  // Whether CUDA IPC exported every rank's allocator probe (BufferOptions::allocator_probe_address): without it
  // neither pull_exchange nor input_exports is made, and every op takes the rings.
  bool tensors_exportable = true;
  // The pull combine's input addresses, exchanged per call (one node only; made with the buffer); null where some
  // peer is not mapped by CUDA IPC (GIN window, fabric memory, another host) or shared memory is unusable: the
  // ring combine runs.
  std::unique_ptr<HostExchange> pull_exchange;
  // The host-free form (runtime/input_exports.hpp): this rank's input exports and the mapping thread. One node:
  // over the group, made with pull_exchange (DEEP_EP_HOST_FREE_COMBINE=0 keeps the exchange). Several nodes with
  // internode_in_place: over this rank's node, where every node can make them.
  std::unique_ptr<InputExports> input_exports;
  RdmaPayloadUsers rdma_payload_users;  // internode and low-latency ops on one low_latency_mode Buffer
  bool poisoned = false;
  std::string poison_message;
  // After an error that leaves this rank's ops out of step with its peers': every later call raises `message`.
  void poison(const std::string& message) {
    poisoned = true;
    poison_message = message;
  }
  // This call's input, exported for the peers that read it in place. The peers launch their half of the op
  // whatever happens here, so a failure (staging memory, its slots, an IPC handle) also poisons the buffer.
  PullInput export_or_poison(const char* op, const void* x, size_t x_bytes, const void* weights, size_t weight_bytes,
                             bool has_rows, cudaStream_t stream) {
    try {
      return input_exports->export_call(x, x_bytes, weights, weight_bytes, has_rows, stream);
    } catch (const std::exception& error) {
      poison(std::string(op) + ": " + error.what());
      throw;
    }
  }
  // The same for this call's dispatch outputs, which the peers write in place.
  OutputPlacement export_outputs_or_poison(const char* op, void* const (&outputs)[kNumPushOutputs],
                                           const size_t (&bytes)[kNumPushOutputs], cudaStream_t stream) {
    try {
      return input_exports->export_outputs(outputs, bytes, stream);
    } catch (const std::exception& error) {
      poison(std::string(op) + ": " + error.what());
      throw;
    }
  }
  // The network side of the transport choice (runtime/network.cpp): set up only when a peer is on
  // another host, in GIN builds. `network` carries gin_compiled, nccl_available, nccl_reports_gin.
  std::shared_ptr<NcclCommunicator> nccl;
  TransportChoiceInputs network;
  // GIN builds, when the group spans hosts and NCCL reports GIN: the whole buffer is ncclMemAlloc memory
  // registered as the communicator's window (NCCL needs cuMem memory there); node-mates map it through
  // NCCL's load/store team instead of CUDA IPC, and other hosts are reached by the GIN transport over it,
  // with the signal ranges of gin_signals.
  bool gin_window = false;
  GinSignalPlan gin_signals{};

  // Where the next notify publishes its counts, with the next epoch.
  HostCounts next_host_counts() {
    return {&host_device->num_recv_tokens, host_device->num_recv_tokens_per_expert, &host_device->counts_ready,
            ++counts_epoch, &host_device->num_rdma_recv_tokens};
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
  // (mapped memory, emulated nodes included), or GIN where the buffer is an NCCL window. The error says
  // which peer and why (transport_to names what is missing when nothing reaches it at all).
  void require_reach(int rank, const char* op) const {
    for (int peer = 0; peer < static_cast<int>(peer_bases.size()); ++peer) {
      if (peer_bases[peer] != nullptr) continue;
      const TransportKind kind = transport_to(rank, peer);
      DEEP_EP_CHECK(kind == TransportKind::kP2p || gin_window, op, ": rank ", rank, " reaches peer rank ", peer,
                    " only through ", transport_name(kind), ", but this Buffer's memory is not an NCCL window");
    }
  }
  // Whether the ops launch the kernels' GIN variants: some peer is reached only through GIN.
  bool uses_gin() const { return gin_window && first_unmapped_peer() >= 0; }

  DeviceDiagnostics* device_diagnostics() const { return &host_device->diagnostics; }
};

// Collective, from the Buffer constructor: where the group needs a network (needs_network: a peer on
// another host) and this build has GIN, obtains the NCCL communicator (adopted from
// options.nccl_comm_address, else created over the group) and its device communicator with the signals
// of gin_signal_plan (kept in in.gin_signals), and records whether NCCL reports GIN. Otherwise it only
// records gin_compiled. Runs on every rank or none: hosts are the same for all.
// ask_for_gin = false creates the device communicator without GIN (a forced window on one host).
void connect_network(Buffer::Internals& in, Group& group, const BufferOptions& options, bool needs_network,
                     int num_nodes, int num_device_sms, bool ask_for_gin = true);

// Testing aid: DEEP_EP_FORCE_NCCL_WINDOW=1 makes a Buffer on one host take its memory as an NCCL window
// and map its peers through NCCL, as a group spanning hosts with GIN does, while the kernels stay on
// P2P: so that path runs on a machine without a NIC (NCCL needs one GPU per rank). GIN builds only.
constexpr const char* kForceNcclWindowEnv = "DEEP_EP_FORCE_NCCL_WINDOW";
// Whether DEEP_EP_FORCE_NCCL_WINDOW is 1; ValueError for other values than unset, empty, 0 or 1, and for
// 1 in a build without GIN.
bool force_nccl_window_from_env();

}  // namespace deep_ep
