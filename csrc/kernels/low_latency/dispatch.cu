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
#include "util/cuda_check.hpp"

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

__device__ __forceinline__ void quantize_chunk(const int4 (&octets)[kChunk], bool round_scale,
                                               QuantizedChunk& quantized) {
#pragma unroll
  for (int u = 0; u < kChunk; ++u) {
    float f[8];
    unpack_bf16x8(octets[u], f);
    float amax = 0.0f;
#pragma unroll
    for (int element = 0; element < 8; ++element) amax = fmaxf(amax, fabsf(f[element]));
#pragma unroll
    for (int lane_mask = 8; lane_mask >= 1; lane_mask >>= 1)
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, lane_mask));
    const float scale_inv = fp8_scale_inv(amax, round_scale);
    const float inv = __fdiv_rn(1.0f, scale_inv);
    uint32_t packed[2] = {0, 0};
#pragma unroll
    for (int element = 0; element < 8; element += 2) {
      const __nv_fp8x2_storage_t pair = __nv_cvt_float2_to_fp8x2(
          make_float2(__fmul_rn(f[element], inv), __fmul_rn(f[element + 1], inv)), __NV_SATFINITE, __NV_E4M3);
      packed[element / 4] |= static_cast<uint32_t>(pair) << (16 * ((element / 2) % 2));
    }
    quantized.fp8[u] = make_uint2(packed[0], packed[1]);
    quantized.scale[u] = scale_inv;
  }
}

// Each block's view of topk_idx: entry i of the whole batch at experts[i]. positions[j] is the slot
// position of the block's own entry first_entry + j, or -1 when that entry sends nothing (no expert,
// a masked rank, or past the num_max_tokens slots a source owns per expert; the owner reports the last case).
__device__ void compute_positions(const Peers& peers, const DispatchArgs& args, const int* experts, int first_entry,
                                  int num_own, int* positions) {
  for (int j = threadIdx.x; j < num_own; j += blockDim.x) {
    const int i = first_entry + j, expert = experts[i];
    int position = -1;
    if (expert >= 0 && !is_masked(peers, expert / args.num_local_experts)) {
      // Threads walk the prefix in step, so each shared load is a broadcast.
      position = 0;
      for (int earlier = 0; earlier < i; ++earlier) position += experts[earlier] == expert;
      if (position >= args.num_max_tokens) position = -1;
    }
    positions[j] = position;
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
__device__ void put_part(const Transport& net, const HalfLayout& layout, bool use_fp8, int dest,
                         int64_t dst_slot_offset, int64_t src_slot_offset, int64_t src_meta_offset, int num_groups,
                         int group_begin, int group_end, int part, int parts, int arrivals) {
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
      const int64_t offset = layout.dispatch_scales_offset + group_begin * 4;
      piece(!has_meta, offset, src_slot_offset + offset,
            group_end == num_groups ? (scale_bytes + 15) / 16 * 16 : scale_bytes);
    }
  }
  if (has_meta) piece(true, layout.dispatch_meta_offset, src_meta_offset, 16);
  if (!has_rows && !has_meta) net.signal_add(dest, arrivals, units);
}

