// The Buffer's network side (runtime/network.cpp) and the per-peer transport choice it feeds
// (Buffer::Internals::transport_to), on hand-built peer tables: no GPU, no NCCL communicator.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"
#include "runtime/buffer_internals.hpp"
#include "temp_dir.hpp"
#include "value_error.hpp"

using namespace deep_ep;
using deep_ep::host_tests::value_error_of;

namespace {

char g_own_buffer[16], g_peer_buffer[16];

}  // namespace

TEST(Network, EveryPeerMappedMeansP2pAndNoCommunicator) {
  Buffer::Internals in;
  in.peer_bases = {g_own_buffer, g_peer_buffer};
  FileGroup group(fresh_test_dir("deep_ep_network_"), 0, 1);
  connect_network(in, group, BufferOptions{}, in.first_unmapped_peer() >= 0, 1, 132);
  EXPECT_EQ(in.network.gin_compiled, gin_compiled());
  EXPECT_FALSE(in.network.nccl_available);
  EXPECT_EQ(in.nccl, nullptr);
  EXPECT_EQ(in.transport_to(0, 1), TransportKind::kP2p);
  EXPECT_EQ(in.transport_to(1, 0), TransportKind::kP2p);
  EXPECT_NO_THROW(in.require_reach(0, "op"));
}

TEST(Network, PeerOnAnotherHostWithoutGinNamesWhatIsMissing) {
  if (gin_compiled()) GTEST_SKIP() << "a GIN build would create an NCCL communicator over the group here";
  Buffer::Internals in;
  in.peer_bases = {g_own_buffer, nullptr, g_peer_buffer};
  FileGroup group(fresh_test_dir("deep_ep_network_"), 0, 1);
  bool asked_for_comm = false;
  BufferOptions options;
  options.nccl_comm_address = [&] {
    asked_for_comm = true;
    return int64_t{0};
  };
  connect_network(in, group, options, in.first_unmapped_peer() >= 0, 2, 132);
  EXPECT_FALSE(asked_for_comm) << "a build without GIN has no use for an NCCL communicator";
  EXPECT_FALSE(in.network.gin_compiled);
  EXPECT_EQ(in.transport_to(0, 2), TransportKind::kP2p);
  try {
    in.transport_to(0, 1);
    FAIL() << "peer 1 is unreachable, yet a transport was chosen";
  } catch (const ValueError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("peer 1"), std::string::npos) << message;
    EXPECT_NE(message.find("no GIN transport"), std::string::npos) << message;
  }
  EXPECT_THROW(in.require_reach(0, "internode dispatch"), ValueError);
}

namespace {

// Internals as connect_network leaves them where NCCL reports GIN, with peer 1 on another host.
Buffer::Internals gin_reported_internals() {
  Buffer::Internals in;
  in.peer_bases = {g_own_buffer, nullptr, g_peer_buffer};
  in.network.gin_compiled = true;
  in.network.nccl_available = true;
  in.network.nccl_reports_gin = true;
  return in;
}

}  // namespace

TEST(Network, GinPeerIsReachedOnlyWhereTheBufferIsAnNcclWindow) {
  Buffer::Internals in = gin_reported_internals();
  EXPECT_EQ(in.transport_to(0, 1), TransportKind::kGin);
  EXPECT_EQ(in.transport_to(0, 2), TransportKind::kP2p);
  // Memory from cudaMalloc cannot be a window: the ops refuse, naming the peer and what is missing.
  EXPECT_FALSE(in.uses_gin());
  try {
    in.require_reach(0, "internode dispatch");
    FAIL() << "a GIN peer was accepted without a window";
  } catch (const ValueError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("internode dispatch"), std::string::npos) << message;
    EXPECT_NE(message.find("peer rank 1"), std::string::npos) << message;
    EXPECT_NE(message.find("NCCL window"), std::string::npos) << message;
  }
  in.gin_window = true;
  EXPECT_TRUE(in.uses_gin());
  EXPECT_NO_THROW(in.require_reach(0, "internode dispatch"));
  // Every peer mapped: nothing goes over GIN even with a window.
  in.peer_bases[1] = g_peer_buffer;
  EXPECT_FALSE(in.uses_gin());
}

TEST(Network, WindowDoesNotReachAPeerNcclCannot) {
  Buffer::Internals in = gin_reported_internals();
  in.gin_window = true;
  in.network.nccl_reports_gin = false;  // e.g. a communicator without GIN contexts
  EXPECT_THROW(in.require_reach(0, "low_latency_dispatch"), ValueError);
}

// DEEP_EP_FORCE_NCCL_WINDOW: 1 forces the NCCL window on one host (GIN builds); anything else but unset,
// empty or 0 is an error naming the variable.
TEST(Network, ForceNcclWindowVariable) {
  unsetenv(kForceNcclWindowEnv);
  EXPECT_FALSE(force_nccl_window_from_env());
  setenv(kForceNcclWindowEnv, "0", 1);
  EXPECT_FALSE(force_nccl_window_from_env());
  setenv(kForceNcclWindowEnv, "yes", 1);
  const std::string error = value_error_of([] { force_nccl_window_from_env(); });
  EXPECT_NE(error.find(kForceNcclWindowEnv), std::string::npos) << "'yes' gave: '" << error << "'";
  setenv(kForceNcclWindowEnv, "1", 1);
  if (gin_compiled()) {
    EXPECT_TRUE(force_nccl_window_from_env());
  } else {
    try {
      force_nccl_window_from_env();
      FAIL() << "a build without GIN accepted a forced NCCL window";
    } catch (const ValueError& e) {
      EXPECT_NE(std::string(e.what()).find("DEEP_EP_ENABLE_GIN"), std::string::npos) << e.what();
    }
  }
  unsetenv(kForceNcclWindowEnv);
}
