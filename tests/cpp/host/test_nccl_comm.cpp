// The host side of the NCCL communicator (csrc/runtime/nccl_comm.hpp) that needs no GPU: the unique-id
// exchange over a Group, the checks on an adopted communicator, version checks, NCCL error messages
// and the transport inputs. Built only with -DDEEP_EP_ENABLE_GIN=ON.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"
#include "runtime/nccl_comm.hpp"
#include "temp_dir.hpp"
#include "value_error.hpp"

using namespace deep_ep;
using deep_ep::host_tests::value_error_of;

namespace {

std::string fresh_dir() { return fresh_test_dir("deep_ep_nccl_comm_"); }

ncclUniqueId patterned_id() {
  ncclUniqueId id;
  for (int i = 0; i < NCCL_UNIQUE_ID_BYTES; ++i) id.internal[i] = static_cast<char>(i * 7 + 3);
  return id;
}

bool same_id(const ncclUniqueId& a, const ncclUniqueId& b) { return std::memcmp(&a, &b, sizeof(a)) == 0; }

// A one-rank group whose all_gather returns a fixed answer, to feed the exchange malformed bytes.
class CannedGroup : public Group {
 public:
  explicit CannedGroup(std::vector<std::string> answer) : answer_(std::move(answer)) {}
  int rank() const override { return 0; }
  int size() const override { return static_cast<int>(answer_.size()); }
  std::vector<std::string> all_gather(const std::string&) override { return answer_; }
  void barrier() override {}

 private:
  std::vector<std::string> answer_;
};

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST(NcclUniqueIdExchange, EveryRankGetsTheIdRankZeroMade) {
  const std::string dir = fresh_dir();
  constexpr int kRanks = 2;
  std::vector<ncclUniqueId> received(kRanks);
  std::atomic<int> num_ids_made_by_other_ranks{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 20.0);
      received[r] = exchange_unique_id(group, [&, r] {
        if (r != 0) ++num_ids_made_by_other_ranks;
        return patterned_id();
      });
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(num_ids_made_by_other_ranks.load(), 0);
  for (int r = 0; r < kRanks; ++r) EXPECT_TRUE(same_id(received[r], patterned_id())) << "rank " << r;
}

TEST(NcclUniqueIdExchange, RealNcclIdTravelsIntact) {
  ncclUniqueId probe;
  const ncclResult_t probe_result = ncclGetUniqueId(&probe);
  if (probe_result != ncclSuccess) {
    GTEST_SKIP() << "ncclGetUniqueId fails on this machine (" << ncclGetErrorString(probe_result)
                 << "); it needs a usable network interface for NCCL's bootstrap";
  }
  const std::string dir = fresh_dir();
  constexpr int kRanks = 2;
  std::vector<ncclUniqueId> received(kRanks);
  ncclUniqueId made;
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 20.0);
      received[r] = exchange_unique_id(group, [&] {
        DEEP_EP_NCCL_CHECK(ncclGetUniqueId(&made), nullptr);
        return made;
      });
    });
  for (auto& t : threads) t.join();
  const ncclUniqueId zeros{};
  EXPECT_FALSE(same_id(made, zeros));
  EXPECT_TRUE(same_id(received[0], made));
  EXPECT_TRUE(same_id(received[1], made));
}

// ncclGetUniqueId needs no GPU (NCCL 2.28.9: it only sets up the bootstrap root), so the id part of
// NcclCommunicator::create runs on a CPU-only machine. Two calls give two communicators' ids.
TEST(NcclUniqueIdExchange, GetUniqueIdNeedsNoGpu) {
  ncclUniqueId first, second;
  const ncclResult_t result = ncclGetUniqueId(&first);
  if (result != ncclSuccess) {
    GTEST_SKIP() << "ncclGetUniqueId fails on this machine (" << ncclGetErrorString(result)
                 << "); it needs a usable network interface for NCCL's bootstrap";
  }
  ASSERT_EQ(ncclGetUniqueId(&second), ncclSuccess);
  EXPECT_FALSE(same_id(first, second));
}

