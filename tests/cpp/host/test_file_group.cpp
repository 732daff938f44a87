// FileGroup: the bootstrap group for C++ users, exercised with one thread per rank.
#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"
#include "temp_dir.hpp"

using namespace deep_ep;

namespace {
std::string fresh_dir() { return fresh_test_dir("deep_ep_file_group_"); }
}  // namespace

TEST(FileGroup, AllGatherReturnsEveryRanksBytesInRankOrder) {
  const std::string dir = fresh_dir();
  constexpr int kRanks = 4;
  std::vector<std::vector<std::string>> results(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup g(dir, r, kRanks, 10.0);
      results[r] = g.all_gather(std::string(r + 1, static_cast<char>('a' + r)));
      g.barrier();
      auto second = g.all_gather(std::to_string(r * 10));
      EXPECT_EQ(second[kRanks - 1], std::to_string((kRanks - 1) * 10));
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_EQ(results[r].size(), static_cast<size_t>(kRanks));
    for (int p = 0; p < kRanks; ++p) EXPECT_EQ(results[r][p], std::string(p + 1, static_cast<char>('a' + p)));
  }
}

TEST(FileGroup, BinaryPayloadSurvives) {
  const std::string dir = fresh_dir();
  std::string payload("\0\1\2\xff", 4);
  FileGroup g(dir, 0, 1, 5.0);
  auto out = g.all_gather(payload);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], payload);
}

TEST(FileGroup, MissingPeerTimesOutNamingIt) {
  const std::string dir = fresh_dir();
  FileGroup g(dir, 0, 2, 0.2);
  try {
    g.all_gather("x");
    FAIL() << "expected a timeout";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos);
  }
}

TEST(FileGroup, RejectsBadRank) {
  EXPECT_THROW(FileGroup("/tmp", 2, 2), ValueError);
  EXPECT_THROW(FileGroup("/tmp", 0, 0), ValueError);
}
