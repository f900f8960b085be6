// Register-blocked CPU kernels for rank-r products (float, double), used by the multi-adapter op.
//
// Rows are picked by an index list (an adapter's tokens in token order or sorted by adapter), so
// nothing is gathered or scattered:
//   shrink  xa[n, j] = s · Σ_c x[n, c] · At[c, j]                  At [in, r]: A [r, in] transposed (pack_At)
//   expand  y[n, o]  = (y or b)[o] + s · Σ_j xa[n, j] · Bt[j, o]  Bt [r, out]: B [out, r] transposed
// Each keeps a tile of accumulators in registers over the whole reduction and broadcasts the scalar
// operand against vectors of the other, so every vector is loaded once per tile. The packed copies
// cost r·in or r·out element moves per adapter (none when the caller stores them so). Rank-r products
// through the BLAS run well below its square-GEMM rate and each call pays the dispatcher and a few
// tensor views; with 32 adapters of 64 tokens those were most of the overhead.
// Written on GCC/Clang vector extensions of the level's register width (one AVX-512, AVX2 or SSE2
// register per vector: a wider vector type than the hardware's is lowered through memory, which ran the
// AVX2 copy at 8 GFLOPS). The tile sizes follow the level's register file: a tile's accumulators plus
// the loaded vectors and the broadcast must fit in it. The packed Aᵀ rounds the rank up to 64 bytes,
// a whole number of vectors at every level.
#pragma once
#ifndef CPU_CAPABILITY
#error "kernel header: include it only from a *_kernels_cpu.cpp, which is compiled once per CPU level"
#endif
#include <cstdint>
#include <cstring>

namespace pyfastpeft::rank_r {
inline namespace CPU_CAPABILITY {  // one copy per CPU level (pyfastpeft/cpu_dispatch.h)

// Vector width, and register tiles: expand kExpandRows rows × kExpandVecs vectors of outputs, shrink
// kShrinkRows rows × kShrinkVecs vectors of ranks (AVX-512 runs 4 rows × 2 vectors, then 8 × 1).
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr int kVecBytes = 64, kExpandRows = 8, kExpandVecs = 2, kShrinkRows = 8, kShrinkVecs = 1;
#elif defined(CPU_CAPABILITY_AVX2)
inline constexpr int kVecBytes = 32, kExpandRows = 6, kExpandVecs = 2, kShrinkRows = 6, kShrinkVecs = 2;
#else
inline constexpr int kVecBytes = 16, kExpandRows = 3, kExpandVecs = 4, kShrinkRows = 3, kShrinkVecs = 4;
#endif

template <typename T>
struct Pack {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t lanes = kVecBytes / sizeof(T);
};

template <typename T>
inline typename Pack<T>::type load(const T* p) {
  typename Pack<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, typename Pack<T>::type v) {
  std::memcpy(p, &v, sizeof v);
}

// dst[c, j] = src[j, c] for src [rows, cols] (row-major), dst with row stride ld_dst ≥ rows. Tiles of
// 16×16 go through a local tile, which the compiler turns into register shuffles (measured about 3×
// faster than a strided loop).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  constexpr int t = 16;
  int64_t r0 = 0;
  for (; r0 + t <= rows; r0 += t) {
    int64_t c0 = 0;
    for (; c0 + t <= cols; c0 += t) {
      T tile[t][t];
      for (int i = 0; i < t; ++i) {
        for (int j = 0; j < t; ++j) tile[j][i] = src[(r0 + i) * cols + c0 + j];
      }
      for (int j = 0; j < t; ++j) {
        for (int i = 0; i < t; ++i) dst[(c0 + j) * ld_dst + r0 + i] = tile[j][i];
      }
    }
    for (; c0 < cols; ++c0) {
      for (int i = 0; i < t; ++i) dst[c0 * ld_dst + r0 + i] = src[(r0 + i) * cols + c0];
    }
  }
  for (; r0 < rows; ++r0) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r0] = src[r0 * cols + c];
  }
}

// Columns of the packed Aᵀ: the rank rounded up to whole packs.
template <typename T>
constexpr int64_t padded_rank(int64_t rank) {
  constexpr int64_t W = 64 / sizeof(T);
  return (rank + W - 1) / W * W;
}

// At [cols, padded_rank] = Aᵀ for one adapter's A [rank, cols], the padding columns zero.
template <typename T>
void pack_At(const T* A, int64_t rank, int64_t cols, T* At) {
  const int64_t rp = padded_rank<T>(rank);
  transpose(A, rank, cols, At, rp);
  if (rp > rank) {
    for (int64_t c = 0; c < cols; ++c) std::memset(At + c * rp + rank, 0, (rp - rank) * sizeof(T));
  }
}

