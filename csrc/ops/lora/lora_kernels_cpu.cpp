// CPU kernels of the LoRA family, compiled once per capability level (see pyfastpeft/cpu_dispatch.h).
//
// The frozen product runs on MKL through ATen; the rank-r products (shrink x·Aᵀ and dy·B, expand xa·Bᵀ
// and u·A, and the weight gradients' outer products) run in pyfastpeft/rank_r_cpu.h's register tiles,
// where the BLAS ran well below its rate on these thin shapes. With dropout, the rank-r work is fused with the mask so that neither the
// mask nor drop(x) is ever written to memory: each block's mask is drawn into a cache-resident buffer
// and consumed there; in the float32 backward (AVX-512) the mask is applied as bits by masked loads and
// stores inside our own rank-r kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "lora.h"
#include "lora_kernels_cpu.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/philox_cpu.h"
#include "pyfastpeft/rank_r_cpu.h"

namespace pyfastpeft::CPU_CAPABILITY {
namespace {

using cpu::dropout_scale_range;
using cpu::kPhiloxGroup;

template <typename acc_t>
struct MaskStream {
  uint64_t seed, offset;
  uint32_t threshold;
  acc_t scale;
  MaskStream(const int64_t* rng_state, float p, double scale_)
      : seed(static_cast<uint64_t>(rng_state[0])),
        offset(static_cast<uint64_t>(rng_state[1])),
        threshold(dropout_threshold(p)),
        scale(static_cast<acc_t>(scale_)) {}
  void row(int64_t e0, int64_t n, acc_t* keep) const { dropout_scale_range(e0, n, seed, offset, threshold, scale, keep); }
  // out = in ⊙ mask·scale over the same elements
  template <typename T>
  void mul_row(int64_t e0, int64_t n, const T* in, acc_t* out) const {
    cpu::dropout_mul_range(e0, n, seed, offset, threshold, scale, in, out);
  }
#if defined(__AVX512F__)
  // the mask of [e0, e0 + n) as bits (see cpu::dropout_keep_bits); `bits` is resized to fit
  void bits(int64_t e0, int64_t n, std::vector<uint16_t>& out, const void* ahead = nullptr,
            int64_t ahead_bytes = 0) const {
    out.resize(cpu::keep_bits_words(e0, n));
    cpu::dropout_keep_bits(e0, n, seed, offset, threshold, out.data(), ahead, ahead_bytes);
  }
#endif
};

// Per-thread scratch for the kernels' buffers: each slot grows to its largest request and is kept for
// the thread's life, so a layer call neither allocates nor zero-fills anything. (std::vector buffers
// cost a malloc, a zero fill and, above glibc's mmap threshold, fresh pages from the kernel on every
// call: about 4 % of a LoRA training step's CPU samples on SmolLM2-135M went to memset, malloc and the
// kernel's page clearing.) A slot holds one buffer per thread at a time; its contents are undefined
// until written. Slots the calling thread fills before a parallel region (A, Aᵀ, the partial sums) are
// read by every thread inside it; the others belong to whichever thread runs a part.
enum Slot { kSlotA, kSlotAt, kSlotPartial, kSlotRows, kSlotBlock, kSlotBuf, kSlotSmall, kSlotCount };

inline void* scratch_bytes(Slot slot, size_t bytes) {
  struct Buffer {
    std::unique_ptr<unsigned char[]> data;
    size_t bytes = 0;
  };
  thread_local Buffer buffers[kSlotCount];
  Buffer& b = buffers[slot];
  const size_t need = bytes + 63;
  if (b.bytes < need) {
    b.data.reset(new unsigned char[need]);
    b.bytes = need;
  }
  return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(b.data.get()) + 63) & ~uintptr_t{63});
}

template <typename T>
T* scratch(Slot slot, int64_t n) {
  return static_cast<T*>(scratch_bytes(slot, static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(T)));
}

// A [r, in] in the accumulation type (a copy, in the calling thread's kSlotA, only when T is a 16-bit type).
template <typename T, typename acc_t>
const acc_t* as_acc(const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    acc_t* out = scratch<acc_t>(kSlotA, n);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(src[i]);
    return out;
  }
}

