// Register-blocked CPU kernels for rank-r products (float, double), used by the multi-adapter op.
//
// Rows are picked by an index list (an adapter's tokens in token order or sorted by adapter), so
// nothing is gathered or scattered:
//   shrink  xa[n, j] = s · Σ_c x[n, c] · At[c, j]                  At [in, r]: A [r, in] transposed (pack_At)
//   expand  y[n, o]  = (y or b)[o] + s · Σ_j xa[n, j] · Bt[j, o]  Bt [r, out]: B [out, r] transposed
// Each keeps a tile of accumulators in registers over the whole reduction and broadcasts the scalar
// operand against 64-byte packs of the other, so every pack is loaded once per tile. The packed copies
// cost r·in or r·out element moves per adapter (none when the caller stores them so). Rank-r products
// through the BLAS run well below its square-GEMM rate and each call pays the dispatcher and a few
// tensor views; with 32 adapters of 64 tokens those were most of the overhead.
// Written on GCC/Clang vector extensions (64-byte packs: one AVX-512 register, two AVX2 ones).
#pragma once
#ifndef CPU_CAPABILITY
#error "kernel header: include it only from a *_kernels_cpu.cpp, which is compiled once per CPU level"
#endif
#include <cstdint>
#include <cstring>

namespace pyfastpeft::rank_r {
inline namespace CPU_CAPABILITY {  // one copy per CPU level (pyfastpeft/cpu_dispatch.h)

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));

template <typename T>
struct Pack;
template <>
struct Pack<float> {
  using type = f32x16;
  static constexpr int64_t lanes = 16;
  // Sum of the lanes as halving adds (one extract + add per level, not 15 serial scalar adds).
  static float sum(f32x16 v) {
    f32x8 a, b;
    std::memcpy(&a, &v, 32);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
    a += b;
    f32x4 c, d;
    std::memcpy(&c, &a, 16);
    std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
  }
};
template <>
struct Pack<double> {
  using type = f64x8;
  static constexpr int64_t lanes = 8;
  static double sum(f64x8 v) {
    f64x4 a, b;
    std::memcpy(&a, &v, 32);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
    a += b;
    f64x2 c, d;
    std::memcpy(&c, &a, 16);
    std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
    c += d;
    return c[0] + c[1];
  }
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
inline int64_t padded_rank(int64_t rank) {
  constexpr int64_t W = Pack<T>::lanes;
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
  int64_t i = 0;
  for (; i + 8 <= n_rows; i += 8) {  // 8 accumulators: 8 rows × one pack, or 4 rows × two packs
    int64_t j = 0;
    for (; j + 2 * W <= rp; j += 2 * W) {
      shrink_block<T, 4, 2>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
      shrink_block<T, 4, 2>(x, ldx, rows + i + 4, At, rp, j, cols, xa, rank, scale);
    }
    if (j < rp) shrink_block<T, 8, 1>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
  }
  for (; i < n_rows; ++i) {
    for (int64_t j = 0; j < rp; j += W) shrink_block<T, 1, 1>(x, ldx, rows + i, At, rp, j, cols, xa, rank, scale);
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
  int64_t o = 0;
  for (; o + 2 * W <= out_cols; o += 2 * W) {
    expand_block<T, MR, 2>(xa, rank, rows, Bt, out_cols, o, bias, s, accumulate, y);
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
  // 8 rows × 2 packs: 16 accumulators, each Bᵀ pack loaded once per 8 rows.
  int64_t i = 0;
  for (; i + 8 <= n_rows; i += 8) expand_rows<T, 8>(xa, rank, rows + i, Bt, out_cols, bias, s, accumulate, y);
  for (; i < n_rows; ++i) expand_rows<T, 1>(xa, rank, rows + i, Bt, out_cols, bias, s, accumulate, y);
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastpeft::rank_r
