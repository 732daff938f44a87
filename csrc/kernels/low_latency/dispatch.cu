// Low-latency dispatch.
// Send: block b takes a contiguous range of tokens, and its warps split each token into parts of whole
// 128-channel groups, so every warp has work even at small batch sizes. A warp reads its part once,
// FP8-quantizes it (optionally) and stores it into the slot of every top-k expert of the token. The
// slot position is the entry's rank among this rank's entries for the same expert in (token, k) order,
// computed from the block's shared copy of topk_idx: placement is deterministic, no atomics needed.
// Completion: each warp fences its stores, then adds one per (expert, part) to this rank's send
// counters; the warp owning expert e (global warp e mod num_warps) waits for all parts of all its
// rows and releases e's signal with the row count.
// Receive: block b owns local experts b, b + num_blocks, ...: it waits for every (expert, source)
// signal of them at once, turns counts into the packed layout (source rank order), and its warps copy
// all those rows into recv_x, the column-major scales and src_info.
#include <cuda_fp8.h>

#include "kernels/common/occupancy.cuh"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/low_latency_gin.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::low_latency {

namespace {

constexpr int kWarps = kThreads / 32;
constexpr float kE4m3Max = 448.0f;
constexpr float kMinAmax = 1e-4f;

__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&f)[8]) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = bf16_to_float(w[q] & 0xffffu);
    f[2 * q + 1] = bf16_to_float(w[q] >> 16);
  }
}

// The CPU reference's rule (reference/number_formats.cpp): amax >= 1e-4, scale_inv = amax / 448 as a
// float32 division, optionally rounded up to a power of two, values multiplied by 1 / scale_inv.
__device__ __forceinline__ float fp8_scale_inv(float amax, bool round_scale) {
  float scale_inv = __fdiv_rn(fmaxf(amax, kMinAmax), kE4m3Max);
  if (round_scale) {
    uint32_t bits = __float_as_uint(scale_inv);
    if (bits & 0x7fffffu) bits = (bits & 0x7f800000u) + 0x800000u;
    scale_inv = __uint_as_float(bits);
  }
  return scale_inv;
}

// Token ranges per block and parts per token (host and device agree through these).
__host__ __device__ inline int tokens_per_block(int num_tokens, int num_blocks) {
  return (num_tokens + num_blocks - 1) / num_blocks;
}
__host__ __device__ inline int parts_per_token(int num_tokens, int num_blocks, int hidden) {
  const int tokens = max(tokens_per_block(num_tokens, num_blocks), 1);
  return max(1, min(hidden / 128, kWarps / tokens));
}

// Stores one chunk of a token part (kChunk octets per lane, already loaded) into one slot: bf16 as is,
// or FP8 with one scale per 128 channels (16 lanes hold a group; the amax is a half-warp butterfly).
constexpr int kChunk = 4;

struct QuantizedChunk {
  uint2 fp8[kChunk];
  float scale[kChunk];
};