// Rows per block of the fused dropout kernels: a block's masked input (rows × in, in the accumulation
// type) stays in L2 while MKL multiplies it, so drop(x) never goes to memory. About 128K elements
// (64 to 128 rows): fewer, larger BLAS calls measured faster than 64-row blocks at in = 512 and 1024.
inline int64_t row_block(int64_t in_features) {
  return std::clamp<int64_t>(131072 / std::max<int64_t>(in_features, 1), 64, 128);
}

// Splits [0, n_rows) into one contiguous part per thread; fn(part, row_begin, row_end).
template <class F>
void for_each_part(int64_t n_rows, int64_t n_parts, F&& fn) {
  at::parallel_for(0, n_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) fn(part, n_rows * part / n_parts, n_rows * (part + 1) / n_parts);
  });
}

// Row parts of the dA reduction: a function of n_rows only (never of the thread count), so the
// summation order and hence the result are the same however many threads run it.
inline int64_t num_parts(int64_t n_rows) {
  constexpr int64_t kMaxParts = 64, kMinRowsPerPart = 256;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxParts, n_rows / kMinRowsPerPart));
}

// Whether this level runs the rank-r products in our register tiles. The baseline (SSE2) has no fused
// multiply-add, so each of a tile's multiply-adds rounds twice: measured about twice the BLAS's error
// (MKL picks FMA kernels at run time whatever our level), more than the tests allow against PEFT's
// float32 outputs. The baseline keeps the BLAS; AVX2 and AVX-512 run the tiles.
#if defined(CPU_CAPABILITY_DEFAULT)
inline constexpr bool kTiles = false;
#else
inline constexpr bool kTiles = true;
#endif

