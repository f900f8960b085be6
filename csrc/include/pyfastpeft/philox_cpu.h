// Vectorised Philox dropout masks for CPU kernels: the same stream as philox.h (and so as the CUDA
// kernels), produced 16 blocks (128 elements) at a time.
#pragma once
#ifndef CPU_CAPABILITY
#error "kernel header: include it only from a *_kernels_cpu.cpp, which is compiled once per CPU level"
#endif
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pyfastpeft/philox.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pyfastpeft::cpu {
inline namespace CPU_CAPABILITY {  // one copy per CPU level (pyfastpeft/cpu_dispatch.h)

// Philox for kBatch consecutive 8-element blocks at once, producing the same words as
// philox4x32_10() in philox.h (which the CUDA kernels use). The compiler does not vectorise the
// 32×32→64-bit multiplies on its own: with AVX-512 the rounds run 8 blocks per instruction in 64-bit
// lanes, with AVX2 8 blocks per instruction in 32-bit lanes.
constexpr int kBatch = 16;

#if defined(__AVX512F__)
// 16 blocks as two halves of 8 in 64-bit lanes: each lane holds one block's 32-bit word in its low half
// and don't-care bits in its high half (_mm512_mul_epu32 reads only the low halves, and only low
// halves are ever kept), so a round needs no blends: per half, 2 multiplies, 2 dword swaps, 2 three-way xors.
inline void philox_group_avx512(uint64_t first_block, uint64_t offset, uint64_t seed, __m512i (&words)[4]) {
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c0[2], c1[2], c2[2], c3[2];
  for (int h = 0; h < 2; ++h) {
    const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first_block + 8 * h)), lane);
    c0[h] = block;
    c1[h] = _mm512_srli_epi64(block, 32);
    c2[h] = _mm512_set1_epi64(static_cast<int64_t>(offset & 0xFFFFFFFFu));
    c3[h] = _mm512_set1_epi64(static_cast<int64_t>(offset >> 32));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
    for (int h = 0; h < 2; ++h) {  // two independent halves in flight hide the multiply latency
      const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
      // the high word brought to the low half by a dword swap (port 5) rather than a shift (port 0, where
      // the multiplies run); the swapped-in high half is another don't-care
      const __m512i hi1 = _mm512_shuffle_epi32(p1, _MM_PERM_CDAB), hi0 = _mm512_shuffle_epi32(p0, _MM_PERM_CDAB);
      c0[h] = _mm512_ternarylogic_epi64(hi1, c1[h], key0, 0x96);  // a ^ b ^ c
      c1[h] = p1;
      c2[h] = _mm512_ternarylogic_epi64(hi0, c3[h], key1, 0x96);
      c3[h] = p0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // the low dwords of both halves, in block order: dword 2j of (half 0, half 1) for j = 0..15
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  words[0] = _mm512_permutex2var_epi32(c0[0], even, c0[1]);
  words[1] = _mm512_permutex2var_epi32(c1[0], even, c1[1]);
  words[2] = _mm512_permutex2var_epi32(c2[0], even, c2[1]);
  words[3] = _mm512_permutex2var_epi32(c3[0], even, c3[1]);
}

inline void philox_batch(uint64_t first_block, uint64_t offset, uint64_t seed, uint32_t (&w)[4][kBatch]) {
  __m512i words[4];
  philox_group_avx512(first_block, offset, seed, words);
  for (int i = 0; i < 4; ++i) _mm512_storeu_si512(w[i], words[i]);
}

// The 16 keep decisions of lane `lane` of a group (elements 16·lane .. 16·lane + 15), as a bit mask.
inline __mmask16 keep_mask16(const __m512i (&words)[4], int lane, __m512i threshold) {
  const __m512i w = words[lane >> 1];
  const __m512i u16 = (lane & 1) ? _mm512_srli_epi32(w, 16) : _mm512_and_si512(w, _mm512_set1_epi32(0xFFFF));
  return _mm512_cmpge_epu32_mask(u16, threshold);
}
#elif defined(__AVX2__)
// Full 32×32→64 products of 8 lanes, split into low and high 32-bit halves.
inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0b10101010);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0b10101010);
}

inline void philox_batch(uint64_t first_block, uint64_t offset, uint64_t seed, uint32_t (&w)[4][kBatch]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int half = 0; half < kBatch; half += 8) {
    alignas(32) uint32_t lo32[8], hi32[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t block = first_block + static_cast<uint64_t>(half + l);
      lo32[l] = static_cast<uint32_t>(block);
      hi32[l] = static_cast<uint32_t>(block >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hi_lo(c0, m0, hi0, lo0);
      mul_hi_lo(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[0][half]), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[1][half]), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[2][half]), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[3][half]), c3);
  }
}
#else
inline void philox_batch(uint64_t first_block, uint64_t offset, uint64_t seed, uint32_t (&w)[4][kBatch]) {
  for (int l = 0; l < kBatch; ++l) {
    const Philox4 words = philox4x32_10(first_block + static_cast<uint64_t>(l), offset, seed);
    for (int i = 0; i < 4; ++i) w[i][l] = words.v[i];
  }
}
#endif

