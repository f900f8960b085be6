// CPU implementation of the multi-adapter LoRA linear (semantics in multi_lora.h).
//
// Tokens are grouped by adapter on the host (the CPU is the host: no synchronisation to avoid).
// float32/float64 forward: a stable counting sort lists each adapter's token rows, and the rank-r
// shrink and expand run over those rows in register-blocked kernels (pyfastpeft/rank_r_cpu.h, compiled once per CPU capability level and
// called through multi_lora_cpu_kernels()) that
// read x and write y in place, so neither runs nor scattered tokens are gathered, and no BLAS call or
// tensor view is made per adapter. The frozen product x·Wᵀ is one BLAS call over all tokens,
// accumulated into y after the expand.
// The backward, and the 16-bit forward (whose rank-r path runs in float32), work on row blocks:
//   - when tokens come in long runs of one adapter (one adapter per sequence, the usual case), each
//     run is a block of rows as it is;
//   - otherwise a stable counting sort gathers the rows into adapter order once and scatters the
//     results back once.
// The per-adapter weight gradients are BLAS products over each block; in float32/float64, u = s·dy·B
// and dx's LoRA part go through the register-blocked kernels too.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "multi_lora.h"
#include "multi_lora_impl.h"
#include "multi_lora_kernels_cpu.h"
#include "pyfastpeft/dropout.h"

namespace pyfastpeft {
namespace {

using multi_lora::acc_scalar_type;
using multi_lora::Shapes;

// A block of consecutive rows (in token order, or in sorted order when gathered) sharing one adapter.
struct Segment {
  int64_t begin, end, adapter;
};

struct Grouping {
  std::vector<Segment> segments;
  at::Tensor perm;     // sorted position → token; undefined when the segments are runs in token order
  at::Tensor inverse;  // token → sorted position

  at::Tensor rows(const at::Tensor& t) const { return perm.defined() ? t.index_select(0, perm) : t; }
  at::Tensor unrows(const at::Tensor& t) const { return perm.defined() ? t.index_select(0, inverse) : t; }
};

// Below this average run length, one gather + one scatter costs less than many small BLAS calls.
constexpr int64_t kMinAverageRun = 32;

template <typename index_t>
Grouping group_tokens_typed(const index_t* idx, int64_t n, int64_t num_adapters) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    TORCH_CHECK_VALUE(k >= -1 && k < num_adapters, "adapter_indices: index ", k, " at token ", i,
                      " is out of range for ", num_adapters, " adapters (expected -1 for no adapter, or 0..",
                      num_adapters - 1, ")");
  }
  Grouping g;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && idx[j] == idx[i]) ++j;
    g.segments.push_back({i, j, static_cast<int64_t>(idx[i])});
    i = j;
  }
  if (static_cast<int64_t>(g.segments.size()) * kMinAverageRun <= n) return g;

  // Stable counting sort; bucket 0 holds the tokens with no adapter.
  std::vector<int64_t> start(num_adapters + 2, 0);
  for (int64_t i = 0; i < n; ++i) ++start[idx[i] + 2];
  for (int64_t b = 1; b < num_adapters + 2; ++b) start[b] += start[b - 1];
  g.perm = at::empty({n}, at::kLong);
  g.inverse = at::empty({n}, at::kLong);
  int64_t* perm = g.perm.mutable_data_ptr<int64_t>();
  int64_t* inverse = g.inverse.mutable_data_ptr<int64_t>();
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = cursor[idx[i] + 1]++;
    perm[pos] = i;
    inverse[i] = pos;
  }
  g.segments.clear();
  for (int64_t b = 0; b <= num_adapters; ++b) {
    if (start[b + 1] > start[b]) g.segments.push_back({start[b], start[b + 1], b - 1});
  }
  return g;
}

Grouping group_tokens(const at::Tensor& adapter_indices, int64_t num_adapters) {
  const at::Tensor idx = adapter_indices.contiguous();
  if (idx.scalar_type() == at::kInt) return group_tokens_typed(idx.const_data_ptr<int32_t>(), idx.numel(), num_adapters);
  return group_tokens_typed(idx.const_data_ptr<int64_t>(), idx.numel(), num_adapters);
}

// Runs fn(task) for every task, the tasks spread over the threads when there are several. The small
// per-adapter products inside then run single-threaded: one parallel region for the whole loop instead
// of one per BLAS call, which matters most when other processes hold the cores.
template <class F>
void for_each_task(int64_t n_tasks, const F& fn) {
  if (n_tasks <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  // Worker threads inherit the caller's dispatch state (we run below autograd).
  const at::ThreadLocalState state;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t t = begin; t < end; ++t) fn(t);
  });
}

