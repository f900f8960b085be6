// CPU kernels of the gguf family (formats in gguf.h), compiled once per capability level (see
// pyfastpeft/cpu_dispatch.h).
//
// The weight is never dequantized as a whole. Every kernel decodes blocks into a small per-thread
// buffer of the accumulation type (float, double for float64) and runs register-blocked products over it:
//  - forward y = x·Wᵀ: a thread takes a panel of kPanelRows weight rows, decodes them once
//    (kPanelRows · cols values, a few tens of KB), then sweeps all tokens over the panel in tiles of
//    kTileRows rows × kTileTokens tokens whose dot products stay in registers over the whole of cols. Each
//    block is read once per call; x is re-read from cache once per panel. With at most kTileTokens tokens
//    (generation) each block is decoded into a 32-wide local buffer and used at once instead.
//  - backward dx = dy·W: a thread takes a column block (32 columns), decodes it in chunks of kChunkRows
//    weight rows and accumulates every token's 32 outputs over the chunk, rows in ascending order, so the
//    sums do not depend on the number of threads.
// Sums run in fixed lanes (GCC vector extensions: one AVX2 register, two SSE ones at the baseline); x and
// dy of a 16-bit dtype are converted once to float (activation-sized, never weight-sized).
#include <ATen/Parallel.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gguf.h"
#include "gguf_kernels_cpu_table.h"
#include "pyfastpeft/dispatch.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

constexpr int64_t kPanelRows = 16;
constexpr int kTileRows = 4, kTileTokens = 3;
constexpr int64_t kChunkRows = 256;

// Tasks of at least kTaskWork multiply-adds (or decoded weights), about a millisecond of one core: a
// smaller call (a one-token matrix-vector product of a small model) runs on the calling thread. On a
// loaded 2-core machine a one-token 576 -> 1536 call that woke the pool took milliseconds of wall time
// waiting for the second thread, against about 0.25 ms of work on one.
constexpr int64_t kTaskWork = int64_t{1} << 22;
inline int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_item)); }

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  using type = f32x8;
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  using type = f64x4;
  static constexpr int lanes = 4;
};

template <typename A>
inline typename Vec<A>::type vload(const A* p) {
  typename Vec<A>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename A>
inline void vstore(A* p, typename Vec<A>::type v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename A>
inline A hsum(typename Vec<A>::type v) {
  A s = 0;
  for (int l = 0; l < Vec<A>::lanes; ++l) s += v[l];
  return s;
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// The 32 weights of one block, in the accumulation type (exact products: see gguf.h).
template <typename A>
inline void decode_block(int qtype, const uint8_t* b, A* out) {
  const A d = static_cast<A>(half_at(b));
  if (qtype == kGGUFQ8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<A>(q[j]);
  } else if (qtype == kGGUFQ4_0) {
    const uint8_t* q = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<A>((q[j] & 0x0F) - 8);
      out[j + 16] = d * static_cast<A>((q[j] >> 4) - 8);
    }
  } else {
    const A m = static_cast<A>(half_at(b + 2));
    const uint8_t* q = b + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<A>(q[j] & 0x0F) + m;
      out[j + 16] = d * static_cast<A>(q[j] >> 4) + m;
    }
  }
}

#if defined(__AVX2__)
// float32 blocks in explicit AVX2 (8 weights a step): the same exact products as the loop above.
template <>
inline void decode_block<float>(int qtype, const uint8_t* b, float* out) {
  const __m256 d = _mm256_set1_ps(half_at(b));
  if (qtype == kGGUFQ8_0) {
    for (int j = 0; j < 32; j += 8) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + j));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
    }
    return;
  }
  const bool q4_1 = qtype == kGGUFQ4_1;
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (q4_1 ? 4 : 2)));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(raw, nibble);                      // weights 0..15
  __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);   // weights 16..31
  if (!q4_1) {
    lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
    hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
  }
  const __m256 m = _mm256_set1_ps(q4_1 ? half_at(b + 2) : 0.0f);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i]));
    // d·q is exact, so adding m with or without a fused multiply-add rounds the same (Q4_0 adds nothing,
    // keeping the sign of a zero weight as the scalar loop does)
    const __m256 dq = _mm256_mul_ps(d, q);
    _mm256_storeu_ps(out + 8 * i, q4_1 ? _mm256_add_ps(dq, m) : dq);
  }
}
#endif