__device__ __forceinline__ void quantize_chunk(const int4 (&v)[kChunk], bool round_scale, QuantizedChunk& q) {
#pragma unroll
  for (int u = 0; u < kChunk; ++u) {
    float f[8];
    unpack_bf16x8(v[u], f);
    float amax = 0.0f;
#pragma unroll
    for (int c = 0; c < 8; ++c) amax = fmaxf(amax, fabsf(f[c]));
#pragma unroll
    for (int m = 8; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    const float scale_inv = fp8_scale_inv(amax, round_scale);
    const float inv = __fdiv_rn(1.0f, scale_inv);
    uint32_t packed[2] = {0, 0};
#pragma unroll
    for (int c = 0; c < 8; c += 2) {
      const __nv_fp8x2_storage_t pair = __nv_cvt_float2_to_fp8x2(
          make_float2(__fmul_rn(f[c], inv), __fmul_rn(f[c + 1], inv)), __NV_SATFINITE, __NV_E4M3);
      packed[c / 4] |= static_cast<uint32_t>(pair) << (16 * ((c / 2) % 2));
    }
    q.fp8[u] = make_uint2(packed[0], packed[1]);
    q.scale[u] = scale_inv;
  }
}

// Each block's view of topk_idx: entry i of the whole batch at experts[i]. positions[j] is the slot
// position of the block's own entry first_entry + j, or -1 when that entry sends nothing (no expert,
// a masked rank, or past the M slots a source owns per expert; the owner reports the last case).
__device__ void compute_positions(const Peers& p, const DispatchArgs& a, const int* experts, int first_entry,
                                  int num_own, int* positions) {
  for (int j = threadIdx.x; j < num_own; j += blockDim.x) {
    const int i = first_entry + j, e = experts[i];
    int pos = -1;
    if (e >= 0 && !is_masked(p, e / a.num_local_experts)) {
      // Threads walk the prefix in step, so each shared load is a broadcast.
      pos = 0;
      for (int q = 0; q < i; ++q) pos += experts[q] == e;
      if (pos >= a.num_max_tokens) pos = -1;
    }
    positions[j] = pos;
  }
}

// The groups of `part` of a token split in `parts`. With transport peers, boundaries fall on multiples of
// four groups, so that every part's float32 scales start 16-byte aligned, as a put needs.
__device__ __forceinline__ void part_groups(int num_groups, int parts, int part, bool quad_aligned, int& begin,
                                            int& end) {
  if (!quad_aligned) {
    begin = part * num_groups / parts;
    end = (part + 1) * num_groups / parts;
    return;
  }
  const int num_quads = (num_groups + 3) / 4;
  begin = min(num_groups, part * num_quads / parts * 4);
  end = min(num_groups, (part + 1) * num_quads / parts * 4);
}

// Whole warp: puts the staged part [group_begin, group_end) of a token (and, with part 0, the metadata
// staged for this destination) into slot `dst_slot_offset` of `dest`; the last put adds this part's
// arrival units to `arrivals`.
template <typename Transport>
__device__ void put_part(const Transport& net, const HalfLayout& lay, bool use_fp8, int dest, int64_t dst_slot_offset,
                         int64_t src_slot_offset, int64_t src_meta_offset, int num_groups, int group_begin,
                         int group_end, int part, int parts, int arrivals) {
  const uint64_t units = kRowArrivalUnits / static_cast<uint64_t>(parts);
  // Each piece is a put; the last one carries the signal.
  auto piece = [&](bool last, int64_t offset_in_slot, int64_t src_offset, int64_t num_bytes) {
    if (last) {
      net.put_with_signal(dest, dst_slot_offset + offset_in_slot, src_offset, num_bytes, arrivals, units);
    } else {
      net.put(dest, dst_slot_offset + offset_in_slot, src_offset, num_bytes);
    }
  };
  const bool has_rows = group_end > group_begin, has_meta = part == 0;
  if (has_rows) {
    const int64_t bytes_per_group = use_fp8 ? 128 : 256;
    piece(!use_fp8 && !has_meta, group_begin * bytes_per_group, src_slot_offset + group_begin * bytes_per_group,
          (group_end - group_begin) * bytes_per_group);
    if (use_fp8) {
      // The last part's scales end where the slot's padding before the metadata does, so rounding the
      // size up to 16 bytes stays inside the slot.
      const int64_t scale_bytes = (group_end - group_begin) * 4;
      const int64_t offset = lay.dispatch_scales_offset + group_begin * 4;
      piece(!has_meta, offset, src_slot_offset + offset, group_end == num_groups ? (scale_bytes + 15) / 16 * 16 : scale_bytes);
    }
  }
  if (has_meta) piece(true, lay.dispatch_meta_offset, src_meta_offset, 16);
  if (!has_rows && !has_meta) net.signal_add(dest, arrivals, units);
}

template <typename Transport>
__device__ void run_send(const Peers& p, const HalfLayout& lay, const Transport& net, const DispatchArgs& a,
                         const int* experts, const int* positions, int first_token, int num_own_tokens, int parts,
                         int tag, int warp, int lane) {
  const int R = p.num_ranks, me = p.rank, L = a.num_local_experts, M = a.num_max_tokens, K = a.num_topk;
  const int num_groups = a.hidden / 128;
  int* done = reinterpret_cast<int*>(half_of(p, me) + lay.send_done_offset);

  for (int unit = warp; unit < num_own_tokens * parts; unit += kWarps) {
    const int local_token = unit / parts, part = unit % parts, token = first_token + local_token;
    int group_begin, group_end;
    part_groups(num_groups, parts, part, p.transport_peers != 0, group_begin, group_end);
    const int octet_begin = group_begin * 16, octet_end = group_end * 16;
    // Transport destinations read the part from this rank's send slot of the token (staged once).
    bool staged = false;
    for (int k = 0; k < K; ++k) {
      const int pos = positions[local_token * K + k];
      staged |= pos >= 0 && via_transport(p, experts[token * K + k] / L);
    }
    const int64_t send_slot_offset = lay.dispatch_send_offset + static_cast<int64_t>(token) * lay.dispatch_slot_bytes;
    const int4* src = reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(token) * a.hidden);
    for (int base = octet_begin; base < octet_end; base += 32 * kChunk) {
      int4 v[kChunk];
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int octet = base + 32 * u + lane;
        v[u] = octet < octet_end ? device::ld_input(src + octet) : make_int4(0, 0, 0, 0);
      }
      QuantizedChunk q;
      if (a.use_fp8) quantize_chunk(v, a.round_scale, q);
      // k == K is the send slot, when staged.
      for (int k = 0; k <= K; ++k) {
        char* slot;
        if (k < K) {
          const int e = experts[token * K + k], pos = positions[local_token * K + k];
          if (pos < 0 || via_transport(p, e / L)) continue;
          slot = half_of(p, e / L) + lay.dispatch_offset +
                 ((static_cast<int64_t>(e % L) * R + me) * M + pos) * lay.dispatch_slot_bytes;
        } else {
          if (!staged) continue;
          slot = half_of(p, me) + send_slot_offset;
        }
#pragma unroll
        for (int u = 0; u < kChunk; ++u) {
          const int octet = base + 32 * u + lane;
          if (octet >= octet_end) continue;
          if (a.use_fp8) {
            reinterpret_cast<uint2*>(slot)[octet] = q.fp8[u];
            if ((lane & 15) == 0) reinterpret_cast<float*>(slot + lay.dispatch_scales_offset)[octet / 16] = q.scale[u];
          } else {
            reinterpret_cast<int4*>(slot)[octet] = v[u];
          }
        }
      }
    }
    // Part 0 carries the metadata {token, top-k slot}: into load/store slots directly, into one staged
    // entry per transport destination (each names its own top-k slot).
    const int64_t send_meta_offset = lay.dispatch_send_meta_offset + static_cast<int64_t>(token) * kNumMaxTopk * 16;
    if (part == 0 && lane == 0) {
      for (int k = 0; k < K; ++k) {
        const int e = experts[token * K + k], pos = positions[local_token * K + k];
        if (pos < 0) continue;
        char* meta = via_transport(p, e / L)
                         ? half_of(p, me) + send_meta_offset + k * 16
                         : half_of(p, e / L) + lay.dispatch_offset +
                               ((static_cast<int64_t>(e % L) * R + me) * M + pos) * lay.dispatch_slot_bytes +
                               lay.dispatch_meta_offset;
        *reinterpret_cast<int4*>(meta) = make_int4(token, k, 0, 0);
      }
    }
    if (staged) {
      // The puts read the send slot through other lanes than those that wrote it.
      __syncwarp();
      for (int k = 0; k < K; ++k) {
        const int e = experts[token * K + k], pos = positions[local_token * K + k];
        if (pos < 0 || !via_transport(p, e / L)) continue;
        const int64_t dst = lay.dispatch_offset + ((static_cast<int64_t>(e % L) * R + me) * M + pos) * lay.dispatch_slot_bytes;
        put_part(net, lay, a.use_fp8, e / L, dst, send_slot_offset, send_meta_offset + k * 16, num_groups, group_begin,
                 group_end, part, parts, lay.dispatch_arrivals_signal(e % L, me));
      }
    }
    // This part is stored in every load/store slot: fence (every lane, its own stores), then count it.
    __threadfence_system();
    __syncwarp();
    for (int k = lane; k < K; k += 32) {
      if (positions[local_token * K + k] >= 0) atomicAdd(&done[experts[token * K + k]], 1);
    }
  }

  // Owners: once every part of every row of expert e is counted, set e's count signal.
  const int num_entries = a.num_tokens * K;
  const int num_warps = gridDim.x * kWarps;
  auto* mirrors = reinterpret_cast<uint64_t*>(half_of(p, me) + lay.dispatch_mirror_offset);
  for (int e = blockIdx.x * kWarps + warp; e < a.num_experts; e += num_warps) {
    const int dest = e / L;
    if (is_masked(p, dest)) continue;
    int count = 0;
    for (int base = 0; base < num_entries; base += 32) {
      const int i = base + lane;
      count += __popc(__ballot_sync(0xffffffffu, i < num_entries && experts[i] == e));
    }
    if (count > M && lane == 0)
      device::report(p.diagnostics, Phase::kLowLatencyTooManyRows, false, me, dest, e, -1, M, count);
    count = min(count, M);
    if (lane == 0) {
      const uint64_t start = device::global_timer_ns();
      for (int polls = 1; device::ld_acquire_gpu(&done[e]) < count * parts; ++polls) {
        if (polls % device::kPollsPerSlowCheck == 0 &&
            device::global_timer_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
          device::report(p.diagnostics, Phase::kLowLatencyDispatchSend, true, me, dest, e, -1, count * parts,
                         device::ld_acquire_gpu(&done[e]));
          break;
        }
      }
      done[e] = 0;  // the next dispatch on this half is a later kernel
    }
    __syncwarp();
    set_count(p, lay, net, dest, lay.dispatch_count_signal(e % L, me), mirrors + e, tag, count);
  }
  // A later op may overwrite the send slots: no put of this warp may still be reading them.
  if (p.transport_peers != 0) net.flush();
}