static_assert(kBatch == kDropoutGroupBlocks, "one philox_batch() call draws one dropout group");
constexpr int64_t kPhiloxGroup = kDropoutGroup;  // elements per philox_batch() call

// keep[i] = scale if flat element e0 + i of the stream (seed, offset) is kept, else 0, for i < n.
template <typename acc_t>
void dropout_scale_range(int64_t e0, int64_t n, uint64_t seed, uint64_t offset, uint32_t threshold, acc_t scale,
                         acc_t* keep) {
  if (n <= 0) return;
  uint32_t words[4][kBatch];
  acc_t group_keep[kPhiloxGroup];
  const int64_t first = e0 / kPhiloxGroup, last = (e0 + n - 1) / kPhiloxGroup;
  for (int64_t group = first; group <= last; ++group) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (group * kPhiloxGroup >= e0 && (group + 1) * kPhiloxGroup <= e0 + n) {  // a whole group
        __m512i w[4];
        philox_group_avx512(static_cast<uint64_t>(group) * kBatch, offset, seed, w);
        const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
        const __m512 s = _mm512_set1_ps(scale);
        float* out = keep + (group * kPhiloxGroup - e0);
        for (int lane = 0; lane < 8; ++lane) _mm512_storeu_ps(out + 16 * lane, _mm512_maskz_mov_ps(keep_mask16(w, lane, thr), s));
        continue;
      }
    }
#endif
    philox_batch(static_cast<uint64_t>(group) * kBatch, offset, seed, words);
    const int64_t g0 = group * kPhiloxGroup;
    const int64_t lo = std::max<int64_t>(g0, e0), hi = std::min<int64_t>(g0 + kPhiloxGroup, e0 + n);
    // element 16·lane + b of the group is 16-bit lane `lane` of block b (see philox.h)
    acc_t* out = (lo == g0 && hi == g0 + kPhiloxGroup) ? keep + (g0 - e0) : group_keep;
    for (int lane = 0; lane < 8; ++lane) {
      const uint32_t* w = words[lane >> 1];
      const int shift = (lane & 1) * 16;
      for (int b = 0; b < kBatch; ++b) {
        out[lane * 16 + b] = ((w[b] >> shift) & 0xFFFFu) >= threshold ? scale : acc_t(0);
      }
    }
    if (out == group_keep) {
      for (int64_t e = lo; e < hi; ++e) keep[e - e0] = group_keep[e - g0];
    }
  }
}

// out[i] = in[i]·scale if flat element e0 + i of the stream (seed, offset) is kept, else 0, for i < n:
// dropout_scale_range() and the product in one pass (float32 whole groups apply the compare masks to
// the loaded input directly; the rest draws the keep values first).
template <typename T, typename acc_t>
void dropout_mul_range(int64_t e0, int64_t n, uint64_t seed, uint64_t offset, uint32_t threshold, acc_t scale,
                       const T* in, acc_t* out) {
  const auto generic = [&](int64_t a, int64_t len) {
    dropout_scale_range(e0 + a, len, seed, offset, threshold, scale, out + a);
    for (int64_t i = a; i < a + len; ++i) out[i] *= static_cast<acc_t>(in[i]);
  };
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
    const int64_t g_first = (e0 + kPhiloxGroup - 1) / kPhiloxGroup, g_end = (e0 + n) / kPhiloxGroup;
    if (g_first < g_end) {
      const int64_t head = g_first * kPhiloxGroup - e0, body_end = g_end * kPhiloxGroup - e0;
      generic(0, head);
      const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
      const __m512 s = _mm512_set1_ps(scale);
      for (int64_t group = g_first; group < g_end; ++group) {
        __m512i w[4];
        philox_group_avx512(static_cast<uint64_t>(group) * kBatch, offset, seed, w);
        const int64_t i0 = group * kPhiloxGroup - e0;
        for (int lane = 0; lane < 8; ++lane) {
          const __m512 v = _mm512_loadu_ps(in + i0 + 16 * lane);
          _mm512_storeu_ps(out + i0 + 16 * lane, _mm512_maskz_mul_ps(keep_mask16(w, lane, thr), v, s));
        }
      }
      generic(body_end, n - body_end);
      return;
    }
  }
#endif
  generic(0, n);
}

// ---- the mask kept as bits from a forward for its backward (layout: dropout_keep_bytes in philox.h) --

