// CPU kernels of the LoRA family, compiled once per capability level (see pyfastpeft/cpu_dispatch.h).
//
// The frozen product runs on MKL through ATen. The rank-r products: float32 at the AVX2 and AVX-512
// levels on lora_rank_simd.h's register-blocked kernels (no packing, the mask bits applied where dx is
// stored, and with AVX-512 where dA reads x; the forward from 128 rows on or with dropout); otherwise on
// the BLAS. With dropout, the rank-r work is fused with the mask so that neither the mask nor drop(x) is
// ever written to memory: each block's mask is drawn into a cache-resident buffer and consumed there.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "lora.h"
#include "lora_kernels_cpu.h"
#include "lora_rank_simd.h"
#include "pyfastpeft/dispatch.h"
#include "pyfastpeft/philox_cpu.h"

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
  // mul_row() that also sets the kept elements' bits in `keep` (see cpu::dropout_mul_keep_bits), when
  // `keep` is not nullptr
  template <typename T>
  void mul_row(int64_t e0, int64_t n, const T* in, acc_t* out, uint8_t* keep) const {
    if (keep == nullptr) return mul_row(e0, n, in, out);
    cpu::dropout_mul_keep_bits(e0, n, seed, offset, threshold, scale, in, out, keep);
  }
};

// Kernel buffers without a malloc and a zero fill per call. Up to kKeepBytes a buffer lives in the
// calling thread's slot, kept for the thread's life (std::vector buffers cost a malloc, a zero fill
// and, above glibc's mmap threshold, fresh pages from the kernel on every layer call); a larger one (a
// very wide layer's blocks, many parts' partial sums) is allocated for the call and freed with it, so
// no thread keeps more than kSlotCount · kKeepBytes. A slot holds one buffer per thread at a time; the
// contents are undefined until written. Buffers the calling thread fills before a parallel region (A's
// copy, the partial sums) are read by every thread inside it; the others belong to whichever thread
// runs a part.
enum Slot { kSlotA, kSlotPartial, kSlotBlock, kSlotBuf, kSlotSmall, kSlotU, kSlotPackB, kSlotCount };
inline constexpr size_t kKeepBytes = size_t{1} << 20;

inline void* slot_bytes(Slot slot, size_t bytes) {
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
class Scratch {
 public:
  Scratch(Slot slot, int64_t n) {
    const size_t count = static_cast<size_t>(std::max<int64_t>(n, 0));
    if (count * sizeof(T) <= kKeepBytes) {
      data_ = static_cast<T*>(slot_bytes(slot, count * sizeof(T)));
    } else {
      owned_.reset(new T[count]);  // default-initialized: not zero-filled
      data_ = owned_.get();
    }
  }
  T* get() const { return data_; }

 private:
  std::unique_ptr<T[]> owned_;
  T* data_ = nullptr;
};

// A [r, in] in the accumulation type (a copy into `storage` only when T is a 16-bit type).
template <typename T, typename acc_t>
const acc_t* as_acc(const T* src, int64_t n, Scratch<acc_t>& storage) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    storage = Scratch<acc_t>(kSlotA, n);
    for (int64_t i = 0; i < n; ++i) storage.get()[i] = static_cast<acc_t>(src[i]);
    return storage.get();
  }
}

// Rows per block of the fused dropout kernels: a block's masked input (rows × in, in the accumulation
// type) stays in L2 while MKL multiplies it, so drop(x) never goes to memory. About 128K elements
// (64 to 128 rows): fewer, larger BLAS calls measured faster than 64-row blocks at in = 512 and 1024.
inline int64_t row_block(int64_t in_features) {
  return std::clamp<int64_t>(131072 / std::max<int64_t>(in_features, 1), 64, 128);
}

template <typename acc_t>
at::Tensor wrap(acc_t* data, at::IntArrayRef sizes) {
  return at::from_blob(data, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Splits [0, n_rows) into one contiguous part per thread; fn(part, row_begin, row_end).
template <class F>
void for_each_part(int64_t n_rows, int64_t n_parts, F&& fn) {
  at::parallel_for(0, n_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) fn(part, n_rows * part / n_parts, n_rows * (part + 1) / n_parts);
  });
}

