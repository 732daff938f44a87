// Low-latency combine. Send (expert rank): the rows of all local experts form one list that the
// grid's warps stride over; a row goes back to its source rank's half, at (token, top-k slot), as
// bf16 or LogFMT. Each warp counts the rows it wrote per home rank and, after a system fence, adds
// them to ll_combine_rows_done; global warp r then waits for home rank r's full count and releases
// r's signal. Receive (home rank): every block waits for every unmasked expert rank's signal, then
// warps sum (token, column range) units: in k order, fmaf(weight, row, sum) from 0, as the CPU
// reference does, and round to bf16 once.
#include <cuda_bf16.h>

#include "kernels/common/bf16.cuh"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/logfmt.hpp"
#include "kernels/low_latency/low_latency_gin.cuh"
#include "util/cuda_check.hpp"

namespace deep_ep::low_latency {

namespace {

constexpr int kWarps = kThreads / 32;
// Top-k slots whose rows a receiving lane loads before it sums any of them.
constexpr int kTopkGroup = 4;
constexpr int kOctetsPerGroup = kLogfmtGroup / 8;

using device::float_to_bf16_bits;

// LogFMT encode of one 8-channel octet per lane; the 8 lanes of a 64-channel group share its range.
__device__ __forceinline__ void encode_octet(const int4& v, char* group_base, int octet_in_group, bool valid) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
  float f[8];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = bf16_to_float(w[q] & 0xffffu);
    f[2 * q + 1] = bf16_to_float(w[q] >> 16);
  }
  float max_abs = 0.0f, min_abs = __int_as_float(0x7f800000);  // +inf
#pragma unroll
  for (int element = 0; element < 8; ++element) {
    const float magnitude = fabsf(f[element]);
    max_abs = fmaxf(max_abs, magnitude);
    if (magnitude > 0.0f) min_abs = fminf(min_abs, magnitude);
  }
#pragma unroll
  for (int lane_mask = 4; lane_mask >= 1; lane_mask >>= 1) {
    max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, lane_mask));
    min_abs = fminf(min_abs, __shfl_xor_sync(0xffffffffu, min_abs, lane_mask));
  }
  float lmin, step;
  logfmt_group_params(max_abs, min_abs, lmin, step);
  uint32_t codes[8];
#pragma unroll
  for (int element = 0; element < 8; ++element) codes[element] = logfmt_encode_value(f[element], lmin, step);
  uint8_t bytes[10];
  logfmt_pack_octet(codes, bytes);
  if (!valid) return;
  if (octet_in_group == 0) *reinterpret_cast<float2*>(group_base) = make_float2(lmin, step);
  // 10-byte fields start at even offsets: five 16-bit stores.
  auto* out = reinterpret_cast<uint16_t*>(group_base + 8 + 10 * octet_in_group);
#pragma unroll
  for (int h = 0; h < 5; ++h) out[h] = static_cast<uint16_t>(bytes[2 * h] | (bytes[2 * h + 1] << 8));
}

__device__ __forceinline__ void decode_octet(const char* group_base, int octet_in_group, float (&f)[8]) {
  const float2 header = __ldcg(reinterpret_cast<const float2*>(group_base));
  const auto* in = reinterpret_cast<const unsigned short*>(group_base + 8 + 10 * octet_in_group);
  uint8_t bytes[10];
#pragma unroll
  for (int h = 0; h < 5; ++h) {
    const unsigned short half_word = __ldcg(in + h);
    bytes[2 * h] = static_cast<uint8_t>(half_word & 0xff);
    bytes[2 * h + 1] = static_cast<uint8_t>(half_word >> 8);
  }
  uint32_t codes[8];
  logfmt_unpack_octet(bytes, codes);
#pragma unroll
  for (int element = 0; element < 8; ++element) f[element] = logfmt_decode_value(codes[element], header.x, header.y);
}

template <typename Transport>
__device__ void signal_home_rank(const Peers& peers, const HalfLayout& layout, const Transport& net,
                                 const CombineArgs& args, int tag, int home_rank);

