// NodeGroup: one node's ranks as a Group over the whole group's collectives, exercised with one thread per rank
// over a FileGroup bootstrap (two nodes of three ranks).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "deep_ep/group.hpp"
#include "runtime/host_exchange.hpp"
#include "runtime/node_group.hpp"
#include "temp_dir.hpp"

using namespace deep_ep;

namespace {
constexpr int kRanks = 6, kRanksPerNode = 3;
}  // namespace

TEST(NodeGroup, RanksAndAllGatherAreTheNodes) {
  const std::string dir = fresh_test_dir("deep_ep_node_group_");
  std::vector<int> ranks(kRanks, -1), sizes(kRanks, -1);
  std::vector<std::vector<std::string>> gathered(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 10.0);
      NodeGroup node(group, kRanksPerNode);
      ranks[r] = node.rank();
      sizes[r] = node.size();
      gathered[r] = node.all_gather("rank" + std::to_string(r));
      node.barrier();
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(ranks[r], r % kRanksPerNode);
    EXPECT_EQ(sizes[r], kRanksPerNode);
    ASSERT_EQ(gathered[r].size(), static_cast<size_t>(kRanksPerNode));
    const int first = r / kRanksPerNode * kRanksPerNode;
    for (int l = 0; l < kRanksPerNode; ++l) EXPECT_EQ(gathered[r][l], "rank" + std::to_string(first + l));
  }
}

TEST(NodeGroup, SharedObjectIsOnePerNode) {
  // Each node's first rank writes its node's number into the node's object; every rank then reads its own node's.
  const std::string dir = fresh_test_dir("deep_ep_node_group_shm_");
  std::vector<int64_t> seen(kRanks, -1);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 10.0);
      NodeGroup node(group, kRanksPerNode);
      // A failed map is recorded, not asserted here: this thread still makes every collective the others wait on.
      void* shared = map_shared_object(node, 4096);
      auto* word = static_cast<std::atomic<int64_t>*>(shared);
      if (word && node.rank() == 0) word->store(100 + r / kRanksPerNode, std::memory_order_release);
      group.barrier();
      seen[r] = word ? word->load(std::memory_order_acquire) : -2;
      group.barrier();  // every rank has read before any unmaps
      unmap_shared_object(shared, 4096);
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(seen[r], 100 + r / kRanksPerNode) << "rank " << r;
}

TEST(NodeGroup, RejectsASizeThatDoesNotDivideTheGroup) {
  const std::string dir = fresh_test_dir("deep_ep_node_group_bad_");
  FileGroup group(dir, 0, 1, 5.0);
  EXPECT_THROW(NodeGroup(group, 2), std::exception);
}