// Row r of the weight, decoded into out [cols].
template <typename A>
inline void decode_row(int qtype, const uint8_t* row, int64_t cols, A* out) {
  const int64_t bb = gguf_block_bytes(qtype);
  for (int64_t k = 0; k < cols / kGGUFBlock; ++k) decode_block(qtype, row + k * bb, out + k * kGGUFBlock);
}

// A contiguous [n] array of T as A: the array itself when T is A, else a converted copy in buf.
template <typename T, typename A>
const A* as_acc(const void* data, int64_t n, std::vector<A>& buf) {
  if constexpr (std::is_same_v<T, A>) {
    return static_cast<const A*>(data);
  } else {
    buf.resize(n);
    const T* src = static_cast<const T*>(data);
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) buf[i] = static_cast<A>(src[i]);
    });
    return buf.data();
  }
}

// out[r][t] = Σ_k w[r·K + k] · x[t·K + k] for TR weight rows and TN tokens, K a multiple of 32.
template <int TR, int TN, typename A>
inline void dot_tile(const A* w, const A* x, int64_t K, A (&out)[kTileRows][kTileTokens]) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes;
  V acc[TR][TN];
  for (int r = 0; r < TR; ++r)
    for (int t = 0; t < TN; ++t) acc[r][t] = V{};
  for (int64_t k = 0; k < K; k += L) {
    V xv[TN];
    for (int t = 0; t < TN; ++t) xv[t] = vload(x + t * K + k);
    for (int r = 0; r < TR; ++r) {
      const V wv = vload(w + r * K + k);
      for (int t = 0; t < TN; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < TR; ++r)
    for (int t = 0; t < TN; ++t) out[r][t] = hsum<A>(acc[r][t]);
}

template <int TR, typename A>
inline void dot_tile_tokens(int tn, const A* w, const A* x, int64_t K, A (&out)[kTileRows][kTileTokens]) {
  switch (tn) {
    case 3: return dot_tile<TR, 3>(w, x, K, out);
    case 2: return dot_tile<TR, 2>(w, x, K, out);
    default: return dot_tile<TR, 1>(w, x, K, out);
  }
}

// out[t] = Σ_k W[row, k] · x[t·K + k] for TN ≤ kTileTokens tokens, each block decoded into a local
// 32-wide buffer and used at once (a one-token call reads each block once and writes nothing back).
template <int TN, typename A>
inline void row_dot(int qtype, const uint8_t* row, const A* x, int64_t K, A* out) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes, NV = kGGUFBlock / L;
  const int64_t bb = gguf_block_bytes(qtype);
  V acc[TN][NV];
  for (int t = 0; t < TN; ++t)
    for (int i = 0; i < NV; ++i) acc[t][i] = V{};
  alignas(32) A w[kGGUFBlock];
  for (int64_t k = 0; k < K; k += kGGUFBlock) {
    decode_block(qtype, row + k / kGGUFBlock * bb, w);
    for (int i = 0; i < NV; ++i) {
      const V wv = vload(w + i * L);
      for (int t = 0; t < TN; ++t) acc[t][i] += wv * vload(x + t * K + k + i * L);
    }
  }
  for (int t = 0; t < TN; ++t) {
    V total = acc[t][0];
    for (int i = 1; i < NV; ++i) total += acc[t][i];
    out[t] = hsum<A>(total);
  }
}

template <typename T, typename A>
void linear_few_tokens(const GGUFLinearParams& p, const A* x) {
  const int64_t N = p.tokens, O = p.rows, K = p.cols, rb = K / kGGUFBlock * gguf_block_bytes(p.qtype);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  at::parallel_for(0, O, grain(K * (N + 2)), [&](int64_t ob, int64_t oe) {
    for (int64_t o = ob; o < oe; ++o) {
      A out[kTileTokens];
      const uint8_t* row = p.blocks + o * rb;
      if (N == 3) row_dot<3>(p.qtype, row, x, K, out);
      else if (N == 2) row_dot<2>(p.qtype, row, x, K, out);
      else row_dot<1>(p.qtype, row, x, K, out);
      const A b = bias ? static_cast<A>(bias[o]) : A(0);
      for (int64_t t = 0; t < N; ++t) y[t * O + o] = static_cast<T>(out[t] + b);
    }
  });
}

