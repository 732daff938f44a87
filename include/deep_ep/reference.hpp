// CPU reference of every deep_ep operation on the global view: all ranks' inputs in, all ranks'
// outputs out (docs/design.md decision 8). It is the executable spec the GPU kernels are tested against.
// Pure C++: no CUDA, no torch. bf16 values travel as their raw 16-bit patterns, FP8 as raw bytes.
#pragma once

#include <cstdint>
#include <vector>

namespace deep_ep::reference {

// ---- number formats -------------------------------------------------------------------------
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);  // round to nearest even, NaN preserved
                                      // (sign and top payload bits kept, quiet bit set)
uint8_t float_to_e4m3(float value);   // round to nearest even, saturating to +-448 (SATFINITE),
                                      // infinities too; NaN -> 0x7F; -0 -> 0x80
float e4m3_to_float(uint8_t bits);

// FP8 quantization of one row of `hidden` values in groups of 128 channels (docs/compatibility.md section 8), all in
// float32: amax = max(1e-4f, max|x|); scale_inv = amax / 448.0f (a division, not a multiply by 1/448);
// with round_scale, scale_inv = 2^ceil(log2(q)) for that float quotient q, the exponent taken exactly
// from q's bits (no log2 rounding); out = e4m3(x * inv) with inv = 1.0f / scale_inv, i.e. a multiply
// by the float32 reciprocal, never x / scale_inv. Writes hidden bytes to `out` and hidden/128 floats to
// `scale_invs`. Throws ValueError unless hidden % 128 == 0.
void quantize_row_fp8(const float* x, int hidden, bool round_scale, uint8_t* out, float* scale_invs);
// Biased UE8M0 exponent byte of a power-of-two scale (what use_ue8m0 packs, 4 per int32, low byte first):
// bits 23..30 of the float32, e.g. 2^-3 -> 124.
uint8_t ue8m0_exponent(float power_of_two_scale);

// ---- layout (docs/compatibility.md section 5) -----------------------------------------------
struct DispatchLayout {
  std::vector<int32_t> num_tokens_per_rank;       // [R]
  std::vector<int32_t> num_tokens_per_rdma_rank;  // [R / 8]; empty when R <= 8
  std::vector<int32_t> num_tokens_per_expert;     // [E]
  std::vector<uint8_t> is_token_in_rank;          // [T, R] row-major, 0 or 1
};
// topk_idx: [num_tokens, num_topk] row-major, -1 = no expert. Throws ValueError on ids outside [-1, E),
// when num_experts % num_ranks != 0, and when num_ranks > 8 is not a multiple of 8.
DispatchLayout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks,
                                   int num_experts);

// ---- normal (intranode) dispatch and combine (docs/compatibility.md sections 6 and 7) ----------
// A row is `row_bytes` raw bytes (bf16: hidden * 2, FP8: hidden); FP8 rows carry `num_scales`
// float32 scales (hidden / 128), 0 for bf16.
struct NormalDispatchInput {  // one rank's arguments
  int num_tokens = 0;
  std::vector<uint8_t> x;                 // [T, row_bytes]
  std::vector<float> x_scales;            // [T, num_scales] row-major; empty when num_scales == 0
  std::vector<int64_t> topk_idx;          // [T, K] or empty (no top-k)
  std::vector<float> topk_weights;        // [T, K] or empty
  std::vector<uint8_t> is_token_in_rank;  // [T, R]
};

