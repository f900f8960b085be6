// Register-blocked float32 kernels for the LoRA op's rank-r products (AVX2 + FMA), included by
// lora_kernels_cpu.cpp. A rank-r product is too thin for a general GEMM: the BLAS packs an operand on
// every call (MKL spent about a third as long packing as multiplying on the real model's layers) and
// runs below its peak in a step's cold caches. These read their operands in place, keep every partial
// sum in registers, and apply the dropout mask bits where they write. Three shapes cover the six
// products of a forward and backward (r the rank, K the long dimension):
//   rank_lanes  C [M, r]  = α·X [M, K]·P [K, R]      shrink xa = drop(x)·Aᵀ, and u = s·dy·B
//   wide        C [M, N]  ← α·U [M, r]·Q [r, N]      expand y = b + s·xa·Bᵀ, and dx = keep·scale·(u·A)
//   outer       C [r, N] += Uᵀ [r, M]·X [M, N]       dA = uᵀ·drop(x), and dBᵀ = xaᵀ·dy
// P is row-major with R = r rounded up to 8 columns (zero-padded); the ranks sit in the vector lanes.
#pragma once
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

// Every loop over a tile's rows or vectors is unrolled, so that the accumulators live in registers (GCC
// otherwise keeps a copy of the array on the stack and stores it on every iteration).
#define PFP_UNROLL _Pragma("GCC unroll 16")

namespace pyfastpeft::CPU_CAPABILITY::rank_avx2 {

// lanes [0, n) set, n in [0, 8]
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// the keep bits of elements e .. e + 7 as a lane mask (bit e at byte e / 8, bit e % 8; the buffer has
// padding after its last byte, so the two-byte read never leaves it)
inline __m256 keep_lanes(const uint8_t* bits, int64_t e) {
  uint16_t two;
  std::memcpy(&two, bits + (e >> 3), sizeof(two));
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32((two >> (e & 7)) & 0xFF);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, select), select));
}

inline int64_t padded_rank(int64_t r) { return (r + 7) / 8 * 8; }

// ---- rank_lanes: C[i, 0 .. r) = α·Σ_k X[i, k]·P[k, 0 .. r), RV vectors of ranks from column g ----------
template <int MR, int RV>
inline void rank_lanes_tile(const float* X, int64_t ldx, int64_t K, const float* P, int64_t R, int64_t g,
                            float alpha, float* C, int64_t ldc, int64_t r) {
  __m256 acc[MR][RV];
  PFP_UNROLL
  for (int m = 0; m < MR; ++m) {
    PFP_UNROLL
    for (int v = 0; v < RV; ++v) acc[m][v] = _mm256_setzero_ps();
  }
  const float* p = P + g;
  for (int64_t k = 0; k < K; ++k, p += R) {
    __m256 pv[RV];
    PFP_UNROLL
    for (int v = 0; v < RV; ++v) pv[v] = _mm256_loadu_ps(p + 8 * v);
    PFP_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(X + m * ldx + k);
      PFP_UNROLL
      for (int v = 0; v < RV; ++v) acc[m][v] = _mm256_fmadd_ps(xv, pv[v], acc[m][v]);
    }
  }
  const __m256 a = _mm256_set1_ps(alpha);
  PFP_UNROLL
  for (int v = 0; v < RV; ++v) {
    const int64_t col = g + 8 * v;
    const bool whole = col + 8 <= r;
    const __m256i keep = lanes_below(r - col);
    PFP_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m256 out = _mm256_mul_ps(acc[m][v], a);
      if (whole) {
        _mm256_storeu_ps(C + m * ldc + col, out);
      } else {
        _mm256_maskstore_ps(C + m * ldc + col, keep, out);
      }
    }
  }
}

template <int MR>
inline void rank_lanes_rows(const float* X, int64_t ldx, int64_t K, const float* P, int64_t R, float alpha, float* C,
                            int64_t ldc, int64_t r) {
  int64_t g = 0;
  for (; g + 16 <= R; g += 16) rank_lanes_tile<MR, 2>(X, ldx, K, P, R, g, alpha, C, ldc, r);
  if (g < R) rank_lanes_tile<MR, 1>(X, ldx, K, P, R, g, alpha, C, ldc, r);
}

