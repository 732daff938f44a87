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
#include "kernels/low_latency/low_latency_gin.cuh"
#include "kernels/low_latency/logfmt.hpp"
#include "runtime/cuda_check.hpp"

namespace deep_ep::low_latency {

namespace {

constexpr int kWarps = kThreads / 32;
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
  for (int c = 0; c < 8; ++c) {
    const float m = fabsf(f[c]);
    max_abs = fmaxf(max_abs, m);
    if (m > 0.0f) min_abs = fminf(min_abs, m);
  }
#pragma unroll
  for (int m = 4; m >= 1; m >>= 1) {
    max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, m));
    min_abs = fminf(min_abs, __shfl_xor_sync(0xffffffffu, min_abs, m));
  }
  float lmin, step;
  logfmt_group_params(max_abs, min_abs, lmin, step);
  uint32_t codes[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) codes[c] = logfmt_encode_value(f[c], lmin, step);
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
  for (int c = 0; c < 8; ++c) f[c] = logfmt_decode_value(codes[c], header.x, header.y);
}

template <typename Transport>
__device__ void signal_home_rank(const Peers& p, const HalfLayout& lay, const Transport& net, const CombineArgs& a,
                                 int tag, int r);

template <typename Transport>
__device__ void run_send(const Peers& p, const HalfLayout& lay, const Transport& net, const CombineArgs& a, int tag,
                         int* row_prefix, int* rank_ends, int warp, int lane) {
  const int R = p.num_ranks, L = a.num_local_experts, H = a.hidden;
  const int64_t S = static_cast<int64_t>(R) * a.num_max_tokens;
  ControlRegion* mine = control_of(p, p.rank);
  // Rows of expert l: ranks' blocks are contiguous and in rank order, so the last one ends them.
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < L; base += 32) {
      const int l = base + lane;
      int n = 0;
      if (l < L) {
        const int64_t last = a.layout_range[l * R + R - 1];
        n = static_cast<int>(last >> 32) + static_cast<int>(last & 0xffffffff);
      }
      int inclusive = n;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += v;
      }
      if (l < L) row_prefix[l + 1] = carry + inclusive;
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) row_prefix[0] = 0;
  }
  // rank_ends[l * R + r]: end of source rank r's rows inside expert l (shared, so that finding a row's
  // home rank costs no dependent global loads).
  for (int j = threadIdx.x; j < L * R; j += blockDim.x) {
    const int64_t range = a.layout_range[j];
    rank_ends[j] = static_cast<int>(range >> 32) + static_cast<int>(range & 0xffffffff);
  }
  __syncthreads();

  const int total_rows = row_prefix[L];
  const int num_warps = gridDim.x * kWarps, global_warp = blockIdx.x * kWarps + warp;
  const int num_octets = H / 8;
  int rows_to_lane_rank = 0;  // lane r counts the rows this warp wrote to home rank r
  for (int q = global_warp; q < total_rows; q += num_warps) {
    int lo = 0, hi = L;  // the expert whose rows contain q
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (row_prefix[mid] <= q) lo = mid; else hi = mid;
    }
    const int l = lo, i = q - row_prefix[l];
    int r = 0;
    while (r < R - 1 && i >= rank_ends[l * R + r]) ++r;
    if (is_masked(p, r)) continue;
    const int token = a.src_info[l * S + i];
    const int k = a.src_info[L * S + l * S + i];
    const int64_t dst_offset =
        lay.combine_offset + (static_cast<int64_t>(token) * lay.combine_slots_per_token + k) * lay.combine_row_bytes;
    const bool remote = via_transport(p, r);
    // A transport home rank gets the row from this rank's dispatch slot (l, i) of the same half, where a
    // zero-copy combine's rows already are (no peer dispatches into this half before this send is done).
    const int64_t staged_offset = lay.dispatch_offset + (l * S + i) * lay.dispatch_slot_bytes;
    char* dst = remote ? half_of(p, p.rank) + staged_offset : half_of(p, r) + dst_offset;
    const int4* src = reinterpret_cast<const int4*>(a.x + l * a.x_expert_stride + i * a.x_row_stride);
    if (!a.use_logfmt) {
      if (reinterpret_cast<const char*>(src) != dst)
        device::warp_copy<8>(reinterpret_cast<int4*>(dst), src, num_octets, lane, device::ld_input);
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
      const int64_t row_bytes = a.use_logfmt ? static_cast<int64_t>(H / kLogfmtGroup) * kLogfmtGroupBytes
                                             : static_cast<int64_t>(H) * 2;
      net.put_with_signal(r, dst_offset, staged_offset, row_bytes, lay.combine_arrivals_signal(p.rank), 1);
    }
    if (lane == r) ++rows_to_lane_rank;
  }
  // Rows before counts: every lane fences its own stores at system scope, then the adds are made.
  __threadfence_system();
  __syncwarp();
  if (lane < R && rows_to_lane_rank > 0) atomicAdd(&mine->ll_combine_rows_done[p.half][lane], rows_to_lane_rank);

  if (global_warp < R && !is_masked(p, global_warp)) signal_home_rank(p, lay, net, a, tag, global_warp);
  // A later op may overwrite the staged rows: no put of this warp may still be reading them.
  if (p.transport_peers != 0) net.flush();
}