// Row parts of the kernels' parallel regions and of the dA/dB reductions: a function of n_rows only
// (never of the thread count), so the summation order and hence the result are the same however many
// threads run it. A power of two, so that 2, 4, 8... threads share the parts evenly; about 256 rows a
// part, but two parts from 128 rows on, so that two threads share a short batch (a fine-tuning batch
// of 8 × ~50 tokens ran its whole rank-r half on one thread with one part per 256 rows); at most 64.
inline int64_t num_parts(int64_t n_rows) {
  constexpr int64_t kMaxParts = 64, kRowsPerPart = 256;
  if (n_rows < kRowsPerPart / 2) return 1;
  int64_t parts = 2;
  while (parts * 2 <= std::min<int64_t>(kMaxParts, n_rows / kRowsPerPart)) parts *= 2;
  return parts;
}

#if defined(__AVX2__) && defined(__FMA__)
#define PFP_LORA_OWN_RANK_KERNELS 1
// float32 at the AVX2 and AVX-512 levels: the rank-r products on register-blocked kernels
// (lora_rank_simd.h) instead of the BLAS, up to this rank (above it the products are thick enough for
// the BLAS's packing to pay).
inline constexpr int64_t kOwnKernelMaxRank = 64;

// Fewer rows than this, without dropout, and the forward's rank-r products go to the BLAS as well: the
// own kernels pay a fixed cost per call (Aᵀ and Bᵀ packed, out·r gathers) that a few rows do not earn
// back. On a 2-core Xeon at 2 threads, 576 → 1536, the forward's rank-r half took 30 µs on the own
// kernels against 13 µs as two BLAS calls for one token, 96 against 61 µs for 64 rows; from 128 rows on
// the own kernels were as fast or faster. With dropout they stay: they fuse the mask. Generation and
// evaluation run one token or a few rows a call, without dropout. (The backward, which packs nothing at
// ranks that are a multiple of the vector width, measured no better on the BLAS at few rows.)
inline constexpr int64_t kOwnKernelMinRows = 128;

inline bool forward_on_own_kernels(int64_t rank, int64_t n_rows, float p) {
  return rank <= kOwnKernelMaxRank && (p > 0 || n_rows >= kOwnKernelMinRows);
}

void lora_forward_rank_own(const LoraForwardRankParams& p) {
  namespace k = rank_simd;
  const int64_t in = p.in_features, out = p.out_features, rank = p.rank, n_rows = p.n_rows;
  const bool drop = p.p > 0;
  const float* x = static_cast<const float*>(p.x);
  float* xa = static_cast<float*>(p.xa);
  float* y = static_cast<float*>(p.y);
  const float* bias = static_cast<const float*>(p.bias);
  uint8_t* keep = static_cast<uint8_t*>(p.keep);
  // Aᵀ as [in, R] for the shrink and Bᵀ [r, out] for the expand, packed once by the calling thread and
  // read by every part
  const int64_t R = k::padded_rank(rank);
  const Scratch<float> a_pack(kSlotA, in * R), b_pack(kSlotPackB, rank * out);
  k::pack_transposed(static_cast<const float*>(p.A), rank, in, a_pack.get());
  k::transpose_into(static_cast<const float*>(p.B), out, rank, rank, b_pack.get(), out);
  const std::optional<MaskStream<float>> mask =
      drop ? std::optional<MaskStream<float>>(std::in_place, p.rng_state, p.p, p.scale) : std::nullopt;
  for_each_part(n_rows, num_parts(n_rows), [&](int64_t, int64_t row_begin, int64_t row_end) {
    const int64_t part_rows = row_end - row_begin;
    if (drop) {
      // drop(x) block by block into a buffer that stays in L2 while the shrink reads it
      const int64_t block = row_block(in);
      const Scratch<float> xd_buf(kSlotBlock, block * in);
      for (int64_t n0 = row_begin; n0 < row_end; n0 += block) {
        const int64_t rows = std::min<int64_t>(block, row_end - n0);
        mask->mul_row(n0 * in, rows * in, x + n0 * in, xd_buf.get(), keep);
        k::rank_lanes(xd_buf.get(), in, rows, in, a_pack.get(), rank, 1.0f, xa + n0 * rank, rank);
      }
    } else {
      k::rank_lanes(x + row_begin * in, in, part_rows, in, a_pack.get(), rank, 1.0f, xa + row_begin * rank, rank);
    }
    k::wide(xa + row_begin * rank, rank, part_rows, rank, b_pack.get(), out, out, static_cast<float>(p.scaling),
            k::BiasStore{y + row_begin * out, out, bias});
  });
}
#endif