// C [M, r] (row stride ldc) = α·X [M, K]·P [K, R]; X row stride ldx.
inline void rank_lanes(const float* X, int64_t ldx, int64_t M, int64_t K, const float* P, int64_t r, float alpha,
                       float* C, int64_t ldc) {
  const int64_t R = padded_rank(r);
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) rank_lanes_rows<6>(X + i * ldx, ldx, K, P, R, alpha, C + i * ldc, ldc, r);
  for (; i + 2 <= M; i += 2) rank_lanes_rows<2>(X + i * ldx, ldx, K, P, R, alpha, C + i * ldc, ldc, r);
  for (; i < M; ++i) rank_lanes_rows<1>(X + i * ldx, ldx, K, P, R, alpha, C + i * ldc, ldc, r);
}

// P [K, R] from a row-major [r, K] matrix (its transpose, ranks padded with zeros)
inline void pack_transposed(const float* src, int64_t r, int64_t K, float* P) {
  const int64_t R = padded_rank(r);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < R; ++j) P[k * R + j] = j < r ? src[j * K + k] : 0.0f;
  }
}

// P [K, R] from a row-major [K, r] matrix (rows padded with zeros)
inline void pack_rows(const float* src, int64_t K, int64_t r, float* P) {
  const int64_t R = padded_rank(r);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < R; ++j) P[k * R + j] = j < r ? src[k * r + j] : 0.0f;
  }
}

// ---- wide: C[i, n] ← α·Σ_j U[i, j]·Q[j, n], written through an epilogue ---------------------------------
// The epilogue gets (row, first column, lane mask or all lanes, the tile's vector) and stores it.
struct BiasStore {  // y = bias + α·acc
  float* y;
  int64_t ldy;
  const float* bias;  // or nullptr
  void operator()(int64_t i, int64_t n, bool whole, __m256i lanes, __m256 v) const {
    if (bias != nullptr) {
      v = _mm256_add_ps(v, whole ? _mm256_loadu_ps(bias + n) : _mm256_maskload_ps(bias + n, lanes));
    }
    if (whole) {
      _mm256_storeu_ps(y + i * ldy + n, v);
    } else {
      _mm256_maskstore_ps(y + i * ldy + n, lanes, v);
    }
  }
};

struct KeepStore {  // dx = keep ⊙ α·acc (all kept when bits is nullptr); element (i, n) is bit e0 + i·ld + n
  float* dx;
  int64_t ld;
  const uint8_t* bits;
  int64_t e0;
  void operator()(int64_t i, int64_t n, bool whole, __m256i lanes, __m256 v) const {
    if (bits != nullptr) v = _mm256_and_ps(v, keep_lanes(bits, e0 + i * ld + n));
    if (whole) {
      _mm256_storeu_ps(dx + i * ld + n, v);
    } else {
      _mm256_maskstore_ps(dx + i * ld + n, lanes, v);
    }
  }
};

template <int MR, int NV, class Store>
inline void wide_tile(const float* U, int64_t ldu, int64_t i0, int64_t r, const float* Q, int64_t ldq, int64_t n0,
                      int64_t N, float alpha, const Store& store) {
  __m256 acc[MR][NV];
  PFP_UNROLL
  for (int m = 0; m < MR; ++m) {
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  }
  const bool whole = n0 + 8 * NV <= N;
  __m256i lanes[NV];
  PFP_UNROLL
  for (int v = 0; v < NV; ++v) lanes[v] = lanes_below(N - n0 - 8 * v);
  for (int64_t j = 0; j < r; ++j) {
    __m256 q[NV];
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) {
      q[v] = whole ? _mm256_loadu_ps(Q + j * ldq + n0 + 8 * v) : _mm256_maskload_ps(Q + j * ldq + n0 + 8 * v, lanes[v]);
    }
    PFP_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m256 u = _mm256_broadcast_ss(U + (i0 + m) * ldu + j);
      PFP_UNROLL
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(u, q[v], acc[m][v]);
    }
  }
  const __m256 a = _mm256_set1_ps(alpha);
  PFP_UNROLL
  for (int m = 0; m < MR; ++m) {
    PFP_UNROLL
    for (int v = 0; v < NV; ++v) {
      if (!whole && n0 + 8 * v >= N) continue;
      store(i0 + m, n0 + 8 * v, whole || n0 + 8 * v + 8 <= N, lanes[v], _mm256_mul_ps(acc[m][v], a));
    }
  }
}