// Global warp r: once every warp's rows to home rank r are counted, set r's count signal.
template <typename Transport>
__device__ void signal_home_rank(const Peers& p, const HalfLayout& lay, const Transport& net, const CombineArgs& a,
                                 int tag, int r) {
  const int R = p.num_ranks, L = a.num_local_experts;
  int expected = 0;
  for (int l = 0; l < L; ++l) expected += static_cast<int>(a.layout_range[l * R + r] & 0xffffffff);
  int* done = &control_of(p, p.rank)->ll_combine_rows_done[p.half][r];
  if (device::lane_id() == 0) {
    // Local warps only; the bound is a safety net against a bug, not a peer.
    const uint64_t start = device::global_timer_ns();
    for (int polls = 1; device::ld_acquire_gpu(done) < expected; ++polls) {
      if (polls % device::kPollsPerSlowCheck == 0 &&
          device::global_timer_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
        device::report(p.diagnostics, Phase::kLowLatencyCombineSend, true, p.rank, r, -1, -1, expected,
                       device::ld_acquire_gpu(done));
        break;
      }
    }
    *done = 0;  // the next combine on this half is a later kernel
    __threadfence_system();
  }
  __syncwarp();
  if (device::error_reported(p.diagnostics)) return;
  auto* mirror = reinterpret_cast<uint64_t*>(half_of(p, p.rank) + lay.combine_mirror_offset) + r;
  set_count(p, lay, net, r, lay.combine_count_signal(p.rank), mirror, tag, expected);
}

template <typename Transport>
__device__ void run_receive(const Peers& p, const HalfLayout& lay, const Transport& net, const CombineArgs& a, int tag,
                            int warp, int lane, int* masked, int* abort_flag) {
  const int R = p.num_ranks, H = a.hidden, K = a.num_topk, L = a.num_local_experts;
  char* half = half_of(p, p.rank);
  for (int r = warp; r < R; r += kWarps) {
    if (lane != 0) continue;
    long long cycles = 0;
    int n = wait_count(p, lay, net, lay.combine_count_signal(r), r, tag, Phase::kLowLatencyCombineRecv, -1, cycles);
    if (n > 0 && via_transport(p, r)) {
      // Every block waits for every source: each keeps its own consumed counter per source.
      auto* consumed = reinterpret_cast<uint64_t*>(half + lay.combine_consumed_offset) +
                       static_cast<int64_t>(blockIdx.x) * R + r;
      const int arrived = wait_arrivals(p, net, lay.combine_arrivals_signal(r), consumed, static_cast<uint64_t>(n), r,
                                        Phase::kLowLatencyCombineRecv, -1);
      if (arrived < 0) n = arrived;
    }
    if (n == -2) *abort_flag = 1;
    if (blockIdx.x == 0 && a.wait_recv_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&a.wait_recv_cost_stats[r]),
                static_cast<unsigned long long>(cycles));
  }
  __syncwarp();  // lane 0 waited alone; reconverge before the block barrier
  __syncthreads();
  if (*abort_flag) return;
  if (threadIdx.x < R) masked[threadIdx.x] = is_masked(p, threadIdx.x) ? 1 : 0;
  __syncthreads();

  // Work units: (token, range of 64-channel groups), enough of them to give every warp one.
  const int num_groups = H / kLogfmtGroup;
  const int num_warps = gridDim.x * kWarps, global_warp = blockIdx.x * kWarps + warp;
  const int T = max(a.num_tokens, 1);
  const int chunks = max(1, min(num_groups, (num_warps + T - 1) / T));
  const int groups_per_chunk = (num_groups + chunks - 1) / chunks;
  for (int u = global_warp; u < a.num_tokens * chunks; u += num_warps) {
    const int t = u / chunks, chunk = u % chunks;
    const int octet_begin = chunk * groups_per_chunk * kOctetsPerGroup;
    const int octet_end = min(num_groups, (chunk + 1) * groups_per_chunk) * kOctetsPerGroup;
    const char* rows = half + lay.combine_offset + static_cast<int64_t>(t) * lay.combine_slots_per_token * lay.combine_row_bytes;
    // Two octets per lane per pass: 2 * K row loads in flight.
    for (int first = octet_begin + lane; first < octet_end; first += 64) {
      const bool has_second = first + 32 < octet_end;
      float acc[2][8] = {};
      for (int k = 0; k < K; ++k) {
        const int64_t e = a.topk_idx[static_cast<int64_t>(t) * K + k];
        if (e < 0 || e >= a.num_experts || masked[e / L]) continue;
        const float w = a.topk_weights[static_cast<int64_t>(t) * K + k];
        const char* row = rows + static_cast<int64_t>(k) * lay.combine_row_bytes;
        float y[2][8];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int octet = first + 32 * h;
          if (h == 1 && !has_second) break;
          if (a.use_logfmt) {
            decode_octet(row + static_cast<int64_t>(octet / kOctetsPerGroup) * kLogfmtGroupBytes,
                         octet % kOctetsPerGroup, y[h]);
          } else {
            const int4 v = device::ld_queue(reinterpret_cast<const int4*>(row) + octet);
            const uint32_t wd[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                                    static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              y[h][2 * q] = bf16_to_float(wd[q] & 0xffffu);
              y[h][2 * q + 1] = bf16_to_float(wd[q] >> 16);
            }
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int c = 0; c < 8; ++c) acc[h][c] = fmaf(w, y[h][c], acc[h][c]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !has_second) break;
        int4 o;
        o.x = static_cast<int>(float_to_bf16_bits(acc[h][0]) | (float_to_bf16_bits(acc[h][1]) << 16));
        o.y = static_cast<int>(float_to_bf16_bits(acc[h][2]) | (float_to_bf16_bits(acc[h][3]) << 16));
        o.z = static_cast<int>(float_to_bf16_bits(acc[h][4]) | (float_to_bf16_bits(acc[h][5]) << 16));
        o.w = static_cast<int>(float_to_bf16_bits(acc[h][6]) | (float_to_bf16_bits(acc[h][7]) << 16));
        reinterpret_cast<int4*>(a.combined_x + static_cast<int64_t>(t) * H)[first + 32 * h] = o;
      }
    }
  }
}