std::vector<double> host_scalings(const at::Tensor& scalings) {
  const at::Tensor s = scalings.to(at::kDouble).contiguous();
  return {s.const_data_ptr<double>(), s.const_data_ptr<double>() + s.numel()};
}

// t ⊙ mask / (1 - p) in place (t contiguous), with the Philox mask of element index i.
void dropout_inplace(at::Tensor& t, double p, const at::Tensor& rng_state) {
  dropout_apply_cpu({t.const_data_ptr(), t.mutable_data_ptr(), nullptr, nullptr, t.numel(), static_cast<float>(p),
                     1.0 / (1.0 - p), rng_state.const_data_ptr<int64_t>(), to_dtype(t.scalar_type())});
}

at::Tensor dropout_copy(const at::Tensor& t, double p, const at::Tensor& rng_state) {
  at::Tensor out = t.clone(at::MemoryFormat::Contiguous);
  dropout_inplace(out, p, rng_state);
  return out;
}

// Tokens sorted by adapter (stable): order[start[b] .. start[b+1]) are the tokens of adapter b - 1
// (bucket 0: no adapter). Token runs stay runs, so the kernels read x's rows in order.
struct SortedTokens {
  std::vector<int64_t> order, start;
};

template <typename index_t>
SortedTokens sort_tokens_typed(const index_t* idx, int64_t n, int64_t num_adapters) {
  SortedTokens sorted{std::vector<int64_t>(n), std::vector<int64_t>(num_adapters + 2, 0)};
  std::vector<int64_t>& start = sorted.start;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    TORCH_CHECK_VALUE(k >= -1 && k < num_adapters, "adapter_indices: index ", k, " at token ", i,
                      " is out of range for ", num_adapters, " adapters (expected -1 for no adapter, or 0..",
                      num_adapters - 1, ")");
    ++start[k + 1];
  }
  int64_t total = 0;
  for (int64_t b = 0; b <= num_adapters + 1; ++b) {
    const int64_t count = b <= num_adapters ? start[b] : 0;
    start[b] = total;
    total += count;
  }
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) sorted.order[cursor[idx[i] + 1]++] = i;
  return sorted;
}

SortedTokens sort_tokens(const at::Tensor& adapter_indices, int64_t num_adapters) {
  const at::Tensor idx = adapter_indices.contiguous();
  if (idx.scalar_type() == at::kInt) {
    return sort_tokens_typed(idx.const_data_ptr<int32_t>(), idx.numel(), num_adapters);
  }
  return sort_tokens_typed(idx.const_data_ptr<int64_t>(), idx.numel(), num_adapters);
}