// The forward's rank-r half, one parallel region over parts of rows: xa = drop(x)·Aᵀ (with dropout,
// block by block through a cache-resident masked copy; without, straight from x), then
// y = bias + s·xa·Bᵀ on the part's rows while they are fresh. Each part's products run on one thread:
// MKL spreads a product this thin over threads poorly (a [512, 16]·[16, 1536] product measured 351 µs
// on 2 threads against 416 µs on 1), and one region replaces a shrink region and an expand region.
template <typename T>
void lora_forward_rank_kernel(const LoraForwardRankParams& p) {
#if defined(PFP_LORA_OWN_RANK_KERNELS)
  if constexpr (std::is_same_v<T, float>) {
    if (forward_on_own_kernels(p.rank, p.n_rows, p.p)) return lora_forward_rank_own(p);
  }
#endif
  using acc_t = acc_type<T>;
  const int64_t in = p.in_features, out = p.out_features, rank = p.rank, n_rows = p.n_rows;
  const bool drop = p.p > 0;
  const T* x = static_cast<const T*>(p.x);
  T* xa = static_cast<T*>(p.xa);
  T* y = static_cast<T*>(p.y);
  uint8_t* keep = static_cast<uint8_t*>(p.keep);
  Scratch<acc_t> a_storage(kSlotA, 0);
  const at::Tensor A_acc_t =
      drop ? wrap(const_cast<acc_t*>(as_acc<T, acc_t>(static_cast<const T*>(p.A), rank * in, a_storage)), {rank, in}).t()
           : at::Tensor();
  const at::Tensor A_t = wrap(const_cast<T*>(static_cast<const T*>(p.A)), {rank, in}).t();
  const at::Tensor B_t = wrap(const_cast<T*>(static_cast<const T*>(p.B)), {out, rank}).t();
  const at::Tensor bias = p.bias != nullptr ? wrap(const_cast<T*>(static_cast<const T*>(p.bias)), {out}) : at::Tensor();
  const std::optional<MaskStream<acc_t>> mask =
      drop ? std::optional<MaskStream<acc_t>>(std::in_place, p.rng_state, p.p, p.scale) : std::nullopt;
  for_each_part(n_rows, num_parts(n_rows), [&](int64_t, int64_t row_begin, int64_t row_end) {
    const int64_t part_rows = row_end - row_begin;
    at::Tensor xa_part = wrap(xa + row_begin * rank, {part_rows, rank});
    if (drop) {
      const int64_t block = row_block(in);
      const Scratch<acc_t> xd_buf(kSlotBlock, block * in), out_buf(kSlotSmall, block * rank);
      acc_t* xd = xd_buf.get();
      acc_t* prod = out_buf.get();
      for (int64_t n0 = row_begin; n0 < row_end; n0 += block) {
        const int64_t rows = std::min<int64_t>(block, row_end - n0);
        mask->mul_row(n0 * in, rows * in, x + n0 * in, xd, keep);
        at::Tensor prod_t = wrap(prod, {rows, rank});
        at::mm_out(prod_t, wrap(xd, {rows, in}), A_acc_t);
        for (int64_t i = 0; i < rows * rank; ++i) xa[n0 * rank + i] = static_cast<T>(prod[i]);
      }
    } else {
      at::mm_out(xa_part, wrap(const_cast<T*>(x + row_begin * in), {part_rows, in}), A_t);
    }
    at::Tensor y_part = wrap(y + row_begin * out, {part_rows, out});
    if (bias.defined()) {
      at::addmm_out(y_part, bias, xa_part, B_t, 1, p.scaling);
    } else {
      at::addmm_out(y_part, y_part, xa_part, B_t, 0, p.scaling);  // beta = 0: y's old contents are not read
    }
  });
}