template <typename T>
void linear_typed(const GGUFLinearParams& p) {
  using A = acc_type<T>;
  const int64_t N = p.tokens, O = p.rows, K = p.cols, rb = K / kGGUFBlock * gguf_block_bytes(p.qtype);
  std::vector<A> xbuf;
  const A* x = as_acc<T, A>(p.x, N * K, xbuf);
  if (N <= kTileTokens) return linear_few_tokens<T, A>(p, x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t panel_rows = kPanelRows;
  const int64_t panels = (O + panel_rows - 1) / panel_rows;
  at::parallel_for(0, panels, grain(panel_rows * K * (N + 2)), [&](int64_t pb, int64_t pe) {
    std::vector<A> w(panel_rows * K);
    for (int64_t panel = pb; panel < pe; ++panel) {
      const int64_t r0 = panel * panel_rows, nr = std::min(panel_rows, O - r0);
      for (int64_t r = 0; r < nr; ++r) decode_row(p.qtype, p.blocks + (r0 + r) * rb, K, w.data() + r * K);
      for (int64_t n0 = 0; n0 < N; n0 += kTileTokens) {
        const int tn = static_cast<int>(std::min<int64_t>(kTileTokens, N - n0));
        for (int64_t r = 0; r < nr; r += kTileRows) {
          const int tr = static_cast<int>(std::min<int64_t>(kTileRows, nr - r));
          A out[kTileRows][kTileTokens];
          if (tr == kTileRows) {
            dot_tile_tokens<kTileRows>(tn, w.data() + r * K, x + n0 * K, K, out);
          } else {
            for (int i = 0; i < tr; ++i) {
              A one[kTileRows][kTileTokens];
              dot_tile_tokens<1>(tn, w.data() + (r + i) * K, x + n0 * K, K, one);
              for (int t = 0; t < tn; ++t) out[i][t] = one[0][t];
            }
          }
          for (int t = 0; t < tn; ++t) {
            T* yrow = y + (n0 + t) * O + r0 + r;
            for (int i = 0; i < tr; ++i) {
              const A b = bias ? static_cast<A>(bias[r0 + r + i]) : A(0);
              yrow[i] = static_cast<T>(out[i][t] + b);
            }
          }
        }
      }
    }
  });
}

// acc[t][0..32) += Σ_{o < n_rows} dy[t·O + o] · wc[o·32 + ..] for TN tokens.
template <int TN, typename A>
inline void axpy_tile(const A* dy, int64_t O, const A* wc, int64_t n_rows, A* acc) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes, NV = kGGUFBlock / L;
  V a[TN][NV];
  for (int t = 0; t < TN; ++t)
    for (int j = 0; j < NV; ++j) a[t][j] = vload(acc + t * kGGUFBlock + j * L);
  for (int64_t o = 0; o < n_rows; ++o) {
    A s[TN];
    for (int t = 0; t < TN; ++t) s[t] = dy[t * O + o];
    for (int j = 0; j < NV; ++j) {
      const V wv = vload(wc + o * kGGUFBlock + j * L);
      for (int t = 0; t < TN; ++t) a[t][j] += s[t] * wv;
    }
  }
  for (int t = 0; t < TN; ++t)
    for (int j = 0; j < NV; ++j) vstore(acc + t * kGGUFBlock + j * L, a[t][j]);
}

