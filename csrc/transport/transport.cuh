// The device-side transport interface (docs/design.md decision 4): how a kernel moves bytes and signals to a
// peer rank without knowing what carries them. This file states the contract and holds the P2P
// implementation (plain stores through peer pointers); gin_transport.cuh holds the NCCL GIN one.
// Transport code depends on CUDA (and NCCL's device API) only, never on csrc/kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "transport/timing.cuh"

// ================================================================================================
// Contract shared by every transport. A kernel names only these members, so the same kernel body
// compiles against P2pTransport and GinTransport (transport_check.cu proves it on every build).
//
// Window. Every rank owns one window with the same layout, so a byte offset names the same place on
// every rank. A put copies from this rank's window to a peer's window: a kernel stages what it sends
// in its own window first (local_ptr gives the address). Offsets and sizes are multiples of 16 bytes.
// `peer` is a rank of the group, 0 <= peer < num_ranks. A rank reaches its own window through
// local_ptr, not through a put; it may signal_add to its own signals like a peer (so one loop can
// count an op done on every rank).
//
// Signals. Every rank owns an array of 64-bit signals, named by index. Peers only add to a rank's
// signals; only the owner waits on (reads) and resets them. A signal only grows between resets, so
// a reader compares with >= (64 bits never wrap in a job's lifetime).
//
// Who calls what:
//   put, put_with_signal, signal_add, flush  warp-collective: all 32 lanes, converged, same arguments
//   wait_signal, read_signal, local_ptr,     any single thread
//   direct_ptr
//   reset_signal                             one thread, while no peer can add to that signal (between
//                                            two barriers of the op that owns it)
//
// Ordering:
//   put(peer, dst_offset, src_offset, num_bytes)
//       Unordered on its own: the peer may see the bytes in any order, at any time, until a signal
//       from this warp to the same peer covers them (below). The source must have been written by
//       this warp, or by threads ordered before it by a barrier.
//   put_with_signal(peer, dst_offset, src_offset, num_bytes, signal_idx, value)
//       The add of `value` to the peer's signal `signal_idx` becomes visible only after the bytes of
//       this put and of every earlier put of this warp to the same peer.
//   signal_add(peer, signal_idx, value)
//       The same, with no payload. It also releases this warp's earlier reads of its own window, so a
//       receiver can hand a slot back ("consumed, you may overwrite") with it.
//   wait_signal(signal_idx, target, timeout_ns, abort_flag, observed) -> bool
//       Acquire: true once the local signal is >= target; every byte the counted adds covered is then
//       visible to the caller, and to the other lanes of its warp after a __syncwarp. False after
//       timeout_ns, or as soon as *abort_flag (checked every kPollsPerSlowCheck polls; may be null)
//       is nonzero because another thread already gave up; *observed holds the last value read. The
//       caller reports (first reporter wins) and unwinds.
//   read_signal(signal_idx) -> uint64_t
//       One acquire read of the local signal, with the same visibility as a successful wait. For
//       protocols that compare with something other than a lower bound (a tag, an overrun), and
//       bound the wait themselves.
//   flush()
//       Afterwards the source bytes of every earlier put of this warp may be overwritten. It does not
//       say the bytes arrived: only a signal says that.
//   direct_ptr(peer, offset) -> char* or nullptr
//       Where a transport maps the peers' windows (P2P), the peer's address of `offset`: a kernel may
//       store there directly instead of staging and putting, saving a copy. Such stores count as puts
//       of the storing thread: a signal_add (or put_with_signal) covers them once every storing thread
//       is ordered before the signalling warp (by a barrier, or by being that warp): the signalling
//       lanes' system fence and release add are cumulative over what the barrier ordered before them,
//       so the storing threads need no fence of their own. nullptr where no mapping exists (GIN): the
//       kernel then stages and puts.
// ================================================================================================

