// Register-blocked float32 kernels for the LoRA op's rank-r products (AVX2 + FMA, or AVX-512), included
// by lora_kernels_cpu.cpp. A rank-r product is too thin for a general GEMM: the BLAS packs an operand on
// every call (MKL spent about a third as long packing as multiplying on the real model's layers) and
// runs below its peak in a step's cold caches. These read their operands in place, keep every partial
// sum in registers, and apply the dropout mask bits where they read or write. Three shapes cover the six
// products of a forward and backward (r the rank, K the long dimension):
//   rank_lanes  C [M, r]  = α·X [M, K]·P [K, R]      shrink xa = drop(x)·Aᵀ, and u = s·dy·B
//   wide        C [M, N]  ← α·U [M, r]·Q [r, N]      expand y = b + s·xa·Bᵀ, and dx = keep·scale·(u·A)
//   outer       C [r, N] += α·Uᵀ [r, M]·X [M, N]     dA = uᵀ·drop(x), and dBᵀ = xaᵀ·dy
// P is row-major with R = r rounded up to a whole vector (zero-padded); the ranks sit in the vector lanes.
// The code is written once over a vector type V (8 lanes with AVX2, 16 with AVX-512) and its tile sizes,
// which fill the 16 or 32 vector registers.
#pragma once
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

// Every loop over a tile's rows or vectors is unrolled, so that the accumulators live in registers (GCC
// otherwise keeps a copy of the array on the stack and stores it on every iteration).
#define PFP_UNROLL _Pragma("GCC unroll 16")

namespace pyfastpeft::CPU_CAPABILITY::rank_simd {

// The mask bits' layout (philox.h's dropout_keep_bytes): element e is bit e % 8 of byte e / 8, and the
// buffer has 8 bytes of padding after its last, so the short reads below never leave it.
#if defined(__AVX512F__)
struct V {
  using vec = __m512;
  using lanes = __mmask16;  // which lanes a partial vector covers
  static constexpr int W = 16;
  // tiles: rank_lanes MR rows × up to 2 vectors of ranks; wide MR rows × NV vectors; outer MJ ranks × NV
  static constexpr int kLanesMR = 12, kWideMR = 6, kWideNV = 4, kOuterMJ = 8, kOuterNV = 3;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float a) { return _mm512_set1_ps(a); }
  static vec bcast(const float* p) { return _mm512_set1_ps(*p); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec load(const float* p, lanes m) { return _mm512_maskz_loadu_ps(m, p); }
  // p[l·stride] in lane l, for the lanes in m (others 0); l·stride must fit in an int32
  static vec gather(const float* p, int64_t stride, lanes m) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i index = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(stride)));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, index, p, 4);
  }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, lanes m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  // lanes [0, n) set (none for n <= 0, all for n >= W)
  static lanes below(int64_t n) {
    if (n <= 0) return 0;
    return n >= W ? static_cast<lanes>(0xFFFF) : static_cast<lanes>((1u << static_cast<unsigned>(n)) - 1);
  }
  // v where elements e .. e + W - 1 are kept, else 0
  static vec kept(const uint8_t* bits, int64_t e, vec v) { return _mm512_maskz_mov_ps(keep_mask(bits, e), v); }
  // the W floats at p where elements e .. are kept, else 0 (dropped ones are not read)
  static vec load_kept(const float* p, const uint8_t* bits, int64_t e) {
    return _mm512_maskz_loadu_ps(keep_mask(bits, e), p);
  }
  static lanes keep_mask(const uint8_t* bits, int64_t e) {
    uint32_t four;
    std::memcpy(&four, bits + (e >> 3), sizeof(four));
    return static_cast<lanes>(four >> (e & 7));
  }
};
#else
struct V {
  using vec = __m256;
  using lanes = __m256i;
  static constexpr int W = 8;
  static constexpr int kLanesMR = 6, kWideMR = 6, kWideNV = 2, kOuterMJ = 6, kOuterNV = 2;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float a) { return _mm256_set1_ps(a); }
  static vec bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec load(const float* p, lanes m) { return _mm256_maskload_ps(p, m); }
  static vec gather(const float* p, int64_t stride, lanes m) {
    const __m256i index =
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(stride)));
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, index, _mm256_castsi256_ps(m), 4);
  }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, lanes m, vec v) { _mm256_maskstore_ps(p, m, v); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static lanes below(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static vec kept(const uint8_t* bits, int64_t e, vec v) { return _mm256_and_ps(v, keep_mask(bits, e)); }
  static vec load_kept(const float* p, const uint8_t* bits, int64_t e) { return kept(bits, e, load(p)); }
  static vec keep_mask(const uint8_t* bits, int64_t e) {
    uint16_t two;
    std::memcpy(&two, bits + (e >> 3), sizeof(two));
    const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_set1_epi32((two >> (e & 7)) & 0xFF);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, select), select));
  }
};
#endif
using vec = V::vec;
constexpr int W = V::W;

