// Internode normal ops and low-latency ops on one low_latency_mode Buffer (runtime/rdma_payload_users.hpp):
// which op sequences need clean_low_latency_buffer, and when the internode state is restored.
#include <gtest/gtest.h>

#include <string>

#include "deep_ep/error.hpp"
#include "runtime/rdma_payload_users.hpp"

using namespace deep_ep;

namespace {

std::string low_latency_refusal(const RdmaPayloadUsers& users) {
  try {
    users.check_low_latency_op("low_latency_dispatch");
  } catch (const ValueError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(RdmaPayloadUsers, AFreshPayloadServesEitherKind) {
  RdmaPayloadUsers users;
  EXPECT_EQ(low_latency_refusal(users), "");
  EXPECT_FALSE(users.internode_state_needs_reset());
}

TEST(RdmaPayloadUsers, LowLatencyOpsAloneNeverNeedAClean) {
  RdmaPayloadUsers users;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(low_latency_refusal(users), "");
    users.low_latency_op_launched();
  }
}

TEST(RdmaPayloadUsers, InternodeOpsAloneNeverNeedARestore) {
  RdmaPayloadUsers users;
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(users.internode_state_needs_reset());
    users.internode_op_launched();
  }
}

TEST(RdmaPayloadUsers, LowLatencyAfterInternodeNeedsACleanAndSaysSo) {
  RdmaPayloadUsers users;
  users.internode_op_launched();
  const std::string refusal = low_latency_refusal(users);
  EXPECT_NE(refusal.find("low_latency_dispatch"), std::string::npos) << refusal;
  EXPECT_NE(refusal.find("clean_low_latency_buffer"), std::string::npos) << refusal;
  users.low_latency_buffer_cleaned();
  EXPECT_EQ(low_latency_refusal(users), "");
}

TEST(RdmaPayloadUsers, InternodeAfterLowLatencyRestoresOnce) {
  RdmaPayloadUsers users;
  users.low_latency_op_launched();
  ASSERT_TRUE(users.internode_state_needs_reset());
  users.internode_state_reset();
  users.internode_op_launched();
  EXPECT_FALSE(users.internode_state_needs_reset());
}

TEST(RdmaPayloadUsers, ACleanAlsoCountsAsOverwritingInternodeState) {
  RdmaPayloadUsers users;
  users.internode_op_launched();
  users.low_latency_buffer_cleaned();
  EXPECT_TRUE(users.internode_state_needs_reset());
}

TEST(RdmaPayloadUsers, AlternatingKindsCycle) {
  RdmaPayloadUsers users;
  for (int i = 0; i < 3; ++i) {
    // internode: restore when low-latency ops (or a clean) came before
    if (users.internode_state_needs_reset()) users.internode_state_reset();
    users.internode_op_launched();
    users.internode_op_launched();
    EXPECT_NE(low_latency_refusal(users), "");
    users.low_latency_buffer_cleaned();
    EXPECT_EQ(low_latency_refusal(users), "");
    users.low_latency_op_launched();
    EXPECT_TRUE(users.internode_state_needs_reset());
  }
}
