// Where a notify kernel publishes, in host-mapped memory, what the host needs before it can allocate a
// dispatch's outputs: num_recv_tokens, num_recv_tokens_per_expert[L] (internode also
// num_rdma_recv_tokens), and last ready = epoch (after a
// system-scope fence). The host reads the counts only once it sees ready == epoch.
#pragma once

namespace deep_ep {

struct HostCounts {
  int* num_recv_tokens;
  int* num_recv_tokens_per_expert;
  volatile int* ready;
  int epoch;
  int* num_rdma_recv_tokens;  // internode: rows this rank receives over the network as a forwarder
};

}  // namespace deep_ep
