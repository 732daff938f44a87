// Environment switches of the runtime that choose between kernel forms. Each is read when its Buffer or call
// starts (docs and the README's environment table name them); a value other than the documented ones is a
// ValueError naming the variable.
#pragma once

#include <cstdlib>
#include <string>

#include "deep_ep/error.hpp"

namespace deep_ep {

// A default-on switch: false only when `name` is set to 0.
bool switched_on(const char* name);

// A switch with two documented settings besides its default: `unset` where `name` is unset or empty, `zero` for 0,
// `one` for 1; anything else is a ValueError naming `name` and what 0 and 1 mean.
template <typename Setting>
Setting two_setting_switch(const char* name, Setting unset, Setting zero, Setting one, const char* zero_means,
                           const char* one_means) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return unset;
  const std::string text(value);
  DEEP_EP_CHECK(text == "0" || text == "1", name, " must be 0 (", zero_means, ") or 1 (", one_means, "), got '", text,
                "'");
  return text == "1" ? one : zero;
}

// Which internode dispatches push the own node's rows into its ranks' outputs (DEEP_EP_INTERNODE_OWN_NODE_PUSH:
// unset, 0 or 1). By default only BF16 ones: an FP8 row is half as long, so the traffic the push saves is smaller
// than the time its senders spend fanning rows out, which the ring form leaves to the receivers (docs/benchmarks.md).
enum class OwnNodePush : int { kNone = 0, kBf16 = 1, kAll = 2 };

// DEEP_EP_INTERNODE_OWN_NODE_PUSH as this process reads it: kBf16 unset or empty, kNone for 0, kAll for 1; else a
// ValueError.
OwnNodePush own_node_push_from_env();

}  // namespace deep_ep