template <typename T>
void linear_backward_typed(const GGUFLinearBackwardParams& p) {
  using A = acc_type<T>;
  const int64_t N = p.tokens, O = p.rows, K = p.cols, bb = gguf_block_bytes(p.qtype);
  const int64_t rb = K / kGGUFBlock * bb, nblocks = K / kGGUFBlock;
  std::vector<A> dybuf;
  const A* dy = as_acc<T, A>(p.grad_y, N * O, dybuf);
  T* dx = static_cast<T*>(p.grad_x);
  at::parallel_for(0, nblocks, grain(O * kGGUFBlock * (N + 2)), [&](int64_t cb_begin, int64_t cb_end) {
    std::vector<A> wc(std::min(kChunkRows, O) * kGGUFBlock), acc(N * kGGUFBlock);
    for (int64_t cb = cb_begin; cb < cb_end; ++cb) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t o0 = 0; o0 < O; o0 += kChunkRows) {
        const int64_t no = std::min(kChunkRows, O - o0);
        for (int64_t o = 0; o < no; ++o) decode_block(p.qtype, p.blocks + (o0 + o) * rb + cb * bb, wc.data() + o * 32);
        for (int64_t n0 = 0; n0 < N; n0 += kTileTokens) {
          const int64_t tn = std::min<int64_t>(kTileTokens, N - n0);
          const A* d = dy + n0 * O + o0;
          A* a = acc.data() + n0 * kGGUFBlock;
          if (tn == 3) axpy_tile<3>(d, O, wc.data(), no, a);
          else if (tn == 2) axpy_tile<2>(d, O, wc.data(), no, a);
          else axpy_tile<1>(d, O, wc.data(), no, a);
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        T* out = dx + n * K + cb * kGGUFBlock;
        for (int j = 0; j < kGGUFBlock; ++j) out[j] = static_cast<T>(acc[n * kGGUFBlock + j]);
      }
    }
  });
}

template <typename T>
void rows_typed(const GGUFRowsParams& p) {
  using A = acc_type<T>;
  const int64_t K = p.cols, rb = K / kGGUFBlock * gguf_block_bytes(p.qtype);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.n_ids, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : K);
    for (int64_t i = b; i < e; ++i) {
      const int64_t row = p.ids ? p.ids[i] : i;
      T* dst = out + i * K;
      if constexpr (std::is_same_v<T, A>) {
        decode_row(p.qtype, p.blocks + row * rb, K, dst);
      } else {
        decode_row(p.qtype, p.blocks + row * rb, K, buf.data());
        for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<T>(buf[k]);
      }
    }
  });
}

inline void store_half(uint8_t* p, float v) {
  const uint16_t bits = c10::Half(v).x;
  std::memcpy(p, &bits, 2);
}

template <typename T>
void quantize_typed(const GGUFQuantizeParams& p) {
  const int64_t K = p.cols, bb = gguf_block_bytes(p.qtype), nb = K / kGGUFBlock;
  const T* w = static_cast<const T*>(p.weight);
  at::parallel_for(0, p.rows * nb, 256, [&](int64_t b, int64_t e) {
    float v[kGGUFBlock];
    for (int64_t i = b; i < e; ++i) {
      const T* src = w + i * kGGUFBlock;  // rows are contiguous, so block i starts at element 32·i
      for (int j = 0; j < kGGUFBlock; ++j) v[j] = static_cast<float>(src[j]);
      uint8_t* dst = p.blocks + i * bb;
      float m = 0.0f;
      const int head = p.qtype == kGGUFQ4_1 ? 4 : 2;
      const float d = gguf_quantize_block(p.qtype, v, dst + head, &m);
      store_half(dst, d);
      if (p.qtype == kGGUFQ4_1) store_half(dst + 2, m);
    }
  });
}

template <typename T>
struct LinearKernel {
  static void run(const GGUFLinearParams& p) { linear_typed<T>(p); }
};
template <typename T>
struct BackwardKernel {
  static void run(const GGUFLinearBackwardParams& p) { linear_backward_typed<T>(p); }
};
template <typename T>
struct RowsKernel {
  static void run(const GGUFRowsParams& p) { rows_typed<T>(p); }
};
template <typename T>
struct QuantizeKernel {
  static void run(const GGUFQuantizeParams& p) { quantize_typed<T>(p); }
};

}  // namespace

constinit const GGUFCpuKernels gguf_cpu_kernels{
    &dispatch_dtype<LinearKernel, GGUFLinearParams>,
    &dispatch_dtype<BackwardKernel, GGUFLinearBackwardParams>,
    &dispatch_dtype<RowsKernel, GGUFRowsParams>,
    &dispatch_dtype<QuantizeKernel, GGUFQuantizeParams>,
};

}  // namespace pyfastpeft::CPU_CAPABILITY