template <typename acc_t>
at::Tensor wrap(const acc_t* data, at::IntArrayRef sizes) {
  return at::from_blob(const_cast<acc_t*>(data), sizes,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// The dropout kernels' per-block rank-r products, on `rows` contiguous rows (`row_list`: 0 .. rows - 1):
//   out [rows, r] = src [rows, in]·Aᵀ       (At: A packed by rank_r::pack_At, used by the tiles)
template <typename acc_t>
void block_shrink(const acc_t* src, int64_t rows, int64_t in, const acc_t* A, const acc_t* At, int64_t rank,
                  const int64_t* row_list, acc_t* out) {
  if constexpr (kTiles) {
    rank_r::shrink<acc_t>(src, in, row_list, rows, At, in, out, rank, acc_t(1));
  } else {
    at::Tensor out_t = wrap(out, {rows, rank});
    at::mm_out(out_t, wrap(src, {rows, in}), wrap(A, {rank, in}).t());
  }
}
//   out [rows, in] = u [rows, r]·A
template <typename acc_t>
void block_expand(const acc_t* u, int64_t rows, int64_t rank, const acc_t* A, int64_t in, const int64_t* row_list,
                  acc_t* out) {
  if constexpr (kTiles) {
    rank_r::expand<acc_t>(u, rank, row_list, rows, A, in, nullptr, acc_t(1), out, false);
  } else {
    at::Tensor out_t = wrap(out, {rows, in});
    at::mm_out(out_t, wrap(u, {rows, rank}), wrap(A, {rank, in}));
  }
}
//   acc [r, in] += uᵀ·buf
template <typename acc_t>
void block_outer_add(const acc_t* u, int64_t rows, int64_t rank, const acc_t* buf, int64_t in, acc_t* acc) {
  if constexpr (kTiles) {
    rank_r::outer<acc_t>(u, rank, buf, in, rows, 0, in, acc_t(1), acc, in, true);
  } else {
    wrap(acc, {rank, in}).addmm_(wrap(u, {rows, rank}).t(), wrap(buf, {rows, in}));
  }
}

// 0, 1, ..., n - 1 (in the calling thread's kSlotRows): the row list of rank_r's kernels over a block.
inline const int64_t* iota(int64_t n) {
  int64_t* rows = scratch<int64_t>(kSlotRows, n);
  std::iota(rows, rows + n, int64_t{0});
  return rows;
}

// xa = drop(x)·Aᵀ (p = 0: x·Aᵀ): each block of rows is masked (or converted to the accumulation type)
// into a cache-resident buffer and multiplied there by the packed Aᵀ in register tiles.
template <typename T>
void lora_shrink_kernel(const LoraShrinkParams& p) {
  using acc_t = acc_type<T>;
  const int64_t in = p.in_features, rank = p.rank, n_rows = p.n_rows;
  const bool drop = p.p > 0;
  constexpr bool kSameType = std::is_same_v<T, acc_t>;
  TORCH_CHECK(drop || kSameType, "lora shrink: a 16-bit type without dropout goes to the BLAS");
  constexpr int64_t kNoState[2] = {0, 0};
  const MaskStream<acc_t> mask(drop ? p.rng_state : kNoState, p.p, p.scale);
  const acc_t* A = as_acc<T, acc_t>(static_cast<const T*>(p.A), rank * in);
  acc_t* At = kTiles ? scratch<acc_t>(kSlotAt, in * rank_r::padded_rank<acc_t>(rank)) : nullptr;
  if (kTiles) rank_r::pack_At(A, rank, in, At);
  const int64_t block = row_block(in);
  const int64_t* rows_of_block = iota(block);
  const T* x = static_cast<const T*>(p.x);
  T* xa = static_cast<T*>(p.xa);
  for_each_part(n_rows, num_parts(n_rows), [&](int64_t, int64_t row_begin, int64_t row_end) {
    acc_t* xd = drop ? scratch<acc_t>(kSlotBlock, block * in) : nullptr;
    acc_t* out = std::is_same_v<T, acc_t> ? nullptr : scratch<acc_t>(kSlotSmall, block * rank);
    for (int64_t n0 = row_begin; n0 < row_end; n0 += block) {
      const int64_t rows = std::min<int64_t>(block, row_end - n0);
      const acc_t* src;
      if (drop) {
        mask.mul_row(n0 * in, rows * in, x + n0 * in, xd);
        src = xd;
      } else {
        src = reinterpret_cast<const acc_t*>(x + n0 * in);  // T == acc_t (checked above)
      }
      if constexpr (std::is_same_v<T, acc_t>) {
        block_shrink(src, rows, in, A, At, rank, rows_of_block, xa + n0 * rank);
      } else {
        block_shrink(src, rows, in, A, At, rank, rows_of_block, out);
        for (int64_t i = 0; i < rows * rank; ++i) xa[n0 * rank + i] = static_cast<T>(out[i]);
      }
    }
  });
}

// y = (accumulate ? y : bias) + s·u·V over row chunks, one register-tiled pass per chunk.
template <typename T>
void lora_expand_kernel(const LoraExpandParams& p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const T* u = static_cast<const T*>(p.u);
    const T* V = static_cast<const T*>(p.V);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    // chunks of at least 16K outputs (and whole tiles), so a thread's start-up is paid on real work
    const int64_t grain = std::max<int64_t>(rank_r::kExpandRows, 16384 / std::max<int64_t>(p.cols, 1));
    at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> rows(end - begin);
      std::iota(rows.begin(), rows.end(), begin);
      rank_r::expand<T>(u, p.rank, rows.data(), end - begin, V, p.cols, bias, static_cast<T>(p.scale), y,
                        p.accumulate);
    });
  } else {
    TORCH_CHECK(false, "lora expand: float32 and float64 only (the 16-bit types go to the BLAS)");
  }
}

template <typename T>
constexpr bool kTiled = std::is_same_v<T, float> || std::is_same_v<T, double>;

// C = s·Uᵀ·X: each thread takes whole strips of columns (every column's sum over rows is the same
// however the columns are split); transposed output through a [rank, cols] buffer.
template <typename T>
void lora_outer_kernel(const LoraOuterParams& p) {
  if constexpr (kTiled<T>) {
    const T* U = static_cast<const T*>(p.U);
    const T* X = static_cast<const T*>(p.X);
    T* C = p.transposed ? scratch<T>(kSlotBuf, p.rank * p.cols) : static_cast<T*>(p.C);
    const int64_t strip = rank_r::kOuterVecs * rank_r::Pack<T>::lanes;
    const int64_t n_strips = (p.cols + strip - 1) / strip;
    at::parallel_for(0, n_strips, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.n_rows * strip, 1)),
                     [&](int64_t begin, int64_t end) {
                       rank_r::outer<T>(U, p.rank, X, p.cols, p.n_rows, begin * strip,
                                        std::min(end * strip, p.cols), static_cast<T>(p.scale), C, p.cols);
                     });
    if (p.transposed) rank_r::transpose<T>(C, p.rank, p.cols, static_cast<T*>(p.C), p.rank);
  } else {
    TORCH_CHECK(false, "lora outer: float32 and float64 only (the 16-bit types go to the BLAS)");
  }
}