inline int64_t padded_rank(int64_t r) { return (r + W - 1) / W * W; }

// ---- what every tile does ---------------------------------------------------------------------------------
template <int M, int NV>
inline void zero_tile(vec (&acc)[M][NV]) {
  PFP_UNROLL
  for (int m = 0; m < M; ++m) {
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = V::zero();
  }
}

// acc[m][v] += s[m·stride]·b[v]: one step of a tile's reduction
template <int M, int NV>
inline void rank1_update(vec (&acc)[M][NV], const float* s, int64_t stride, const vec (&b)[NV]) {
  PFP_UNROLL
  for (int m = 0; m < M; ++m) {
    const vec a = V::bcast(s + m * stride);
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = V::fma(a, b[v], acc[m][v]);
  }
}

// the lanes of a strip's NV vectors that lie before column N (the strip starts `left` columns before it)
template <int NV>
inline void strip_lanes(int64_t left, V::lanes (&lanes)[NV]) {
  PFP_UNROLL
  for (int v = 0; v < NV; ++v) lanes[v] = V::below(left - W * v);
}

// ---- rank_lanes: C[i, 0 .. r) = α·Σ_k X[i, k]·P[k, 0 .. r), RV vectors of ranks from column g ----------
template <int MR, int RV>
inline void rank_lanes_tile(const float* X, int64_t ldx, int64_t K, const float* P, int64_t R, int64_t g,
                            float alpha, float* C, int64_t ldc, int64_t r) {
  vec acc[MR][RV];
  zero_tile(acc);
  const float* p = P + g;
  for (int64_t k = 0; k < K; ++k, p += R) {
    vec pv[RV];
    PFP_UNROLL
    for (int v = 0; v < RV; ++v) pv[v] = V::load(p + W * v);
    rank1_update(acc, X + k, ldx, pv);
  }
  const vec a = V::set1(alpha);
  PFP_UNROLL
  for (int v = 0; v < RV; ++v) {
    const int64_t col = g + W * v;
    const bool whole = col + W <= r;
    const V::lanes keep = V::below(r - col);
    PFP_UNROLL
    for (int m = 0; m < MR; ++m) {
      const vec out = V::mul(acc[m][v], a);
      if (whole) {
        V::store(C + m * ldc + col, out);
      } else {
        V::store(C + m * ldc + col, keep, out);
      }
    }
  }
}

template <int MR>
inline void rank_lanes_rows(const float* X, int64_t ldx, int64_t K, const float* P, int64_t R, float alpha, float* C,
                            int64_t ldc, int64_t r) {
  int64_t g = 0;
  for (; g + 2 * W <= R; g += 2 * W) rank_lanes_tile<MR, 2>(X, ldx, K, P, R, g, alpha, C, ldc, r);
  if (g < R) rank_lanes_tile<MR, 1>(X, ldx, K, P, R, g, alpha, C, ldc, r);
}

// C [M, r] (row stride ldc) = α·X [M, K]·P [K, R]; X row stride ldx.
inline void rank_lanes(const float* X, int64_t ldx, int64_t M, int64_t K, const float* P, int64_t r, float alpha,
                       float* C, int64_t ldc) {
  constexpr int MR = V::kLanesMR;
  const int64_t R = padded_rank(r);
  int64_t i = 0;
  for (; i + MR <= M; i += MR) rank_lanes_rows<MR>(X + i * ldx, ldx, K, P, R, alpha, C + i * ldc, ldc, r);
  for (; i + 2 <= M; i += 2) rank_lanes_rows<2>(X + i * ldx, ldx, K, P, R, alpha, C + i * ldc, ldc, r);
  for (; i < M; ++i) rank_lanes_rows<1>(X + i * ldx, ldx, K, P, R, alpha, C + i * ldc, ldc, r);
}

// D [C, ldd] (row-major) with D[c, i] = S[i, c] for i < n and 0 for n <= i < ldd: the transpose of S [n, C]
// (row stride lds), its rows padded. Used for Aᵀ [in, R] and Bᵀ [r, out], a vector of D's row at a time
// from one gather (a scalar loop read S down its columns: ~20 µs a layer call at the real model's shapes).
inline void transpose_into(const float* S, int64_t n, int64_t lds, int64_t C, float* D, int64_t ldd) {
  if (lds * W > INT32_MAX) {  // the gather's indices are int32
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < ldd; ++i) D[c * ldd + i] = i < n ? S[i * lds + c] : 0.0f;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i0 = 0; i0 < ldd; i0 += W) {
      const vec v = V::gather(S + i0 * lds + c, lds, V::below(n - i0));
      if (i0 + W <= ldd) {
        V::store(D + c * ldd + i0, v);
      } else {
        V::store(D + c * ldd + i0, V::below(ldd - i0), v);
      }
    }
  }
}

