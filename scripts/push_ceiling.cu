// The push dispatch's and the pull combine's memory patterns alone, on a fixed number of SMs: how fast can blocks
// that read a token's row once and write it to every rank it goes to (push), or read its row at every such rank and
// write their sum once (pull), move data, with no communication, no flags and no peers? 8 ranks sharing one GPU
// take 8 x num_sms of its SMs, so these, next to a plain copy on the same SMs, are the ceilings of those kernels.
//
// Build and run (one GPU, one process):
//   nvcc -O3 -arch=sm_90a --expt-relaxed-constexpr -Icsrc -Iinclude -o /tmp/push_ceiling scripts/push_ceiling.cu &&
//   /tmp/push_ceiling
//
// Tokens: 8 ranks x 4096, hidden 7168 BF16 (14336-byte rows), each routed to the ranks of 8 distinct random experts
// of 256 (32 per rank), as the bench's dispatch. Block b takes a contiguous 1/grid of the tokens (a channel); its
// warps take the block's tokens in turn. Per-rank figures divide the rows received (the push's writes, the pull's
// reads) by 8, as the bench does; both move the same bytes (a row per token plus a row per destination).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/common/device_utils.cuh"

namespace {

void check(cudaError_t result, const char* what) {
  if (result == cudaSuccess) return;
  std::fprintf(stderr, "push_ceiling: %s: %s\n", what, cudaGetErrorString(result));
  std::exit(1);
}

constexpr int kRanks = 8, kTokensPerRank = 4096, kTokens = kRanks * kTokensPerRank;
constexpr int kRowBytes = 7168 * 2, kRowInt4 = kRowBytes / 16;

enum class Store { kStreaming, kPlain };

struct Pattern {
  const int4* src;
  int4* dst[kRanks];
  int4* out;           // the pull's output: a row per token
  const unsigned* to;  // a bit per destination rank, per token
  const int* rows;     // [token][rank]: the token's row at that rank
};

template <Store kStore>
__device__ __forceinline__ void store(int4* p, const int4& v) {
  if constexpr (kStore == Store::kStreaming)
    __stcs(p, v);
  else
    *p = v;
}

// A round of kUnroll words per lane of the row at src, from word `base` on (lane's first), as the kernel loads it.
template <int kUnroll>
__device__ __forceinline__ void load_round(int4 (&v)[kUnroll], const int4* src, int base) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (base + 32 * u < kRowInt4) v[u] = deep_ep::device::ld_input(src + base + 32 * u);
}

// The round into token t's row at every rank of `to`.
template <int kUnroll, Store kStore>
__device__ __forceinline__ void store_round(const Pattern& p, int t, unsigned to, int base, const int4 (&v)[kUnroll]) {
#pragma unroll
  for (int j = 0; j < kRanks; ++j) {
    if (!((to >> j) & 1u)) continue;
    int4* dst = p.dst[j] + static_cast<int64_t>(p.rows[t * kRanks + j]) * kRowInt4;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + 32 * u < kRowInt4) store<kStore>(dst + base + 32 * u, v[u]);
  }
}

// The push dispatch's loop: a round of kUnroll words per lane is loaded, then stored to every destination.
// kDynamic: a warp takes the block's next unclaimed token (a shared counter) instead of every kWarps-th one, so
// warps that drew tokens with fewer destinations do not idle at the end.
template <int kWarps, int kUnroll, Store kStore, bool kDynamic = false>
__global__ void __launch_bounds__(kWarps * 32, 1) push_rounds(Pattern p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int begin, end;
  deep_ep::device::channel_range(blockIdx.x, gridDim.x, kTokens, begin, end);
  __shared__ int next_token;
  if (threadIdx.x == 0) next_token = begin + kWarps;
  __syncthreads();
  for (int t = begin + warp; t < end;) {
    const unsigned to = p.to[t];
    const int4* src = p.src + static_cast<int64_t>(t) * kRowInt4;
    for (int base = lane; base < kRowInt4; base += 32 * kUnroll) {
      int4 v[kUnroll];
      load_round(v, src, base);
      store_round<kUnroll, kStore>(p, t, to, base, v);
    }
    if constexpr (kDynamic) {
      int claimed = 0;
      if (lane == 0) claimed = atomicAdd(&next_token, 1);
      t = __shfl_sync(0xffffffffu, claimed, 0);
    } else {
      t += kWarps;
    }
  }
}

