// Error types and check macros shared by every layer of deep_ep.
// Host code throws these; the Python binding maps ValueError/TypeError/TimeoutError to the Python
// exceptions of the same names and everything else to RuntimeError.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// Message building without iostreams: the Python extension may be linked against a libstdc++ whose
// locale facets are not initialized in the host process, and error paths must never crash.
inline void append(std::string& out, const std::string& s) { out += s; }
inline void append(std::string& out, const char* s) { out += s ? s : "(null)"; }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, bool b) { out += b ? "true" : "false"; }
template <typename T>
std::enable_if_t<std::is_arithmetic_v<T>> append(std::string& out, T v) {
  char buf[64];
  if constexpr (std::is_floating_point_v<T>) {
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  } else if constexpr (std::is_signed_v<T>) {
    std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  } else {
    std::snprintf(buf, sizeof(buf), "%llu", static_cast<unsigned long long>(v));
  }
  out += buf;
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}
}  // namespace detail

}  // namespace deep_ep

// Checks that stay in release builds. The message parts are streamed, so callers can write
// DEEP_EP_CHECK(k > 0, "num_topk must be positive, got ", k).
#define DEEP_EP_CHECK_AS(ExceptionType, cond, ...)                            \
  do {                                                                        \
    if (!(cond)) throw ExceptionType(::deep_ep::detail::concat(__VA_ARGS__)); \
  } while (0)

#define DEEP_EP_CHECK(cond, ...) DEEP_EP_CHECK_AS(::deep_ep::ValueError, cond, __VA_ARGS__)
#define DEEP_EP_TYPE_CHECK(cond, ...) DEEP_EP_CHECK_AS(::deep_ep::TypeError, cond, __VA_ARGS__)
#define DEEP_EP_RUNTIME_CHECK(cond, ...) DEEP_EP_CHECK_AS(std::runtime_error, cond, __VA_ARGS__)
