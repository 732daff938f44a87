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
#include "util/align.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

// generation[s] is stored (release) by the owner after handles[s] and bases[s] (odd: exported; even: retired or
// never used); the mapping threads of the other ranks load it (acquire) before they read them, and load it again
// after, so that handles of a slot re-exported meanwhile are not taken for the generation first read.
// std::atomic<uint32_t> is lock-free, hence address-free: processes mapping the object at different addresses
// share it.
struct InputExports::Table {
  std::atomic<uint32_t> generation[kExportSlots];
  // Bumped by a peer after it exported or retired a slot (then a futex wake): the owner's mapping thread sleeps
  // on it while there is nothing to map instead of polling (8 ranks polling every few microseconds cost the
  // hosts' cores measurable time in every other call).
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

// One page-aligned table per rank.
size_t table_stride() { return align_up(sizeof(InputExports::Table), 4096); }

}  // namespace

InputExports::Table* InputExports::table(int rank) const {
  const size_t stride = table_stride();
  return reinterpret_cast<Table*>(static_cast<char*>(shared_) + stride * rank);
}

std::unique_ptr<InputExports> InputExports::create(Group& group, int device) {
  const size_t bytes = table_stride() * group.size();
  void* shared = map_shared_object(group, bytes);  // zero-filled: nothing exported yet
  if (!shared) {
    // The barrier below is taken on this path too: a NodeGroup's collectives are the whole group's, and another
    // node may have succeeded.
    group.barrier();
    return nullptr;
  }
  std::unique_ptr<InputExports> exports;
  try {
    exports.reset(new InputExports(group.rank(), group.size(), device, shared, bytes));
  } catch (...) {
    // The constructor released what it made, the shared object included.
    group.barrier();  // the other ranks' barrier below is still met; this rank's Buffer then fails
    throw;
  }
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
    // The zeros are in place before any kernel of this Buffer can read them: cudaMemset returns before it is done
    // and orders nothing against a non-blocking stream, so the device is synchronized (once, at creation).
    DEEP_EP_CUDA_CHECK(cudaMemset(resolved_bases_, 0, resolved_bytes));
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
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
  for (void* base : retired_mappings_) cudaIpcCloseMemHandle(base);
  for (char* old : retired_staging_) cudaFree(old);
  if (staging_) cudaFree(staging_);
  if (host_imports_) cudaFreeHost(host_imports_);
  if (resolved_bases_) cudaFree(resolved_bases_);
  cudaGetLastError();  // a release path reports nothing
  unmap_shared_object(shared_, shared_bytes_);
}

void InputExports::publish(int slot, uint32_t generation) {
  table(rank_)->generation[slot].store(generation, std::memory_order_release);
  // A retirement's (even) store is ordered before the handle and base a later export of the slot writes (a
  // seqlock's writer): a mapping thread that reads the new handle then reads a changed generation.
  if (generation % 2 == 0) std::atomic_thread_fence(std::memory_order_seq_cst);
  for (int peer = 0; peer < size_; ++peer)
    if (peer != rank_) bump_and_wake(&table(peer)->wake_sequence);
}

bool InputExports::export_allocation(char* base, const cudaIpcMemHandle_t& handle, bool staging, InputRef* ref) {
  int slot = -1;
  uint32_t generation = 1;
  if (staging) {
    if (next_staging_ >= kExportSlots) return false;
    slot = next_staging_++;
  } else {
    for (int s = 0; s < kGeneralSlots && slot < 0; ++s)
      if (general_[s].generation % 2 == 0) slot = s;
    if (slot < 0) return false;
    GeneralSlot& general = general_[slot];
    generation = ++general.generation;
    general.base = base;
    std::memcpy(general.key.data(), &handle, sizeof(handle));
    slot_of_[general.key] = slot;
  }
  Table* mine = table(rank_);
  mine->handles[slot] = handle;
  mine->bases[slot] = reinterpret_cast<uint64_t>(base);
  publish(slot, generation);
  *ref = InputRef{slot, generation, 0};
  return true;
}

void InputExports::close_retired_mappings(cudaStream_t stream) {
  if (!has_retired_mappings_.load(std::memory_order_acquire)) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    cudaGetLastError();
    return;  // a capture may not close memory: the next call outside one does
  }
  std::vector<void*> closing;
  {
    std::lock_guard<std::mutex> lock(retired_mutex_);
    closing.swap(retired_mappings_);
    has_retired_mappings_.store(false, std::memory_order_release);
  }
  for (void* base : closing) cudaIpcCloseMemHandle(base);
  cudaGetLastError();  // a close that fails leaves a mapping behind, not an error of this call
}

