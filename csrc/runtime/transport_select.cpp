// Host-side choice between the P2P and GIN transports (include/deep_ep/transport.hpp). Pure: the
// runtime gathers the facts (topology, NCCL, build) and this file only applies the rule.
#include "deep_ep/transport.hpp"

#include "deep_ep/error.hpp"

namespace deep_ep {

namespace {

bool gin_usable(const TransportChoiceInputs& in) { return in.gin_compiled && in.nccl_available && in.nccl_reports_gin; }

// The first missing piece of GIN, in the order a user has to fix them.
const char* why_gin_is_unusable(const TransportChoiceInputs& in) {
  if (!in.gin_compiled) return "this build has no GIN transport (configure with -DDEEP_EP_ENABLE_GIN=ON, NCCL >= 2.28)";
  if (!in.nccl_available) return "no NCCL communicator is available (the GIN transport runs over NCCL >= 2.28)";
  return "NCCL reports no GIN support for this communicator (it needs NCCL >= 2.28 and a GIN-capable network)";
}

}  // namespace

TransportKind choose_transport(const TransportChoiceInputs& inputs, int rank, int peer) {
  DEEP_EP_CHECK(rank >= 0 && peer >= 0, "choose_transport: rank and peer must be non-negative, got rank ", rank,
                " and peer ", peer);
  if (inputs.peer_reachable_by_load_store) {
    return inputs.prefer_gin_for_local && gin_usable(inputs) ? TransportKind::kGin : TransportKind::kP2p;
  }
  if (gin_usable(inputs)) return TransportKind::kGin;
  throw ValueError(detail::concat("no transport from rank ", rank, " to peer ", peer,
                                  ": the peer is not reachable by load/store and ", why_gin_is_unusable(inputs)));
}

const char* transport_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kP2p:
      return "p2p";
    case TransportKind::kGin:
      return "gin";
  }
  return "unknown";
}

bool gin_compiled() {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  return true;
#else
  return false;
#endif
}

}  // namespace deep_ep