// P [K, R] from a row-major [r, K] matrix (its transpose, ranks padded with zeros)
inline void pack_transposed(const float* src, int64_t r, int64_t K, float* P) {
  transpose_into(src, r, K, K, P, padded_rank(r));
}

// P [K, R] from a row-major [K, r] matrix (rows padded with zeros)
inline void pack_rows(const float* src, int64_t K, int64_t r, float* P) {
  const int64_t R = padded_rank(r);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < R; ++j) P[k * R + j] = j < r ? src[k * r + j] : 0.0f;
  }
}

// ---- wide: C[i, n] ← α·Σ_j U[i, j]·Q[j, n], written through an epilogue ---------------------------------
// The epilogue gets (row, first column, whether the vector is whole, its lanes, the tile's vector) and
// stores it.
struct BiasStore {  // y = bias + α·acc
  float* y;
  int64_t ldy;
  const float* bias;  // or nullptr
  void operator()(int64_t i, int64_t n, bool whole, V::lanes lanes, vec v) const {
    if (bias != nullptr) v = V::add(v, whole ? V::load(bias + n) : V::load(bias + n, lanes));
    if (whole) {
      V::store(y + i * ldy + n, v);
    } else {
      V::store(y + i * ldy + n, lanes, v);
    }
  }
};

struct KeepStore {  // dx = keep ⊙ α·acc (all kept when bits is nullptr); element (i, n) is bit e0 + i·ld + n
  float* dx;
  int64_t ld;
  const uint8_t* bits;
  int64_t e0;
  void operator()(int64_t i, int64_t n, bool whole, V::lanes lanes, vec v) const {
    if (bits != nullptr) v = V::kept(bits, e0 + i * ld + n, v);
    if (whole) {
      V::store(dx + i * ld + n, v);
    } else {
      V::store(dx + i * ld + n, lanes, v);
    }
  }
};

template <int MR, int NV, class Store>
inline void wide_tile(const float* U, int64_t ldu, int64_t i0, int64_t r, const float* Q, int64_t ldq, int64_t n0,
                      int64_t N, float alpha, const Store& store) {
  vec acc[MR][NV];
  zero_tile(acc);
  const bool whole = n0 + W * NV <= N;
  V::lanes lanes[NV];
  strip_lanes(N - n0, lanes);
  for (int64_t j = 0; j < r; ++j) {
    vec q[NV];
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) {
      const float* q_at = Q + j * ldq + n0 + W * v;
      q[v] = whole ? V::load(q_at) : V::load(q_at, lanes[v]);
    }
    rank1_update(acc, U + i0 * ldu + j, ldu, q);
  }
  const vec a = V::set1(alpha);
  PFP_UNROLL
  for (int m = 0; m < MR; ++m) {
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) {
      if (!whole && n0 + W * v >= N) continue;
      store(i0 + m, n0 + W * v, whole || n0 + W * (v + 1) <= N, lanes[v], V::mul(acc[m][v], a));
    }
  }
}

// Every element of C [M, N] through `store`: U [M, r] (row stride ldu), Q [r, N] (row stride ldq).
// Rows outer, column strips inner: C is written row after row (measured faster than strips outer, which
// wrote each strip down all the rows), and Q (r × N) is read from L2.
template <int MR, class Store>
inline void wide_rows(const float* U, int64_t ldu, int64_t i0, int64_t r, const float* Q, int64_t ldq, int64_t N,
                      float alpha, const Store& store) {
  constexpr int NV = V::kWideNV;
  for (int64_t n0 = 0; n0 < N; n0 += W * NV) wide_tile<MR, NV>(U, ldu, i0, r, Q, ldq, n0, N, alpha, store);
}

template <class Store>
inline void wide(const float* U, int64_t ldu, int64_t M, int64_t r, const float* Q, int64_t ldq, int64_t N,
                 float alpha, const Store& store) {
  constexpr int MR = V::kWideMR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) wide_rows<MR>(U, ldu, i, r, Q, ldq, N, alpha, store);
  for (; i + 2 <= M; i += 2) wide_rows<2>(U, ldu, i, r, Q, ldq, N, alpha, store);
  for (; i < M; ++i) wide_rows<1>(U, ldu, i, r, Q, ldq, N, alpha, store);
}

// ---- outer: C[j, n] += α·Σ_i U[i, j]·X[i, n], X read through a loader -----------------------------------
struct PlainLoad {  // X as it is
  vec operator()(const float* x, int64_t, int64_t) const { return V::load(x); }
  vec operator()(const float* x, int64_t, int64_t, V::lanes lanes) const { return V::load(x, lanes); }
};