// y = s·x·M, M [cols, r] read as the shrink's packed Aᵀ (copied with zero padding unless r is a whole
// number of 64-byte packs).
template <typename T>
void lora_project_kernel(const LoraProjectParams& p) {
  if constexpr (kTiled<T>) {
    const int64_t rp = rank_r::padded_rank<T>(p.rank);
    const T* M = static_cast<const T*>(p.M);
    if (rp != p.rank) {
      T* padded = scratch<T>(kSlotAt, p.cols * rp);
      for (int64_t c = 0; c < p.cols; ++c) {
        std::copy_n(M + c * p.rank, p.rank, padded + c * rp);
        std::fill_n(padded + c * rp + p.rank, rp - p.rank, T(0));
      }
      M = padded;
    }
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const int64_t grain = std::max<int64_t>(rank_r::kShrinkRows, 16384 / std::max<int64_t>(p.cols, 1));
    at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> rows(end - begin);
      std::iota(rows.begin(), rows.end(), begin);
      rank_r::shrink<T>(x, p.cols, rows.data(), end - begin, M, p.cols, y, p.rank, static_cast<T>(p.scale));
    });
  } else {
    TORCH_CHECK(false, "lora project: float32 and float64 only (the 16-bit types go to the BLAS)");
  }
}

#if defined(__AVX512F__)
// float32 with AVX-512: the backward's two mask uses folded into register-blocked rank-r kernels, which
// read the mask as bits through masked loads and stores, so neither drop(x) nor u·A is written out.
// Element (i, c) of a block of rows of width `in` is bit bit0 + i·in + c of `bits`.
namespace masked {

inline __mmask16 tail_mask(int64_t width) {
  return width >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
}

// acc[j, c0 + 16v ..] += scale·Σ_i u[i, j0 + m]·keep(i, c)·x[i, c] for MJ ranks and NV packs of columns
// (the last pack restricted to the columns set in `last`).
template <int MJ, int NV>
inline void outer_tile(const float* u, int64_t rank, int64_t j0, const uint16_t* bits, int64_t bit0, const float* x,
                       int64_t in, int64_t c0, int64_t rows, __mmask16 last, float scale, float* acc) {
  __m512 sum[MJ][NV];
  for (int m = 0; m < MJ; ++m) {
    for (int v = 0; v < NV; ++v) sum[m][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < rows; ++i) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) {
      const int64_t c = c0 + 16 * v;
      const __mmask16 k = cpu::keep_bits_at(bits, bit0 + i * in + c) & (v == NV - 1 ? last : 0xFFFF);
      b[v] = _mm512_maskz_loadu_ps(k, x + i * in + c);
    }
    for (int m = 0; m < MJ; ++m) {
      const __m512 a = _mm512_set1_ps(u[i * rank + j0 + m]);
      for (int v = 0; v < NV; ++v) sum[m][v] = _mm512_fmadd_ps(a, b[v], sum[m][v]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int m = 0; m < MJ; ++m) {
    for (int v = 0; v < NV; ++v) {
      float* p = acc + (j0 + m) * in + c0 + 16 * v;
      const __mmask16 k = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      _mm512_mask_storeu_ps(p, k, _mm512_fmadd_ps(sum[m][v], s, _mm512_maskz_loadu_ps(k, p)));
    }
  }
}

template <int NV>
inline void outer_columns(const float* u, int64_t rank, const uint16_t* bits, int64_t bit0, const float* x, int64_t in,
                          int64_t c0, int64_t rows, __mmask16 last, float scale, float* acc) {
  int64_t j = 0;
  for (; j + 8 <= rank; j += 8) outer_tile<8, NV>(u, rank, j, bits, bit0, x, in, c0, rows, last, scale, acc);
  for (; j + 4 <= rank; j += 4) outer_tile<4, NV>(u, rank, j, bits, bit0, x, in, c0, rows, last, scale, acc);
  for (; j < rank; ++j) outer_tile<1, NV>(u, rank, j, bits, bit0, x, in, c0, rows, last, scale, acc);
}

// acc [rank, in] += scale·uᵀ·(keep ⊙ x) over a block of rows: u [rows, rank], x [rows, in].
inline void outer(const float* u, int64_t rank, const uint16_t* bits, int64_t bit0, const float* x, int64_t in,
                  int64_t rows, float scale, float* acc) {
  int64_t c = 0;
  for (; c + 32 <= in; c += 32) outer_columns<2>(u, rank, bits, bit0, x, in, c, rows, 0xFFFF, scale, acc);
  for (; c < in; c += 16) outer_columns<1>(u, rank, bits, bit0, x, in, c, rows, tail_mask(in - c), scale, acc);
}

// dx[i0 + i, c0 + 16v ..] = scale·keep·Σ_j u[i0 + i, j]·A[j, c] for MR rows and NV packs of columns.
template <int MR, int NV>
inline void expand_tile(const float* u, int64_t rank, int64_t i0, const float* A, const uint16_t* bits, int64_t bit0,
                        int64_t in, int64_t c0, __mmask16 last, float scale, float* dx) {
  __m512 sum[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) sum[i][v] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < rank; ++j) {
    __m512 a[NV];
    for (int v = 0; v < NV; ++v) {
      a[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF), A + j * in + c0 + 16 * v);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 w = _mm512_set1_ps(u[(i0 + i) * rank + j]);
      for (int v = 0; v < NV; ++v) sum[i][v] = _mm512_fmadd_ps(w, a[v], sum[i][v]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      const int64_t at = (i0 + i) * in + c0 + 16 * v;
      const __mmask16 k = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      _mm512_mask_storeu_ps(dx + at, k, _mm512_maskz_mul_ps(cpu::keep_bits_at(bits, bit0 + at), sum[i][v], s));
    }
  }
}

template <int MR>
inline void expand_rows(const float* u, int64_t rank, int64_t i0, const float* A, const uint16_t* bits, int64_t bit0,
                        int64_t in, float scale, float* dx) {
  int64_t c = 0;
  for (; c + 32 <= in; c += 32) expand_tile<MR, 2>(u, rank, i0, A, bits, bit0, in, c, 0xFFFF, scale, dx);
  for (; c < in; c += 16) expand_tile<MR, 1>(u, rank, i0, A, bits, bit0, in, c, tail_mask(in - c), scale, dx);
}

// dx [rows, in] = scale·keep ⊙ (u·A) over a block of rows (every element written, dropped ones as 0).
inline void expand(const float* u, int64_t rank, const float* A, const uint16_t* bits, int64_t bit0, int64_t in,
                   int64_t rows, float scale, float* dx) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) expand_rows<8>(u, rank, i, A, bits, bit0, in, scale, dx);
  for (; i < rows; ++i) expand_rows<1>(u, rank, i, A, bits, bit0, in, scale, dx);
}

}  // namespace masked
#endif