// `net` reaches the peers for which via_transport is true: the kernel's __grid_constant__ parameter,
// read in place, never copied (GIN keeps references into it for the whole kernel).
template <typename Transport>
__global__ void __launch_bounds__(kThreads, 1) combine(Peers p, HalfLayout lay,
                                                              const __grid_constant__ Transport net, CombineArgs a,
                                                              int phases) {
  __shared__ int tag_shared, abort_flag;
  __shared__ int row_prefix[kMaxLocalExperts + 1];
  __shared__ int masked[kMaxLowLatencyRanks];
  extern __shared__ int rank_ends[];  // [L * R], send only
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  if (threadIdx.x == 0) {
    abort_flag = 0;
    tag_shared = (phases & kSend) ? begin_send(p, 1) : receive_tag(p, 1);
  }
  __syncthreads();
  const int tag = tag_shared;
  if (phases & kSend) run_send(p, lay, net, a, tag, row_prefix, rank_ends, warp, lane);
  if (phases & kReceive) run_receive(p, lay, net, a, tag, warp, lane, masked, &abort_flag);
}

template <typename Transport>
void launch(const Peers& peers, const HalfLayout& layout, const Transport& net, const CombineArgs& args, int phases,
            int num_blocks, cudaStream_t stream) {
  const int shared = (phases & kSend) ? combine_shared_bytes(args.num_local_experts, peers.num_ranks) : 0;
  if (shared > 40 * 1024)  // with the static shared memory, over the 48 KB a launch gets by default
    DEEP_EP_CUDA_CHECK(
        cudaFuncSetAttribute(combine<Transport>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  combine<Transport><<<num_blocks, kThreads, shared, stream>>>(peers, layout, net, args, phases);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int combine_shared_bytes(int num_local_experts, int num_ranks) { return num_local_experts * num_ranks * 4; }

// The transports combine is built for.
void launch_combine(const Peers& peers, const HalfLayout& layout, const CombineArgs& args, int phases, int num_blocks,
                    cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, phases, num_blocks, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_combine(const Peers& peers, const HalfLayout& layout, const CombineArgs& args,
                    const transport::GinTransport& gin, int phases, int num_blocks, cudaStream_t stream) {
  launch(peers, layout, gin, args, phases, num_blocks, stream);
}

namespace {

__global__ void reset_signals_kernel(const __grid_constant__ transport::GinTransport gin, int num_signals) {
  for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < num_signals; s += gridDim.x * blockDim.x)
    gin.reset_signal(s);
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
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x)
    if (rank < 0 || r == rank) mine->ll_mask[r] = value;
}

__global__ void query_mask_kernel(const ControlRegion* mine, int* status, int num_ranks) {
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) status[r] = mine->ll_mask[r] != 0 ? 1 : 0;
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