// Forward for float32/float64 (the accumulation type is the input type): per adapter, its tokens'
// rows go through the register-blocked shrink and expand (pyfastpeft/rank_r_cpu.h), in blocks of
// kRowBlock rows so that a block's xa is still in L1 for the expand; then y += x·Wᵀ in one BLAS call.
//   xa[n] = drop(x)[n]·A[a(n)]ᵀ (0 for no adapter);  y[n] = b + s[a(n)]·xa[n]·B[a(n)]ᵀ + x[n]·Wᵀ
template <typename T>
void multi_lora_forward_rows(const at::Tensor& x2, const at::Tensor& xd, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                             const std::vector<double>& scale, const SortedTokens& sorted, const Shapes& s,
                             at::Tensor& xa, at::Tensor& y) {
  const RankROps<T>& mk = rank_r_ops<T>();
  constexpr int64_t kRowBlock = 64;
  const int64_t in = s.in_features, out = s.out_features, r = s.rank;
  // A stored as Aᵀ [K, in, r] (r a whole number of packs) and B as Bᵀ [K, r, out], the layouts the
  // kernels read, are used in place: the LoRA layer keeps its inference stack that way, so serving
  // does not transpose every adapter on every call. Any other layout is packed per call.
  const bool A_packed = r == mk.padded_rank(r) && lora_A.stride(0) == in * r && lora_A.stride(1) == 1 &&
                        lora_A.stride(2) == r;
  const bool B_packed = lora_B.stride(0) == r * out && lora_B.stride(1) == 1 && lora_B.stride(2) == out;
  const at::Tensor A = A_packed ? lora_A : lora_A.contiguous(), B = B_packed ? lora_B : lora_B.contiguous();
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const T* x_data = xd.const_data_ptr<T>();
  const T* A_data = A.const_data_ptr<T>();
  const T* B_data = B.const_data_ptr<T>();
  const T* b_data = b ? b->const_data_ptr<T>() : nullptr;
  T* xa_data = xa.mutable_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  // One task per bucket: an adapter's A and B are transposed once, and each token row has a single writer.
  for_each_task(s.num_adapters + 1, [&](int64_t bucket) {
    const int64_t begin = sorted.start[bucket], end = sorted.start[bucket + 1];
    if (begin == end) return;
    const int64_t* rows = sorted.order.data();
    if (bucket == 0) {  // no adapter: xa = 0, y = b
      for (int64_t i = begin; i < end; ++i) {
        std::fill_n(xa_data + rows[i] * r, r, T(0));
        T* y_row = y_data + rows[i] * out;
        b_data ? std::copy_n(b_data, out, y_row) : std::fill_n(y_row, out, T(0));
      }
      return;
    }
    const int64_t k = bucket - 1;
    // Left uninitialised: every element is written before it is read (zeroing them cost as much as
    // packing them, with 32 adapters).
    std::unique_ptr<T[]> A_storage, B_storage;
    const T* At = A_data + k * r * in;
    const T* Bt = B_data + k * out * r;
    if (!A_packed) {
      A_storage.reset(new T[in * mk.padded_rank(r)]);
      mk.pack_At(At, r, in, A_storage.get());
      At = A_storage.get();
    }
    if (!B_packed) {
      B_storage.reset(new T[r * out]);
      mk.transpose(Bt, out, r, B_storage.get(), out);
      Bt = B_storage.get();
    }
    for (int64_t i = begin; i < end; i += kRowBlock) {
      const int64_t len = std::min(kRowBlock, end - i);
      mk.shrink(x_data, in, rows + i, len, At, in, xa_data, r, T(1));
      mk.expand(xa_data, r, rows + i, len, Bt, out, b_data, static_cast<T>(scale[k]), y_data, false);
    }
  });
  y.addmm_(x2, weight.t());
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         const at::Tensor& scalings,
                                                         const at::Tensor& adapter_indices, double dropout_p,
                                                         const std::optional<at::Tensor>& rng_state) {
  const Shapes s = multi_lora::check_inputs(x, weight, bias, lora_A, lora_B, scalings, adapter_indices, dropout_p,
                                            rng_state);
  if (multi_lora::lora_term_is_empty(s)) {
    multi_lora::check_index_range_host(adapter_indices, s.num_adapters);
    return multi_lora::forward_base_only(x, weight, bias, s);
  }
  const at::Tensor x2 = x.reshape({-1, s.in_features});
  const std::vector<double> scale = host_scalings(scalings);
  // The rank-r path runs in the accumulation type (float32 for 16-bit inputs): no-ops for float32/64.
  const at::ScalarType acc = acc_scalar_type(x.scalar_type());
  const bool low_precision = acc != x.scalar_type();
  if (!low_precision) {
    const SortedTokens sorted = sort_tokens(adapter_indices, s.num_adapters);
    const at::Tensor xd = dropout_p > 0 ? dropout_copy(x2, dropout_p, *rng_state) : x2.contiguous();
    at::Tensor xa = at::empty({s.n_rows, s.rank}, x.options());
    at::Tensor y = at::empty({s.n_rows, s.out_features}, x.options());
    if (acc == at::kDouble) {
      multi_lora_forward_rows<double>(x2, xd, weight, bias, lora_A, lora_B, scale, sorted, s, xa, y);
    } else {
      multi_lora_forward_rows<float>(x2, xd, weight, bias, lora_A, lora_B, scale, sorted, s, xa, y);
    }
    return {y.view(multi_lora::with_last(x.sizes(), s.out_features)), xa};
  }

  // 16-bit inputs: the rank-r products run in float32 through the BLAS, segment by segment.
  const Grouping g = group_tokens(adapter_indices, s.num_adapters);
  const at::Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const std::optional<at::Tensor> bias_acc = bias ? std::optional<at::Tensor>(bias->to(acc)) : std::nullopt;
  const at::Tensor xs = g.rows(dropout_p > 0 ? dropout_copy(x2, dropout_p, *rng_state) : x2);

  at::Tensor xa_s = at::empty({s.n_rows, s.rank}, x.options().dtype(acc));
  at::Tensor y_s = at::empty({s.n_rows, s.out_features}, x.options());
  // Segments write disjoint rows: they run in parallel.
  for_each_task(static_cast<int64_t>(g.segments.size()), [&](int64_t task) {
    const Segment& seg = g.segments[task];
    const int64_t len = seg.end - seg.begin;
    at::Tensor xa_rows = xa_s.narrow(0, seg.begin, len);
    at::Tensor y_rows = y_s.narrow(0, seg.begin, len);
    if (seg.adapter < 0) {
      xa_rows.zero_();
      bias ? y_rows.copy_(bias->expand_as(y_rows)) : y_rows.zero_();
      return;
    }
    const double s_k = scale[seg.adapter];
    at::mm_out(xa_rows, xs.narrow(0, seg.begin, len).to(acc), A[seg.adapter].t());
    // y = b + s·xa·Bᵀ first; the frozen product accumulates into all rows at once below.
    y_rows.copy_(bias_acc ? at::addmm(*bias_acc, xa_rows, B[seg.adapter].t(), 1, s_k)
                          : at::mm(xa_rows, B[seg.adapter].t()).mul_(s_k));
  });
  at::Tensor y = g.unrows(y_s);
  y.addmm_(x2, weight.t());
  return {y.view(multi_lora::with_last(x.sizes(), s.out_features)), g.unrows(xa_s)};
}

