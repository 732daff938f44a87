// HostExchange: the shared-memory all-gather of the pull combine, exercised with one thread per rank
// (each maps the object on its own, as processes do) over a FileGroup bootstrap.
#include <gtest/gtest.h>

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"
#include "runtime/host_exchange.hpp"
#include "temp_dir.hpp"

using namespace deep_ep;

namespace {

struct Record {
  int rank;
  int round;
  char tag[40];
};

}  // namespace

TEST(HostExchange, EveryRoundReturnsEveryRanksRecordInRankOrder) {
  const std::string dir = fresh_test_dir("deep_ep_host_exchange_");
  constexpr int kRanks = 5, kRounds = 300;
  std::vector<int> mismatches(kRanks, 0);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 20.0);
      auto exchange = HostExchange::create(group, sizeof(Record), 20.0);
      ASSERT_NE(exchange, nullptr);
      std::mt19937 random(r);
      for (int n = 0; n < kRounds; ++n) {
        // Ranks arrive in a different order every round, some far behind.
        if (random() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(random() % 300));
        Record mine{r, n, {}};
        std::snprintf(mine.tag, sizeof(mine.tag), "rank %d round %d", r, n);
        Record all[kRanks];
        std::memset(all, 0xff, sizeof(all));  // nothing of an earlier round may pass for this one
        exchange->all_gather(&mine, all, "test");
        for (int p = 0; p < kRanks; ++p) {
          char want[40];
          std::snprintf(want, sizeof(want), "rank %d round %d", p, n);
          if (all[p].rank != p || all[p].round != n || std::strncmp(all[p].tag, want, sizeof(want)) != 0)
            ++mismatches[r];
        }
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(mismatches[r], 0) << "rank " << r;
}

TEST(HostExchange, MissingPeerTimesOutNamingRankPeerAndPhase) {
  const std::string dir = fresh_test_dir("deep_ep_host_exchange_");
  std::unique_ptr<HostExchange> exchanges[2];
  std::thread other([&] {
    FileGroup group(dir, 1, 2, 20.0);
    exchanges[1] = HostExchange::create(group, 8, 0.2);
  });
  FileGroup group(dir, 0, 2, 20.0);
  exchanges[0] = HostExchange::create(group, 8, 0.2);
  other.join();
  ASSERT_NE(exchanges[0], nullptr);
  const uint64_t record = 7;
  uint64_t all[2];
  try {
    exchanges[0]->all_gather(&record, all, "combine (test phase)");  // rank 1 never joins
    FAIL() << "expected a timeout";
  } catch (const TimeoutError& e) {
    const std::string text = e.what();
    EXPECT_NE(text.find("rank 0"), std::string::npos) << text;
    EXPECT_NE(text.find("peer rank 1"), std::string::npos) << text;
    EXPECT_NE(text.find("combine (test phase)"), std::string::npos) << text;
  }
  // The rounds are out of step now: later calls refuse at once instead of pairing the wrong rounds.
  EXPECT_THROW(exchanges[0]->all_gather(&record, all, "combine"), std::runtime_error);
}

TEST(HostExchange, ObjectIsUnlinkedOnceEveryRankMappedIt) {
  const std::string dir = fresh_test_dir("deep_ep_host_exchange_");
  std::unique_ptr<HostExchange> exchanges[3];
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, 3, 20.0);
      exchanges[r] = HostExchange::create(group, 16, 5.0);
    });
  for (auto& t : threads) t.join();
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm"))
    EXPECT_EQ(entry.path().filename().string().find("deep_ep_exchange_" + std::to_string(getpid()) + "_"),
              std::string::npos)
        << entry.path();
}

TEST(HostExchange, RejectsBadArguments) {
  const std::string dir = fresh_test_dir("deep_ep_host_exchange_");
  FileGroup group(dir, 0, 1, 5.0);
  EXPECT_THROW(HostExchange::create(group, 0, 1.0), ValueError);
  EXPECT_THROW(HostExchange::create(group, 8, 0.0), ValueError);
}

// map_shared_object (the input exports' tables use it too): every rank maps the same zero-filled bytes, and
// what one rank writes the others read.
TEST(SharedObject, EveryRankMapsTheSameZeroFilledBytes) {
  const std::string dir = fresh_test_dir("deep_ep_shared_object_");
  constexpr int kRanks = 4;
  constexpr size_t kBytes = 3 * 4096;
  std::vector<int> nonzero(kRanks, -1), wrong(kRanks, -1);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 20.0);
      auto* base = static_cast<unsigned char*>(map_shared_object(group, kBytes));
      ASSERT_NE(base, nullptr);
      int zeros_broken = 0;
      for (size_t i = r; i < kBytes; i += kRanks) zeros_broken += base[i] != 0;  // before anyone writes there
      nonzero[r] = zeros_broken;
      group.barrier();
      base[r] = static_cast<unsigned char>(10 + r);  // each rank its own byte
      group.barrier();
      int mismatches = 0;
      for (int p = 0; p < kRanks; ++p) mismatches += base[p] != 10 + p;
      wrong[r] = mismatches;
      group.barrier();
      unmap_shared_object(base, kBytes);
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(nonzero[r], 0) << "rank " << r;
    EXPECT_EQ(wrong[r], 0) << "rank " << r;
  }
}
