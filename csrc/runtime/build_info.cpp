// Facts about this build that the Python layer reports (Buffer.is_sm90_compiled).
#include <string>

#include "deep_ep/config.hpp"

#ifndef DEEP_EP_CUDA_ARCHITECTURES
#define DEEP_EP_CUDA_ARCHITECTURES ""
#endif

namespace deep_ep {

const char* compiled_cuda_architectures() { return DEEP_EP_CUDA_ARCHITECTURES; }

bool is_sm90_compiled() {
  // Entries look like 90, 90a, 90-real or 90a-virtual; "all" and "all-major" include sm_90.
  const std::string list = compiled_cuda_architectures();
  size_t begin = 0;
  while (begin <= list.size()) {
    size_t end = list.find(';', begin);
    if (end == std::string::npos) end = list.size();
    const std::string entry = list.substr(begin, end - begin);
    if (entry == "all" || entry == "all-major") return true;
    if (entry.rfind("90", 0) == 0 && (entry.size() == 2 || entry[2] == 'a' || entry[2] == '-')) return true;
    begin = end + 1;
  }
  return false;
}

}  // namespace deep_ep