TEST(NcclUniqueIdExchange, RankZeroFailureReleasesEveryRankWithItsMessage) {
  const std::string dir = fresh_dir();
  constexpr int kRanks = 2;
  std::vector<std::string> errors(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      FileGroup group(dir, r, kRanks, 20.0);
      try {
        exchange_unique_id(group, []() -> ncclUniqueId { throw TimeoutError("no bootstrap interface"); });
      } catch (const TimeoutError& e) {
        errors[r] = std::string("TimeoutError: ") + e.what();
      } catch (const std::runtime_error& e) {
        errors[r] = std::string("runtime_error: ") + e.what();
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors[0], "TimeoutError: no bootstrap interface");  // rank 0 gets its own exception back
  EXPECT_TRUE(contains(errors[1], "runtime_error: "));
  EXPECT_TRUE(contains(errors[1], "rank 0 could not create the id: no bootstrap interface")) << errors[1];
}

TEST(NcclUniqueIdExchange, RankZeroContributionOfTheWrongSizeIsRejected) {
  CannedGroup group({std::string("I") + "short"});
  const std::string error = value_error_of([&] { exchange_unique_id(group, patterned_id); });
  EXPECT_TRUE(contains(error, "rank 0 contributed 6 bytes")) << error;
  EXPECT_TRUE(contains(error, "sizeof(ncclUniqueId) = 128")) << error;
}

TEST(NcclUniqueIdExchange, AnswerOfTheWrongRankCountIsRejected) {
  // CannedGroup reports the answer's length as its size; one that disagrees is caught by the check.
  class ShortAnswerGroup : public CannedGroup {
   public:
    ShortAnswerGroup() : CannedGroup({}) {}
    int size() const override { return 2; }
  } group;
  const std::string error = value_error_of([&] { exchange_unique_id(group, patterned_id); });
  EXPECT_TRUE(contains(error, "returned 0 contributions for a group of 2 ranks")) << error;
}

TEST(NcclCommunicatorAdopt, NullAddressIsRejectedBeforeNcclSeesIt) {
  const std::string dir = fresh_dir();
  FileGroup group(dir, 0, 1, 5.0);
  const std::string error = value_error_of([&] { NcclCommunicator::adopt(0, group); });
  EXPECT_TRUE(contains(error, "the address is 0, a null ncclComm_t")) << error;
}

TEST(NcclCommunicatorAdopt, AddressesThatCannotBeACommunicatorAreRejectedUnread) {
  EXPECT_TRUE(contains(value_error_of([] { comm_from_address(-4096); }), "is negative"));
  EXPECT_TRUE(contains(value_error_of([] { comm_from_address(8); }), "never-mapped first page"));
  EXPECT_TRUE(contains(value_error_of([] { comm_from_address(0x7f0000001003); }), "is not aligned to 8 bytes"));
  // A plausible address passes through unchanged (and is not dereferenced by the check).
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(comm_from_address(0x7f0000001000)), std::uintptr_t{0x7f0000001000});
}

TEST(NcclCommunicatorAdopt, CommunicatorMustBeTheGroup) {
  EXPECT_EQ(value_error_of([] { check_comm_matches_group(4, 1, 4, 1); }), "");
  const std::string size_error = value_error_of([] { check_comm_matches_group(8, 1, 4, 1); });
  EXPECT_TRUE(contains(size_error, "it has 8 ranks")) << size_error;
  EXPECT_TRUE(contains(size_error, "the group has 4 ranks")) << size_error;
  const std::string rank_error = value_error_of([] { check_comm_matches_group(4, 2, 4, 1); });
  EXPECT_TRUE(contains(rank_error, "this process is its rank 2")) << rank_error;
  EXPECT_TRUE(contains(rank_error, "this process is its rank 1")) << rank_error;
}

TEST(NcclVersion, LinkedLibraryIsTheReleaseOfTheHeaders) {
  int runtime_version = 0;
  DEEP_EP_NCCL_CHECK(ncclGetVersion(&runtime_version), nullptr);
  EXPECT_EQ(value_error_of([&] { check_nccl_version_compatible(NCCL_VERSION_CODE, runtime_version); }), "");
}

