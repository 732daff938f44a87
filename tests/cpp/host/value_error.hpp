// The host tests' check of bad input: the message of the ValueError a call throws, so that a test asserts what the
// message names (the argument, the variable, the peer).
#pragma once

#include <string>

#include "deep_ep/error.hpp"

namespace deep_ep::host_tests {

// The message of the ValueError that fn() throws, or "" if it throws none (which no assertion on a name accepts).
template <typename Fn>
std::string value_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const ValueError& e) {
    return e.what();
  }
  return "";
}

}  // namespace deep_ep::host_tests