// u = s·dy·B and the LoRA part of dx (u·A, added into dx or written over it) for one segment's rows,
// through the register-blocked kernels: B [out, r] already has the [cols, rank] layout the shrink
// reads (copied with zero padding when r is not a whole number of packs), and A [r, in] the
// [rank, cols] layout the expand reads, so nothing is transposed.
template <typename T>
void backward_rank_rows(const T* dy, const T* B_k, const T* A_k, int64_t out, int64_t in, int64_t r,
                        const int64_t* rows, int64_t len, T s, T* u, T* dx, bool accumulate) {
  const RankROps<T>& mk = rank_r_ops<T>();
  const int64_t rp = mk.padded_rank(r);
  std::unique_ptr<T[]> padded;
  if (rp != r) {
    padded.reset(new T[out * rp]);
    for (int64_t o = 0; o < out; ++o) {
      std::copy_n(B_k + o * r, r, padded.get() + o * rp);
      std::fill_n(padded.get() + o * rp + r, rp - r, T(0));
    }
    B_k = padded.get();
  }
  mk.shrink(dy, out, rows, len, B_k, out, u, r, s);
  if (dx) mk.expand(u, r, rows, len, A_k, in, static_cast<const T*>(nullptr), T(1), dx, accumulate);
}

// output_mask: which of (dx, dW, db, dA, dB) to compute; the others come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scalings, const at::Tensor& adapter_indices, const at::Tensor& xa,
    double dropout_p, const std::optional<at::Tensor>& rng_state, std::array<bool, 5> output_mask) {
  const Shapes s = multi_lora::check_inputs(x, weight, std::nullopt, lora_A, lora_B, scalings, adapter_indices,
                                            dropout_p, rng_state);
  multi_lora::check_backward_inputs(s, grad_y, x, xa);
  if (multi_lora::lora_term_is_empty(s)) {
    multi_lora::check_index_range_host(adapter_indices, s.num_adapters);
    return multi_lora::backward_base_only(grad_y, x, weight, lora_A, lora_B, output_mask);
  }
  const auto [need_dx, need_dW, need_db, need_dA, need_dB] = output_mask;
  const at::Tensor x2 = x.reshape({-1, s.in_features});
  const at::Tensor g2 = grad_y.reshape({-1, s.out_features});
  // Outputs not asked for are distinct empty tensors (outputs must not alias one another).
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = none(), dW = none(), db = none(), dA = none(), dB = none();
  if (need_dW) dW = at::mm(g2.t(), x2);
  if (need_db) db = g2.sum(0);
  if (!need_dx && !need_dA && !need_dB) return {dx, dW, db, dA, dB};

  const Grouping g = group_tokens(adapter_indices, s.num_adapters);
  const std::vector<double> scale = host_scalings(scalings);
  const at::ScalarType acc = acc_scalar_type(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc);
  // float32/float64: u and dx's LoRA part go through the register-blocked kernels; 16-bit: the BLAS.
  const bool fast = acc == x.scalar_type();
  const at::Tensor A = lora_A.to(acc).contiguous(), B = lora_B.to(acc).contiguous();
  const at::Tensor dys = fast ? g.rows(g2).contiguous() : g.rows(g2);
  std::vector<int64_t> positions(fast ? s.n_rows : 0);  // row i of the (sorted) buffers is row i
  for (int64_t i = 0; i < static_cast<int64_t>(positions.size()); ++i) positions[i] = i;
  const at::Tensor xas = need_dB ? g.rows(xa) : at::Tensor();
  const at::Tensor xds = need_dA ? g.rows(dropout_p > 0 ? dropout_copy(x2, dropout_p, *rng_state) : x2) : at::Tensor();
  at::Tensor dA_acc = need_dA ? at::zeros({s.num_adapters, s.rank, s.in_features}, acc_options) : at::Tensor();
  at::Tensor dB_acc = need_dB ? at::zeros({s.num_adapters, s.out_features, s.rank}, acc_options) : at::Tensor();
  // Runs in token order, no dropout, float32/float64: the LoRA part of dx accumulates straight into
  // dy·W, row block by row block. Otherwise it is built apart (to be masked or scattered) and added.
  const bool dx_in_place = need_dx && !g.perm.defined() && dropout_p == 0 && acc == x.scalar_type();
  if (dx_in_place) dx = at::mm(g2, weight);
  at::Tensor dxl_s = need_dx && !dx_in_place ? at::empty({s.n_rows, s.in_features}, acc_options) : at::Tensor();
  at::Tensor u_s = need_dx || need_dA ? at::empty({s.n_rows, s.rank}, acc_options) : at::Tensor();

  const auto process = [&](const Segment& seg) {
    const int64_t len = seg.end - seg.begin, k = seg.adapter;
    if (k < 0) {
      if (need_dx && !dx_in_place) dxl_s.narrow(0, seg.begin, len).zero_();
      return;
    }
    const at::Tensor dy_rows = dys.narrow(0, seg.begin, len).to(acc);
    if (need_dB) dB_acc[k].addmm_(dy_rows.t(), xas.narrow(0, seg.begin, len), 1, scale[k]);
    if (!need_dx && !need_dA) return;
    at::Tensor u = u_s.narrow(0, seg.begin, len);
    if (fast) {
      at::Tensor dx_target = dx_in_place ? dx : dxl_s;
      const auto run = [&](auto zero) {
        using T = decltype(zero);
        backward_rank_rows<T>(dys.const_data_ptr<T>(), B.const_data_ptr<T>() + k * s.out_features * s.rank,
                              A.const_data_ptr<T>() + k * s.rank * s.in_features, s.out_features, s.in_features,
                              s.rank, positions.data() + seg.begin, len, static_cast<T>(scale[k]),
                              u_s.mutable_data_ptr<T>(), need_dx ? dx_target.mutable_data_ptr<T>() : nullptr,
                              dx_in_place);
      };
      acc == at::kDouble ? run(0.0) : run(0.0f);
      if (need_dA) dA_acc[k].addmm_(u.t(), xds.narrow(0, seg.begin, len));
      return;
    }
    at::addmm_out(u, u, dy_rows, B[k], 0, scale[k]);  // u = s·dy·B
    if (need_dA) dA_acc[k].addmm_(u.t(), xds.narrow(0, seg.begin, len).to(acc));
    if (dx_in_place) {
      dx.narrow(0, seg.begin, len).addmm_(u, A[k]);
    } else if (need_dx) {
      at::Tensor dxl_rows = dxl_s.narrow(0, seg.begin, len);
      at::mm_out(dxl_rows, u, A[k]);
    }
  };
  // One task per adapter (its runs in order), so dA[k] and dB[k] have a single writer.
  std::vector<std::vector<const Segment*>> by_adapter(s.num_adapters + 1);
  for (const Segment& seg : g.segments) by_adapter[seg.adapter + 1].push_back(&seg);
  for_each_task(s.num_adapters + 1, [&](int64_t task) {
    for (const Segment* segment : by_adapter[task]) process(*segment);
  });
  if (dx_in_place) {
    dx = dx.view(x.sizes());
  } else if (need_dx) {
    at::Tensor dxl = g.unrows(dxl_s);
    if (dropout_p > 0) dropout_inplace(dxl, dropout_p, *rng_state);  // the forward's mask, regenerated
    dx = dxl.to(x.scalar_type());
    dx.addmm_(g2, weight);
    dx = dx.view(x.sizes());
  }
  if (need_dA) dA = dA_acc.to(x.scalar_type());
  if (need_dB) dB = dB_acc.to(x.scalar_type());
  return {dx, dW, db, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, CPU, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_cpu);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cpu);
}

}  // namespace pyfastpeft