// The parts' partial sums, in the calling thread's scratch: part k's dA [r, in] at dA(k) and its dBᵀ
// [r, out] at dB(k), for the gradients asked for (an unasked one has size 0).
template <typename acc_t>
struct PartSums {
  int64_t n_parts, dA_size, dB_size;
  Scratch<acc_t> buf;
  PartSums(const LoraBackwardRankParams& p, int64_t n_parts_)
      : n_parts(n_parts_),
        dA_size(p.dA != nullptr ? p.rank * p.in_features : 0),
        dB_size(p.dB != nullptr ? p.rank * p.out_features : 0),
        buf(kSlotPartial, n_parts_ * (dA_size + dB_size)) {}
  acc_t* dA(int64_t part) const { return buf.get() + part * dA_size; }
  acc_t* dB(int64_t part) const { return buf.get() + n_parts * dA_size + part * dB_size; }
};

// dA and dB from the parts' partial sums, summed in part order: the same result however many threads
// ran the parts. The sums are added into part 0's buffers (contiguous passes), then dA is copied out and
// dB transposed out. Up to kSerialReduce elements a pass runs on the calling thread (r·in = 9216 at the
// real model's r = 16, in = 576: a few µs, less than waking the other threads for it).
template <typename T, typename acc_t = acc_type<T>>
void reduce_parts(const LoraBackwardRankParams& p, const PartSums<acc_t>& sums) {
  const int64_t n_parts = sums.n_parts, dA_size = sums.dA_size, dB_size = sums.dB_size;
  const int64_t out = p.out_features, rank = p.rank;
  constexpr int64_t kSerialReduce = int64_t{1} << 16;
  // parts 1 .. n - 1 added into part 0, in part order
  const auto sum_into_first = [&](acc_t* first, int64_t size) {
    at::parallel_for(0, size, kSerialReduce, [&](int64_t begin, int64_t end) {
      for (int64_t part = 1; part < n_parts; ++part) {
        const acc_t* other = first + part * size;
        for (int64_t i = begin; i < end; ++i) first[i] += other[i];
      }
    });
  };
  if (p.dA != nullptr) {
    acc_t* sum = sums.dA(0);
    sum_into_first(sum, dA_size);
    T* dA = static_cast<T*>(p.dA);
    for (int64_t i = 0; i < dA_size; ++i) dA[i] = static_cast<T>(sum[i]);
  }
  if (p.dB != nullptr) {
    // dB [out, r] = s·(Σ_parts dBᵀ partial [r, out])ᵀ, written 16 rows of dB at a time (they stay in L1)
    acc_t* sum = sums.dB(0);
    sum_into_first(sum, dB_size);
    T* dB = static_cast<T*>(p.dB);
    const acc_t scaling = static_cast<acc_t>(p.scaling);
    constexpr int64_t kRows = 16;
    for (int64_t o0 = 0; o0 < out; o0 += kRows) {
      const int64_t o1 = std::min(out, o0 + kRows);
      for (int64_t j = 0; j < rank; ++j) {
        for (int64_t o = o0; o < o1; ++o) dB[o * rank + j] = static_cast<T>(scaling * sum[j * out + o]);
      }
    }
  }
}

#if defined(PFP_LORA_OWN_RANK_KERNELS)
// Whether dA's outer product reads x through the mask bits (AVX-512: a masked load, no extra work) or
// from a cache-resident block of drop(x) made first (AVX2, whose lane masks cost several instructions per
// vector: standalone, one thread, 256 rows, r = 16, in = 576, the outer product took 87 µs through the
// bits against 54 µs on a masked copy).
inline constexpr bool kOuterReadsBits = rank_simd::W == 16;

// Rows of a backward chunk: every product of the part runs chunk by chunk, so that the chunk's dy (read by
// dB's outer product, then by u = s·dy·B), its x and its dx stay in L2 together (about 1 MB, in whole
// sweeps of the outer product so that the sums are added in the same order whatever the chunk).
inline int64_t backward_chunk_rows(int64_t in, int64_t out) {
  constexpr int64_t kChunkFloats = int64_t{1} << 18;
  const int64_t rows = kChunkFloats / std::max<int64_t>(2 * in + out, 1);
  return std::clamp<int64_t>(rows / rank_simd::kOuterRows * rank_simd::kOuterRows, rank_simd::kOuterRows, 128);
}

