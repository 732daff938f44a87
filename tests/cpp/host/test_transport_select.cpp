// Host-side transport choice (include/deep_ep/transport.hpp): load/store peers use P2P, other peers
// GIN when it is compiled in and NCCL reports it, and anything else is an error naming the reason.
#include <gtest/gtest.h>

#include <string>

#include "deep_ep/error.hpp"
#include "deep_ep/transport.hpp"

using namespace deep_ep;

namespace {

TransportChoiceInputs gin_ready() {
  TransportChoiceInputs in;
  in.nccl_available = true;
  in.nccl_reports_gin = true;
  in.gin_compiled = true;
  return in;
}

// The message of the ValueError that choose_transport throws, or "" if it throws none.
std::string choice_error(const TransportChoiceInputs& in, int rank, int peer) {
  try {
    choose_transport(in, rank, peer);
  } catch (const ValueError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(TransportSelect, LoadStorePeerUsesP2pEvenWhenGinIsUsable) {
  TransportChoiceInputs in = gin_ready();
  in.peer_reachable_by_load_store = true;
  EXPECT_EQ(choose_transport(in, 0, 1), TransportKind::kP2p);
}

TEST(TransportSelect, LoadStorePeerUsesP2pWithoutNcclOrGinBuild) {
  TransportChoiceInputs in;
  in.peer_reachable_by_load_store = true;
  EXPECT_EQ(choose_transport(in, 2, 3), TransportKind::kP2p);
}

TEST(TransportSelect, RemotePeerUsesGinWhenCompiledAndReported) {
  EXPECT_EQ(choose_transport(gin_ready(), 0, 9), TransportKind::kGin);
}

TEST(TransportSelect, PreferGinForLocalUsesGinWhenUsable) {
  TransportChoiceInputs in = gin_ready();
  in.peer_reachable_by_load_store = true;
  in.prefer_gin_for_local = true;
  EXPECT_EQ(choose_transport(in, 0, 1), TransportKind::kGin);
}

TEST(TransportSelect, PreferGinForLocalFallsBackToP2pWhenGinIsUnusable) {
  TransportChoiceInputs in = gin_ready();
  in.peer_reachable_by_load_store = true;
  in.prefer_gin_for_local = true;
  in.nccl_reports_gin = false;
  EXPECT_EQ(choose_transport(in, 0, 1), TransportKind::kP2p);
}

TEST(TransportSelect, RemotePeerWithoutGinBuildNamesRankPeerAndTheBuildOption) {
  TransportChoiceInputs in = gin_ready();
  in.gin_compiled = false;
  const std::string msg = choice_error(in, 3, 11);
  EXPECT_NE(msg.find("rank 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("peer 11"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not reachable by load/store"), std::string::npos) << msg;
  EXPECT_NE(msg.find("DEEP_EP_ENABLE_GIN"), std::string::npos) << msg;
}

TEST(TransportSelect, RemotePeerWithoutNcclNamesRankPeerAndNccl) {
  TransportChoiceInputs in = gin_ready();
  in.nccl_available = false;
  const std::string msg = choice_error(in, 5, 12);
  EXPECT_NE(msg.find("rank 5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("peer 12"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no NCCL communicator"), std::string::npos) << msg;
}

TEST(TransportSelect, RemotePeerWithoutGinSupportNamesRankPeerAndNcclReport) {
  TransportChoiceInputs in = gin_ready();
  in.nccl_reports_gin = false;
  const std::string msg = choice_error(in, 7, 15);
  EXPECT_NE(msg.find("rank 7"), std::string::npos) << msg;
  EXPECT_NE(msg.find("peer 15"), std::string::npos) << msg;
  EXPECT_NE(msg.find("NCCL reports no GIN support"), std::string::npos) << msg;
}

TEST(TransportSelect, MissingBuildIsReportedBeforeMissingNccl) {
  const std::string msg = choice_error(TransportChoiceInputs{}, 0, 8);
  EXPECT_NE(msg.find("DEEP_EP_ENABLE_GIN"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("NCCL communicator"), std::string::npos) << msg;
}

TEST(TransportSelect, RejectsNegativeRankOrPeer) {
  TransportChoiceInputs in;
  in.peer_reachable_by_load_store = true;
  EXPECT_THROW(choose_transport(in, -1, 0), ValueError);
  EXPECT_THROW(choose_transport(in, 0, -1), ValueError);
}

// Every combination of the five inputs: load/store peers never fail, and GIN is chosen exactly when it
// is usable and either the peer is remote or GIN is preferred.
TEST(TransportSelect, EveryInputCombinationFollowsTheRule) {
  for (int bits = 0; bits < 32; ++bits) {
    TransportChoiceInputs in;
    in.peer_reachable_by_load_store = bits & 1;
    in.nccl_available = bits & 2;
    in.nccl_reports_gin = bits & 4;
    in.gin_compiled = bits & 8;
    in.prefer_gin_for_local = bits & 16;
    const bool usable = in.gin_compiled && in.nccl_available && in.nccl_reports_gin;
    SCOPED_TRACE(bits);
    if (!in.peer_reachable_by_load_store && !usable) {
      EXPECT_THROW(choose_transport(in, 1, 4), ValueError);
      continue;
    }
    const bool expect_gin = usable && (!in.peer_reachable_by_load_store || in.prefer_gin_for_local);
    EXPECT_EQ(choose_transport(in, 1, 4), expect_gin ? TransportKind::kGin : TransportKind::kP2p);
  }
}

TEST(TransportSelect, NamesAreDistinct) {
  EXPECT_STREQ(transport_name(TransportKind::kP2p), "p2p");
  EXPECT_STREQ(transport_name(TransportKind::kGin), "gin");
}

TEST(TransportSelect, GinCompiledMatchesTheBuild) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  EXPECT_TRUE(gin_compiled());
#else
  EXPECT_FALSE(gin_compiled());
#endif
}
