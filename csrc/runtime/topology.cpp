// Node topology (see topology.hpp): groups the ranks' bootstrap reports into nodes, by host or by the
// DEEP_EP_RANKS_PER_NODE override, and checks the node-major rank layout internode mode relies on.
#include "deep_ep/topology.hpp"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <map>
#include <unordered_map>
#include <utility>

#include "deep_ep/error.hpp"

namespace deep_ep {

namespace {

constexpr const char* kRanksPerNodeEnv = "DEEP_EP_RANKS_PER_NODE";

// The grouping the hosts imply. Kept even when invalid: with an override, an invalid host grouping only
// means the override's nodes are emulated, not that the input is wrong.
struct HostGrouping {
  std::vector<int> host_of_rank;  // index of the rank's hostname in order of first appearance
  std::vector<std::string> hosts;
  int num_ranks_per_host = 0;  // meaningful only when error is empty
  std::string error;           // why the hosts do not form a node-major layout; empty when they do
};

HostGrouping group_by_host(const std::vector<RankLocation>& ranks) {
  HostGrouping g;
  const int num_ranks = static_cast<int>(ranks.size());
  g.host_of_rank.resize(num_ranks);
  std::unordered_map<std::string, int> index_of_host;
  std::vector<int> first_rank_of_host, num_ranks_of_host;
  for (int r = 0; r < num_ranks; ++r) {
    const std::string& hostname = ranks[r].hostname;
    const auto [it, is_new] = index_of_host.emplace(hostname, static_cast<int>(g.hosts.size()));
    const int host = it->second;
    if (is_new) {
      g.hosts.push_back(hostname);
      first_rank_of_host.push_back(r);
      num_ranks_of_host.push_back(0);
    } else if (g.host_of_rank[r - 1] != host && g.error.empty()) {
      // A host seen before, but not on the previous rank: its ranks were interrupted by another host's.
      g.error = detail::concat("rank ", r, " runs on host ", hostname,
                               " but ranks of a node must be contiguous (rank = node * ranks_per_node + local "
                               "rank): host ",
                               hostname, "'s ranks start at rank ", first_rank_of_host[host], " and rank ", r - 1,
                               " runs on host ", g.hosts[g.host_of_rank[r - 1]]);
    }
    g.host_of_rank[r] = host;
    ++num_ranks_of_host[host];
  }
  if (g.error.empty()) {
    for (size_t h = 1; h < g.hosts.size(); ++h) {
      if (num_ranks_of_host[h] == num_ranks_of_host[0]) continue;
      g.error = detail::concat("node ", h, " (host ", g.hosts[h], ", ranks [", first_rank_of_host[h], ", ",
                               first_rank_of_host[h] + num_ranks_of_host[h], ")) has ", num_ranks_of_host[h],
                               " ranks, node 0 (host ", g.hosts[0], ") has ", num_ranks_of_host[0],
                               ": every node needs the same number (rank = node * ranks_per_node + local rank)");
      break;
    }
  }
  if (g.error.empty()) g.num_ranks_per_host = num_ranks_of_host[0];
  return g;
}

}  // namespace

bool Topology::same_node(int a, int b) const {
  DEEP_EP_CHECK(a >= 0 && a < num_ranks, "Topology.same_node: rank a must be in [0, ", num_ranks, "), got ", a);
  DEEP_EP_CHECK(b >= 0 && b < num_ranks, "Topology.same_node: rank b must be in [0, ", num_ranks, "), got ", b);
  return node_of_rank[a] == node_of_rank[b];
}

int Topology::rank_of(int node, int local_rank) const {
  DEEP_EP_CHECK(node >= 0 && node < num_nodes, "Topology.rank_of: node must be in [0, ", num_nodes, "), got ", node);
  DEEP_EP_CHECK(local_rank >= 0 && local_rank < num_ranks_per_node, "Topology.rank_of: local_rank must be in [0, ",
                num_ranks_per_node, "), got ", local_rank);
  return node * num_ranks_per_node + local_rank;
}

Topology make_topology(const std::vector<RankLocation>& ranks, int ranks_per_node_override) {
  DEEP_EP_CHECK(!ranks.empty(), "make_topology: ranks must hold one location per rank (at least one), got none");
  DEEP_EP_CHECK(ranks.size() <= static_cast<size_t>(INT_MAX), "make_topology: ranks must hold at most ", INT_MAX,
                " locations, got ", ranks.size());
  DEEP_EP_CHECK(ranks_per_node_override >= 0,
                "make_topology: ranks_per_node_override must be 0 (nodes from hosts) or positive, got ",
                ranks_per_node_override);
  const int num_ranks = static_cast<int>(ranks.size());
  // An empty name means the rank could not read its hostname; grouping such ranks together would claim
  // load/store reachability nobody checked.
  for (int r = 0; r < num_ranks; ++r)
    DEEP_EP_CHECK(!ranks[r].hostname.empty(), "make_topology: rank ", r, " reported an empty hostname");

  const HostGrouping hosts = group_by_host(ranks);
  Topology t;
  t.num_ranks = num_ranks;
  if (ranks_per_node_override == 0) {
    DEEP_EP_CHECK(hosts.error.empty(), "make_topology: ", hosts.error);
    t.num_ranks_per_node = hosts.num_ranks_per_host;
  } else {
    const int n = ranks_per_node_override;
    DEEP_EP_CHECK(num_ranks % n == 0, "make_topology: ranks_per_node override ", n,
                  " must divide the number of ranks, got ", num_ranks, " ranks (rank ", num_ranks / n * n,
                  " would start an incomplete node)");
    // A declared node's ranks talk by load/store, which only works inside one host.
    for (int r = 0; r < num_ranks; ++r) {
      const int leader = r / n * n;
      DEEP_EP_CHECK(hosts.host_of_rank[r] == hosts.host_of_rank[leader], "make_topology: rank ", r, " runs on host ",
                    ranks[r].hostname, " but rank ", leader, " of the same node ", r / n, " (ranks_per_node override ",
                    n, ") runs on host ", ranks[leader].hostname,
                    ": ranks of one node must reach each other by load/store, which needs one host");
    }
    t.num_ranks_per_node = n;
    // Every declared node lies inside one host, so equal node sizes mean the same grouping as the hosts'.
    t.emulated = !hosts.error.empty() || hosts.num_ranks_per_host != n;
  }
  t.num_nodes = num_ranks / t.num_ranks_per_node;

  t.node_of_rank.resize(num_ranks);
  t.local_rank_of_rank.resize(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    t.node_of_rank[r] = r / t.num_ranks_per_node;
    t.local_rank_of_rank[r] = r % t.num_ranks_per_node;
  }

  // Device UUIDs are only unique within a host as far as the reports go, so the host is part of the key.
  std::map<std::pair<int, std::array<unsigned char, 16>>, int> num_ranks_of_device;
  for (int r = 0; r < num_ranks; ++r) ++num_ranks_of_device[{hosts.host_of_rank[r], ranks[r].device_uuid}];
  t.ranks_per_device.resize(num_ranks);
  for (int r = 0; r < num_ranks; ++r)
    t.ranks_per_device[r] = num_ranks_of_device[{hosts.host_of_rank[r], ranks[r].device_uuid}];
  return t;
}

int ranks_per_node_from_env() {
  const char* value = std::getenv(kRanksPerNodeEnv);
  if (value == nullptr || *value == '\0') return 0;
  // Digits only: strtol alone would accept leading blanks, a sign, and trailing garbage after a number.
  bool all_digits = true;
  for (const char* c = value; *c != '\0'; ++c) all_digits = all_digits && *c >= '0' && *c <= '9';
  DEEP_EP_CHECK(
      all_digits, kRanksPerNodeEnv,
      " must be a non-negative integer (ranks per emulated node; unset, empty or 0 = nodes from hosts), got '", value,
      "'");
  errno = 0;
  const long long parsed = std::strtoll(value, nullptr, 10);
  DEEP_EP_CHECK(errno != ERANGE && parsed <= INT_MAX, kRanksPerNodeEnv, " must be at most ", INT_MAX, ", got '", value,
                "'");
  return static_cast<int>(parsed);
}

}  // namespace deep_ep
