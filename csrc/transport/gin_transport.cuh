// The GIN transport: the contract of transport.cuh over NCCL's device API (NCCL >= 2.28, GPU-initiated
// networking), for peers behind an RDMA network. The host runtime creates the device communicator and
// registers the window; this file only issues the device-side operations.
// Compiled only with -DDEEP_EP_ENABLE_GIN=ON; otherwise including it yields nothing.
#pragma once

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN

#include <nccl_device.h>

#include "transport/transport.cuh"

namespace deep_ep::transport {

// Pass it by value in a kernel's parameters: ncclGin keeps a reference to dev_comm, which must
// outlive every operation (a kernel parameter does).
//
// Peers are ranks of dev_comm's world team, which the runtime builds in the group's rank order.
//
// Signals are NCCL GIN signals: signal s of this transport is ncclGinSignal_t signal_start + s. Peers
// add to them only through put_with_signal/signal_add (NCCL makes the add visible after the payload
// of that put and of earlier puts of the same context to the same peer); the owner reads them with an
// acquire load (readSignal) and resets them (resetSignal) only between barriers. NCCL reaches a
// signal through the context's handle, so a signal's adders and its owner must use the same
// context_idx (derive it from something both sides know, such as the channel).
struct GinTransport {
  ncclDevComm dev_comm;   // from ncclDevCommCreate, with ginSignalCount covering this transport's signals
  ncclWindow_t window;    // the registered window; same layout on every rank
  int64_t base_offset;    // where this transport's offset 0 is inside the window (a region of the buffer)
  int context_idx;        // GIN context to post on (NCCL folds it modulo its context count)
  uint32_t signal_start;  // first NCCL signal id of this transport's signal array

  __device__ __forceinline__ char* local_ptr(int64_t offset) const {
    return static_cast<char*>(ncclGetLocalPointer(window, window_offset(offset)));
  }

  // Peers' windows are reached through the NIC only: kernels stage and put.
  __device__ __forceinline__ char* direct_ptr(int, int64_t) const { return nullptr; }

  __device__ __forceinline__ void put(int peer, int64_t dst_offset, int64_t src_offset, int64_t num_bytes) const {
    if (num_bytes == 0) return;
    release_sources();
    gin().put(ncclTeamWorld(dev_comm), peer, window, window_offset(dst_offset), window, window_offset(src_offset),
              static_cast<size_t>(num_bytes), ncclGin_None{}, ncclGin_None{}, ncclCoopWarp{});
  }

  __device__ __forceinline__ void put_with_signal(int peer, int64_t dst_offset, int64_t src_offset, int64_t num_bytes,
                                                  int signal_idx, uint64_t value) const {
    if (num_bytes == 0) {
      signal_add(peer, signal_idx, value);
      return;
    }
    release_sources();
    gin().put(ncclTeamWorld(dev_comm), peer, window, window_offset(dst_offset), window, window_offset(src_offset),
              static_cast<size_t>(num_bytes), ncclGin_SignalAdd{signal_id(signal_idx), value}, ncclGin_None{},
              ncclCoopWarp{});
  }

  __device__ __forceinline__ void signal_add(int peer, int signal_idx, uint64_t value) const {
    release_sources();
    gin().signal(ncclTeamWorld(dev_comm), peer, ncclGin_SignalAdd{signal_id(signal_idx), value}, ncclCoopWarp{});
  }

  __device__ __forceinline__ void flush() const { gin().flush(ncclCoopWarp{}); }

  __device__ __forceinline__ bool wait_signal(int signal_idx, uint64_t target, int64_t timeout_ns,
                                              const int* abort_flag, uint64_t* observed) const {
    const ncclGin gin_ctx = gin();
    const ncclGinSignal_t signal = signal_id(signal_idx);
    return detail::wait_at_least(
        [&gin_ctx, signal] { return gin_ctx.readSignal(signal, 64, cuda::memory_order_acquire); }, target, timeout_ns,
        abort_flag, observed);
  }

  __device__ __forceinline__ uint64_t read_signal(int signal_idx) const {
    return gin().readSignal(signal_id(signal_idx), 64, cuda::memory_order_acquire);
  }

  __device__ __forceinline__ void reset_signal(int signal_idx) const { gin().resetSignal(signal_id(signal_idx)); }

 private:
  __device__ __forceinline__ ncclGin gin() const { return ncclGin(dev_comm, context_idx); }

  __device__ __forceinline__ size_t window_offset(int64_t offset) const {
    return static_cast<size_t>(base_offset + offset);
  }

  __device__ __forceinline__ ncclGinSignal_t signal_id(int signal_idx) const {
    return signal_start + static_cast<uint32_t>(signal_idx);
  }

  // The NIC reads the source, and a peer may read what this warp read before a signal_add, only after
  // these accesses are visible system-wide. Each posting lane fences; the fence is cumulative, so it also
  // covers the accesses of threads that a barrier ordered before this warp (the writers of a staged batch).
  // NCCL's put then joins the warp (__syncwarp) before one lane posts. NCCL 2.28 also fences inside put,
  // but whether it does depends on the backend and on its scope arguments, so the contract does not rest
  // on it.
  static __device__ __forceinline__ void release_sources() { __threadfence_system(); }
};

}  // namespace deep_ep::transport

#endif  // DEEP_EP_ENABLE_GIN