template <typename Transport>
__device__ void run_receive(const Peers& p, const HalfLayout& lay, const Transport& net, const DispatchArgs& a, int tag,
                            int warp, int lane, int* counts, int* abort_flag) {
  const int R = p.num_ranks, L = a.num_local_experts, M = a.num_max_tokens, H = a.hidden;
  const int64_t S = static_cast<int64_t>(R) * M;
  const int num_scales = H / 128;
  char* half = half_of(p, p.rank);
  // This block's experts: local = blockIdx.x + i * gridDim.x. counts[i * (R + 1) + r] holds the rows
  // of (expert i, source r); after the prefix pass it holds their begin, with the total at r = R.
  const int num_mine = (L - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  for (int pair = warp; pair < num_mine * R; pair += kWarps) {
    if (lane != 0) continue;
    const int i = pair / R, r = pair % R, local = blockIdx.x + i * gridDim.x;
    long long cycles = 0;
    int n = wait_count(p, lay, net, lay.dispatch_count_signal(local, r), r, tag, Phase::kLowLatencyDispatchRecv, local,
                       cycles);
    if (n > 0 && via_transport(p, r)) {
      // The count is set after the source's puts were issued, not after they landed: wait for their
      // arrival units too (this warp is the pair's only reader of its consumed counter).
      auto* consumed = reinterpret_cast<uint64_t*>(half + lay.dispatch_consumed_offset) + local * R + r;
      const int arrived = wait_arrivals(p, net, lay.dispatch_arrivals_signal(local, r), consumed,
                                        static_cast<uint64_t>(n) * kRowArrivalUnits, r, Phase::kLowLatencyDispatchRecv,
                                        local);
      if (arrived < 0) n = arrived;
    }
    if (n == -2) *abort_flag = 1;
    counts[i * (R + 1) + r] = max(n, 0);
    if (a.wait_recv_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&a.wait_recv_cost_stats[r]), static_cast<unsigned long long>(cycles));
  }
  __syncwarp();  // lane 0 waited alone; reconverge before the block barrier
  __syncthreads();
  if (*abort_flag) return;
  for (int i = threadIdx.x; i < num_mine; i += blockDim.x) {
    const int local = blockIdx.x + i * gridDim.x;
    int* row = counts + i * (R + 1);
    int running = 0;
    for (int r = 0; r < R; ++r) {
      const int n = row[r];
      row[r] = running;
      a.layout_range[local * R + r] = (static_cast<int64_t>(running) << 32) | static_cast<uint32_t>(n);
      running += n;
    }
    row[R] = running;
    a.recv_count[local] = running;
    if (a.cumulative_recv_stats) a.cumulative_recv_stats[local] += running;
  }
  __syncthreads();

  // Rows of all this block's experts, one list; the lane-0 acquires and the barrier order these reads
  // after the senders' stores, and slots are read at L2 because earlier calls rewrote them.
  int total = 0;
  for (int i = 0; i < num_mine; ++i) total += counts[i * (R + 1) + R];
  for (int q = warp; q < total; q += kWarps) {
    int i = 0, row = q;
    while (row >= counts[i * (R + 1) + R]) row -= counts[(i++) * (R + 1) + R];
    const int local = blockIdx.x + i * gridDim.x;
    const int* begins = counts + i * (R + 1);
    int r = 0;
    while (r + 1 < R && row >= begins[r + 1]) ++r;
    const int pos = row - begins[r];
    const char* slot = half + lay.dispatch_offset + ((static_cast<int64_t>(local) * R + r) * M + pos) * lay.dispatch_slot_bytes;
    const int64_t out_row = local * S + row;
    if (a.use_fp8) {
      device::warp_copy<8>(reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + out_row * H),
                           reinterpret_cast<const int4*>(slot), H / 16, lane, device::ld_queue);
      const float* scales = reinterpret_cast<const float*>(slot + lay.dispatch_scales_offset);
      if (a.use_ue8m0) {
        int* out = static_cast<int*>(a.recv_scales);
        for (int w = lane; w < num_scales / 4; w += 32) {
          uint32_t word = 0;
#pragma unroll
          for (int b = 0; b < 4; ++b) word |= ((__float_as_uint(__ldcg(scales + 4 * w + b)) >> 23) & 0xffu) << (8 * b);
          out[(static_cast<int64_t>(local) * (num_scales / 4) + w) * S + row] = static_cast<int>(word);
        }
      } else {
        float* out = static_cast<float*>(a.recv_scales);
        for (int g = lane; g < num_scales; g += 32)
          out[(static_cast<int64_t>(local) * num_scales + g) * S + row] = __ldcg(scales + g);
      }
    } else {
      device::warp_copy<8>(reinterpret_cast<int4*>(static_cast<uint16_t*>(a.recv_x) + out_row * H),
                           reinterpret_cast<const int4*>(slot), H / 8, lane, device::ld_queue);
    }
    if (lane == 0) {
      const int4 meta = __ldcg(reinterpret_cast<const int4*>(slot + lay.dispatch_meta_offset));
      a.src_info[out_row] = meta.x;
      a.src_info[L * S + out_row] = meta.y;
    }
  }
}

