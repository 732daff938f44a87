#include "runtime/input_exports.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <ctime>

#include "deep_ep/config.hpp"
#include "deep_ep/error.hpp"
#include "runtime/host_exchange.hpp"
#include "runtime/ipc_allocation.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

// exported[s] is stored (release) by the owner after handles[s] and bases[s]; the mapping threads of the
// other ranks load it (acquire) before they read them. std::atomic<uint32_t> is lock-free, hence address-free:
// processes mapping the object at different addresses share it.
struct InputExports::Table {
  std::atomic<uint32_t> exported[kExportSlots];
  // Bumped by a peer after it exported a slot (then a futex wake): the owner's mapping thread sleeps on it
  // while there is nothing to map instead of polling (8 ranks polling every few microseconds cost the hosts'
  // cores measurable time in every other call).
  std::atomic<uint32_t> wake_sequence;
  int32_t pid;
  uint64_t bases[kExportSlots];  // the owner's addresses (used by ranks of the same process)
  cudaIpcMemHandle_t handles[kExportSlots];
};
static_assert(std::atomic<uint32_t>::is_always_lock_free);

namespace {

// Process-shared futex on a word of the shared object (FUTEX_WAIT / FUTEX_WAKE without _PRIVATE).
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, long timeout_ns) {
  timespec timeout{timeout_ns / 1000000000L, timeout_ns % 1000000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &timeout, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}
void bump_and_wake(std::atomic<uint32_t>* word) {
  word->fetch_add(1, std::memory_order_release);
  futex_wake_all(word);
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

namespace {
// One page-aligned table per rank.
size_t table_stride() { return (sizeof(InputExports::Table) + 4095) / 4096 * 4096; }
}  // namespace

InputExports::Table* InputExports::table(int rank) const {
  const size_t stride = table_stride();
  return reinterpret_cast<Table*>(static_cast<char*>(shared_) + stride * rank);
}

std::unique_ptr<InputExports> InputExports::create(Group& group, int device) {
  const size_t bytes = table_stride() * group.size();
  void* shared = map_shared_object(group, bytes);  // zero-filled: nothing exported yet
  if (!shared) return nullptr;
  std::unique_ptr<InputExports> exports(new InputExports(group.rank(), group.size(), device, shared, bytes));
  group.barrier();  // every pid is written before any mapping thread reads one
  exports->mapper_ = std::thread([raw = exports.get()] { raw->serve(); });
  return exports;
}

InputExports::InputExports(int rank, int size, int device, void* shared, size_t shared_bytes)
    : rank_(rank), size_(size), device_(device), shared_(shared), shared_bytes_(shared_bytes) {
  // A constructor that throws runs no destructor: what was made before the failure is released here.
  try {
    DEEP_EP_CHECK(size <= kNumMaxNvlPeers, "the pull combine's input exports take at most ", kNumMaxNvlPeers,
                  " ranks, got ", size);
    table(rank_)->pid = static_cast<int32_t>(getpid());
    const size_t import_bytes = sizeof(ImportEntry) * kNumMaxNvlPeers * kExportSlots;
    DEEP_EP_CUDA_CHECK(cudaSetDevice(device_));
    DEEP_EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_imports_), import_bytes,
                                     cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host_imports_, 0, import_bytes);  // kImportPending everywhere
    DEEP_EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_imports_), host_imports_, 0));
    const size_t resolved_bytes = sizeof(uint64_t) * kNumMaxNvlPeers * kExportSlots;
    DEEP_EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&resolved_bases_), resolved_bytes));
    // Synchronous: the zeros are in place before any kernel of this Buffer can read them.
    DEEP_EP_CUDA_CHECK(cudaMemset(resolved_bases_, 0, resolved_bytes));
    opened_.assign(size_, std::vector<void*>(kExportSlots, nullptr));
  } catch (...) {
    release_memory();
    throw;
  }
}

InputExports::~InputExports() {
  stop_.store(true, std::memory_order_release);
  bump_and_wake(&table(rank_)->wake_sequence);
  if (mapper_.joinable()) mapper_.join();
  release_memory();
}

void InputExports::release_memory() {
  cudaSetDevice(device_);
  for (auto& peer : opened_)
    for (void* base : peer)
      if (base) cudaIpcCloseMemHandle(base);
  for (char* old : retired_staging_) cudaFree(old);
  if (staging_) cudaFree(staging_);
  if (host_imports_) cudaFreeHost(host_imports_);
  if (resolved_bases_) cudaFree(resolved_bases_);
  cudaGetLastError();  // a release path reports nothing
  unmap_shared_object(shared_, shared_bytes_);
}

int InputExports::export_allocation(char* base, const cudaIpcMemHandle_t& handle, bool staging) {
  int& next = staging ? next_staging_ : next_general_;
  const int end = staging ? kExportSlots : kExportSlots - kStagingSlots;
  if (next >= end) return -1;
  const int slot = next++;
  Table* mine = table(rank_);
  mine->handles[slot] = handle;
  mine->bases[slot] = reinterpret_cast<uint64_t>(base);
  mine->exported[slot].store(1, std::memory_order_release);
  for (int peer = 0; peer < size_; ++peer)
    if (peer != rank_) bump_and_wake(&table(peer)->wake_sequence);
  return slot;
}

