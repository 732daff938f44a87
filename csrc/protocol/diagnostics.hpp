// Host-mapped diagnostics: how a kernel reports a bounded wait that expired or a bad value it met in
// device memory (docs/design.md decision 6). The first reporter wins; the host turns the record into an
// exception naming rank, peer, channel and phase.
#pragma once

#include <cstdint>

namespace deep_ep {

enum class Phase : int {
  kNone = 0,
  kLayoutExpertRange,         // get_dispatch_layout met an expert id outside [-1, num_experts)
  kBarrier,                   // cross-rank barrier of an op's prologue
  kNotifyCounts,              // notify waiting for peers' counts
  kDispatchWaitSpace,         // dispatch sender waiting for receivers to free ring slots
  kDispatchWaitData,          // dispatch receiver waiting for a sender to stage slots
  kDispatchDrain,             // dispatch sender waiting for receivers to finish
  kCombineWaitSpace,          // combine sender waiting for the home rank to free ring slots
  kCombineWaitData,           // combine receiver waiting for an expert rank's rows
  kDispatchExpertRange,       // dispatch met an expert id outside [-1, num_experts)
  kLowLatencyDispatchRecv,    // low-latency dispatch receive waiting for a source rank's rows
  kLowLatencyCombineRecv,     // low-latency combine receive waiting for an expert rank's rows
  kLowLatencyCombineSend,     // low-latency combine send waiting for its own warps' rows
  kLowLatencyDispatchSend,    // low-latency dispatch send waiting for its own warps' rows
  kLowLatencyExpertRange,     // low-latency dispatch met an expert id outside [-1, num_experts)
  kLowLatencyTooManyRows,     // a source rank sends one expert more than num_max_dispatch_tokens_per_rank rows
  kLowLatencyOverrun,         // a peer's next op on a buffer half arrived before this op's receive read it
  kInternodeBarrier,          // an internode op waiting for every rank to finish the previous one
  kInternodeNotify,           // internode notify waiting for a source's counts
  kInternodeDispatchForward,  // internode dispatch forwarder waiting for a source node's rows
  kInternodeDispatchRecv,     // internode dispatch receiver waiting for a forwarder of its node
  kInternodeCombineStage,     // internode combine forwarder waiting for a local rank's staged rows
  kInternodeCombineRecv,      // internode combine home rank waiting for a node's partial sums
  kInternodeTooManyRows,      // an internode dispatch receives more rows than num_worst_tokens
  kPullCombineReady,          // pull combine waiting for an expert rank's outputs to be ready
  kPullCombineDone,           // pull combine waiting for a home rank to finish reading this rank's outputs
  kInternodeDispatchSend,     // internode dispatch sender waiting for a forwarder's credits (ring space)
  kInternodeCombineSend,      // internode combine forwarder waiting for a home rank's credits (ring space)
  kPullCombineMap,            // pull combine waiting for an expert rank's input to be mapped here
  kInternodeCombineMap,       // internode combine forwarder waiting for a local rank's input to be mapped here
  kPushDispatchReady,         // push dispatch waiting for a destination rank's outputs to be allocated
  kPushDispatchDone,          // push dispatch waiting for a source rank to finish writing this rank's outputs
  kPushDispatchMap,           // push dispatch waiting for a destination rank's output to be mapped here
  kDispatchTooManyRows,       // an intranode dispatch receives more rows than num_worst_tokens
  kInternodeDispatchOutputs,  // internode dispatch sender waiting for a rank of its node to publish its outputs
};

inline const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::kNone:
      return "none";
    case Phase::kLayoutExpertRange:
      return "get_dispatch_layout (expert id out of range)";
    case Phase::kBarrier:
      return "barrier";
    case Phase::kNotifyCounts:
      return "notify (count exchange)";
    case Phase::kDispatchWaitSpace:
      return "dispatch send (waiting for free queue slots)";
    case Phase::kDispatchWaitData:
      return "dispatch receive (waiting for staged tokens)";
    case Phase::kDispatchDrain:
      return "dispatch send (waiting for receivers to drain)";
    case Phase::kCombineWaitSpace:
      return "combine send (waiting for free queue slots)";
    case Phase::kCombineWaitData:
      return "combine receive (waiting for rows)";
    case Phase::kDispatchExpertRange:
      return "dispatch (expert id out of range)";
    case Phase::kLowLatencyDispatchRecv:
      return "low-latency dispatch receive (waiting for a source rank)";
    case Phase::kLowLatencyCombineRecv:
      return "low-latency combine receive (waiting for an expert rank)";
    case Phase::kLowLatencyCombineSend:
      return "low-latency combine send (waiting for this rank's rows)";
    case Phase::kLowLatencyDispatchSend:
      return "low-latency dispatch send (waiting for this rank's rows)";
    case Phase::kLowLatencyExpertRange:
      return "low-latency dispatch (expert id out of range)";
    case Phase::kLowLatencyOverrun:
      return "low-latency receive (a peer already sent its next op on this buffer half: calls must alternate "
             "halves, e.g. a CUDA graph replayed in a loop must hold an even number of low-latency ops)";
    case Phase::kInternodeBarrier:
      return "internode barrier (waiting for every rank to finish the previous internode op)";
    case Phase::kInternodeNotify:
      return "internode notify (waiting for a source rank's counts)";
    case Phase::kInternodeDispatchForward:
      return "internode dispatch forward (waiting for a source node's rows, or for the node's ranks to scan them)";
    case Phase::kInternodeDispatchSend:
      return "internode dispatch send (waiting for a forwarder to credit ring slots: its node's ranks read too slowly)";
    case Phase::kInternodeCombineSend:
      return "internode combine forward (waiting for a home rank to credit ring slots of partial sums)";
    case Phase::kInternodeDispatchRecv:
      return "internode dispatch receive (waiting for a forwarder of this node)";
    case Phase::kInternodeCombineStage:
      return "internode combine (waiting for a local rank's staged rows)";
    case Phase::kInternodeCombineRecv:
      return "internode combine receive (waiting for a node's partial sums)";
    case Phase::kInternodeTooManyRows:
      return "internode dispatch (more received rows than num_worst_tokens)";
    case Phase::kPullCombineReady:
      return "combine (waiting for an expert rank's outputs to be ready)";
    case Phase::kPullCombineDone:
      return "combine (waiting for a home rank to finish reading this rank's outputs)";
    case Phase::kPullCombineMap:
      return "combine (waiting for an expert rank's input to be mapped into this process)";
    case Phase::kInternodeCombineMap:
      return "internode combine (waiting for a local rank's input to be mapped into this process, in place)";
    case Phase::kPushDispatchReady:
      return "dispatch (waiting for a destination rank's outputs to be allocated)";
    case Phase::kPushDispatchDone:
      return "dispatch (waiting for a source rank to finish writing this rank's outputs)";
    case Phase::kPushDispatchMap:
      return "dispatch (waiting for a destination rank's output to be mapped into this process)";
    case Phase::kDispatchTooManyRows:
      return "dispatch (more received rows than num_worst_tokens)";
    case Phase::kInternodeDispatchOutputs:
      return "internode dispatch send (waiting for a rank of this node to publish where its outputs are)";
    case Phase::kLowLatencyTooManyRows:
      return "low-latency dispatch (more than num_max_dispatch_tokens_per_rank rows to one expert)";
  }
  return "unknown";
}

// Value errors: the kernel that meets one skips the offending entries and runs on, its op completes with the
// peers, and the host raises a ValueError with the buffer still usable. Every other report ends the op.
constexpr bool is_value_error(Phase phase) {
  return phase == Phase::kLayoutExpertRange || phase == Phase::kDispatchExpertRange ||
         phase == Phase::kLowLatencyExpertRange || phase == Phase::kLowLatencyTooManyRows ||
         phase == Phase::kInternodeTooManyRows || phase == Phase::kDispatchTooManyRows;
}

// `claimed` is taken with atomicCAS by the first reporter, which fills the fields and then publishes
// `ready = 1` after a system-scope fence; the host reads the fields only after it sees `ready`.
struct DeviceDiagnostics {
  int claimed;
  int ready;
  int phase;
  int is_timeout;
  int rank, peer, channel, token;
  long long expected, observed;
  // Set by every report that ends the op (not by value errors), whether or not it claimed the record: the
  // waits of this rank's kernels abort on it. A value error leaves it 0, so the op's other threads keep the
  // protocol going (aborting them would leave the peers waiting, or let an in-place input be reused while
  // peers still read it). Never cleared: a buffer that saw it is re-created.
  int abort_waits;
};

}  // namespace deep_ep