template <typename Transport>
__device__ void run_send(const Peers& peers, const HalfLayout& layout, const Transport& net, const CombineArgs& args,
                         int tag, int* row_prefix, int* rank_ends, int warp, int lane) {
  const int num_ranks = peers.num_ranks, num_local_experts = args.num_local_experts, hidden = args.hidden;
  const int64_t num_slots_per_expert = static_cast<int64_t>(num_ranks) * args.num_max_tokens;
  ControlRegion* mine = control_of(peers, peers.rank);
  // Rows of each local expert: ranks' blocks are contiguous and in rank order, so the last one ends them.
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < num_local_experts; base += 32) {
      const int local_expert = base + lane;
      int num_rows = 0;
      if (local_expert < num_local_experts) {
        const int64_t last = args.layout_range[local_expert * num_ranks + num_ranks - 1];
        num_rows = static_cast<int>(last >> 32) + static_cast<int>(last & 0xffffffff);
      }
      int inclusive = num_rows;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int below = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += below;
      }
      if (local_expert < num_local_experts) row_prefix[local_expert + 1] = carry + inclusive;
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) row_prefix[0] = 0;
  }
  // rank_ends[e * num_ranks + r]: end of source rank r's rows inside local expert e (shared, so that finding
  // a row's home rank costs no dependent global loads).
  for (int j = threadIdx.x; j < num_local_experts * num_ranks; j += blockDim.x) {
    const int64_t range = args.layout_range[j];
    rank_ends[j] = static_cast<int>(range >> 32) + static_cast<int>(range & 0xffffffff);
  }
  __syncthreads();

  const int total_rows = row_prefix[num_local_experts];
  const int num_warps = gridDim.x * kWarps, global_warp = blockIdx.x * kWarps + warp;
  const int num_octets = hidden / 8;
  int rows_to_lane_rank = 0;  // lane r counts the rows this warp wrote to home rank r
  for (int row = global_warp; row < total_rows; row += num_warps) {
    int lo = 0, hi = num_local_experts;  // the expert whose rows contain `row`
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (row_prefix[mid] <= row)
        lo = mid;
      else
        hi = mid;
    }
    const int local_expert = lo, expert_row = row - row_prefix[local_expert];
    int home_rank = 0;
    while (home_rank < num_ranks - 1 && expert_row >= rank_ends[local_expert * num_ranks + home_rank]) ++home_rank;
    if (is_masked(peers, home_rank)) continue;
    const int token = args.src_info[local_expert * num_slots_per_expert + expert_row];
    const int topk_slot =
        args.src_info[num_local_experts * num_slots_per_expert + local_expert * num_slots_per_expert + expert_row];
    const int64_t dst_offset =
        layout.combine_offset +
        (static_cast<int64_t>(token) * layout.combine_slots_per_token + topk_slot) * layout.combine_row_bytes;
    const bool remote = via_transport(peers, home_rank);
    // A transport home rank gets the row from this rank's dispatch slot (local_expert, expert_row) of the
    // same half, where a zero-copy combine's rows already are (no peer dispatches into this half before this
    // send is done).
    const int64_t staged_offset =
        layout.dispatch_offset + (local_expert * num_slots_per_expert + expert_row) * layout.dispatch_slot_bytes;
    char* dst = remote ? half_of(peers, peers.rank) + staged_offset : half_of(peers, home_rank) + dst_offset;
    const int4* src =
        reinterpret_cast<const int4*>(args.x + local_expert * args.x_expert_stride + expert_row * args.x_row_stride);
    if (!args.use_logfmt) {
      if (reinterpret_cast<const char*>(src) != dst)
        device::warp_copy_in_rounds<8>(reinterpret_cast<int4*>(dst), src, num_octets, lane, device::ld_input);
    } else {
      // In place (zero copy) is safe too: a pass reads its 32 octets before it writes, and writes below
      // the next pass's first source byte (88 encoded bytes per 128 read).
      for (int base = 0; base < num_octets; base += 32) {
        const int octet = base + lane;
        const bool valid = octet < num_octets;
        encode_octet(valid ? device::ld_input(src + octet) : make_int4(0, 0, 0, 0),
                     dst + static_cast<int64_t>(octet / kOctetsPerGroup) * kLogfmtGroupBytes, octet % kOctetsPerGroup,
                     valid);
      }
    }
    if (remote) {
      __syncwarp();  // the put reads the staged row through other lanes than those that wrote it
      const int64_t row_bytes = args.use_logfmt ? static_cast<int64_t>(hidden / kLogfmtGroup) * kLogfmtGroupBytes
                                                : static_cast<int64_t>(hidden) * 2;
      net.put_with_signal(home_rank, dst_offset, staged_offset, row_bytes, layout.combine_arrivals_signal(peers.rank),
                          1);
    }
    if (lane == home_rank) ++rows_to_lane_rank;
  }
  // Rows before counts: every lane fences its own stores at system scope, then the adds are made.
  __threadfence_system();
  __syncwarp();
  if (lane < num_ranks && rows_to_lane_rank > 0)
    atomicAdd(&mine->ll_combine_rows_done[peers.half][lane], rows_to_lane_rank);

  if (global_warp < num_ranks && !is_masked(peers, global_warp))
    signal_home_rank(peers, layout, net, args, tag, global_warp);
  // A later op may overwrite the staged rows: no put of this warp may still be reading them.
  if (peers.transport_peers != 0) net.flush();
}