namespace deep_ep::transport {

namespace detail {

// Release at system scope: this thread's earlier accesses, and those of the lanes that joined it at a
// __syncwarp after their own fences, are visible before the add, to any reader that acquires it.
__device__ __forceinline__ void red_add_release_sys(uint64_t* ptr, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

__device__ __forceinline__ bool abort_requested(const int* abort_flag) {
  return abort_flag != nullptr && *reinterpret_cast<const volatile int*>(abort_flag) != 0;
}

// Bounded spin until read() >= target; shared by the transports so that both time out alike.
template <typename Read>
__device__ __forceinline__ bool wait_at_least(Read read, uint64_t target, int64_t timeout_ns, const int* abort_flag,
                                              uint64_t* observed) {
  uint64_t value = read();
  if (value >= target) {
    *observed = value;
    return true;
  }
  const uint64_t start = global_timer_ns();
  for (int polls = 1;; ++polls) {
    poll_pause();
    value = read();
    if (value >= target) break;
    if (polls % kPollsPerSlowCheck == 0) {
      if (abort_requested(abort_flag) || global_timer_ns() - start > static_cast<uint64_t>(timeout_ns)) {
        *observed = value;
        return false;
      }
    }
  }
  *observed = value;
  return true;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31); }

}  // namespace detail

// Plain stores through peer pointers: every rank's buffer is mapped into this process (CUDA IPC, or
// the raw pointer of a peer in the same process). Used for load/store-reachable peers and to emulate
// remote nodes on one host or one GPU. Pass it by value in a kernel's parameters.
struct P2pTransport {
  char* const* peer_bases;  // device array [num_ranks]: each rank's buffer as mapped here
  int64_t window_offset;    // where the window starts inside each base
  // Where the signal array (uint64_t[num_signals], 8-byte aligned) starts inside the window. Signal s
  // of rank r: written by peers only with red.release.sys adds (after their payload stores and a
  // system fence), read only by r with ld.acquire.sys, reset by r with a plain store between barriers.
  int64_t signals_offset;
  int rank;  // peer_bases[rank] is this rank's own buffer

  __device__ __forceinline__ char* local_ptr(int64_t offset) const { return peer_ptr(rank, offset); }

  __device__ __forceinline__ char* direct_ptr(int peer, int64_t offset) const { return peer_ptr(peer, offset); }

  __device__ __forceinline__ void put(int peer, int64_t dst_offset, int64_t src_offset, int64_t num_bytes) const {
    copy_to_peer(peer, dst_offset, src_offset, num_bytes);
  }

  __device__ __forceinline__ void put_with_signal(int peer, int64_t dst_offset, int64_t src_offset, int64_t num_bytes,
                                                  int signal_idx, uint64_t value) const {
    copy_to_peer(peer, dst_offset, src_offset, num_bytes);
    signal_add(peer, signal_idx, value);
  }

  // Every lane fences its own stores (and loads) at system scope; the __syncwarp orders all lanes'
  // fences before lane 0's release add, which a waiter acquires.
  __device__ __forceinline__ void signal_add(int peer, int signal_idx, uint64_t value) const {
    __threadfence_system();
    __syncwarp();
    if (detail::lane_id() == 0) detail::red_add_release_sys(signal_ptr(peer, signal_idx), value);
    __syncwarp();
  }

  // A store's source was loaded before the store issued, so the source is reusable already; the fence
  // makes flush, as on GIN, a point after which none of this warp's earlier stores is pending here.
  __device__ __forceinline__ void flush() const {
    __threadfence_system();
    __syncwarp();
  }

  __device__ __forceinline__ bool wait_signal(int signal_idx, uint64_t target, int64_t timeout_ns,
                                              const int* abort_flag, uint64_t* observed) const {
    const uint64_t* signal = signal_ptr(rank, signal_idx);
    return detail::wait_at_least([signal] { return detail::ld_acquire_sys(signal); }, target, timeout_ns, abort_flag,
                                 observed);
  }

  __device__ __forceinline__ uint64_t read_signal(int signal_idx) const {
    return detail::ld_acquire_sys(signal_ptr(rank, signal_idx));
  }

  __device__ __forceinline__ void reset_signal(int signal_idx) const { *signal_ptr(rank, signal_idx) = 0; }

 private:
  static constexpr int kUnroll = 4;  // 16-byte loads in flight per lane before the first store

  __device__ __forceinline__ char* peer_ptr(int peer, int64_t offset) const {
    return peer_bases[peer] + window_offset + offset;
  }

  __device__ __forceinline__ uint64_t* signal_ptr(int peer, int signal_idx) const {
    return reinterpret_cast<uint64_t*>(peer_ptr(peer, signals_offset)) + signal_idx;
  }

  // The source is this rank's window, which other blocks of the same kernel may have rewritten since
  // this SM last read it: load at L2 (.cg), never from a stale L1 line.
  __device__ __forceinline__ void copy_to_peer(int peer, int64_t dst_offset, int64_t src_offset,
                                               int64_t num_bytes) const {
    const int4* src = reinterpret_cast<const int4*>(local_ptr(src_offset));
    int4* dst = reinterpret_cast<int4*>(peer_ptr(peer, dst_offset));
    const int64_t num_int4 = num_bytes / 16;
    int64_t i = detail::lane_id();
    for (; i + 32 * (kUnroll - 1) < num_int4; i += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldcg(src + i + 32 * u);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) dst[i + 32 * u] = v[u];
    }
    for (; i < num_int4; i += 32) dst[i] = __ldcg(src + i);
  }
};

}  // namespace deep_ep::transport
