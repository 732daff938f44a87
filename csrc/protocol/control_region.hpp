// The control region at the start of every rank's NVLink buffer: cross-rank barrier signals, the
// count exchange of notify, and the head/tail counters of the intranode queues. Plain data, shared
// by host (sizes, offsets) and device code. Payload bytes (num_nvl_bytes) follow it.
#pragma once

#include <cstdint>

#include "deep_ep/config.hpp"
#include "protocol/pull_inputs.hpp"
#include "protocol/push_outputs.hpp"

namespace deep_ep {

constexpr int kMaxChannels = 128;               // one channel per block: num_sms <= 128
constexpr int kMaxIntranodeExperts = 8 * 1024;  // R <= 8 ranks, L <= 1024 local experts
constexpr int kMaxLowLatencyRanks = 32;         // a warp's lanes cover every rank in the LL kernels

struct ControlRegion {
  // barrier_signal[i]: written by rank i (release, system scope) with the barrier's epoch; read by
  // the owner (acquire). Epochs only grow, so nothing is ever reset.
  int barrier_signal[kNumMaxNvlPeers];
  // Epoch of the owner's last barrier, kept on the device (read and written only by the owner's
  // single-block prologue kernels) so that CUDA graph replays keep counting up.
  int barrier_epoch;
  int pad0[31 - kNumMaxNvlPeers];

  // Notify exchange, written by the owner before a barrier and read by every peer after it.
  int num_tokens;  // owner's T
  int pad1[31];
  int num_tokens_per_rank[kNumMaxNvlPeers];  // tokens the owner sends to each rank
  int pad2[32 - kNumMaxNvlPeers];
  int num_tokens_per_channel_rank[kMaxChannels][kNumMaxNvlPeers];  // same, per dispatch channel
  int num_tokens_per_expert[kMaxIntranodeExperts];                 // slots the owner sends to each expert

  // Queue counters. Each is written by exactly one remote rank with st.release.sys and polled by the
  // owner with ld.acquire.sys, so the payload stored before the release is visible after the acquire.
  // All are zeroed by the owner between the two barriers of an op's prologue.
  int dispatch_tail[kMaxChannels][kNumMaxNvlPeers];  // [channel][sender]: slots staged by sender
  int dispatch_head[kMaxChannels][kNumMaxNvlPeers];  // [channel][receiver]: slots receiver is done with
  int combine_tail[kMaxChannels][kNumMaxNvlPeers];   // [channel][expert rank]: rows pushed to the owner
  int combine_head[kMaxChannels][kNumMaxNvlPeers];   // [channel][home rank]: rows the home rank consumed

  // Low-latency state, read and written only by the owner's kernels (GPU scope); zeroed by
  // clean_low_latency_buffer. [half][op] with op 0 = dispatch, 1 = combine.
  // ll_epoch: sends of that op into that half so far. Every block of a send reads it, then counts
  //   itself in ll_arrivals (after a fence); the block that arrives last resets ll_arrivals and bumps
  //   ll_epoch, so no block can read the bumped value during the same send.
  int ll_epoch[2][2];
  int ll_arrivals[2][2];
  // Combine rows this rank has written to each home rank in the current send: warps add after a
  // system fence; the warp that signals the home rank waits for the full count, then resets it.
  int ll_combine_rows_done[2][kMaxLowLatencyRanks];
  // Nonzero = the rank is masked (enable_shrink): not sent to, not waited for.
  int ll_mask[kMaxLowLatencyRanks];

  // Internode normal mode, read and written only by the owner's kernels (GPU scope).
  // internode_ops: internode kernels finished so far. Every block reads it at its start; the block
  //   that arrives last in internode_arrivals (after a fence) resets the arrivals and bumps it, so no
  //   block of the same kernel can read the bumped value.
  int internode_ops;
  int internode_arrivals;

  // The op bracket of the pull combine and the push dispatch (kernels/intranode/op_bracket.cuh).
  // pull_epoch: bracketed ops finished here, read by every block at its start and bumped by the last block to
  // arrive in pull_arrivals (owner only, GPU scope). pull_ready[i] / pull_done[i]: written by rank i with
  // st.release.sys (epoch + 1 once its side of the op may be touched by peers: combine inputs readable, dispatch
  // outputs writable / once it has finished touching every rank's), polled here with ld.acquire.sys.
  int pull_epoch;
  int pull_arrivals;
  int pull_ready[kNumMaxNvlPeers];
  int pull_done[kNumMaxNvlPeers];
  // pull_inputs[i]: where rank i's inputs of the current pull combine live (host-free form), written by rank
  // i's block 0 before its system fence and pull_ready release, read here after the acquire of pull_ready[i].
  // Rank i rewrites it only in its next pull combine, which starts after every rank's pull_done of this one.
  PullInput pull_inputs[kNumMaxNvlPeers];
  // push_outputs[i]: where rank i's outputs of the current push dispatch live, under the same contract as
  // pull_inputs (the push dispatch takes the pull combine's op bracket: pull_epoch, pull_ready, pull_done).
  PushOutputs push_outputs[kNumMaxNvlPeers];

  // The internode dispatch's own-node push (kernels/internode/dispatch.cu). node_recv_x[i]: where local rank i's
  // recv_x of the current dispatch lives in its exports, node_num_rows[i] its rows, node_first_row[i] the first row
  // of this rank's tokens there; written by rank i's block 0, which then stores node_outputs_ready[i] = epoch + 1
  // with st.release.sys; read here after the acquire. Rank i rewrites them only in a later internode op, which
  // starts after every rank has ended this one (the done signal).
  InputRef node_recv_x[kNumMaxNvlPeers];
  int node_num_rows[kNumMaxNvlPeers];
  int node_first_row[kNumMaxNvlPeers];
  int64_t node_outputs_ready[kNumMaxNvlPeers];
};

constexpr int64_t kControlRegionBytes = (sizeof(ControlRegion) + 4095) / 4096 * 4096;

}  // namespace deep_ep