// The same with the next round's loads issued before the current round's stores (two register sets of kUnroll).
template <int kWarps, int kUnroll, Store kStore>
__global__ void __launch_bounds__(kWarps * 32, 1) push_pipelined(Pattern p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int begin, end;
  deep_ep::device::channel_range(blockIdx.x, gridDim.x, kTokens, begin, end);
  for (int t = begin + warp; t < end; t += kWarps) {
    const unsigned to = p.to[t];
    const int4* src = p.src + static_cast<int64_t>(t) * kRowInt4;
    int4 cur[kUnroll], next[kUnroll];
    load_round(cur, src, lane);
    for (int base = lane; base < kRowInt4; base += 32 * kUnroll) {
      load_round(next, src, base + 32 * kUnroll);
      store_round<kUnroll, kStore>(p, t, to, base, cur);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) cur[u] = next[u];
    }
  }
}

// The pull combine's loop: a warp reads the token's row at every rank it went to, kColumns 16-byte columns per
// lane per step (all loads of a step issued before the first sum), sums them in float32 and writes the token's
// row once.
template <int kWarps, int kColumns>
__global__ void __launch_bounds__(kWarps * 32, 1) pull_sum(Pattern p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int begin, end;
  deep_ep::device::channel_range(blockIdx.x, gridDim.x, kTokens, begin, end);
  for (int t = begin + warp; t < end; t += kWarps) {
    const unsigned from = p.to[t];
    for (int col = lane; col < kRowInt4; col += 32 * kColumns) {
      int4 v[kRanks][kColumns];
#pragma unroll
      for (int j = 0; j < kRanks; ++j) {
        const int4* row = p.dst[j] + static_cast<int64_t>(p.rows[t * kRanks + j]) * kRowInt4;
#pragma unroll
        for (int c = 0; c < kColumns; ++c)
          if (((from >> j) & 1u) && col + 32 * c < kRowInt4) v[j][c] = __ldcg(row + col + 32 * c);
      }
#pragma unroll
      for (int c = 0; c < kColumns; ++c) {
        if (col + 32 * c >= kRowInt4) continue;
        float sum[8] = {};
#pragma unroll
        for (int j = 0; j < kRanks; ++j) {
          if (!((from >> j) & 1u)) continue;
          const uint32_t* w = reinterpret_cast<const uint32_t*>(&v[j][c]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sum[2 * e] += __uint_as_float(w[e] << 16);
            sum[2 * e + 1] += __uint_as_float(w[e] & 0xffff0000u);
          }
        }
        int4 o;
        uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          ow[e] = (__float_as_uint(sum[2 * e]) >> 16) | (__float_as_uint(sum[2 * e + 1]) & 0xffff0000u);
        __stcs(p.out + static_cast<int64_t>(t) * kRowInt4 + col + 32 * c, o);
      }
    }
  }
}

struct Routing {
  std::vector<unsigned> to;
  std::vector<int> rows;
  int rows_at[kRanks] = {};
  int64_t rows_written = 0;
};

// copy: every token to one rank (t % 8); else to the ranks of 8 distinct random experts of 256, 32 per rank.
Routing route(bool copy) {
  Routing r;
  r.to.resize(kTokens);
  r.rows.assign(static_cast<size_t>(kTokens) * kRanks, 0);
  std::mt19937 rng(7);
  std::vector<int> experts(256);
  for (int i = 0; i < 256; ++i) experts[i] = i;
  for (int t = 0; t < kTokens; ++t) {
    unsigned to = 0;
    if (copy) {
      to = 1u << (t % kRanks);
    } else {
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int k = 0; k < 8; ++k) to |= 1u << (experts[k] / 32);
    }
    r.to[t] = to;
    for (int j = 0; j < kRanks; ++j)
      if ((to >> j) & 1u) r.rows[static_cast<size_t>(t) * kRanks + j] = r.rows_at[j]++;
  }
  for (int j = 0; j < kRanks; ++j) r.rows_written += r.rows_at[j];
  return r;
}