template <typename Transport>
__device__ void run_send(const Peers& peers, const HalfLayout& layout, const Transport& net, const DispatchArgs& args,
                         const int* experts, const int* positions, int first_token, int num_own_tokens, int parts,
                         int tag, int warp, int lane) {
  const int num_ranks = peers.num_ranks, rank = peers.rank, num_local_experts = args.num_local_experts;
  const int num_max_tokens = args.num_max_tokens, num_topk = args.num_topk;
  const int num_groups = args.hidden / 128;
  int* done = reinterpret_cast<int*>(half_of(peers, rank) + layout.send_done_offset);

  for (int unit = warp; unit < num_own_tokens * parts; unit += kWarps) {
    const int local_token = unit / parts, part = unit % parts, token = first_token + local_token;
    int group_begin, group_end;
    part_groups(num_groups, parts, part, peers.transport_peers != 0, group_begin, group_end);
    const int octet_begin = group_begin * 16, octet_end = group_end * 16;
    // Transport destinations read the part from this rank's send slot of the token (staged once).
    bool staged = false;
    for (int k = 0; k < num_topk; ++k) {
      const int position = positions[local_token * num_topk + k];
      staged |= position >= 0 && via_transport(peers, experts[token * num_topk + k] / num_local_experts);
    }
    const int64_t send_slot_offset =
        layout.dispatch_send_offset + static_cast<int64_t>(token) * layout.dispatch_slot_bytes;
    const int4* src = reinterpret_cast<const int4*>(args.x + static_cast<int64_t>(token) * args.hidden);
    for (int base = octet_begin; base < octet_end; base += 32 * kChunk) {
      int4 octets[kChunk];
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int octet = base + 32 * u + lane;
        octets[u] = octet < octet_end ? device::ld_input(src + octet) : make_int4(0, 0, 0, 0);
      }
      QuantizedChunk quantized;
      if (args.use_fp8) quantize_chunk(octets, args.round_scale, quantized);
      // k == num_topk is the send slot, when staged.
      for (int k = 0; k <= num_topk; ++k) {
        char* slot;
        if (k < num_topk) {
          const int expert = experts[token * num_topk + k], position = positions[local_token * num_topk + k];
          if (position < 0 || via_transport(peers, expert / num_local_experts)) continue;
          slot = half_of(peers, expert / num_local_experts) + layout.dispatch_offset +
                 ((static_cast<int64_t>(expert % num_local_experts) * num_ranks + rank) * num_max_tokens + position) *
                     layout.dispatch_slot_bytes;
        } else {
          if (!staged) continue;
          slot = half_of(peers, rank) + send_slot_offset;
        }
#pragma unroll
        for (int u = 0; u < kChunk; ++u) {
          const int octet = base + 32 * u + lane;
          if (octet >= octet_end) continue;
          if (args.use_fp8) {
            reinterpret_cast<uint2*>(slot)[octet] = quantized.fp8[u];
            if ((lane & 15) == 0)
              reinterpret_cast<float*>(slot + layout.dispatch_scales_offset)[octet / 16] = quantized.scale[u];
          } else {
            reinterpret_cast<int4*>(slot)[octet] = octets[u];
          }
        }
      }
    }
    // Part 0 carries the metadata {token, top-k slot}: into load/store slots directly, into one staged
    // entry per transport destination (each names its own top-k slot).
    const int64_t send_meta_offset = layout.dispatch_send_meta_offset + static_cast<int64_t>(token) * kNumMaxTopk * 16;
    if (part == 0 && lane == 0) {
      for (int k = 0; k < num_topk; ++k) {
        const int expert = experts[token * num_topk + k], position = positions[local_token * num_topk + k];
        if (position < 0) continue;
        char* meta = via_transport(peers, expert / num_local_experts)
                         ? half_of(peers, rank) + send_meta_offset + k * 16
                         : half_of(peers, expert / num_local_experts) + layout.dispatch_offset +
                               ((static_cast<int64_t>(expert % num_local_experts) * num_ranks + rank) * num_max_tokens +
                                position) *
                                   layout.dispatch_slot_bytes +
                               layout.dispatch_meta_offset;
        *reinterpret_cast<int4*>(meta) = make_int4(token, k, 0, 0);
      }
    }
    if (staged) {
      // The puts read the send slot through other lanes than those that wrote it.
      __syncwarp();
      for (int k = 0; k < num_topk; ++k) {
        const int expert = experts[token * num_topk + k], position = positions[local_token * num_topk + k];
        if (position < 0 || !via_transport(peers, expert / num_local_experts)) continue;
        const int64_t dst =
            layout.dispatch_offset +
            ((static_cast<int64_t>(expert % num_local_experts) * num_ranks + rank) * num_max_tokens + position) *
                layout.dispatch_slot_bytes;
        put_part(net, layout, args.use_fp8, expert / num_local_experts, dst, send_slot_offset,
                 send_meta_offset + k * 16, num_groups, group_begin, group_end, part, parts,
                 layout.dispatch_arrivals_signal(expert % num_local_experts, rank));
      }
    }
    // This part is stored in every load/store slot: fence (every lane, its own stores), then count it.
    __threadfence_system();
    __syncwarp();
    for (int k = lane; k < num_topk; k += 32) {
      if (positions[local_token * num_topk + k] >= 0) atomicAdd(&done[experts[token * num_topk + k]], 1);
    }
  }

  // Owners: once every part of every row of `expert` is counted, set its count signal.
  const int num_entries = args.num_tokens * num_topk;
  const int num_warps = gridDim.x * kWarps;
  auto* mirrors = reinterpret_cast<uint64_t*>(half_of(peers, rank) + layout.dispatch_mirror_offset);
  for (int expert = blockIdx.x * kWarps + warp; expert < args.num_experts; expert += num_warps) {
    const int dest = expert / num_local_experts;
    if (is_masked(peers, dest)) continue;
    int count = 0;
    for (int base = 0; base < num_entries; base += 32) {
      const int entry = base + lane;
      count += __popc(__ballot_sync(0xffffffffu, entry < num_entries && experts[entry] == expert));
    }
    if (count > num_max_tokens && lane == 0)
      device::report(peers.diagnostics, Phase::kLowLatencyTooManyRows, false, rank, dest, expert, -1, num_max_tokens,
                     count);
    count = min(count, num_max_tokens);
    if (lane == 0) {
      const uint64_t start = device::global_timer_ns();
      for (int polls = 1; device::ld_acquire_gpu(&done[expert]) < count * parts; ++polls) {
        if (polls % device::kPollsPerSlowCheck == 0 &&
            device::global_timer_ns() - start > static_cast<uint64_t>(peers.timeout_ns)) {
          device::report(peers.diagnostics, Phase::kLowLatencyDispatchSend, true, rank, dest, expert, -1, count * parts,
                         device::ld_acquire_gpu(&done[expert]));
          break;
        }
      }
      done[expert] = 0;  // the next dispatch on this half is a later kernel
    }
    __syncwarp();
    set_count(peers, layout, net, dest, layout.dispatch_count_signal(expert % num_local_experts, rank),
              mirrors + expert, tag, count);
  }
  // A later op may overwrite the send slots: no put of this warp may still be reading them.
  if (peers.transport_peers != 0) net.flush();
}

