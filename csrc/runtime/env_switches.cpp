// Environment switches that choose kernel forms (env_switches.hpp).
#include "runtime/env_switches.hpp"

#include <cstdlib>
#include <string>

#include "deep_ep/error.hpp"

namespace deep_ep {

bool switched_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::string(value) != "0";
}

OwnNodePush own_node_push_from_env() {
  const char* name = "DEEP_EP_INTERNODE_OWN_NODE_PUSH";
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return OwnNodePush::kBf16;
  const std::string text(value);
  DEEP_EP_CHECK(text == "0" || text == "1", name, " must be 0 (no dispatch pushes) or 1 (every dispatch pushes), got '",
                text, "'");
  return text == "1" ? OwnNodePush::kAll : OwnNodePush::kNone;
}

}  // namespace deep_ep