// xa[rows[i], j0 ..] = Σ_c x[rows[i], c] · At[c, j0 ..] for MR rows and NV packs of ranks: the MR·NV
// accumulators stay in registers and each Aᵀ pack is loaded once per MR rows.
template <typename T, int MR, int NV>
inline void shrink_block(const T* x, int64_t ldx, const int64_t* rows, const T* At, int64_t rp, int64_t j0,
                         int64_t cols, T* xa, int64_t rank, T scale) {
  using V = typename Pack<T>::type;
  constexpr int64_t W = Pack<T>::lanes;
  const T* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + rows[i] * ldx;
  V acc[MR][NV] = {};
  for (int64_t c = 0; c < cols; ++c) {
    V av[NV];
    for (int v = 0; v < NV; ++v) av[v] = load(At + c * rp + j0 + v * W);
    for (int i = 0; i < MR; ++i) {
      const T xv = xr[i][c];
      for (int v = 0; v < NV; ++v) acc[i][v] += xv * av[v];
    }
  }
  const int64_t width = rank - j0 < NV * W ? rank - j0 : NV * W;  // the padding is not written
  for (int i = 0; i < MR; ++i) {
    T lanes[NV * W];
    for (int v = 0; v < NV; ++v) acc[i][v] *= scale;
    std::memcpy(lanes, acc[i], sizeof lanes);
    std::memcpy(xa + rows[i] * rank + j0, lanes, width * sizeof(T));
  }
}

// xa[n, :] = scale·x[n, :]·Aᵀ for the listed rows (At: pack_At's [cols, padded_rank(rank)]; any
// [cols, padded_rank] matrix, such as an adapter's B [out, r] when r is a whole number of packs).
template <typename T>
void shrink(const T* x, int64_t ldx, const int64_t* rows, int64_t n_rows, const T* At, int64_t cols, T* xa,
            int64_t rank, T scale = T(1)) {
  constexpr int64_t W = Pack<T>::lanes;
  const int64_t rp = padded_rank<T>(rank);
  constexpr int MR = kShrinkRows, NV = kShrinkVecs;
  int64_t i = 0;
  for (; i + MR <= n_rows; i += MR) {
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; j + 2 * W <= rp; j += 2 * W) {
      shrink_block<T, MR / 2, 2>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
      shrink_block<T, MR / 2, 2>(x, ldx, rows + i + MR / 2, At, rp, j, cols, xa, rank, scale);
    }
#endif
    for (; j + NV * W <= rp; j += NV * W) shrink_block<T, MR, NV>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
    for (; j < rank; j += W) shrink_block<T, MR, 1>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
  }
  for (; i < n_rows; ++i) {
    for (int64_t j = 0; j < rank; j += W) shrink_block<T, 1, 1>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
  }
}

// y[rows[i], o0 + v·W ..] = (y or b) + s·Σ_j xa[rows[i], j]·Bt[j, ..] for MR rows and NV packs of outputs.
template <typename T, int MR, int NV>
inline void expand_block(const T* xa, int64_t rank, const int64_t* rows, const T* Bt, int64_t out_cols, int64_t o0,
                         const T* bias, T s, bool accumulate, T* y) {
  using V = typename Pack<T>::type;
  constexpr int64_t W = Pack<T>::lanes;
  V acc[MR][NV] = {};
  for (int64_t j = 0; j < rank; ++j) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(Bt + j * out_cols + o0 + v * W);
    for (int i = 0; i < MR; ++i) {
      const T a = xa[rows[i] * rank + j];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * bv[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    const V bb = bias ? load(bias + o0 + v * W) : V{};
    for (int i = 0; i < MR; ++i) {
      T* out = y + rows[i] * out_cols + o0 + v * W;
      store(out, (accumulate ? load(out) : bb) + s * acc[i][v]);
    }
  }
}

template <typename T, int MR>
inline void expand_rows(const T* xa, int64_t rank, const int64_t* rows, const T* Bt, int64_t out_cols, const T* bias,
                        T s, bool accumulate, T* y) {
  constexpr int64_t W = Pack<T>::lanes;
  constexpr int NV = kExpandVecs;
  int64_t o = 0;
  for (; o + NV * W <= out_cols; o += NV * W) {
    expand_block<T, MR, NV>(xa, rank, rows, Bt, out_cols, o, bias, s, accumulate, y);
  }
  for (; o + W <= out_cols; o += W) expand_block<T, MR, 1>(xa, rank, rows, Bt, out_cols, o, bias, s, accumulate, y);
  for (; o < out_cols; ++o) {
    for (int i = 0; i < MR; ++i) {
      T total = 0;
      for (int64_t j = 0; j < rank; ++j) total += xa[rows[i] * rank + j] * Bt[j * out_cols + o];
      T& out = y[rows[i] * out_cols + o];
      out = (accumulate ? out : bias ? bias[o] : T(0)) + s * total;
    }
  }
}

// y[n, :] = (accumulate ? y[n, :] : b) + s·xa[n, :]·Bᵀ for the listed rows (Bt: [rank, out_cols], such
// as a transposed B, or an adapter's A [r, in] as it is; bias may be null).
template <typename T>
void expand(const T* xa, int64_t rank, const int64_t* rows, int64_t n_rows, const T* Bt, int64_t out_cols,
            const T* bias, T s, T* y, bool accumulate = false) {
  // kExpandRows rows × kExpandVecs vectors of accumulators, each Bᵀ vector loaded once per tile of rows.
  constexpr int MR = kExpandRows;
  int64_t i = 0;
  for (; i + MR <= n_rows; i += MR) expand_rows<T, MR>(xa, rank, rows + i, Bt, out_cols, bias, s, accumulate, y);
  for (; i < n_rows; ++i) expand_rows<T, 1>(xa, rank, rows + i, Bt, out_cols, bias, s, accumulate, y);
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastpeft::rank_r
