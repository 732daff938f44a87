// How the runtime launches an op's kernel: every family's dispatch and combine launcher takes
// (peers, runtime-made layout, args, shape, stream), and the runtime picks the shape from the
// co-residency check (docs/design.md decision 5) before it launches.
#pragma once

namespace deep_ep {

struct LaunchShape {
  int num_blocks = 0;  // the grid: channels (normal modes) or the blocks that fit (pull combine, low latency)
  bool wide = false;   // intranode rings: one block per SM with more warps, else two blocks per SM
  int phases = 0;      // low latency: which halves of the op run (low_latency::Phases)
};

}  // namespace deep_ep