// `net` reaches the peers for which via_transport is true: the kernel's __grid_constant__ parameter,
// read in place, never copied (GIN keeps references into it for the whole kernel).
template <typename Transport>
__global__ void __launch_bounds__(kThreads, 1) dispatch(Peers p, HalfLayout lay,
                                                               const __grid_constant__ Transport net, DispatchArgs a,
                                                               int phases) {
  // Send: [T * K] expert ids (-1 for none or out of range), then the block's own positions.
  // Receive: [experts of this block][R + 1] counts. The two phases reuse the same memory.
  extern __shared__ int shared[];
  __shared__ int tag_shared, abort_flag;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  if (threadIdx.x == 0) {
    abort_flag = 0;
    tag_shared = (phases & kSend) ? begin_send(p, 0) : receive_tag(p, 0);
  }
  if (phases & kSend) {
    const int K = a.num_topk, num_entries = a.num_tokens * K;
    int* experts = shared;
    int* positions = shared + num_entries;
    for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
      int64_t e = a.topk_idx[i];
      if (e < -1 || e >= a.num_experts) {
        if (blockIdx.x == 0)
          device::report(p.diagnostics, Phase::kLowLatencyExpertRange, false, p.rank, -1, -1, i / K, a.num_experts, e);
        e = -1;
      }
      experts[i] = static_cast<int>(e);
    }
    __syncthreads();
    const int per_block = tokens_per_block(a.num_tokens, gridDim.x);
    const int first_token = min(a.num_tokens, static_cast<int>(blockIdx.x) * per_block);
    const int num_own = min(a.num_tokens, first_token + per_block) - first_token;
    compute_positions(p, a, experts, first_token * K, num_own * K, positions);
    __syncthreads();
    run_send(p, lay, net, a, experts, positions, first_token, num_own,
             parts_per_token(a.num_tokens, gridDim.x, a.hidden), tag_shared, warp, lane);
    __syncthreads();  // the receive reuses the shared memory
  } else {
    __syncthreads();
  }
  if (phases & kReceive) run_receive(p, lay, net, a, tag_shared, warp, lane, shared, &abort_flag);
}

