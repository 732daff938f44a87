// Error types and check macros shared by every layer of deep_ep.
// Host code throws these; the Python binding maps ValueError/TypeError/TimeoutError to the Python
// exceptions of the same names and everything else to RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace deep_ep {

// A value is out of its allowed range or inconsistent with another argument.
class ValueError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// An argument has the wrong kind: dtype, device, or a missing/extra optional.
class TypeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bounded device or host wait expired; the message names rank, peer and phase.
class TimeoutError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace deep_ep

// Checks that stay in release builds. The message parts are streamed, so callers can write
// DEEP_EP_CHECK(k > 0, "num_topk must be positive, got ", k).
#define DEEP_EP_CHECK_AS(ExceptionType, cond, ...)                              \
  do {                                                                          \
    if (!(cond)) throw ExceptionType(::deep_ep::detail::concat(__VA_ARGS__));   \
  } while (0)

#define DEEP_EP_CHECK(cond, ...) DEEP_EP_CHECK_AS(::deep_ep::ValueError, cond, __VA_ARGS__)
#define DEEP_EP_TYPE_CHECK(cond, ...) DEEP_EP_CHECK_AS(::deep_ep::TypeError, cond, __VA_ARGS__)
#define DEEP_EP_RUNTIME_CHECK(cond, ...) DEEP_EP_CHECK_AS(std::runtime_error, cond, __VA_ARGS__)
