// Environment switches that choose kernel forms (env_switches.hpp).
#include "runtime/env_switches.hpp"

#include <cstdlib>
#include <string>

namespace deep_ep {

bool switched_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::string(value) != "0";
}

OwnNodePush own_node_push_from_env() {
  return two_setting_switch("DEEP_EP_INTERNODE_OWN_NODE_PUSH", OwnNodePush::kBf16, OwnNodePush::kNone,
                            OwnNodePush::kAll, "no dispatch pushes", "every dispatch pushes");
}

}  // namespace deep_ep