struct NormalDispatchOutput {                       // one rank's results
  int num_recv_tokens = 0;                          // real rows N (before num_worst_tokens padding)
  int num_rows = 0;                                 // rows of the outputs: N, or num_worst_tokens when > 0
  std::vector<uint8_t> recv_x;                      // [num_rows, row_bytes]; padding rows zero
  std::vector<float> recv_x_scales;                 // [num_rows, num_scales]
  std::vector<int64_t> recv_topk_idx;               // [num_rows, K] local expert ids, -1 elsewhere and in padding
  std::vector<float> recv_topk_weights;             // [num_rows, K] 0 where not local and in padding
  std::vector<int32_t> num_recv_tokens_per_expert;  // [L], each rounded up to expert_alignment; counts
                                                    // (row, k) slots of real rows (a row naming local expert
                                                    // l twice counts twice); empty when num_topk == 0;
                                                    // filled even with num_worst_tokens (Python drops it)
  std::vector<int32_t> rank_prefix_matrix;          // [R, R] inclusive prefix over senders
  std::vector<int32_t> recv_src_idx;                // [N] source token index of each real row
};

struct NormalDispatchArgs {
  int num_ranks = 0;
  int num_experts = 0;  // needed for the local-expert remap; 0 allowed when no top-k
  int row_bytes = 0;
  int num_scales = 0;
  int num_topk = 0;  // 0 when no top-k
  int expert_alignment = 1;
  int num_worst_tokens = 0;
  // -1: every rank's outputs. A rank r >= 0 (a test that checks one rank's results): only outputs[r] gets its rows;
  // the other ranks' outputs keep num_recv_tokens, num_rows, rank_prefix_matrix and recv_src_idx (all that
  // normal_combine reads of them) and leave the row, top-k and expert-count vectors empty.
  int only_rank = -1;
};

// Rows received by rank r are ordered by source rank, then by source token index. A token goes where
// is_token_in_rank says, whatever its topk_idx. num_topk == 0 means no top-k (recv_topk_* empty);
// num_worst_tokens needs no top-k here (cached dispatch passes it too). Throws ValueError on bad
// sizes, ids outside [-1, E), or more than num_worst_tokens (> 0) rows for some rank.
std::vector<NormalDispatchOutput> normal_dispatch(const std::vector<NormalDispatchInput>& inputs,
                                                  const NormalDispatchArgs& args);

struct NormalCombineInput {         // one rank's arguments
  std::vector<uint16_t> x;          // [N, hidden] bf16: one row per row this rank received
  std::vector<float> topk_weights;  // [N, K] or empty
  std::vector<uint16_t> bias_0;     // [T, hidden] or empty
  std::vector<uint16_t> bias_1;     // [T, hidden] or empty
};

struct NormalCombineOutput {
  std::vector<uint16_t> combined_x;          // [T, hidden] bf16
  std::vector<float> combined_topk_weights;  // [T, K]; empty without topk_weights
};

// Routing comes from the dispatch that produced the rows: `dispatch_inputs[r].is_token_in_rank` and
// `dispatch_outputs[j].rank_prefix_matrix / recv_src_idx`. Sums are accumulated in float32 from 0.0f
// over ranks in increasing order, then ((sum + bias_0) + bias_1), then one rounding to bf16. Rank j's
// x and topk_weights may hold num_recv_tokens rows or num_rows rows (padding rows are ignored).
// num_topk is K of topk_weights: 0 means combine got no topk_weights (combined_topk_weights empty).
//
// num_ranks_per_node selects the summation order. 0, or any value >= num_ranks, is the flat order
// above (the intranode kernels). Otherwise ranks form nodes of num_ranks_per_node consecutive ranks
// (num_ranks must be a multiple of it, else ValueError) and each token is summed in two levels, as the
// internode kernels do (inside each node on the forwarder rank, then across nodes on the home rank):
//   - per node n holding at least one rank j with is_token_in_rank[t, j]: partial_n = float32 sum
//     from 0.0f over those j in increasing order, rounded once to bf16 (nearest even); its weights
//     are the float32 sum from 0.0f over the same j, not rounded;
//   - sum = float32 sum from 0.0f of bf16_to_float(partial_n) over those nodes in increasing n, and
//     weights likewise from 0.0f over the nodes' partial weights;
//   - then ((sum + bias_0) + bias_1) and one rounding to bf16, as in the flat order.
// A token sent to no rank gets zeros (plus the bias) and weights 0 in either order.
//
// only_rank >= 0 combines that rank's tokens only (the other outputs stay empty); -1 combines every rank's.
std::vector<NormalCombineOutput> normal_combine(const std::vector<NormalDispatchInput>& dispatch_inputs,
                                                const std::vector<NormalDispatchOutput>& dispatch_outputs,
                                                const std::vector<NormalCombineInput>& inputs, int hidden, int num_topk,
                                                int num_ranks_per_node = 0, int only_rank = -1);

