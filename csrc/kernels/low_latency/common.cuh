// Device pieces shared by the low-latency dispatch and combine kernels: addressing of a peer's half,
// the send tag protocol (see low_latency.hpp) over load/store or the transport, and the bounded waits
// that mask a silent peer under enable_shrink. The kernels are templates over the transport
// (transport.cuh) that reaches the peers for which via_transport is true.
//
// Reach. A kernel dereferences bases[r] (half_of, control_of) only for this rank and for peers with
// !via_transport(peers, r); with GIN, bases of other nodes are null. Every row and signal for a transport
// peer goes through the transport: staged in this rank's half, then put. The transport's window is
// the active half (its local_ptr(0) is half_of(peers, peers.rank)), so a put's offsets are offsets in a half.
#pragma once

#include <cstdint>

#include "kernels/common/device_utils.cuh"
#include "kernels/low_latency/low_latency.hpp"
#include "protocol/control_region.hpp"
#include "transport/transport.cuh"

namespace deep_ep::low_latency {

__device__ __forceinline__ ControlRegion* control_of(const Peers& peers, int rank) {
  return reinterpret_cast<ControlRegion*>(peers.bases[rank]);
}

__device__ __forceinline__ char* half_of(const Peers& peers, int rank) { return peers.bases[rank] + peers.half_offset; }

__device__ __forceinline__ int64_t make_signal(int tag, int rows) {
  return (static_cast<int64_t>(tag) << 32) | static_cast<uint32_t>(rows);
}

__device__ __forceinline__ bool is_masked(const Peers& peers, int rank) {
  return peers.enable_shrink && *reinterpret_cast<volatile int*>(&control_of(peers, peers.rank)->ll_mask[rank]) != 0;
}

// Called by thread 0 of every block at the start of a send. Returns the tag of this op. Ordering:
// the read of ll_epoch precedes this block's arrival (fence), and the last block's bump follows
// every arrival, so all blocks read the same value.
__device__ __forceinline__ int begin_send(const Peers& peers, int op) {
  ControlRegion* mine = control_of(peers, peers.rank);
  const int epoch = *reinterpret_cast<volatile int*>(&mine->ll_epoch[peers.half][op]);
  __threadfence();
  if (atomicAdd(&mine->ll_arrivals[peers.half][op], 1) == static_cast<int>(gridDim.x) - 1) {
    __threadfence();
    mine->ll_arrivals[peers.half][op] = 0;
    *reinterpret_cast<volatile int*>(&mine->ll_epoch[peers.half][op]) = epoch + 1;
  }
  return epoch + 1;
}

// The tag a hooked receive expects: its send has bumped ll_epoch already (the receive runs after it).
__device__ __forceinline__ int receive_tag(const Peers& peers, int op) {
  return *reinterpret_cast<volatile int*>(&control_of(peers, peers.rank)->ll_epoch[peers.half][op]);
}

// One lane. Polls `poll(observed)` until it returns a value >= 0 (returned) or -2 (it reported an
// error; returned). Returns -1 when the peer is (or becomes) masked. A timeout masks the peer under
// enable_shrink, and is reported otherwise, naming `expected` and the last `observed` (then -2: the
// caller unwinds). `waited_cycles` gets the clock cycles from the call to the poll that succeeded (or timed
// out), the first poll included, as V1's wait-cost statistics count them: a signal already present still costs the
// cycles of one poll, so the statistic of a peer that was reached always grows.
template <typename Poll>
__device__ __forceinline__ int wait_for_peer(const Peers& peers, int peer, Phase phase, int channel, long long expected,
                                             Poll poll, long long& waited_cycles) {
  const long long start_clock = clock64();
  waited_cycles = 0;
  if (is_masked(peers, peer)) return -1;
  long long observed = 0;
  int result = poll(observed);
  if (result != -1) {
    waited_cycles = clock64() - start_clock;
    return result;
  }
  const uint64_t start = device::global_timer_ns();
  for (int polls = 1;; ++polls) {
    result = poll(observed);
    if (result != -1) {
      waited_cycles = clock64() - start_clock;
      return result;
    }
    // Hundreds of waiters poll at once: back off a little so their loads leave L2 bandwidth to the data.
    __nanosleep(64);
    if (polls % device::kPollsPerSlowCheck != 0) continue;
    if (is_masked(peers, peer)) return -1;
    if (device::error_reported(peers.diagnostics)) return -2;
    if (device::global_timer_ns() - start > static_cast<uint64_t>(peers.timeout_ns)) {
      waited_cycles = clock64() - start_clock;
      if (peers.enable_shrink) {
        atomicExch(&control_of(peers, peers.rank)->ll_mask[peer], 1);
        return -1;
      }
      device::report(peers.diagnostics, phase, true, peers.rank, peer, channel, -1, expected, observed);
      return -2;
    }
  }
}

// The P2P transport of the active half, built on the host from the mapped bases: offsets of its
// operations are relative to the start of the half, and its signals are HalfLayout's signal array.
inline transport::P2pTransport p2p_transport(const Peers& peers, const HalfLayout& layout) {
  return transport::P2pTransport{peers.bases, peers.half_offset, layout.signals_offset, peers.rank};
}

__device__ __forceinline__ bool via_transport(const Peers& peers, int peer) {
  return (peers.transport_peers >> peer) & 1u;
}

// One lane waits until this rank's count signal `idx`, written by `source`, carries `tag`; returns the
// row count, or -1 / -2 as wait_for_peer. A load/store source releases it with a store into this
// rank's memory, a transport source adds to it: the matching acquire read differs (with GIN the two
// are different memory: the own half's signal array, and the transport's signals).
template <typename Transport>
__device__ __forceinline__ int wait_count(const Peers& peers, const HalfLayout& layout, const Transport& net, int idx,
                                          int source, int tag, Phase phase, int channel, long long& waited_cycles) {
  const bool remote = via_transport(peers, source);
  const auto* signal = reinterpret_cast<const int64_t*>(half_of(peers, peers.rank) + layout.signals_offset) + idx;
  return wait_for_peer(
      peers, source, phase, channel, tag,
      [&](long long& observed) {
        const int64_t value = remote ? static_cast<int64_t>(net.read_signal(idx)) : device::ld_acquire_sys(signal);
        const int observed_tag = static_cast<int>(value >> 32);
        observed = observed_tag;
        if (observed_tag == tag) return static_cast<int>(value & 0xffffffff);
        // Tags only grow: a later one means the peer overwrote this op's signal (and
        // maybe its rows).
        if (observed_tag - tag > 0) {
          device::report(peers.diagnostics, Phase::kLowLatencyOverrun, false, peers.rank, source, channel, -1, tag,
                         observed_tag);
          return -2;
        }
        return -1;
      },
      waited_cycles);
}

// One lane, after wait_count announced `units` arrival units from transport source `source`: waits
// until arrivals signal `idx` covers them on top of what earlier ops consumed (*consumed, this rank's
// memory, one reader), then advances *consumed. The acquire read makes the rows of every counted put
// visible. Returns 0, or -1 / -2 as wait_for_peer (a masked source leaves *consumed behind; only
// clean_low_latency_buffer realigns it).
template <typename Transport>
__device__ __forceinline__ int wait_arrivals(const Peers& peers, const Transport& net, int idx, uint64_t* consumed,
                                             uint64_t units, int source, Phase phase, int channel) {
  const uint64_t target = *consumed + units;
  long long cycles = 0;
  const int result = wait_for_peer(
      peers, source, phase, channel, static_cast<long long>(target),
      [&](long long& observed) {
        const uint64_t value = net.read_signal(idx);
        observed = static_cast<long long>(value);
        return value >= target ? 0 : -1;
      },
      cycles);
  if (result == 0) *consumed = target;
  return result;
}

// Whole warp: sets this rank's count signal `idx` at `dest` to (tag << 32 | rows). A load/store dest
// gets a release store, ordered after the rows by the caller's fences; a transport dest gets the
// difference to *mirror (this rank's memory: what it last set there) as an add, which the transport
// orders after this warp's earlier puts to dest (others' puts are covered by their arrivals).
template <typename Transport>
__device__ __forceinline__ void set_count(const Peers& peers, const HalfLayout& layout, const Transport& net, int dest,
                                          int idx, uint64_t* mirror, int tag, int rows) {
  const uint64_t value = static_cast<uint64_t>(make_signal(tag, rows));
  if (!via_transport(peers, dest)) {
    if (device::lane_id() == 0) {
      auto* signal = reinterpret_cast<int64_t*>(half_of(peers, dest) + layout.signals_offset) + idx;
      device::st_release_sys(signal, static_cast<int64_t>(value));
    }
    __syncwarp();
    return;
  }
  const uint64_t last = *reinterpret_cast<volatile uint64_t*>(mirror);
  __syncwarp();                             // every lane has read the mirror before lane 0 rewrites it
  net.signal_add(dest, idx, value - last);  // wraps modulo 2^64 to exactly `value`
  if (device::lane_id() == 0) *mirror = value;
  __syncwarp();
}

__device__ __forceinline__ float bf16_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

}  // namespace deep_ep::low_latency
