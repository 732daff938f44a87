// Node topology: grouping of bootstrap reports into nodes, by host and by the ranks-per-node override.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/topology.hpp"

using namespace deep_ep;

namespace {

std::array<unsigned char, 16> uuid(int device) {
  std::array<unsigned char, 16> id{};
  id.fill(0xab);
  id[15] = static_cast<unsigned char>(device);
  return id;
}

// One location per entry of `hosts`; ranks of a host are spread over `num_gpus_per_host` GPUs in blocks,
// so each GPU holds consecutive ranks. Hosts' GPUs share UUIDs on purpose: only (host, UUID) is a device.
std::vector<RankLocation> locations(const std::vector<std::string>& hosts, int num_gpus_per_host = 1) {
  std::vector<RankLocation> out;
  std::vector<std::string> seen;
  for (const auto& h : hosts) {
    size_t idx = 0;
    while (idx < seen.size() && seen[idx] != h) ++idx;
    if (idx == seen.size()) seen.push_back(h);
    out.push_back({h, uuid(0)});
  }
  for (const auto& h : seen) {
    int total = 0;
    for (const auto& x : hosts) total += x == h;
    int local = 0;
    for (auto& loc : out) {
      if (loc.hostname != h) continue;
      loc.device_uuid = uuid(local * num_gpus_per_host / total);
      ++local;
    }
  }
  return out;
}

std::vector<std::string> repeat(const std::string& host, int n) { return std::vector<std::string>(n, host); }

std::vector<std::string> concat_hosts(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The error text, or nothing when no ValueError was raised.
template <typename F>
std::optional<std::string> value_error_of(F&& f) {
  try {
    f();
  } catch (const ValueError& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}

void expect_node_major_and_consistent(const Topology& t) {
  ASSERT_EQ(static_cast<int>(t.node_of_rank.size()), t.num_ranks);
  ASSERT_EQ(static_cast<int>(t.local_rank_of_rank.size()), t.num_ranks);
  ASSERT_EQ(static_cast<int>(t.ranks_per_device.size()), t.num_ranks);
  EXPECT_EQ(t.num_nodes * t.num_ranks_per_node, t.num_ranks);
  for (int r = 0; r < t.num_ranks; ++r) {
    EXPECT_EQ(t.node_of_rank[r], r / t.num_ranks_per_node) << "rank " << r;
    EXPECT_EQ(t.local_rank_of_rank[r], r % t.num_ranks_per_node) << "rank " << r;
    EXPECT_EQ(t.rank_of(t.node_of_rank[r], t.local_rank_of_rank[r]), r);
    for (int s = 0; s < t.num_ranks; ++s)
      EXPECT_EQ(t.same_node(r, s), t.node_of_rank[r] == t.node_of_rank[s]) << "ranks " << r << ", " << s;
  }
}

// Sets an environment variable for one scope and puts back what was there before.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    if (old) old_ = old;
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace

TEST(Topology, EightRanksOnOneGpuFormOneNodeFromTheHost) {
  const Topology t = make_topology(locations(repeat("a", 8)), 0);
  EXPECT_EQ(t.num_ranks, 8);
  EXPECT_EQ(t.num_nodes, 1);
  EXPECT_EQ(t.num_ranks_per_node, 8);
  EXPECT_FALSE(t.emulated);
  for (int r = 0; r < 8; ++r) EXPECT_EQ(t.ranks_per_device[r], 8);
  expect_node_major_and_consistent(t);
}

TEST(Topology, OverrideSplitsSixteenRanksOnOneGpuIntoTwoEmulatedNodes) {
  const Topology t = make_topology(locations(repeat("a", 16)), 8);
  EXPECT_EQ(t.num_nodes, 2);
  EXPECT_EQ(t.num_ranks_per_node, 8);
  EXPECT_TRUE(t.emulated);
  for (int r = 0; r < 16; ++r) {
    EXPECT_EQ(t.local_rank_of_rank[r], r % 8);
    EXPECT_EQ(t.ranks_per_device[r], 16);
  }
  EXPECT_TRUE(t.same_node(0, 7));
  EXPECT_FALSE(t.same_node(7, 8));
  EXPECT_EQ(t.rank_of(1, 0), 8);
  expect_node_major_and_consistent(t);
}

TEST(Topology, OverrideSplitsSixteenRanksOnOneGpuIntoFourNodesOfFour) {
  const Topology t = make_topology(locations(repeat("a", 16)), 4);
  EXPECT_EQ(t.num_nodes, 4);
  EXPECT_EQ(t.num_ranks_per_node, 4);
  EXPECT_TRUE(t.emulated);
  EXPECT_EQ(t.node_of_rank[13], 3);
  EXPECT_EQ(t.local_rank_of_rank[13], 1);
  EXPECT_EQ(t.rank_of(3, 1), 13);
  expect_node_major_and_consistent(t);
}

TEST(Topology, OverrideEqualToTheWholeHostIsNotEmulated) {
  const Topology t = make_topology(locations(repeat("a", 8)), 8);
  EXPECT_EQ(t.num_nodes, 1);
  EXPECT_FALSE(t.emulated);
}

TEST(Topology, TwoHostsFormTwoNodes) {
  const auto locs = locations(concat_hosts(repeat("a", 4), repeat("b", 4)), 4);
  const Topology t = make_topology(locs, 0);
  EXPECT_EQ(t.num_nodes, 2);
  EXPECT_EQ(t.num_ranks_per_node, 4);
  EXPECT_FALSE(t.emulated);
  for (int r = 0; r < 8; ++r) EXPECT_EQ(t.ranks_per_device[r], 1) << "rank " << r;
  expect_node_major_and_consistent(t);
}

TEST(Topology, OverrideMatchingTheHostsIsNotEmulated) {
  const auto locs = locations(concat_hosts(repeat("a", 4), repeat("b", 4)), 4);
  const Topology from_hosts = make_topology(locs, 0);
  const Topology t = make_topology(locs, 4);
  EXPECT_FALSE(t.emulated);
  EXPECT_EQ(t.num_nodes, 2);
  EXPECT_EQ(t.node_of_rank, from_hosts.node_of_rank);
  EXPECT_EQ(t.local_rank_of_rank, from_hosts.local_rank_of_rank);
}

TEST(Topology, OverrideMaySplitAHostIntoSeveralNodes) {
  const auto locs = locations(concat_hosts(repeat("a", 4), repeat("b", 4)), 4);
  const Topology t = make_topology(locs, 2);
  EXPECT_EQ(t.num_nodes, 4);
  EXPECT_EQ(t.num_ranks_per_node, 2);
  EXPECT_TRUE(t.emulated);
  expect_node_major_and_consistent(t);
}

TEST(Topology, OverrideNodeSpanningTwoHostsIsRejected) {
  const auto locs = locations(concat_hosts(repeat("a", 4), repeat("b", 4)), 4);
  const auto error = value_error_of([&] { make_topology(locs, 8); });
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->find("rank 4 runs on host b"), std::string::npos) << *error;
  EXPECT_NE(error->find("load/store"), std::string::npos) << *error;
}

TEST(Topology, OverrideIsAllowedWhereTheHostsAloneAreUneven) {
  // Hosts give nodes of 2 and 4 ranks, but every declared node of 2 stays on one host.
  const auto locs = locations(concat_hosts(repeat("a", 2), repeat("b", 4)));
  EXPECT_THROW(make_topology(locs, 0), ValueError);
  const Topology t = make_topology(locs, 2);
  EXPECT_EQ(t.num_nodes, 3);
  EXPECT_TRUE(t.emulated);
}

TEST(Topology, NonContiguousHostsAreRejected) {
  const auto error = value_error_of([] { make_topology(locations({"a", "b", "a", "b"}), 0); });
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->find("rank 2 runs on host a"), std::string::npos) << *error;
  EXPECT_NE(error->find("contiguous"), std::string::npos) << *error;
}

TEST(Topology, UnevenHostsAreRejected) {
  const auto error = value_error_of([] { make_topology(locations({"a", "a", "a", "b"}), 0); });
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->find("node 1 (host b, ranks [3, 4)) has 1 ranks, node 0 (host a) has 3"), std::string::npos)
      << *error;
}

