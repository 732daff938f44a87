// Which transport carries a rank's bytes to a peer (docs/design.md decision 4). The host runtime asks once
// per peer while it sets a buffer up; the device side of each transport lives in csrc/transport/.
#pragma once

namespace deep_ep {

enum class TransportKind { kP2p, kGin };

// What the runtime learned about one (rank, peer) pair and about this build.
struct TransportChoiceInputs {
  bool peer_reachable_by_load_store = false;  // the peer's buffer is mapped here (NVLink, same GPU, same process)
  bool nccl_available = false;                // an NCCL communicator over the group exists
  bool nccl_reports_gin = false;              // NCCL gave that communicator GIN contexts
  bool gin_compiled = false;                  // pass gin_compiled(); an input so tests can vary it
  // Route load/store peers over GIN too when GIN is usable, falling back to P2P when it is not: lets
  // one node exercise the GIN path. Off in production.
  bool prefer_gin_for_local = false;
};

// The rule: a peer reachable by load/store uses P2P (no NIC on the path, so always the fastest) unless
// prefer_gin_for_local asks for GIN and GIN is usable; any other peer uses GIN, which needs all of
// gin_compiled, nccl_available and nccl_reports_gin. A peer nothing can reach is a ValueError naming
// rank, peer and the missing piece; so are negative ranks.
TransportKind choose_transport(const TransportChoiceInputs& inputs, int rank, int peer);

// "p2p" or "gin", for logs and messages.
const char* transport_name(TransportKind kind);

// Whether this build has the GIN transport (-DDEEP_EP_ENABLE_GIN=ON).
bool gin_compiled();

}  // namespace deep_ep