template <typename Transport>
void launch(const Peers& peers, const HalfLayout& layout, const Transport& net, const DispatchArgs& args, int phases,
            int num_blocks, cudaStream_t stream) {
  const int shared = dispatch_shared_bytes(args.num_tokens, args.num_topk, args.num_local_experts, peers.num_ranks,
                                          num_blocks);
  if (shared > 47 * 1024)  // with the static shared memory, over the 48 KB a launch gets by default
    DEEP_EP_CUDA_CHECK(
        cudaFuncSetAttribute(dispatch<Transport>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  dispatch<Transport><<<num_blocks, kThreads, shared, stream>>>(peers, layout, net, args, phases);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int dispatch_shared_bytes(int num_tokens, int num_topk, int num_local_experts, int num_ranks, int num_blocks) {
  const int own = tokens_per_block(num_tokens, num_blocks) * num_topk;
  const int send = (num_tokens * num_topk + own) * 4;
  const int receive = (num_local_experts + num_blocks - 1) / num_blocks * (num_ranks + 1) * 4;
  return send > receive ? send : receive;
}

int max_resident_blocks_per_sm() {
  return device::resident_blocks_per_sm<dispatch<transport::P2pTransport>>(kThreads, 48 * 1024);
}

// The transports dispatch is built for.
void launch_dispatch(const Peers& peers, const HalfLayout& layout, const DispatchArgs& args, int phases,
                     int num_blocks, cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, phases, num_blocks, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_dispatch(const Peers& peers, const HalfLayout& layout, const DispatchArgs& args,
                     const transport::GinTransport& gin, int phases, int num_blocks, cudaStream_t stream) {
  launch(peers, layout, gin, args, phases, num_blocks, stream);
}
#endif

}  // namespace deep_ep::low_latency