TEST(NcclVersion, OlderOrOtherReleasesAreRejectedForUnversionedHeaders) {
  EXPECT_EQ(value_error_of([] { check_nccl_version_compatible(22809, 22812); }), "");
  const std::string older = value_error_of([] { check_nccl_version_compatible(22809, 22805); });
  EXPECT_TRUE(contains(older, "libnccl 2.28.5 is older than the NCCL headers deep_ep was built with (2.28.9)"))
      << older;
  const std::string newer_minor = value_error_of([] { check_nccl_version_compatible(22809, 22903); });
  EXPECT_TRUE(contains(newer_minor, "same major.minor")) << newer_minor;
  // From 2.29 on the device structs are versioned: a newer library is fine, an older one is not.
  EXPECT_EQ(value_error_of([] { check_nccl_version_compatible(22907, 23100); }), "");
  EXPECT_NE(value_error_of([] { check_nccl_version_compatible(22907, 22906); }), "");
}

TEST(NcclErrorMessage, NamesCallResultAndLastError) {
  EXPECT_EQ(nccl_error_message("ncclCommCount(comm, &n)", ncclInvalidArgument, "invalid argument", "comm is NULL",
                               "nccl_comm.cpp", 42),
            "NCCL error in ncclCommCount(comm, &n) at nccl_comm.cpp:42: ncclInvalidArgument (invalid argument); "
            "NCCL's last error: comm is NULL");
  EXPECT_EQ(nccl_error_message("ncclMemFree(ptr)", ncclUnhandledCudaError, "unhandled cuda error", "", "a.cpp", 7),
            "NCCL error in ncclMemFree(ptr) at a.cpp:7: ncclUnhandledCudaError (unhandled cuda error)");
  EXPECT_EQ(nccl_result_name(ncclRemoteError), "ncclRemoteError");
  EXPECT_EQ(nccl_result_name(static_cast<ncclResult_t>(42)), "ncclResult_t(42)");
}

TEST(NcclErrorMessage, CheckThrowsNcclErrorForAFailingCall) {
  int count = 0;
  try {
    DEEP_EP_NCCL_CHECK(ncclCommCount(nullptr, &count), nullptr);
    FAIL() << "ncclCommCount(nullptr) should fail";
  } catch (const NcclError& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.result(), ncclInvalidArgument);
    EXPECT_TRUE(contains(message, "NCCL error in ncclCommCount(nullptr, &count) at ")) << message;
    EXPECT_TRUE(contains(message, std::string("ncclInvalidArgument (") + ncclGetErrorString(ncclInvalidArgument)))
        << message;
    const std::string last_error = ncclGetLastError(nullptr);
    ASSERT_FALSE(last_error.empty());  // NCCL 2.28 says why: the comm argument is NULL
    EXPECT_TRUE(contains(message, "NCCL's last error: " + last_error)) << message;
  }
  int version = 0;
  EXPECT_NO_THROW(DEEP_EP_NCCL_CHECK(ncclGetVersion(&version), nullptr));
  EXPECT_GT(version, 0);
}

TEST(NcclTransportInputs, NoCommunicatorMeansNoNcclAndNoGin) {
  TransportChoiceInputs inputs;
  inputs.nccl_available = true;
  inputs.nccl_reports_gin = true;
  inputs.peer_reachable_by_load_store = true;
  fill_nccl_transport_inputs(nullptr, inputs);
  EXPECT_FALSE(inputs.nccl_available);
  EXPECT_FALSE(inputs.nccl_reports_gin);
  EXPECT_TRUE(inputs.peer_reachable_by_load_store);  // only the NCCL fields are touched
}

TEST(NcclTransportInputs, GinIsWhereTheDeviceCommunicatorHasGinContexts) {
  ncclDevComm dev_comm{};
  EXPECT_FALSE(dev_comm_reports_gin(dev_comm));
  dev_comm.ginContextCount = 2;
  EXPECT_TRUE(dev_comm_reports_gin(dev_comm));
}
