// Node topology for internode normal mode: which ranks form a node (an RDMA domain whose ranks reach each
// other by load/store) and how many ranks share each GPU. Pure host logic, computed from what every rank
// reports at bootstrap; an override groups ranks into emulated nodes so that one host or one GPU can
// exercise the internode path (cross-node traffic then takes the P2P transport, docs/design.md decision 4).
#pragma once

#include <array>
#include <string>
#include <vector>

namespace deep_ep {

// What each rank reports at bootstrap.
struct RankLocation {
  std::string hostname;
  std::array<unsigned char, 16> device_uuid{};
};

// Ranks are laid out node-major, as DeepEP's internode mode requires:
// rank = node * num_ranks_per_node + local rank.
struct Topology {
  int num_ranks = 0, num_nodes = 0, num_ranks_per_node = 0;
  std::vector<int> node_of_rank;        // [num_ranks]
  std::vector<int> local_rank_of_rank;  // [num_ranks] index of the rank inside its node
  std::vector<int> ranks_per_device;    // [num_ranks] ranks of the whole group sharing this rank's GPU, itself included
  bool emulated = false;                // nodes come from the override and differ from the hosts' grouping

  // ValueError when a or b is not in [0, num_ranks).
  bool same_node(int a, int b) const;
  // Inverse of (node_of_rank, local_rank_of_rank); ValueError when node or local_rank is out of range.
  int rank_of(int node, int local_rank) const;
};

// ranks_per_node_override: 0 = nodes are the hosts (distinct hostnames in order of first appearance, each
// holding a contiguous range of ranks, all of the same size); N > 0 = ranks [k*N, (k+1)*N) form node k,
// which must lie on one host. Inconsistent input raises ValueError naming the rank that breaks the rule.
Topology make_topology(const std::vector<RankLocation>& ranks, int ranks_per_node_override);

// The override from DEEP_EP_RANKS_PER_NODE: unset or empty = 0; anything but a non-negative decimal
// integer raises ValueError naming the variable and its value.
int ranks_per_node_from_env();

}  // namespace deep_ep