template <typename Transport>
__device__ void run_receive(const Peers& peers, const HalfLayout& layout, const Transport& net,
                            const DispatchArgs& args, int tag, int warp, int lane, int* counts, int* abort_flag) {
  const int num_ranks = peers.num_ranks, num_local_experts = args.num_local_experts;
  const int num_max_tokens = args.num_max_tokens, hidden = args.hidden;
  const int64_t num_slots_per_expert = static_cast<int64_t>(num_ranks) * num_max_tokens;
  const int num_scales = hidden / 128;
  char* half = half_of(peers, peers.rank);
  // This block's experts: local_expert = blockIdx.x + i * gridDim.x. counts[i * (num_ranks + 1) + source]
  // holds the rows of (expert i, source); after the prefix pass it holds their begin, with the total at
  // source = num_ranks.
  const int num_mine = (num_local_experts - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) /
                       static_cast<int>(gridDim.x);
  for (int pair = warp; pair < num_mine * num_ranks; pair += kWarps) {
    if (lane != 0) continue;
    const int i = pair / num_ranks, source = pair % num_ranks, local_expert = blockIdx.x + i * gridDim.x;
    long long cycles = 0;
    int count = wait_count(peers, layout, net, layout.dispatch_count_signal(local_expert, source), source, tag,
                           Phase::kLowLatencyDispatchRecv, local_expert, cycles);
    if (count > 0 && via_transport(peers, source)) {
      // The count is set after the source's puts were issued, not after they landed: wait for their
      // arrival units too (this warp is the pair's only reader of its consumed counter).
      auto* consumed =
          reinterpret_cast<uint64_t*>(half + layout.dispatch_consumed_offset) + local_expert * num_ranks + source;
      const int arrived = wait_arrivals(peers, net, layout.dispatch_arrivals_signal(local_expert, source), consumed,
                                        static_cast<uint64_t>(count) * kRowArrivalUnits, source,
                                        Phase::kLowLatencyDispatchRecv, local_expert);
      if (arrived < 0) count = arrived;
    }
    if (count == -2) *abort_flag = 1;
    counts[i * (num_ranks + 1) + source] = max(count, 0);
    if (args.wait_recv_cost_stats && cycles > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&args.wait_recv_cost_stats[source]),
                static_cast<unsigned long long>(cycles));
  }
  __syncwarp();  // lane 0 waited alone; reconverge before the block barrier
  __syncthreads();
  if (*abort_flag) return;
  for (int i = threadIdx.x; i < num_mine; i += blockDim.x) {
    const int local_expert = blockIdx.x + i * gridDim.x;
    int* row = counts + i * (num_ranks + 1);
    int running = 0;
    for (int source = 0; source < num_ranks; ++source) {
      const int count = row[source];
      row[source] = running;
      args.layout_range[local_expert * num_ranks + source] =
          (static_cast<int64_t>(running) << 32) | static_cast<uint32_t>(count);
      running += count;
    }
    row[num_ranks] = running;
    args.recv_count[local_expert] = running;
    if (args.cumulative_recv_stats) args.cumulative_recv_stats[local_expert] += running;
  }
  __syncthreads();

  // Rows of all this block's experts, one list; the lane-0 acquires and the barrier order these reads
  // after the senders' stores, and slots are read at L2 because earlier calls rewrote them.
  int total = 0;
  for (int i = 0; i < num_mine; ++i) total += counts[i * (num_ranks + 1) + num_ranks];
  for (int list_row = warp; list_row < total; list_row += kWarps) {
    int i = 0, row = list_row;
    while (row >= counts[i * (num_ranks + 1) + num_ranks]) row -= counts[(i++) * (num_ranks + 1) + num_ranks];
    const int local_expert = blockIdx.x + i * gridDim.x;
    const int* begins = counts + i * (num_ranks + 1);
    int source = 0;
    while (source + 1 < num_ranks && row >= begins[source + 1]) ++source;
    const int position = row - begins[source];
    const char* slot = half + layout.dispatch_offset +
                       ((static_cast<int64_t>(local_expert) * num_ranks + source) * num_max_tokens + position) *
                           layout.dispatch_slot_bytes;
    const int64_t out_row = local_expert * num_slots_per_expert + row;
    // The slot's metadata and its first scales (64 floats, or 32 packed words of UE8M0) are loaded before the row
    // is copied and stored after it, so their round trips overlap the row's.
    int4 meta = make_int4(0, 0, 0, 0);
    if (lane == 0) meta = __ldcg(reinterpret_cast<const int4*>(slot + layout.dispatch_meta_offset));
    if (args.use_fp8) {
      const float* scales = reinterpret_cast<const float*>(slot + layout.dispatch_scales_offset);
      const int num_words = num_scales / 4;
      // UE8M0: four scales' exponents per int32 word.
      auto packed_word = [&](int word_idx) {
        uint32_t word = 0;
#pragma unroll
        for (int byte = 0; byte < 4; ++byte)
          word |= ((__float_as_uint(__ldcg(scales + 4 * word_idx + byte)) >> 23) & 0xffu) << (8 * byte);
        return static_cast<int>(word);
      };
      float scale_lo = 0.0f, scale_hi = 0.0f;
      int word = 0;
      if (args.use_ue8m0) {
        if (lane < num_words) word = packed_word(lane);
      } else {
        if (lane < num_scales) scale_lo = __ldcg(scales + lane);
        if (lane + 32 < num_scales) scale_hi = __ldcg(scales + lane + 32);
      }
      device::warp_copy_in_rounds<8>(reinterpret_cast<int4*>(static_cast<uint8_t*>(args.recv_x) + out_row * hidden),
                                     reinterpret_cast<const int4*>(slot), hidden / 16, lane, device::ld_queue);
      if (args.use_ue8m0) {
        int* out = static_cast<int*>(args.recv_scales);
        auto out_of = [&](int word_idx) -> int& {
          return out[(static_cast<int64_t>(local_expert) * num_words + word_idx) * num_slots_per_expert + row];
        };
        if (lane < num_words) out_of(lane) = word;
        for (int word_idx = lane + 32; word_idx < num_words; word_idx += 32) out_of(word_idx) = packed_word(word_idx);
      } else {
        float* out = static_cast<float*>(args.recv_scales);
        auto out_of = [&](int group) -> float& {
          return out[(static_cast<int64_t>(local_expert) * num_scales + group) * num_slots_per_expert + row];
        };
        if (lane < num_scales) out_of(lane) = scale_lo;
        if (lane + 32 < num_scales) out_of(lane + 32) = scale_hi;
        for (int group = lane + 64; group < num_scales; group += 32) out_of(group) = __ldcg(scales + group);
      }
    } else {
      device::warp_copy_in_rounds<8>(reinterpret_cast<int4*>(static_cast<uint16_t*>(args.recv_x) + out_row * hidden),
                                     reinterpret_cast<const int4*>(slot), hidden / 8, lane, device::ld_queue);
    }
    if (lane == 0) {
      args.src_info[out_row] = meta.x;
      args.src_info[num_local_experts * num_slots_per_expert + out_row] = meta.y;
    }
  }
}