// Whether the dropout backward keeps a block's mask as bits (AVX-512, float32) or as float keep values.
template <typename T>
#if defined(__AVX512F__)
constexpr bool kMaskBits = std::is_same_v<T, float>;
#else
constexpr bool kMaskBits = false;
#endif

// With u = s·dy·B [N, r]:
//   dx_lora = mask·scale ⊙ (u·A)        (written to dx, which dy·W is then added to)
//   dA      = uᵀ·(mask·scale ⊙ x)
// Block by block: the mask is drawn once, both products run on cache-resident blocks, and dA is
// reduced from per-thread partial sums in a fixed order (independent of scheduling). float32 with
// AVX-512 draws the mask as bits and applies it inside register-blocked kernels (masked:: above);
// the other types draw float keep values and apply them to x and to u·A around the rank-r kernels.
template <typename T>
void lora_dropout_backward_kernel(const LoraDropoutBackwardParams& p) {
  using acc_t = acc_type<T>;
  const int64_t in = p.in_features, rank = p.rank, n_rows = p.n_rows;
  const MaskStream<acc_t> mask(p.rng_state, p.p, p.scale);
  const acc_t* A = as_acc<T, acc_t>(static_cast<const T*>(p.A), rank * in);
  const T* x = static_cast<const T*>(p.x);
  const T* u = static_cast<const T*>(p.u);
  T* dx = static_cast<T*>(p.dx);
  const int64_t n_parts = num_parts(n_rows);
  const int64_t* rows_of_block = iota(row_block(in));
  // part k's partial dA at partials + k·r·in, in the calling thread's scratch (summed after the parts)
  acc_t* partials = p.dA != nullptr ? scratch<acc_t>(kSlotPartial, n_parts * rank * in) : nullptr;
  for_each_part(n_rows, n_parts, [&](int64_t part, int64_t row_begin, int64_t row_end) {
    const int64_t block = row_block(in);
    acc_t* ub = scratch<acc_t>(kSlotSmall, block * rank);
    acc_t* keep = kMaskBits<T> ? nullptr : scratch<acc_t>(kSlotBlock, block * in);
    acc_t* buf = kMaskBits<T> ? nullptr : scratch<acc_t>(kSlotBuf, block * in);
    std::vector<uint16_t> bits;
    acc_t* partial = p.dA != nullptr ? partials + part * rank * in : nullptr;
    if (partial != nullptr) std::fill_n(partial, rank * in, acc_t(0));
    for (int64_t n0 = row_begin; n0 < row_end; n0 += block) {
      const int64_t rows = std::min<int64_t>(block, row_end - n0);
      const T* xb = x + n0 * in;
      T* dxb = dx != nullptr ? dx + n0 * in : nullptr;
      for (int64_t i = 0; i < rows * rank; ++i) ub[i] = static_cast<acc_t>(u[n0 * rank + i]);
#if defined(__AVX512F__)
      if constexpr (kMaskBits<T>) {
        // float32: the mask drawn once as bits and applied inside the rank-r kernels
        const int64_t bit0 = n0 * in - cpu::keep_bits_first(n0 * in);
        // x's block is fetched into L2 while the mask is drawn: the outer product below walks it in column
        // strips, an access pattern the hardware prefetcher does not follow (measured: dA's pass over a cold
        // x 1.5x faster at in = 512 and 1376).
        const int64_t block_bytes = rows * in * static_cast<int64_t>(sizeof(float));
        mask.bits(n0 * in, rows * in, bits, p.dA != nullptr ? xb : nullptr, block_bytes);
        if (p.dA != nullptr) {
          masked::outer(ub, rank, bits.data(), bit0, xb, in, rows, mask.scale, partial);
        }
        if (dx != nullptr) {
          masked::expand(ub, rank, A, bits.data(), bit0, in, rows, mask.scale, dxb);
        }
        continue;
      }
#endif
      mask.row(n0 * in, rows * in, keep);
      if (p.dA != nullptr) {
        for (int64_t i = 0; i < rows * in; ++i) buf[i] = static_cast<acc_t>(xb[i]) * keep[i];
        block_outer_add(ub, rows, rank, buf, in, partial);
      }
      if (dx != nullptr) {
        block_expand(ub, rows, rank, A, in, rows_of_block, buf);
        for (int64_t i = 0; i < rows * in; ++i) dxb[i] = static_cast<T>(buf[i] * keep[i]);
      }
    }
  });
  if (p.dA != nullptr) {
    T* dA = static_cast<T*>(p.dA);
    at::parallel_for(0, rank * in, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t s = 0;
        for (int64_t part = 0; part < n_parts; ++part) s += partials[part * rank * in + i];
        dA[i] = static_cast<T>(s);
      }
    });
  }
}

template <typename T>
struct Shrink {
  static void run(const LoraShrinkParams& p) { lora_shrink_kernel<T>(p); }
};
template <typename T>
struct Expand {
  static void run(const LoraExpandParams& p) { lora_expand_kernel<T>(p); }
};
template <typename T>
struct Outer {
  static void run(const LoraOuterParams& p) { lora_outer_kernel<T>(p); }
};
template <typename T>
struct Project {
  static void run(const LoraProjectParams& p) { lora_project_kernel<T>(p); }
};
template <typename T>
struct DropoutBackward {
  static void run(const LoraDropoutBackwardParams& p) { lora_dropout_backward_kernel<T>(p); }
};

}  // namespace

constinit const LoraCpuKernels lora_cpu_kernels{
    kTiles,
    &dispatch_dtype<Shrink, LoraShrinkParams>,
    &dispatch_dtype<Expand, LoraExpandParams>,
    &dispatch_dtype<Outer, LoraOuterParams>,
    &dispatch_dtype<Project, LoraProjectParams>,
    &dispatch_dtype<DropoutBackward, LoraDropoutBackwardParams>,
};

}  // namespace pyfastpeft::CPU_CAPABILITY