// out[i] = in[i]·scale if element e0 + i of the stream is kept, else 0 (as dropout_mul_range()), and the
// kept elements' bits set in `bits` (indexed by the buffer-wide element e0 + i; zeroed by the caller). A
// group wholly inside [e0, e0 + n) has its 16 bytes stored; the bytes of a group the range only meets
// are OR-ed in atomically, since the neighbouring range (another thread's rows) sets bits in them too.
template <typename T, typename acc_t>
void dropout_mul_keep_bits(int64_t e0, int64_t n, uint64_t seed, uint64_t offset, uint32_t threshold, acc_t scale,
                           const T* in, acc_t* out, uint8_t* bits) {
  if (n <= 0) return;
  const int64_t first = e0 / kPhiloxGroup, last = (e0 + n - 1) / kPhiloxGroup;
  for (int64_t group = first; group <= last; ++group) {
    const int64_t g0 = group * kPhiloxGroup;
    const int64_t lo = std::max<int64_t>(g0, e0), hi = std::min<int64_t>(g0 + kPhiloxGroup, e0 + n);
    const bool whole = lo == g0 && hi == g0 + kPhiloxGroup;
    uint8_t* group_bits = bits + g0 / 8;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
      if (whole) {
        __m512i w[4];
        philox_group_avx512(static_cast<uint64_t>(group) * kBatch, offset, seed, w);
        const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
        const __m512 s = _mm512_set1_ps(scale);
        for (int lane = 0; lane < 8; ++lane) {
          const __mmask16 k = keep_mask16(w, lane, thr);
          const __m512 v = _mm512_loadu_ps(in + (g0 - e0) + 16 * lane);
          _mm512_storeu_ps(out + (g0 - e0) + 16 * lane, _mm512_maskz_mul_ps(k, v, s));
          const uint16_t word = static_cast<uint16_t>(k);
          std::memcpy(group_bits + 2 * lane, &word, sizeof(word));
        }
        continue;
      }
    }
#elif defined(__AVX2__)
    if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
      if (whole) {
        // element 16·lane + b is 16-bit lane `lane` of block b: blocks 0-7 and 8-15 of a lane are one
        // vector each, and their 8 keep decisions one byte each
        alignas(32) uint32_t words[4][kBatch];
        philox_batch(static_cast<uint64_t>(group) * kBatch, offset, seed, words);
        // u16 >= threshold as a signed compare u16 > threshold - 1 (both below 2^16)
        const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
        const __m256i low16 = _mm256_set1_epi32(0xFFFF);
        const __m256 s = _mm256_set1_ps(scale);
        for (int lane = 0; lane < 8; ++lane) {
          for (int h = 0; h < 2; ++h) {
            const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(&words[lane >> 1][8 * h]));
            const __m256i u16 = (lane & 1) ? _mm256_srli_epi32(w, 16) : _mm256_and_si256(w, low16);
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(u16, below));
            const int64_t i = (g0 - e0) + 16 * lane + 8 * h;
            _mm256_storeu_ps(out + i, _mm256_and_ps(keep, _mm256_mul_ps(_mm256_loadu_ps(in + i), s)));
            group_bits[2 * lane + h] = static_cast<uint8_t>(_mm256_movemask_ps(keep));
          }
        }
        continue;
      }
    }
#endif
    uint32_t words[4][kBatch];
    philox_batch(static_cast<uint64_t>(group) * kBatch, offset, seed, words);
    uint8_t kept_bits[kPhiloxGroup / 8] = {};
    for (int64_t e = lo; e < hi; ++e) {
      const int i = static_cast<int>(e - g0), lane = i / 16, b = i % 16;
      const bool kept = ((words[lane >> 1][b] >> ((lane & 1) * 16)) & 0xFFFFu) >= threshold;
      out[e - e0] = kept ? static_cast<acc_t>(in[e - e0]) * scale : acc_t(0);
      kept_bits[i >> 3] = static_cast<uint8_t>(kept_bits[i >> 3] | (static_cast<unsigned>(kept) << (i & 7)));
    }
    if (whole) {
      std::memcpy(group_bits, kept_bits, sizeof(kept_bits));
    } else {
      for (int64_t k = (lo - g0) / 8; k <= (hi - 1 - g0) / 8; ++k) {
        if (kept_bits[k] != 0) std::atomic_ref<uint8_t>(group_bits[k]).fetch_or(kept_bits[k], std::memory_order_relaxed);
      }
    }
  }
}

// out[i] = in[i]·scale if bit e0 + i of `bits` is set, else 0, for i < n (out may be in).
template <typename In, typename Out, typename acc_t>
void mul_by_bits(const uint8_t* bits, int64_t e0, int64_t n, acc_t scale, const In* in, Out* out) {
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<In, float> && std::is_same_v<Out, float> && std::is_same_v<acc_t, float>) {
    const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 s = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      const int64_t e = e0 + i;
      uint16_t two;
      std::memcpy(&two, bits + (e >> 3), sizeof(two));  // the byte after the last is padding
      const __m256i b = _mm256_set1_epi32((two >> (e & 7)) & 0xFF);
      const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, select), select));
      _mm256_storeu_ps(out + i, _mm256_and_ps(set, _mm256_mul_ps(_mm256_loadu_ps(in + i), s)));
    }
  }
#endif
  for (; i < n; ++i) {
    const int64_t e = e0 + i;
    out[i] = ((bits[e >> 3] >> (e & 7)) & 1) != 0 ? static_cast<Out>(static_cast<acc_t>(in[i]) * scale) : Out(0);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastpeft::cpu