void InputExports::retire_freed() {
  for (int s = 0; s < kGeneralSlots; ++s) {
    GeneralSlot& general = general_[s];
    if (general.generation % 2 == 0) continue;
    // Still the same allocation at the same address? A freed one makes the query fail; a new allocation there
    // has another base or another handle. No kernel reads a freed allocation any more: its owner's last combine
    // that used it had ended (the free synchronizes), and that kernel ends only after every rank's reads.
    IpcAllocation now;
    const bool same = find_ipc_allocation(general.base, &now) && now.base == general.base &&
                      std::memcmp(&now.handle, general.key.data(), sizeof(now.handle)) == 0;
    if (same) continue;
    slot_of_.erase(general.key);
    general.base = nullptr;
    publish(s, ++general.generation);
  }
}

InputRef InputExports::stage(const void* ptr, size_t bytes, size_t offset, cudaStream_t stream) {
  DEEP_EP_CUDA_CHECK(cudaMemcpyAsync(staging_ + offset, ptr, bytes, cudaMemcpyDeviceToDevice, stream));
  InputRef ref = staging_ref_;
  ref.offset = offset;
  return ref;
}

bool InputExports::find_or_export(const void* ptr, InputRef* ref) {
  IpcAllocation allocation;
  if (!find_ipc_allocation(ptr, &allocation)) return false;
  HandleKey key;
  std::memcpy(key.data(), &allocation.handle, sizeof(allocation.handle));
  auto it = slot_of_.find(key);
  if (it != slot_of_.end()) {
    *ref = InputRef{it->second, general_[it->second].generation, 0};
  } else {
    // A new allocation: a caching allocator makes one after it freed others (empty_cache, a retried
    // allocation), so this is when freed ones are looked for, their slots and the peers' mappings released.
    retire_freed();
    calls_since_scan_ = 0;
    if (!export_allocation(allocation.base, allocation.handle, false, ref)) return false;  // every slot is live
  }
  ref->offset = allocation.offset;
  return true;
}

void InputExports::begin_call(cudaStream_t stream) {
  close_retired_mappings(stream);
  if (++calls_since_scan_ >= kScanPeriod) {
    retire_freed();
    calls_since_scan_ = 0;
  }
}

void InputExports::reserve_staging(size_t needed) {
  if (needed <= staging_bytes_) return;
  // A larger one, exported anew; the old one stays allocated (peers' kernels may still be reading it).
  const size_t bytes = std::max(needed, 2 * staging_bytes_);
  char* fresh = nullptr;
  DEEP_EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&fresh), bytes));
  IpcAllocation allocation;
  const bool exportable = find_ipc_allocation(fresh, &allocation);
  InputRef ref{};
  if (!exportable || !export_allocation(fresh, allocation.handle, true, &ref)) {
    cudaFree(fresh);
    DEEP_EP_RUNTIME_CHECK(false, "rank ", rank_, " cannot export a staging allocation of ", bytes, " bytes (",
                          exportable ? "its staging slots are used up" : "cudaIpcGetMemHandle failed",
                          "); set DEEP_EP_PULL_COMBINE=0 and DEEP_EP_PUSH_DISPATCH=0 (internode: ",
                          "DEEP_EP_INTERNODE_IN_PLACE=0) on every rank");
  }
  if (staging_) retired_staging_.push_back(staging_);
  staging_ = fresh;
  staging_bytes_ = bytes;
  staging_ref_ = ref;
}

PullInput InputExports::export_call(const void* x, size_t x_bytes, const void* topk_weights, size_t weights_bytes,
                                    bool has_rows, cudaStream_t stream) {
  PullInput out{};
  out.x = out.topk_weights = InputRef{-1, 0, 0};
  begin_call(stream);
  if (!has_rows) return out;
  const bool staged[2] = {x && !find_or_export(x, &out.x),
                          topk_weights && !find_or_export(topk_weights, &out.topk_weights)};
  if (!staged[0] && !staged[1]) return out;

  // Staging: x at 0, the weights after it. The stream orders the copy after this rank's previous bracketed op,
  // which ended only once every rank had finished with the staging allocation's earlier contents.
  const size_t weights_offset = align_up(staged[0] ? x_bytes : 0, 256);
  reserve_staging(weights_offset + (staged[1] ? weights_bytes : 0));
  if (staged[0]) out.x = stage(x, x_bytes, 0, stream);
  if (staged[1]) out.topk_weights = stage(topk_weights, weights_bytes, weights_offset, stream);
  return out;
}

