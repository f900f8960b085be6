// Counter-based Philox4x32-10 random numbers, bit-identical on the CPU and in CUDA kernels.
//
// A dropout mask element is a pure function of (seed, offset, element index e):
//   group = e / 128, i = e % 128                 (a group is 16 Philox blocks of 8 draws)
//   block = 16·group + i % 16, lane = i / 16
//   words = philox4x32_10(counter = (block, offset), key = seed)
//   u16   = 16-bit lane `lane` of words (low half of word 0 first)
//   keep  = u16 >= round(p * 65536)
// so a backward pass regenerates the forward's mask instead of saving it, on either device. Lanes are
// interleaved across the 16 blocks of a group so that the CPU turns 16 vectorised Philox results into
// 16 consecutive mask elements, and 16 consecutive CUDA threads write 16 consecutive elements.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PFP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PFP_HOST_DEVICE inline
#endif

namespace pyfastpeft {

struct Philox4 {
  uint32_t v[4];
};

PFP_HOST_DEVICE Philox4 philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Drop an element when its 16-bit draw is below this threshold (p quantised to 1/65536).
PFP_HOST_DEVICE uint32_t dropout_threshold(float p) {
  const float t = p * 65536.0f + 0.5f;
  return t >= 65535.0f ? 65535u : static_cast<uint32_t>(t);
}

PFP_HOST_DEVICE uint32_t philox_lane16(const Philox4& words, int lane) {
  return (words.v[lane >> 1] >> ((lane & 1) * 16)) & 0xFFFFu;
}

constexpr int64_t kDropoutGroup = 128;       // mask elements per group
constexpr int64_t kDropoutGroupBlocks = 16;  // Philox blocks per group

// The Philox block and 16-bit lane that decide element `index`.
PFP_HOST_DEVICE uint64_t dropout_block(int64_t index) {
  return static_cast<uint64_t>(index / kDropoutGroup) * kDropoutGroupBlocks + static_cast<uint64_t>(index % 16);
}
PFP_HOST_DEVICE int dropout_lane(int64_t index) { return static_cast<int>((index % kDropoutGroup) / 16); }

// True when element `index` of the stream keyed by (seed, offset) is kept.
PFP_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, int64_t index, uint32_t threshold) {
  const Philox4 words = philox4x32_10(dropout_block(index), offset, seed);
  return philox_lane16(words, dropout_lane(index)) >= threshold;
}

// A mask kept as bits (the CPU LoRA forward keeps its mask for the backward): element e is bit e % 8 of
// byte e / 8, so a group is 16 whole bytes; 8 zero bytes follow the last element's byte, for
// unaligned multi-byte reads. The size of such a buffer for `numel` elements:
PFP_HOST_DEVICE int64_t dropout_keep_bytes(int64_t numel) { return (numel + 7) / 8 + 8; }

}  // namespace pyfastpeft