TEST(Topology, OverrideThatDoesNotDivideTheRanksIsRejected) {
  const auto error = value_error_of([] { make_topology(locations(repeat("a", 12)), 8); });
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->find("override 8"), std::string::npos) << *error;
  EXPECT_NE(error->find("12 ranks"), std::string::npos) << *error;
  EXPECT_THROW(make_topology(locations(repeat("a", 4)), 8), ValueError);
}

TEST(Topology, EmptyInputIsRejected) {
  const auto error = value_error_of([] { make_topology({}, 0); });
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->find("got none"), std::string::npos) << *error;
  EXPECT_THROW(make_topology({}, 4), ValueError);
}

TEST(Topology, NegativeOverrideAndEmptyHostnameAreRejected) {
  const auto negative = value_error_of([] { make_topology(locations(repeat("a", 4)), -1); });
  ASSERT_TRUE(negative.has_value());
  EXPECT_NE(negative->find("ranks_per_node_override"), std::string::npos) << *negative;
  auto locs = locations(repeat("a", 4));
  locs[2].hostname.clear();
  const auto empty_host = value_error_of([&] { make_topology(locs, 0); });
  ASSERT_TRUE(empty_host.has_value());
  EXPECT_NE(empty_host->find("rank 2"), std::string::npos) << *empty_host;
}