OutputPlacement InputExports::export_outputs(void* const (&outputs)[kNumPushOutputs],
                                             const size_t (&bytes)[kNumPushOutputs], cudaStream_t stream) {
  OutputPlacement placement{};
  begin_call(stream);
  size_t staged_bytes = 0;
  size_t offsets[kNumPushOutputs] = {};
  for (int i = 0; i < kNumPushOutputs; ++i) {
    placement.refs[i] = InputRef{-1, 0, 0};
    placement.local[i] = outputs[i];
    placement.staged[i] = false;
    if (outputs[i] == nullptr || bytes[i] == 0) continue;
    if (find_or_export(outputs[i], &placement.refs[i])) continue;
    placement.staged[i] = true;
    offsets[i] = staged_bytes;
    staged_bytes = align_up(staged_bytes + bytes[i], 256);
  }
  if (staged_bytes == 0) return placement;
  // Staged outputs are written in the staging allocation and copied out after the kernel (copy_staged_outputs).
  // The stream orders both after this rank's previous bracketed op, which ended only once every rank had finished
  // with the staging allocation's earlier contents.
  reserve_staging(staged_bytes);
  for (int i = 0; i < kNumPushOutputs; ++i) {
    if (!placement.staged[i]) continue;
    placement.refs[i] = staging_ref_;
    placement.refs[i].offset = offsets[i];
    placement.local[i] = staging_ + offsets[i];
  }
  return placement;
}

void InputExports::copy_staged_outputs(const OutputPlacement& placement, void* const (&outputs)[kNumPushOutputs],
                                       const size_t (&bytes)[kNumPushOutputs], cudaStream_t stream) {
  for (int i = 0; i < kNumPushOutputs; ++i)
    if (placement.staged[i])
      DEEP_EP_CUDA_CHECK(cudaMemcpyAsync(outputs[i], placement.local[i], bytes[i], cudaMemcpyDeviceToDevice, stream));
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
  // The generation of each peer slot this thread has brought its entry to (0: none yet).
  std::vector<std::vector<uint32_t>> done(size_, std::vector<uint32_t>(kExportSlots, 0));
  std::vector<std::vector<int>> failures(size_, std::vector<int>(kExportSlots, 0));
  std::vector<std::vector<uint32_t>> attempted(size_, std::vector<uint32_t>(kExportSlots, 0));
  std::atomic<uint32_t>* wake = &table(rank_)->wake_sequence;
  while (!stop_.load(std::memory_order_acquire)) {
    // Read before the scan: an export after it changes the word, and the wait below returns at once.
    const uint32_t sequence = wake->load(std::memory_order_acquire);
    bool found = false, retry = false;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_) continue;
      Table* theirs = table(peer);
      for (int slot = 0; slot < kExportSlots; ++slot) {
        const uint32_t generation = theirs->generation[slot].load(std::memory_order_acquire);
        if (generation == done[peer][slot]) continue;
        const cudaIpcMemHandle_t handle = theirs->handles[slot];
        const uint64_t owner_base = theirs->bases[slot];
        // The reads above complete before the generation is read again (a seqlock's reader).
        std::atomic_thread_fence(std::memory_order_acquire);
        if (theirs->generation[slot].load(std::memory_order_relaxed) != generation) {
          retry = true;  // re-exported while being read: read it again
          continue;
        }
        if (attempted[peer][slot] != generation) {  // a new generation gets its own open attempts
          attempted[peer][slot] = generation;
          failures[peer][slot] = 0;
        }
        ImportEntry& entry = host_imports_[peer * kExportSlots + slot];
        // The earlier generation's mapping: its allocation was freed, so no kernel reads through it any more
        // (see InputExports::retire_freed). It is closed by the calling thread at its next export_call, not here:
        // a close may wait for this process's running kernels, one of which may be waiting for this thread.
        if (opened_[peer][slot]) {
          std::lock_guard<std::mutex> lock(retired_mutex_);
          retired_mappings_.push_back(opened_[peer][slot]);
          has_retired_mappings_.store(true, std::memory_order_release);
          opened_[peer][slot] = nullptr;
        }
        uint64_t kind = kImportRetired;
        if (generation % 2 == 1) {
          kind = kImportMapped;
          if (theirs->pid == my_pid) {
            entry.base = owner_base;
          } else {
            void* base = nullptr;
            if (cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess) == cudaSuccess) {
              opened_[peer][slot] = base;
              entry.base = reinterpret_cast<uint64_t>(base);
            } else {
              cudaGetLastError();
              if (++failures[peer][slot] < kOpenAttempts) {
                retry = true;
                continue;
              }
              kind = kImportFailed;
            }
          }
        }
        done[peer][slot] = generation;
        found = true;
        // The kernel reads state with ld.acquire.sys, then base: base is visible first.
        std::atomic_thread_fence(std::memory_order_release);
        reinterpret_cast<volatile uint64_t&>(entry.state) = import_state(generation, kind);
      }
    }
    if (retry) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // a refused open, tried again shortly
    } else if (!found) {
      // Woken by a peer's export or retirement, or by the destructor; the timeout only bounds a missed wake.
      futex_wait(wake, sequence, 100'000'000L);
    }
  }
}

}  // namespace deep_ep