// Global warp `home_rank`: once every warp's rows to `home_rank` are counted, set its count signal.
template <typename Transport>
__device__ void signal_home_rank(const Peers& peers, const HalfLayout& layout, const Transport& net,
                                 const CombineArgs& args, int tag, int home_rank) {
  const int num_ranks = peers.num_ranks, num_local_experts = args.num_local_experts;
  int expected = 0;
  for (int local_expert = 0; local_expert < num_local_experts; ++local_expert)
    expected += static_cast<int>(args.layout_range[local_expert * num_ranks + home_rank] & 0xffffffff);
  int* done = &control_of(peers, peers.rank)->ll_combine_rows_done[peers.half][home_rank];
  if (device::lane_id() == 0) {
    // Local warps only; the bound is a safety net against a bug, not a peer.
    const uint64_t start = device::global_timer_ns();
    for (int polls = 1; device::ld_acquire_gpu(done) < expected; ++polls) {
      if (polls % device::kPollsPerSlowCheck == 0 &&
          device::global_timer_ns() - start > static_cast<uint64_t>(peers.timeout_ns)) {
        device::report(peers.diagnostics, Phase::kLowLatencyCombineSend, true, peers.rank, home_rank, -1, -1, expected,
                       device::ld_acquire_gpu(done));
        break;
      }
    }
    *done = 0;  // the next combine on this half is a later kernel
    __threadfence_system();
  }
  __syncwarp();
  if (device::error_reported(peers.diagnostics)) return;
  auto* mirror = reinterpret_cast<uint64_t*>(half_of(peers, peers.rank) + layout.combine_mirror_offset) + home_rank;
  set_count(peers, layout, net, home_rank, layout.combine_count_signal(peers.rank), mirror, tag, expected);
}

