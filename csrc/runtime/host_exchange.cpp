#include "runtime/host_exchange.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "deep_ep/error.hpp"
#include "util/align.hpp"

namespace deep_ep {

namespace {

constexpr size_t kLine = 64;  // slots never share a cache line

// A slot begins with its round counter; std::atomic<uint64_t> is lock-free, hence address-free, so
// processes that map the object at different addresses may share it.
static_assert(std::atomic<uint64_t>::is_always_lock_free);
std::atomic<uint64_t>* round_of(char* slot) { return reinterpret_cast<std::atomic<uint64_t>*>(slot); }

// Maps the named object (of `bytes` bytes; created when `create`), or returns null.
void* map_object(const std::string& name, size_t bytes, bool create) {
  const int fd = shm_open(name.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
  if (fd < 0) return nullptr;
  if (create && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    shm_unlink(name.c_str());
    return nullptr;
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  return base == MAP_FAILED ? nullptr : base;
}

}  // namespace

void* map_shared_object(Group& group, size_t bytes) {
  const int rank = group.rank();
  std::string name;
  void* base = nullptr;
  if (rank == 0) {
    std::random_device entropy;
    name = "/deep_ep_shared_" + std::to_string(getpid()) + "_" + std::to_string(entropy());
    base = map_object(name, bytes, true);  // ftruncate zero-fills
    if (!base) name.clear();
  }
  const std::string shared_name = group.all_gather(name)[0];
  if (rank != 0 && !shared_name.empty()) base = map_object(shared_name, bytes, false);
  const auto mapped = group.all_gather(std::string(1, base ? '1' : '0'));
  if (rank == 0 && !shared_name.empty()) shm_unlink(shared_name.c_str());  // every rank has mapped or given up
  bool everyone = true;
  for (const auto& m : mapped) everyone = everyone && m == "1";
  if (!everyone) {
    if (base) munmap(base, bytes);
    return nullptr;
  }
  return base;
}

void unmap_shared_object(void* base, size_t bytes) {
  if (base) munmap(base, bytes);
}

std::unique_ptr<HostExchange> HostExchange::create(Group& group, size_t record_bytes, double timeout_s) {
  DEEP_EP_CHECK(record_bytes > 0, "HostExchange record_bytes must be positive");
  DEEP_EP_CHECK(timeout_s > 0, "HostExchange timeout_s must be positive, got ", timeout_s);
  const int rank = group.rank(), size = group.size();
  const size_t slot_bytes = kLine + 2 * align_up(record_bytes, kLine);
  const size_t bytes = slot_bytes * size;
  void* base = map_shared_object(group, bytes);  // zero-filled: every round starts at 0
  if (!base) return nullptr;
  return std::unique_ptr<HostExchange>(new HostExchange(rank, size, record_bytes, timeout_s, base, bytes));
}

HostExchange::HostExchange(int rank, int size, size_t record_bytes, double timeout_s, void* base, size_t mapped_bytes)
    : rank_(rank),
      size_(size),
      record_bytes_(record_bytes),
      slot_bytes_(kLine + 2 * align_up(record_bytes, kLine)),
      timeout_s_(timeout_s),
      base_(base),
      mapped_bytes_(mapped_bytes) {}

HostExchange::~HostExchange() { unmap_shared_object(base_, mapped_bytes_); }

char* HostExchange::slot(int rank) const { return static_cast<char*>(base_) + slot_bytes_ * rank; }

void HostExchange::all_gather(const void* record, void* all_records, const char* phase) {
  DEEP_EP_RUNTIME_CHECK(!broken_, "rank ", rank_, ": ", phase, " cannot run: an earlier host exchange timed out");
  const uint64_t n = ++round_;
  const size_t record_stride = align_up(record_bytes_, kLine);
  auto record_of = [&](int rank) { return slot(rank) + kLine + (n % 2) * record_stride; };
  std::memcpy(record_of(rank_), record, record_bytes_);
  round_of(slot(rank_))->store(n, std::memory_order_release);  // the record above is visible first

  const auto start = std::chrono::steady_clock::now();
  for (int peer = 0; peer < size_; ++peer) {
    // Spin first (peers usually arrive within microseconds), then yield the core.
    for (long polls = 0; round_of(slot(peer))->load(std::memory_order_acquire) < n; ++polls) {
      if (polls < 4096) continue;
      std::this_thread::yield();
      if (polls % 1024 == 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s_) {
        broken_ = true;
        throw TimeoutError(detail::concat("rank ", rank_, " timed out after ", timeout_s_, " s waiting for peer rank ",
                                          peer, " in ", phase, " (host exchange round ", n,
                                          "; did every rank make the same call?)"));
      }
    }
    std::memcpy(static_cast<char*>(all_records) + peer * record_bytes_, record_of(peer), record_bytes_);
  }
}

}  // namespace deep_ep