// float32 at the AVX2 and AVX-512 levels: the backward's four rank-r products on lora_rank_simd.h's
// kernels. dx's LoRA term is written with the mask applied as it is stored; dA reads x through the
// forward's bits, or drop(x) from a cache-resident block made from them (kOuterReadsBits). Without the
// forward's bits the mask is drawn again with its bits, as the forward did, and used the same way, so
// the result is the same bit for bit.
void lora_backward_rank_own(const LoraBackwardRankParams& p) {
  namespace k = rank_simd;
  const int64_t in = p.in_features, out = p.out_features, rank = p.rank, n_rows = p.n_rows;
  const bool drop = p.p > 0;
  const float* x = static_cast<const float*>(p.x);
  const float* dy = static_cast<const float*>(p.dy);
  const float* xa = static_cast<const float*>(p.xa);
  const float* A = static_cast<const float*>(p.A);
  float* dx = static_cast<float*>(p.dx);
  const uint8_t* kept = static_cast<const uint8_t*>(p.keep);
  const float scale = drop ? static_cast<float>(p.scale) : 1.0f;
  std::vector<uint8_t> drawn;  // the mask drawn again when the forward's bits are not passed
  const bool redraw = drop && kept == nullptr;
  const std::optional<MaskStream<float>> mask =
      redraw ? std::optional<MaskStream<float>>(std::in_place, p.rng_state, p.p, p.scale) : std::nullopt;
  if (mask) {
    drawn.assign(dropout_keep_bytes(n_rows * in), 0);
    kept = drawn.data();
  }
  // B as [out, R] for u = s·dy·B: B itself when r is a multiple of the vector width, else a zero-padded copy
  const int64_t R = k::padded_rank(rank);
  const Scratch<float> b_pack(kSlotPackB, R == rank ? 0 : out * R);
  const float* B_rows = static_cast<const float*>(p.B);
  if (R != rank) {
    k::pack_rows(B_rows, out, rank, b_pack.get());
    B_rows = b_pack.get();
  }
  const PartSums<float> sums(p, num_parts(n_rows));
  const int64_t chunk = backward_chunk_rows(in, out);
  const bool need_u = dx != nullptr || p.dA != nullptr;
  const bool need_xd = mask || (p.dA != nullptr && !kOuterReadsBits);
  for_each_part(n_rows, sums.n_parts, [&](int64_t part, int64_t row_begin, int64_t row_end) {
    float* dB_part = p.dB != nullptr ? sums.dB(part) : nullptr;
    float* dA_part = p.dA != nullptr ? sums.dA(part) : nullptr;
    if (dB_part != nullptr) std::fill_n(dB_part, sums.dB_size, 0.0f);
    if (dA_part != nullptr) std::fill_n(dA_part, sums.dA_size, 0.0f);
    const Scratch<float> u_buf(kSlotU, need_u ? chunk * rank : 0);
    const Scratch<float> xd_buf(kSlotBuf, drop && need_xd ? chunk * in : 0);
    float* u = u_buf.get();
    for (int64_t n0 = row_begin; n0 < row_end; n0 += chunk) {
      const int64_t rows = std::min<int64_t>(chunk, row_end - n0);
      const float* dy_rows = dy + n0 * out;
      if (dB_part != nullptr) k::outer(xa + n0 * rank, rank, rows, rank, dy_rows, out, out, dB_part, out);
      if (!need_u) continue;
      // the chunk's dy is still in cache from dB's pass
      k::rank_lanes(dy_rows, out, rows, out, B_rows, rank, static_cast<float>(p.scaling), u, rank);
      if (!drop) {
        if (dA_part != nullptr) k::outer(u, rank, rows, rank, x + n0 * in, in, in, dA_part, in);
        if (dx != nullptr) {
          k::wide(u, rank, rows, rank, A, in, in, 1.0f, k::KeepStore{dx + n0 * in, in, nullptr, 0});
        }
        continue;
      }
      if (mask) {  // drop(x) and its bits (bytes a part boundary shares are set atomically)
        mask->mul_row(n0 * in, rows * in, x + n0 * in, xd_buf.get(), const_cast<uint8_t*>(kept));
      } else if (dA_part != nullptr && !kOuterReadsBits) {
        cpu::mul_by_bits(kept, n0 * in, rows * in, scale, x + n0 * in, xd_buf.get());
      }
      if (dA_part != nullptr && kOuterReadsBits) {
        k::outer(u, rank, rows, rank, x + n0 * in, in, in, dA_part, in, scale, k::KeptLoad{kept, n0 * in, in});
      } else if (dA_part != nullptr) {
        k::outer(u, rank, rows, rank, xd_buf.get(), in, in, dA_part, in);
      }
      if (dx != nullptr) {
        k::wide(u, rank, rows, rank, A, in, in, scale, k::KeepStore{dx + n0 * in, in, kept, n0 * in});
      }
    }
  });
  reduce_parts<float>(p, sums);
}
#endif