// Every element of C [M, N] through `store`: U [M, r] (row stride ldu), Q [r, N] (row stride ldq).
// Rows outer, column strips of 16 inner: C is written row after row (measured faster than strips
// outer, which wrote each strip down all the rows), and Q (r × N) is read from L2.
template <int MR, class Store>
inline void wide_rows(const float* U, int64_t ldu, int64_t i0, int64_t r, const float* Q, int64_t ldq, int64_t N,
                      float alpha, const Store& store) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) wide_tile<MR, 2>(U, ldu, i0, r, Q, ldq, n0, N, alpha, store);
}

template <class Store>
inline void wide(const float* U, int64_t ldu, int64_t M, int64_t r, const float* Q, int64_t ldq, int64_t N,
                 float alpha, const Store& store) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) wide_rows<6>(U, ldu, i, r, Q, ldq, N, alpha, store);
  for (; i + 2 <= M; i += 2) wide_rows<2>(U, ldu, i, r, Q, ldq, N, alpha, store);
  for (; i < M; ++i) wide_rows<1>(U, ldu, i, r, Q, ldq, N, alpha, store);
}

// ---- outer: C[j, n] += Σ_i U[i, j]·X[i, n] -----------------------------------------------------------------
template <int MJ>
inline void outer_tile(const float* U, int64_t ldu, int64_t M, int64_t j0, const float* X, int64_t ldx, int64_t n0,
                       int64_t N, float* C, int64_t ldc) {
  __m256 acc[MJ][2];
  PFP_UNROLL
  for (int m = 0; m < MJ; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const bool whole = n0 + 16 <= N;
  const __m256i lanes0 = lanes_below(N - n0), lanes1 = lanes_below(N - n0 - 8);
  const float* x = X + n0;
  const float* u = U + j0;
  if (whole) {
    for (int64_t i = 0; i < M; ++i, x += ldx, u += ldu) {
      const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
      PFP_UNROLL
      for (int m = 0; m < MJ; ++m) {
        const __m256 w = _mm256_broadcast_ss(u + m);
        acc[m][0] = _mm256_fmadd_ps(w, x0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w, x1, acc[m][1]);
      }
    }
  } else {
    for (int64_t i = 0; i < M; ++i, x += ldx, u += ldu) {
      const __m256 x0 = _mm256_maskload_ps(x, lanes0), x1 = _mm256_maskload_ps(x + 8, lanes1);
      PFP_UNROLL
      for (int m = 0; m < MJ; ++m) {
        const __m256 w = _mm256_broadcast_ss(u + m);
        acc[m][0] = _mm256_fmadd_ps(w, x0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w, x1, acc[m][1]);
      }
    }
  }
  PFP_UNROLL
  for (int m = 0; m < MJ; ++m) {
    float* c = C + (j0 + m) * ldc + n0;
    if (whole) {
      _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), acc[m][0]));
      _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), acc[m][1]));
    } else {
      _mm256_maskstore_ps(c, lanes0, _mm256_add_ps(_mm256_maskload_ps(c, lanes0), acc[m][0]));
      _mm256_maskstore_ps(c + 8, lanes1, _mm256_add_ps(_mm256_maskload_ps(c + 8, lanes1), acc[m][1]));
    }
  }
}

// C [r, N] (row stride ldc) += Uᵀ·X: U [M, r] (row stride ldu), X [M, N] (row stride ldx). Column strips
// of 16 outer: a strip of X (M × 16) is read from memory once and from L1 by the strip's other rank tiles.
inline void outer(const float* U, int64_t ldu, int64_t M, int64_t r, const float* X, int64_t ldx, int64_t N, float* C,
                  int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    int64_t j = 0;
    for (; j + 6 <= r; j += 6) outer_tile<6>(U, ldu, M, j, X, ldx, n0, N, C, ldc);
    for (; j + 4 <= r; j += 4) outer_tile<4>(U, ldu, M, j, X, ldx, n0, N, C, ldc);
    for (; j < r; ++j) outer_tile<1>(U, ldu, M, j, X, ldx, n0, N, C, ldc);
  }
}

}  // namespace pyfastpeft::CPU_CAPABILITY::rank_avx2
#undef PFP_UNROLL
#endif
