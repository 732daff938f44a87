// Environment switches that choose kernel forms (runtime/env_switches.hpp): their documented values and the error
// for any other.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "deep_ep/error.hpp"
#include "runtime/env_switches.hpp"
#include "value_error.hpp"

using namespace deep_ep;
using deep_ep::host_tests::value_error_of;

TEST(EnvSwitches, SwitchedOnIsOffOnlyForZero) {
  const char* name = "DEEP_EP_TEST_SWITCH";
  unsetenv(name);
  EXPECT_TRUE(switched_on(name));
  setenv(name, "1", 1);
  EXPECT_TRUE(switched_on(name));
  setenv(name, "", 1);
  EXPECT_TRUE(switched_on(name));
  setenv(name, "0", 1);
  EXPECT_FALSE(switched_on(name));
  unsetenv(name);
}

// DEEP_EP_INTERNODE_OWN_NODE_PUSH: unset (or empty) pushes BF16 rows only, 0 none, 1 every dtype; anything else is an
// error naming the variable.
TEST(EnvSwitches, OwnNodePushVariable) {
  const char* name = "DEEP_EP_INTERNODE_OWN_NODE_PUSH";
  unsetenv(name);
  EXPECT_EQ(own_node_push_from_env(), OwnNodePush::kBf16);
  setenv(name, "", 1);
  EXPECT_EQ(own_node_push_from_env(), OwnNodePush::kBf16);
  setenv(name, "0", 1);
  EXPECT_EQ(own_node_push_from_env(), OwnNodePush::kNone);
  setenv(name, "1", 1);
  EXPECT_EQ(own_node_push_from_env(), OwnNodePush::kAll);
  setenv(name, "2", 1);
  const std::string error = value_error_of([] { own_node_push_from_env(); });
  EXPECT_NE(error.find(name), std::string::npos) << "'2' gave: '" << error << "'";
  unsetenv(name);
}