template <typename Kernel>
float median_us(Kernel kernel, int grid, int threads, const Pattern& p) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  for (int i = 0; i < 3; ++i) kernel<<<grid, threads>>>(p);
  check(cudaGetLastError(), "cudaGetLastError");
  std::vector<float> times;
  for (int i = 0; i < 11; ++i) {
    check(cudaEventRecord(a), "cudaEventRecord");
    kernel<<<grid, threads>>>(p);
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    times.push_back(ms * 1e3f);
  }
  std::sort(times.begin(), times.end());
  check(cudaEventDestroy(a), "cudaEventDestroy");
  check(cudaEventDestroy(b), "cudaEventDestroy");
  return times[times.size() / 2];
}

struct Case {
  const char* name;
  void (*kernel)(Pattern);
  int threads;
};

}  // namespace

int main() {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

  const Case cases[] = {
      {"rounds 16w x8 streaming (kernel today)", push_rounds<16, 8, Store::kStreaming>, 512},
      {"rounds 16w x8 plain", push_rounds<16, 8, Store::kPlain>, 512},
      {"rounds 16w x8 streaming, dynamic", push_rounds<16, 8, Store::kStreaming, true>, 512},
      {"rounds 32w x4 streaming", push_rounds<32, 4, Store::kStreaming>, 1024},
      {"pipelined 16w 2x4 streaming", push_pipelined<16, 4, Store::kStreaming>, 512},
      {"pipelined 16w 2x8 streaming", push_pipelined<16, 8, Store::kStreaming>, 512},
      {"pipelined 32w 2x2 streaming", push_pipelined<32, 2, Store::kStreaming>, 1024},
      {"pull sum 16w x2 columns (combine)", pull_sum<16, 2>, 512},
      {"pull sum 16w x1 column", pull_sum<16, 1>, 512},
  };
  std::printf("%-42s %-6s %5s %9s %12s %12s\n", "variant", "route", "SMs", "us", "HBM GB/s", "GB/s/rank");
  for (const bool copy : {true, false}) {
    const Routing r = route(copy);
    Pattern p{};
    int4* src = nullptr;
    unsigned* to = nullptr;
    int* rows = nullptr;
    check(cudaMalloc(&src, static_cast<size_t>(kTokens) * kRowBytes), "cudaMalloc");
    check(cudaMalloc(&p.out, static_cast<size_t>(kTokens) * kRowBytes), "cudaMalloc");
    check(cudaMemset(src, 1, static_cast<size_t>(kTokens) * kRowBytes), "cudaMemset");
    check(cudaMalloc(&to, r.to.size() * sizeof(unsigned)), "cudaMalloc");
    check(cudaMalloc(&rows, r.rows.size() * sizeof(int)), "cudaMalloc");
    check(cudaMemcpy(to, r.to.data(), r.to.size() * sizeof(unsigned), cudaMemcpyHostToDevice), "cudaMemcpy");
    check(cudaMemcpy(rows, r.rows.data(), r.rows.size() * sizeof(int), cudaMemcpyHostToDevice), "cudaMemcpy");
    p.src = src;
    p.to = to;
    p.rows = rows;
    for (int j = 0; j < kRanks; ++j)
      check(cudaMalloc(&p.dst[j], static_cast<size_t>(r.rows_at[j]) * kRowBytes + 16), "cudaMalloc");
    const double written = static_cast<double>(r.rows_written) * kRowBytes;
    const double moved = written + static_cast<double>(kTokens) * kRowBytes;
    for (const Case& c : cases) {
      for (const int sms : {64, 128, prop.multiProcessorCount}) {
        const float us = median_us(c.kernel, sms, c.threads, p);
        std::printf("%-42s %-6s %5d %9.1f %12.0f %12.1f\n", c.name, copy ? "copy" : "top-8", sms, us,
                    moved / (us * 1e-6) / 1e9, written / kRanks / (us * 1e-6) / 1e9);
      }
    }
    if (!copy)
      std::printf("top-8 routing: %.2f destinations per token\n", static_cast<double>(r.rows_written) / kTokens);
    for (int j = 0; j < kRanks; ++j) check(cudaFree(p.dst[j]), "cudaFree");
    check(cudaFree(src), "cudaFree");
    check(cudaFree(p.out), "cudaFree");
    check(cudaFree(to), "cudaFree");
    check(cudaFree(rows), "cudaFree");
  }
  return 0;
}
