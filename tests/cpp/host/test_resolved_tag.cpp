// The pull combine's cache of resolved input addresses (protocol/pull_inputs.hpp): a word keeps the base and
// enough of the generation that another generation of the same slot does not match it, and is never 0.
#include <gtest/gtest.h>

#include <cstdint>

#include "protocol/pull_inputs.hpp"

using namespace deep_ep;

namespace {

// What the kernels do (kernels/common/import_resolve.cuh): the base when the word's tag is the generation's.
uint64_t cached_base(uint64_t word, uint32_t generation) {
  return (word & ~kResolvedBaseMask) == resolved_tag(generation) ? word & kResolvedBaseMask : 0;
}

TEST(ResolvedTag, RoundTripsTheBaseForItsGeneration) {
  const uint64_t bases[] = {0x7f0000000000ull, 0x7fffffffff00ull, 0x100ull, 0x7a1234567800ull};
  const uint32_t generations[] = {1, 3, 255, 257, 0xffffffu, 0x1000001u, 0xffffffffu};
  for (uint64_t base : bases) {
    ASSERT_TRUE(is_cacheable_base(base));
    for (uint32_t g : generations) {
      const uint64_t word = base | resolved_tag(g);
      EXPECT_NE(word, 0u);
      EXPECT_EQ(cached_base(word, g), base) << std::hex << base << " generation " << g;
    }
  }
}

TEST(ResolvedTag, OtherGenerationsMissUntilTwoToTheTwentyFour) {
  const uint64_t base = 0x7f1234560000ull;
  for (uint32_t g : {1u, 0x7fu, 0xffu, 0x101u, 0xfffffu}) {
    const uint64_t word = base | resolved_tag(g);
    for (uint32_t later = g + 2; later < g + 4096; later += 2) EXPECT_EQ(cached_base(word, later), 0u) << later;
    for (int bit = 0; bit < 24; ++bit) EXPECT_EQ(cached_base(word, g ^ (1u << bit)), 0u) << "bit " << bit;
    // The documented limit: 2^24 generation steps later the tag repeats.
    EXPECT_EQ(cached_base(word, g + (1u << 24)), base);
  }
}

TEST(ResolvedTag, UnalignedOrHighBasesAreNotCached) {
  EXPECT_FALSE(is_cacheable_base(0x7f0000000080ull));
  EXPECT_FALSE(is_cacheable_base(0x1000000000000ull));
  EXPECT_TRUE(is_cacheable_base(0x7f0000000100ull));
}

}  // namespace