struct KeptLoad {  // keep ⊙ X: element (i, n) is bit e0 + i·ld + n
  const uint8_t* bits;
  int64_t e0, ld;
  vec operator()(const float* x, int64_t i, int64_t n) const { return V::load_kept(x, bits, e0 + i * ld + n); }
  vec operator()(const float* x, int64_t i, int64_t n, V::lanes lanes) const {
    return V::kept(bits, e0 + i * ld + n, V::load(x, lanes));
  }
};

// Rows of X that `outer` sweeps across all its column strips before it moves down. X is read row after
// row, and C, which every sweep updates, stays in cache; a strip's first rank tile (Fetch) asks for the
// next sweep's lines of its strip into L2 as it goes. In a training step's backward x and dy are not in
// cache: walking each strip down all the rows instead, as `outer` once did, missed to memory on most
// loads (on a 2-core Xeon, one thread, SmolLM2-135M: the step's outer products took 119 ms a step that
// way, 64 ms this way; at the AVX2 level 102 and 73 ms).
inline constexpr int64_t kOuterRows = 32;

// C[j0 .. j0 + MJ, n0 .. n0 + W·NV) += α·Σ_{i0 <= i < i1} U[i, j]·X[i, n]
template <int MJ, int NV, bool Fetch, class Load>
inline void outer_tile(const float* U, int64_t ldu, int64_t i0, int64_t i1, int64_t j0, const float* X, int64_t ldx,
                       int64_t n0, int64_t N, float alpha, const Load& load, float* C, int64_t ldc) {
  vec acc[MJ][NV];
  zero_tile(acc);
  const bool whole = n0 + W * NV <= N;
  V::lanes lanes[NV];
  strip_lanes(N - n0, lanes);
  const float* x = X + i0 * ldx + n0;
  const float* u = U + i0 * ldu + j0;
  // two loops, so that a whole strip's loads carry no lane masks
  if (whole) {
    for (int64_t i = i0; i < i1; ++i, x += ldx, u += ldu) {
      if constexpr (Fetch) {
        PFP_UNROLL
        for (int v = 0; v < NV; ++v) {
          _mm_prefetch(reinterpret_cast<const char*>(x + kOuterRows * ldx + W * v), _MM_HINT_T1);
        }
      }
      vec xv[NV];
      PFP_UNROLL
      for (int v = 0; v < NV; ++v) xv[v] = load(x + W * v, i, n0 + W * v);
      rank1_update(acc, u, 1, xv);
    }
  } else {
    for (int64_t i = i0; i < i1; ++i, x += ldx, u += ldu) {
      vec xv[NV];
      PFP_UNROLL
      for (int v = 0; v < NV; ++v) xv[v] = load(x + W * v, i, n0 + W * v, lanes[v]);
      rank1_update(acc, u, 1, xv);
    }
  }
  const vec a = V::set1(alpha);
  PFP_UNROLL
  for (int m = 0; m < MJ; ++m) {
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) {
      float* c = C + (j0 + m) * ldc + n0 + W * v;
      if (whole) {
        V::store(c, V::fma(acc[m][v], a, V::load(c)));
      } else if (n0 + W * v < N) {
        V::store(c, lanes[v], V::fma(acc[m][v], a, V::load(c, lanes[v])));
      }
    }
  }
}

// C [r, N] (row stride ldc) += α·Uᵀ·X: U [M, r] (row stride ldu), X [M, N] (row stride ldx) read through
// `load`.
template <class Load = PlainLoad>
inline void outer(const float* U, int64_t ldu, int64_t M, int64_t r, const float* X, int64_t ldx, int64_t N, float* C,
                  int64_t ldc, float alpha = 1.0f, const Load& load = Load{}) {
  constexpr int MJ = V::kOuterMJ, NV = V::kOuterNV;
  for (int64_t i0 = 0; i0 < M; i0 += kOuterRows) {
    const int64_t i1 = std::min(M, i0 + kOuterRows);
    for (int64_t n0 = 0; n0 < N; n0 += W * NV) {
      int64_t j = 0;
      if (j + MJ <= r) {
        outer_tile<MJ, NV, true>(U, ldu, i0, i1, j, X, ldx, n0, N, alpha, load, C, ldc);
        j += MJ;
      }
      for (; j + MJ <= r; j += MJ) outer_tile<MJ, NV, false>(U, ldu, i0, i1, j, X, ldx, n0, N, alpha, load, C, ldc);
      for (; j + 4 <= r; j += 4) outer_tile<4, NV, false>(U, ldu, i0, i1, j, X, ldx, n0, N, alpha, load, C, ldc);
      for (; j < r; ++j) outer_tile<1, NV, false>(U, ldu, i0, i1, j, X, ldx, n0, N, alpha, load, C, ldc);
    }
  }
}

}  // namespace pyfastpeft::CPU_CAPABILITY::rank_simd
#undef PFP_UNROLL
#endif