// The backward's rank-r half, one parallel region over parts of rows. Per part, with u = s·dy·B:
//   dBᵀ partial = xaᵀ·dy                      (float32/float64; the glue computes a 16-bit dB)
//   dx_lora     = mask·scale ⊙ (u·A)          (written to dx, which dy·W is then added to)
//   dA partial  = uᵀ·(mask·scale ⊙ x)
// With dropout, block by block: the mask is drawn once (or taken from the forward's bits), applied to x
// and to u·A, and both products run on cache-resident blocks through the BLAS. dA and dB are reduced
// from the parts' sums in a fixed order (independent of scheduling).
template <typename T>
void lora_backward_rank_kernel(const LoraBackwardRankParams& p) {
#if defined(PFP_LORA_OWN_RANK_KERNELS)
  if constexpr (std::is_same_v<T, float>) {
    if (p.rank <= kOwnKernelMaxRank) return lora_backward_rank_own(p);
  }
#endif
  using acc_t = acc_type<T>;
  const int64_t in = p.in_features, out = p.out_features, rank = p.rank, n_rows = p.n_rows;
  const bool drop = p.p > 0;
  const bool need_u = p.dx != nullptr || p.dA != nullptr;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* xa = static_cast<const T*>(p.xa);
  T* dx = static_cast<T*>(p.dx);
  const uint8_t* kept = static_cast<const uint8_t*>(p.keep);
  const at::Tensor A_T = wrap(const_cast<T*>(static_cast<const T*>(p.A)), {rank, in});
  const at::Tensor B_T = wrap(const_cast<T*>(static_cast<const T*>(p.B)), {out, rank});
  Scratch<acc_t> a_storage(kSlotA, 0);
  const at::Tensor A = drop ? wrap(const_cast<acc_t*>(as_acc<T, acc_t>(static_cast<const T*>(p.A), rank * in, a_storage)),
                                   {rank, in})
                            : at::Tensor();
  const std::optional<MaskStream<acc_t>> mask =
      drop ? std::optional<MaskStream<acc_t>>(std::in_place, p.rng_state, p.p, p.scale) : std::nullopt;
  // summed after the parts; only float32/float64 reach here with a dB (T == acc_t)
  const PartSums<acc_t> sums(p, num_parts(n_rows));
  for_each_part(n_rows, sums.n_parts, [&](int64_t part, int64_t row_begin, int64_t row_end) {
    const int64_t part_rows = row_end - row_begin;
    const at::Tensor dy_part = wrap(const_cast<T*>(dy + row_begin * out), {part_rows, out});
    if constexpr (std::is_same_v<T, acc_t>) {
      if (p.dB != nullptr) {
        at::Tensor dB_part = wrap(sums.dB(part), {rank, out});
        at::mm_out(dB_part, wrap(const_cast<T*>(xa + row_begin * rank), {part_rows, rank}).t(), dy_part);
      }
    }
    if (!need_u) return;
    const Scratch<T> u_buf(kSlotU, part_rows * rank);
    at::Tensor u_part = wrap(u_buf.get(), {part_rows, rank});
    at::addmm_out(u_part, u_part, dy_part, B_T, 0, p.scaling);
    acc_t* partial = p.dA != nullptr ? sums.dA(part) : nullptr;
    const at::Tensor x_part = wrap(const_cast<T*>(x + row_begin * in), {part_rows, in});
    if (!drop) {
      if (p.dA != nullptr) {
        at::Tensor dA_part = wrap(partial, {rank, in});
        if constexpr (std::is_same_v<T, acc_t>) {
          at::mm_out(dA_part, u_part.t(), x_part);
        } else {
          dA_part.copy_(at::mm(u_part.t(), x_part));  // a 16-bit product into the float32 partial
        }
      }
      if (dx != nullptr) {
        at::Tensor dx_part = wrap(dx + row_begin * in, {part_rows, in});
        at::mm_out(dx_part, u_part, A_T);
      }
      return;
    }
    const int64_t block = row_block(in);
    const Scratch<acc_t> ub_buf(kSlotSmall, std::is_same_v<T, acc_t> ? 0 : block * rank);
    const Scratch<acc_t> keep_buf(kSlotBlock, kept != nullptr ? 0 : block * in);
    const Scratch<acc_t> buf_buf(kSlotBuf, block * in);
    acc_t* keep = keep_buf.get();
    acc_t* buf = buf_buf.get();
    at::Tensor dA_part;
    if (partial != nullptr) {
      std::fill_n(partial, rank * in, acc_t(0));
      dA_part = wrap(partial, {rank, in});
    }
    for (int64_t n0 = row_begin; n0 < row_end; n0 += block) {
      const int64_t rows = std::min<int64_t>(block, row_end - n0);
      const T* xb = x + n0 * in;
      T* dxb = dx != nullptr ? dx + n0 * in : nullptr;
      const T* u_rows = u_buf.get() + (n0 - row_begin) * rank;
      const acc_t* ub;
      if constexpr (std::is_same_v<T, acc_t>) {
        ub = u_rows;
      } else {
        for (int64_t i = 0; i < rows * rank; ++i) ub_buf.get()[i] = static_cast<acc_t>(u_rows[i]);
        ub = ub_buf.get();
      }
      const at::Tensor u_blk = wrap(const_cast<acc_t*>(ub), {rows, rank});
      const at::Tensor buf_blk = wrap(buf, {rows, in});
      if (kept != nullptr) {
        // the forward's mask, applied from its bits (no keep values written)
        if (p.dA != nullptr) {
          cpu::mul_by_bits(kept, n0 * in, rows * in, mask->scale, xb, buf);
          dA_part.addmm_(u_blk.t(), buf_blk);
        }
        if (dx != nullptr) {
          at::mm_out(const_cast<at::Tensor&>(buf_blk), u_blk, A);
          cpu::mul_by_bits(kept, n0 * in, rows * in, mask->scale, static_cast<const acc_t*>(buf), dxb);
        }
        continue;
      }
      mask->row(n0 * in, rows * in, keep);
      if (p.dA != nullptr) {
        for (int64_t i = 0; i < rows * in; ++i) buf[i] = static_cast<acc_t>(xb[i]) * keep[i];
        dA_part.addmm_(u_blk.t(), buf_blk);
      }
      if (dx != nullptr) {
        at::mm_out(const_cast<at::Tensor&>(buf_blk), u_blk, A);
        for (int64_t i = 0; i < rows * in; ++i) dxb[i] = static_cast<T>(buf[i] * keep[i]);
      }
    }
  });
  reduce_parts<T>(p, sums);
}

template <typename T>
struct ForwardRank {
  static void run(const LoraForwardRankParams& p) { lora_forward_rank_kernel<T>(p); }
};
template <typename T>
struct BackwardRank {
  static void run(const LoraBackwardRankParams& p) { lora_backward_rank_kernel<T>(p); }
};

}  // namespace

constinit const LoraCpuKernels lora_cpu_kernels{
    &dispatch_dtype<ForwardRank, LoraForwardRankParams>,
    &dispatch_dtype<BackwardRank, LoraBackwardRankParams>,
};

}  // namespace pyfastpeft::CPU_CAPABILITY