// ---- low-latency dispatch and combine (docs/compatibility.md section 8) ----------------------
struct LowLatencyDispatchInput {
  int num_tokens = 0;             // T <= num_max_dispatch_tokens_per_rank
  std::vector<uint16_t> x;        // [T, hidden] bf16
  std::vector<int64_t> topk_idx;  // [T, K], -1 allowed
};

struct LowLatencyDispatchArgs {
  int num_ranks = 0;
  int num_experts = 0;
  int hidden = 0;
  int num_topk = 0;
  int num_max_dispatch_tokens_per_rank = 0;  // M
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;  // requires round_scale
};

// Expert l's rows are grouped by source rank in increasing order; within a source rank, by source
// token index, then k (a token naming the expert twice gets two rows). Rows past recv_count[l] are
// zero. S = R * M rows per local expert. Throws ValueError when T > M, when one source rank would send
// an expert more than M rows, or (use_fp8 only) when use_ue8m0 lacks round_scale or hidden % 512 != 0;
// without use_fp8, round_scale and use_ue8m0 are ignored.
struct LowLatencyDispatchOutput {
  std::vector<uint16_t> recv_x_bf16;       // [L, S, hidden] when !use_fp8
  std::vector<uint8_t> recv_x_fp8;         // [L, S, hidden] when use_fp8
  std::vector<float> recv_scales;          // [L, S, hidden / 128] logical (row-major here) when use_fp8 && !use_ue8m0
  std::vector<int32_t> recv_scales_ue8m0;  // [L, S, hidden / 512] when use_ue8m0, 4 exponent bytes each, low byte first
  std::vector<int32_t> recv_count;         // [L]
  std::vector<int32_t> src_info;           // [L, S] source token index of each valid row, 0 elsewhere
  std::vector<int64_t> layout_range;       // [L, R] (begin << 32) | count
};

std::vector<LowLatencyDispatchOutput> low_latency_dispatch(const std::vector<LowLatencyDispatchInput>& inputs,
                                                           const LowLatencyDispatchArgs& args);

struct LowLatencyCombineInput {
  std::vector<uint16_t> x;          // [L, S, hidden] bf16 expert outputs in dispatch's row layout
  std::vector<float> topk_weights;  // [T, K] of this rank as the dispatching rank
};

// combined_x[t] = sum over valid k (in k order, float32) of topk_weights[t, k] * y(t, k), rounded to bf16.
// Each term is one fused multiply-add, sum = fmaf(w, y, sum) from sum = 0.0f (what nvcc emits for
// `sum += w * y`). y(t, k) is found through the handle: among the layout_range rows rank r sent to
// expert topk_idx[t, k], the rows with src_info == t; a token naming that expert n times owns n of them
// and its i-th listing (in k order) takes the i-th. `masked_ranks` (size R, or empty) removes every
// expert of a masked rank from the sum.
std::vector<std::vector<uint16_t>> low_latency_combine(const std::vector<LowLatencyDispatchInput>& dispatch_inputs,
                                                       const std::vector<LowLatencyDispatchOutput>& dispatch_outputs,
                                                       const std::vector<LowLatencyCombineInput>& inputs,
                                                       const LowLatencyDispatchArgs& args,
                                                       const std::vector<uint8_t>& masked_ranks = {});

}  // namespace deep_ep::reference