TEST(Topology, SingleRankIsOneNode) {
  const Topology t = make_topology(locations({"a"}), 0);
  EXPECT_EQ(t.num_nodes, 1);
  EXPECT_EQ(t.num_ranks_per_node, 1);
  EXPECT_EQ(t.ranks_per_device, std::vector<int>{1});
  EXPECT_EQ(t.rank_of(0, 0), 0);
}

TEST(Topology, RanksPerDeviceCountsRanksOnTheSameHostAndGpu) {
  // Two hosts, two GPUs each, two ranks per GPU; both hosts report the same UUIDs.
  const auto locs = locations(concat_hosts(repeat("a", 4), repeat("b", 4)), 2);
  ASSERT_EQ(locs[0].device_uuid, locs[4].device_uuid);
  ASSERT_NE(locs[0].device_uuid, locs[2].device_uuid);
  const Topology t = make_topology(locs, 0);
  EXPECT_EQ(t.ranks_per_device, std::vector<int>(8, 2));
}

TEST(Topology, RanksPerDeviceFollowsUnevenSharing) {
  auto locs = locations(repeat("a", 4));
  locs[3].device_uuid = uuid(1);
  const Topology t = make_topology(locs, 0);
  EXPECT_EQ(t.ranks_per_device, (std::vector<int>{3, 3, 3, 1}));
}

TEST(Topology, AccessorsRejectOutOfRangeArguments) {
  const Topology t = make_topology(locations(repeat("a", 8)), 4);
  EXPECT_THROW(t.same_node(-1, 0), ValueError);
  EXPECT_THROW(t.same_node(0, 8), ValueError);
  EXPECT_THROW(t.rank_of(2, 0), ValueError);
  EXPECT_THROW(t.rank_of(-1, 0), ValueError);
  EXPECT_THROW(t.rank_of(0, 4), ValueError);
  EXPECT_THROW(t.rank_of(0, -1), ValueError);
  const auto error = value_error_of([&] { t.rank_of(0, 4); });
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->find("local_rank"), std::string::npos) << *error;
}

TEST(Topology, RanksPerNodeFromEnvironment) {
  {
    ScopedEnv env("DEEP_EP_RANKS_PER_NODE", nullptr);
    EXPECT_EQ(ranks_per_node_from_env(), 0);
  }
  {
    ScopedEnv env("DEEP_EP_RANKS_PER_NODE", "");
    EXPECT_EQ(ranks_per_node_from_env(), 0);
  }
  {
    ScopedEnv env("DEEP_EP_RANKS_PER_NODE", "8");
    EXPECT_EQ(ranks_per_node_from_env(), 8);
  }
  {
    ScopedEnv env("DEEP_EP_RANKS_PER_NODE", "0");
    EXPECT_EQ(ranks_per_node_from_env(), 0);
  }
}

TEST(Topology, RanksPerNodeFromEnvironmentRejectsNonIntegers) {
  for (const char* bad : {"x", "-1", "8x", " 8", "4.0", "99999999999"}) {
    ScopedEnv env("DEEP_EP_RANKS_PER_NODE", bad);
    const auto error = value_error_of([] { ranks_per_node_from_env(); });
    ASSERT_TRUE(error.has_value()) << "value '" << bad << "'";
    EXPECT_NE(error->find("DEEP_EP_RANKS_PER_NODE"), std::string::npos) << *error;
    EXPECT_NE(error->find(std::string("'") + bad + "'"), std::string::npos) << *error;
  }
}
