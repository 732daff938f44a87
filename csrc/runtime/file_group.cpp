// FileGroup: a bootstrap group over a shared directory (see group.hpp).
#include <chrono>
#include <cstdio>
#include <thread>

#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"

namespace deep_ep {

FileGroup::FileGroup(std::string dir, int rank, int size, double timeout_s)
    : dir_(std::move(dir)), rank_(rank), size_(size), timeout_s_(timeout_s) {
  DEEP_EP_CHECK(size > 0, "FileGroup size must be positive, got ", size);
  DEEP_EP_CHECK(rank >= 0 && rank < size, "FileGroup rank must be in [0, ", size, "), got ", rank);
  DEEP_EP_CHECK(timeout_s > 0, "FileGroup timeout_s must be positive, got ", timeout_s);
}

static std::string round_path(const std::string& dir, long round, int rank) {
  return dir + "/" + std::to_string(round) + "." + std::to_string(rank);
}

std::vector<std::string> FileGroup::all_gather(const std::string& bytes) {
  const long round = round_++;
  const std::string mine = round_path(dir_, round, rank_);
  {
    // Readers only ever see complete files: rename is atomic within a directory.
    const std::string tmp = mine + ".tmp";
    std::FILE* out = std::fopen(tmp.c_str(), "wb");
    DEEP_EP_RUNTIME_CHECK(out != nullptr, "FileGroup: cannot write ", tmp);
    const size_t written = std::fwrite(bytes.data(), 1, bytes.size(), out);
    std::fclose(out);
    DEEP_EP_RUNTIME_CHECK(written == bytes.size(), "FileGroup: short write to ", tmp);
    DEEP_EP_RUNTIME_CHECK(std::rename(tmp.c_str(), mine.c_str()) == 0, "FileGroup: cannot rename ", tmp);
  }
  std::vector<std::string> result(size_);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
  for (int peer = 0; peer < size_; ++peer) {
    const std::string path = round_path(dir_, round, peer);
    while (true) {
      if (std::FILE* in = std::fopen(path.c_str(), "rb")) {
        std::string content;
        char chunk[4096];
        size_t n;
        while ((n = std::fread(chunk, 1, sizeof(chunk), in)) > 0) content.append(chunk, n);
        std::fclose(in);
        result[peer] = std::move(content);
        break;
      }
      if (std::chrono::steady_clock::now() > deadline)
        throw TimeoutError(detail::concat("FileGroup: rank ", rank_, " timed out after ", timeout_s_,
                                          " s waiting for rank ", peer, " in round ", round, " under ", dir_));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  return result;
}

void FileGroup::barrier() { all_gather(std::string()); }

}  // namespace deep_ep