InputRef InputExports::stage(const void* ptr, size_t bytes, size_t offset, cudaStream_t stream) {
  DEEP_EP_CUDA_CHECK(cudaMemcpyAsync(staging_ + offset, ptr, bytes, cudaMemcpyDeviceToDevice, stream));
  return InputRef{staging_slot_, 0, offset};
}

PullInput InputExports::export_call(const void* x, size_t x_bytes, const void* topk_weights, size_t weights_bytes,
                                    bool has_rows, cudaStream_t stream) {
  PullInput out{};
  out.x = out.topk_weights = InputRef{-1, 0, 0};
  if (!has_rows) return out;
  const void* inputs[2] = {x, topk_weights};
  InputRef* refs[2] = {&out.x, &out.topk_weights};
  bool staged[2] = {false, false};
  for (int i = 0; i < 2; ++i) {
    if (!inputs[i]) continue;
    IpcAllocation allocation;
    if (!find_ipc_allocation(inputs[i], &allocation)) {
      staged[i] = true;
      continue;
    }
    HandleKey key;
    std::memcpy(key.data(), &allocation.handle, sizeof(allocation.handle));
    auto it = slot_of_.find(key);
    if (it == slot_of_.end()) {
      const int slot = export_allocation(allocation.base, allocation.handle, false);
      if (slot < 0) {
        staged[i] = true;  // general slots used up
        continue;
      }
      it = slot_of_.emplace(key, slot).first;
    }
    *refs[i] = InputRef{it->second, 0, allocation.offset};
  }
  if (!staged[0] && !staged[1]) return out;

  // Staging: x at 0, the weights after it. The stream orders the copy after this rank's previous pull combine,
  // which ended only once every rank had read the staging allocation's earlier contents.
  const size_t weights_offset = align_up(staged[0] ? x_bytes : 0);
  const size_t needed = weights_offset + (staged[1] ? weights_bytes : 0);
  if (needed > staging_bytes_) {
    // A larger one, exported anew; the old one stays allocated (peers' kernels may still be reading it).
    const size_t bytes = std::max(needed, 2 * staging_bytes_);
    char* fresh = nullptr;
    DEEP_EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&fresh), bytes));
    IpcAllocation allocation;
    const bool exportable = find_ipc_allocation(fresh, &allocation);
    const int slot = exportable ? export_allocation(fresh, allocation.handle, true) : -1;
    if (slot < 0) {
      cudaFree(fresh);
      DEEP_EP_RUNTIME_CHECK(false, "pull combine: rank ", rank_, " cannot export a staging allocation of ", bytes,
                            " bytes (", exportable ? "its staging slots are used up" : "cudaIpcGetMemHandle failed",
                            "); set DEEP_EP_PULL_COMBINE=0 on every rank");
    }
    if (staging_) retired_staging_.push_back(staging_);
    staging_ = fresh;
    staging_bytes_ = bytes;
    staging_slot_ = slot;
  }
  if (staged[0]) out.x = stage(x, x_bytes, 0, stream);
  if (staged[1]) out.topk_weights = stage(topk_weights, weights_bytes, weights_offset, stream);
  return out;
}

void InputExports::serve() {
  if (cudaSetDevice(device_) != cudaSuccess) return;
  // Another thread's CUDA graph capture (torch captures in global mode) must not forbid this thread's
  // cudaIpcOpenMemHandle: relaxed mode lets it run whatever the others capture.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  const int32_t my_pid = static_cast<int32_t>(getpid());
  // A failed open is retried (a transient refusal must not fail a combine) before it is reported as failed.
  constexpr int kOpenAttempts = 1000;
  std::vector<std::vector<char>> seen(size_, std::vector<char>(kExportSlots, 0));
  std::vector<std::vector<int>> failures(size_, std::vector<int>(kExportSlots, 0));
  std::atomic<uint32_t>* wake = &table(rank_)->wake_sequence;
  while (!stop_.load(std::memory_order_acquire)) {
    // Read before the scan: an export after it changes the word, and the wait below returns at once.
    const uint32_t sequence = wake->load(std::memory_order_acquire);
    bool found = false, retry = false;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_) continue;
      Table* theirs = table(peer);
      for (int slot = 0; slot < kExportSlots; ++slot) {
        if (seen[peer][slot] || !theirs->exported[slot].load(std::memory_order_acquire)) continue;
        ImportEntry& entry = host_imports_[peer * kExportSlots + slot];
        uint64_t state = kImportMapped;
        if (theirs->pid == my_pid) {
          entry.base = theirs->bases[slot];
        } else {
          void* base = nullptr;
          if (cudaIpcOpenMemHandle(&base, theirs->handles[slot], cudaIpcMemLazyEnablePeerAccess) == cudaSuccess) {
            opened_[peer][slot] = base;
            entry.base = reinterpret_cast<uint64_t>(base);
          } else {
            cudaGetLastError();
            if (++failures[peer][slot] < kOpenAttempts) {
              retry = true;
              continue;
            }
            state = kImportFailed;
          }
        }
        seen[peer][slot] = 1;
        found = true;
        // The kernel reads state with ld.acquire.sys, then base: base is visible first.
        std::atomic_thread_fence(std::memory_order_release);
        reinterpret_cast<volatile uint64_t&>(entry.state) = state;
      }
    }
    if (retry) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // a refused open, tried again shortly
    } else if (!found) {
      // Woken by a peer's export or by the destructor; the timeout only bounds a missed wake.
      futex_wait(wake, sequence, 100'000'000L);
    }
  }
}

}  // namespace deep_ep