// `net` reaches the peers for which via_transport is true: the kernel's __grid_constant__ parameter,
// read in place, never copied (GIN keeps references into it for the whole kernel).
template <typename Transport>
__global__ void __launch_bounds__(kThreads, 1)
    dispatch(Peers peers, HalfLayout layout, const __grid_constant__ Transport net, DispatchArgs args, int phases) {
  // Send: [T * K] expert ids (-1 for none or out of range), then the block's own positions.
  // Receive: [experts of this block][R + 1] counts. The two phases reuse the same memory.
  extern __shared__ int shared[];
  __shared__ int tag_shared, abort_flag;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  if (threadIdx.x == 0) {
    abort_flag = 0;
    tag_shared = (phases & kSend) ? begin_send(peers, 0) : receive_tag(peers, 0);
  }
  if (phases & kSend) {
    const int num_topk = args.num_topk, num_entries = args.num_tokens * num_topk;
    int* experts = shared;
    int* positions = shared + num_entries;
    for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
      int64_t expert = args.topk_idx[i];
      if (expert < -1 || expert >= args.num_experts) {
        if (blockIdx.x == 0)
          device::report(peers.diagnostics, Phase::kLowLatencyExpertRange, false, peers.rank, -1, -1, i / num_topk,
                         args.num_experts, expert);
        expert = -1;
      }
      experts[i] = static_cast<int>(expert);
    }
    __syncthreads();
    const int per_block = tokens_per_block(args.num_tokens, gridDim.x);
    const int first_token = min(args.num_tokens, static_cast<int>(blockIdx.x) * per_block);
    const int num_own = min(args.num_tokens, first_token + per_block) - first_token;
    compute_positions(peers, args, experts, first_token * num_topk, num_own * num_topk, positions);
    __syncthreads();
    run_send(peers, layout, net, args, experts, positions, first_token, num_own,
             parts_per_token(args.num_tokens, gridDim.x, args.hidden), tag_shared, warp, lane);
    __syncthreads();  // the receive reuses the shared memory
  } else {
    __syncthreads();
  }
  if (phases & kReceive) run_receive(peers, layout, net, args, tag_shared, warp, lane, shared, &abort_flag);
}

template <typename Transport>
void launch(const Peers& peers, const HalfLayout& layout, const Transport& net, const DispatchArgs& args, int phases,
            int num_blocks, cudaStream_t stream) {
  const int shared =
      dispatch_shared_bytes(args.num_tokens, args.num_topk, args.num_local_experts, peers.num_ranks, num_blocks);
  if (shared > 47 * 1024)  // with the static shared memory, over the 48 KB a launch gets by default
    DEEP_EP_CUDA_CHECK(cudaFuncSetAttribute(dispatch<Transport>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
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
void launch_dispatch(const Peers& peers, const HalfLayout& layout, const DispatchArgs& args, const LaunchShape& shape,
                     cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, shape.phases, shape.num_blocks, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_dispatch(const Peers& peers, const HalfLayout& layout, const DispatchArgs& args,
                     const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream) {
  launch(peers, layout, gin, args, shape.phases, shape.num_blocks, stream);
}
#endif

}  // namespace deep_ep::low_latency
