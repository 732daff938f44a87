// Normal-mode tuning knobs (docs/compatibility.md section 2) and the exact buffer sizes they imply.
// One Config describes one op's launch: num_sms blocks, one channel each (V1's pair of sender and
// receiver blocks is a pair of warp roles inside one block here, see csrc/kernels/intranode/), and the
// chunk sizes of the per-channel queues. num_sms stays even for V1 compatibility.
#pragma once

#include <cstdint>

namespace deep_ep {

constexpr int kNumMaxNvlPeers = 8;
constexpr int kMaxLocalExperts = 1024;  // L: experts per rank (docs/compatibility.md section 9)
constexpr int kNumMaxTopk = 128;        // size hints reserve this many top-k slots per token

struct Config {
  int num_sms = 20;
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 256;

  Config() = default;
  // Validates like V1 (ValueError naming the field); rounds the RDMA recv chunk up to a multiple of
  // the RDMA send chunk.
  Config(int num_sms, int nvl_send, int nvl_recv, int rdma_send, int rdma_recv);

  // One channel per block: each block stages its channel's tokens and receives that channel from every peer.
  int num_channels() const { return num_sms; }

  // Bytes of the per-rank NVLink buffer the dispatch and combine need for rows of `hidden_bytes`
  // (V1 callers pass hidden * 2) among `num_ranks` ranks in nodes of `num_ranks_per_node`, a multiple
  // of 128. Exact: an op with this config runs in a buffer of this size.
  //   One node (num_ranks <= num_ranks_per_node): the max of the intranode queue layouts.
  //   Several nodes: the internode flags and published prefixes, plus the combine rings: per channel
  //   and local rank, num_max_nvl_chunked_recv_tokens rows (at least 16).
  int64_t get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks, int num_ranks_per_node = kNumMaxNvlPeers) const;
  // 0 for one node. Several nodes: the internode window, whose row area holds, per node and channel,
  // a ring of num_max_rdma_chunked_recv_tokens rows twice (received and staged for sending). The rings
  // bound the buffer, not the call: a call streams any number of tokens through them, and neither hint
  // depends on the token count.
  int64_t get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks,
                                    int num_ranks_per_node = kNumMaxNvlPeers) const;
};

// Recommended configs (docs/compatibility.md section 2) for num_ranks in {2,4,8,16,24,32,48,64,96,128,144,160}.
Config get_dispatch_config(int num_ranks, int num_sms);
Config get_combine_config(int num_ranks, int num_sms);

}  // namespace deep_ep

namespace deep_ep {
// Bytes of the RDMA payload low-latency mode needs (both halves), a multiple of 128 (docs/compatibility.md section 3).
int64_t get_low_latency_rdma_size_hint(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                                       int64_t num_experts);
// The CUDA architectures this build's kernels were compiled for (CMAKE_CUDA_ARCHITECTURES, e.g.
// "90" or "90;100a"), and whether sm_90 is among them.
const char* compiled_cuda_architectures();
bool is_sm90_compiled();

}  // namespace deep_ep