template <typename Transport>
__device__ void run_receive(const Peers& peers, const HalfLayout& layout, const Transport& net, const CombineArgs& args,
                            int tag, int warp, int lane, int* masked, int* abort_flag) {
  const int num_ranks = peers.num_ranks, hidden = args.hidden, num_topk = args.num_topk;
  const int num_local_experts = args.num_local_experts;
  char* half = half_of(peers, peers.rank);
  for (int source = warp; source < num_ranks; source += kWarps) {
    if (lane != 0) continue;
    long long cycles = 0;
    int count = wait_count(peers, layout, net, layout.combine_count_signal(source), source, tag,
                           Phase::kLowLatencyCombineRecv, -1, cycles);
    if (count > 0 && via_transport(peers, source)) {
      // Every block waits for every source: each keeps its own consumed counter per source.
      auto* consumed = reinterpret_cast<uint64_t*>(half + layout.combine_consumed_offset) +
                       static_cast<int64_t>(blockIdx.x) * num_ranks + source;
      const int arrived = wait_arrivals(peers, net, layout.combine_arrivals_signal(source), consumed,
                                        static_cast<uint64_t>(count), source, Phase::kLowLatencyCombineRecv, -1);
      if (arrived < 0) count = arrived;
    }
    if (count == -2) *abort_flag = 1;
    if (blockIdx.x == 0 && args.wait_recv_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&args.wait_recv_cost_stats[source]),
                static_cast<unsigned long long>(cycles));
  }
  __syncwarp();  // lane 0 waited alone; reconverge before the block barrier
  __syncthreads();
  if (*abort_flag) return;
  if (threadIdx.x < num_ranks) masked[threadIdx.x] = is_masked(peers, threadIdx.x) ? 1 : 0;
  __syncthreads();

  // Work units: (token, range of 64-channel groups), enough of them to give every warp one.
  const int num_groups = hidden / kLogfmtGroup;
  const int num_warps = gridDim.x * kWarps, global_warp = blockIdx.x * kWarps + warp;
  const int num_tokens_or_one = max(args.num_tokens, 1);
  const int chunks = max(1, min(num_groups, (num_warps + num_tokens_or_one - 1) / num_tokens_or_one));
  const int groups_per_chunk = (num_groups + chunks - 1) / chunks;
  for (int unit = global_warp; unit < args.num_tokens * chunks; unit += num_warps) {
    const int token = unit / chunks, chunk = unit % chunks;
    const int octet_begin = chunk * groups_per_chunk * kOctetsPerGroup;
    const int octet_end = min(num_groups, (chunk + 1) * groups_per_chunk) * kOctetsPerGroup;
    const char* rows = half + layout.combine_offset +
                       static_cast<int64_t>(token) * layout.combine_slots_per_token * layout.combine_row_bytes;
    // Two octets per lane per pass. Plain rows: the loads of kTopkGroup slots' rows are issued before any of them
    // is summed (one memory round trip per group, not per slot); LogFMT rows are decoded slot by slot.
    const int64_t* token_topk = args.topk_idx + static_cast<int64_t>(token) * num_topk;
    const float* token_weights = args.topk_weights + static_cast<int64_t>(token) * num_topk;
    // The slot's expert is a valid, unmasked one: its row holds data.
    auto slot_valid = [&](int k) {
      const int64_t expert = token_topk[k];
      return expert >= 0 && expert < args.num_experts && !masked[expert / num_local_experts];
    };
    for (int first = octet_begin + lane; first < octet_end; first += 64) {
      const bool has_second = first + 32 < octet_end;
      float acc[2][8] = {};
      if (args.use_logfmt) {
        for (int k = 0; k < num_topk; ++k) {
          if (!slot_valid(k)) continue;
          const float weight = token_weights[k];
          const char* row = rows + static_cast<int64_t>(k) * layout.combine_row_bytes;
          float values[2][8];
#pragma unroll
          for (int octet_idx = 0; octet_idx < 2; ++octet_idx) {
            const int octet = first + 32 * octet_idx;
            if (octet_idx == 1 && !has_second) break;
            decode_octet(row + static_cast<int64_t>(octet / kOctetsPerGroup) * kLogfmtGroupBytes,
                         octet % kOctetsPerGroup, values[octet_idx]);
          }
#pragma unroll
          for (int octet_idx = 0; octet_idx < 2; ++octet_idx)
#pragma unroll
            for (int element = 0; element < 8; ++element)
              acc[octet_idx][element] = fmaf(weight, values[octet_idx][element], acc[octet_idx][element]);
        }
      } else {
        for (int k0 = 0; k0 < num_topk; k0 += kTopkGroup) {
          int4 raw[kTopkGroup][2];
          float weight[kTopkGroup];
          bool valid[kTopkGroup];
#pragma unroll
          for (int g = 0; g < kTopkGroup; ++g) {
            const int k = k0 + g;
            valid[g] = k < num_topk && slot_valid(k);
            weight[g] = valid[g] ? token_weights[k] : 0.0f;
            const int4* row = reinterpret_cast<const int4*>(rows + static_cast<int64_t>(k) * layout.combine_row_bytes);
            if (valid[g]) raw[g][0] = device::ld_queue(row + first);
            if (valid[g] && has_second) raw[g][1] = device::ld_queue(row + first + 32);
          }
#pragma unroll
          for (int g = 0; g < kTopkGroup; ++g) {
            if (!valid[g]) continue;
#pragma unroll
            for (int octet_idx = 0; octet_idx < 2; ++octet_idx) {
              if (octet_idx == 1 && !has_second) break;
              const int4 v = raw[g][octet_idx];
              const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                                         static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                acc[octet_idx][2 * q] = fmaf(weight[g], bf16_to_float(words[q] & 0xffffu), acc[octet_idx][2 * q]);
                acc[octet_idx][2 * q + 1] = fmaf(weight[g], bf16_to_float(words[q] >> 16), acc[octet_idx][2 * q + 1]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int octet_idx = 0; octet_idx < 2; ++octet_idx) {
        if (octet_idx == 1 && !has_second) break;
        int4 out;
        out.x = static_cast<int>(float_to_bf16_bits(acc[octet_idx][0]) | (float_to_bf16_bits(acc[octet_idx][1]) << 16));
        out.y = static_cast<int>(float_to_bf16_bits(acc[octet_idx][2]) | (float_to_bf16_bits(acc[octet_idx][3]) << 16));
        out.z = static_cast<int>(float_to_bf16_bits(acc[octet_idx][4]) | (float_to_bf16_bits(acc[octet_idx][5]) << 16));
        out.w = static_cast<int>(float_to_bf16_bits(acc[octet_idx][6]) | (float_to_bf16_bits(acc[octet_idx][7]) << 16));
        reinterpret_cast<int4*>(args.combined_x + static_cast<int64_t>(token) * hidden)[first + 32 * octet_idx] = out;
      }
    }
  }
}

// `net` reaches the peers for which via_transport is true: the kernel's __grid_constant__ parameter,
// read in place, never copied (GIN keeps references into it for the whole kernel).
template <typename Transport>
__global__ void __launch_bounds__(kThreads, 1)
    combine(Peers peers, HalfLayout layout, const __grid_constant__ Transport net, CombineArgs args, int phases) {
  __shared__ int tag_shared, abort_flag;
  __shared__ int row_prefix[kMaxLocalExperts + 1];
  __shared__ int masked[kMaxLowLatencyRanks];
  extern __shared__ int rank_ends[];  // [L * R], send only
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  if (threadIdx.x == 0) {
    abort_flag = 0;
    tag_shared = (phases & kSend) ? begin_send(peers, 1) : receive_tag(peers, 1);
  }
  __syncthreads();
  const int tag = tag_shared;
  if (phases & kSend) run_send(peers, layout, net, args, tag, row_prefix, rank_ends, warp, lane);
  if (phases & kReceive) run_receive(peers, layout, net, args, tag, warp, lane, masked, &abort_flag);
}

template <typename Transport>
void launch(const Peers& peers, const HalfLayout& layout, const Transport& net, const CombineArgs& args, int phases,
            int num_blocks, cudaStream_t stream) {
  const int shared = (phases & kSend) ? combine_shared_bytes(args.num_local_experts, peers.num_ranks) : 0;
  if (shared > 40 * 1024)  // with the static shared memory, over the 48 KB a launch gets by default
    DEEP_EP_CUDA_CHECK(cudaFuncSetAttribute(combine<Transport>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  combine<Transport><<<num_blocks, kThreads, shared, stream>>>(peers, layout, net, args, phases);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int combine_shared_bytes(int num_local_experts, int num_ranks) { return num_local_experts * num_ranks * 4; }

// The transports combine is built for.
void launch_combine(const Peers& peers, const HalfLayout& layout, const CombineArgs& args, const LaunchShape& shape,
                    cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, shape.phases, shape.num_blocks, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_combine(const Peers& peers, const HalfLayout& layout, const CombineArgs& args,
                    const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream) {
  launch(peers, layout, gin, args, shape.phases, shape.num_blocks, stream);
}

namespace {

__global__ void reset_signals_kernel(const __grid_constant__ transport::GinTransport gin, int num_signals) {
  for (int signal = blockIdx.x * blockDim.x + threadIdx.x; signal < num_signals; signal += gridDim.x * blockDim.x)
    gin.reset_signal(signal);
}

}  // namespace

void launch_reset_signals(const transport::GinTransport& gin, int num_signals, cudaStream_t stream) {
  if (num_signals <= 0) return;
  reset_signals_kernel<<<(num_signals + 255) / 256, 256, 0, stream>>>(gin, num_signals);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}
#endif

namespace {

__global__ void update_mask_kernel(ControlRegion* mine, int rank, int value, int num_ranks) {
  for (int peer = threadIdx.x; peer < num_ranks; peer += blockDim.x)
    if (rank < 0 || peer == rank) mine->ll_mask[peer] = value;
}

__global__ void query_mask_kernel(const ControlRegion* mine, int* status, int num_ranks) {
  for (int peer = threadIdx.x; peer < num_ranks; peer += blockDim.x) status[peer] = mine->ll_mask[peer] != 0 ? 1 : 0;
}

}  // namespace

void launch_update_mask(char* own_base, int rank, int value, int num_ranks, cudaStream_t stream) {
  update_mask_kernel<<<1, 32, 0, stream>>>(reinterpret_cast<ControlRegion*>(own_base), rank, value, num_ranks);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

void launch_query_mask(const char* own_base, int* mask_status, int num_ranks, cudaStream_t stream) {
  query_mask_kernel<<<1, 32, 0, stream>>>(reinterpret_cast<const ControlRegion*>(own_base), mask_status, num_ranks);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::low_latency
