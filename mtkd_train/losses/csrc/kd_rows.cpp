// The two O(P V) passes of the fused KD + CE objective at T = 1 on float32 CPU logits, one row at a time.
//
// Built on first use by `mtkd_train/losses/_native.py` with the builder of the precompute's top-k kernel
// (plain C++17, no torch headers) and called through ctypes. Each call splits its rows over `threads`
// std::threads (the process's torch thread count). A row (V float32 logits, 32 KiB at V = 8,192) stays in
// the core's L1/L2 cache while the kernel reads it, so the sparse reads and writes at the support's k ids
// cost what they cost in cache, not a gather or a scatter over the whole (P, V) tensor.
//
//   mtkd_kd_stats: per row, lse = logsumexp(x); the logits at the support ids and at the label;
//     bucket: log sum_{v not in S} exp(x_v), summed over the off-support ids themselves (a 0/1 mask of S)
//     in the same pass as lse, so it needs no 1 - sum_S q (which loses every digit for a confident
//     student); spread: sum_v x_v.
//   mtkd_kd_grad: per row, out := coef * exp(x - lse) - shift; then the support's values written over
//     it at the kept entries (padding entries write nothing), then the label's value added. `out` may be `x`.
//
// These are the quantities of `_fused_math._stats_t1` and `t1_grad_compiled`, in the same dtypes. Rows with
// a NaN give NaN statistics; rows with +inf give lse = +inf (as the compiled kernel); -inf logits are
// ordinary (exp gives 0).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "simd.h"

namespace {

using namespace mtkd_simd;

// Read 1 of a row: its max, and whether a logit is NaN or +inf (then the row's lse is set as torch's is).
// Read 2: sum(exp(x - max)) and, with a mask `keep` (1 off the support, 0 on it), the off-support part of that
// sum, summed from the entries it describes: no 1 - sum_S q cancellation when a confident student leaves
// little mass off the support. Returns lse; *masked gets log(off-support sum) + max (or -inf).
template <bool Masked>
float row_lse(const float* row, int64_t vocab, const float* keep, float* masked) {
  const int64_t vectors = vocab / kLanes;
  vf m0 = splat(-INFINITY), m1 = m0, probe = vf{};
  int64_t t = 0;
  for (; t + 1 < vectors; t += 2) {
    vf a = load(row + t * kLanes), b = load(row + (t + 1) * kLanes);
    probe += (a + b) - (a + b);  // NaN as soon as a lane sees NaN or +-inf
    m0 = vmax2(m0, a);
    m1 = vmax2(m1, b);
  }
  if (t < vectors) {
    vf a = load(row + t * kLanes);
    probe += a - a;
    m0 = vmax2(m0, a);
  }
  float m = vectors ? hmax(vmax2(m0, m1)) : -INFINITY;
  bool clean = true;
  for (int i = 0; i < kLanes; ++i) clean = clean && probe[i] == 0.0f;
  for (int64_t j = vectors * kLanes; j < vocab; ++j) {
    clean = clean && std::isfinite(row[j]);
    m = row[j] > m ? row[j] : m;
  }
  if (!clean) {  // -inf logits are fine; NaN and +inf decide the row
    bool nan = false, inf = false;
    for (int64_t j = 0; j < vocab; ++j) {
      nan = nan || std::isnan(row[j]);
      inf = inf || row[j] == INFINITY;
    }
    if (nan || inf) {
      if (Masked) *masked = NAN;
      return nan ? NAN : INFINITY;
    }
  }
  if (m == -INFINITY) {  // every logit -inf: lse = -inf
    if (Masked) *masked = -INFINITY;
    return -INFINITY;
  }
  const vf vm = splat(m);
  double sum = 0.0, off = 0.0;
  for (int64_t start = 0; start < vectors; start += kSumBlock) {
    vf acc = vf{}, acc_off = vf{};
    const int64_t stop = std::min(vectors, start + kSumBlock);
    for (int64_t u = start; u < stop; ++u) {
      vf e = vexp(load(row + u * kLanes) - vm);
      acc += e;
      if (Masked) acc_off += e * load(keep + u * kLanes);
    }
    sum += hsum(acc);
    if (Masked) off += hsum(acc_off);
  }
  for (int64_t j = vectors * kLanes; j < vocab; ++j) {
    const float e = std::exp(row[j] - m);
    sum += e;
    if (Masked) off += static_cast<double>(e * keep[j]);
  }
  if (Masked) *masked = static_cast<float>(m + std::log(off));
  return static_cast<float>(m + std::log(sum));
}

double row_total(const float* row, int64_t vocab) {
  const int64_t vectors = vocab / kLanes;
  double total = 0.0;
  for (int64_t start = 0; start < vectors; start += kSumBlock) {
    vf acc = vf{};
    const int64_t stop = std::min(vectors, start + kSumBlock);
    for (int64_t u = start; u < stop; ++u) acc += load(row + u * kLanes);
    total += hsum(acc);
  }
  for (int64_t j = vectors * kLanes; j < vocab; ++j) total += row[j];
  return total;
}

struct StatsArgs {
  const float* x;
  int64_t vocab, ld, width;
  const int64_t* idx;
  const uint8_t* kept;
  const int64_t* labels;
  int mode;  // 0 bucket, 1 spread
  float *lse, *x_kept, *z_label, *aux;
};

void stats_rows(const StatsArgs& a, int64_t begin, int64_t end) {
  std::vector<float> keep;  // 1 off the support, 0 on it: set per row, restored after it
  if (a.mode == 0) keep.assign(a.vocab, 1.0f);
  for (int64_t r = begin; r < end; ++r) {
    const float* row = a.x + r * a.ld;
    const int64_t* ids = a.idx + r * a.width;
    const uint8_t* kept = a.kept + r * a.width;
    for (int64_t c = 0; c < a.width; ++c) a.x_kept[r * a.width + c] = row[ids[c]];
    a.z_label[r] = row[a.labels[r]];
    if (a.mode == 1) {  // spread: the row's sum
      a.lse[r] = row_lse<false>(row, a.vocab, nullptr, nullptr);
      a.aux[r] = static_cast<float>(row_total(row, a.vocab));
      continue;
    }
    bool any = false;
    for (int64_t c = 0; c < a.width; ++c) any = any || kept[c];
    if (!any) {  // no support: the bucket is the whole row
      a.lse[r] = a.aux[r] = row_lse<false>(row, a.vocab, nullptr, nullptr);
      continue;
    }
    for (int64_t c = 0; c < a.width; ++c) keep[ids[c]] = 0.0f;  // padding points at a kept id
    a.lse[r] = row_lse<true>(row, a.vocab, keep.data(), &a.aux[r]);
    for (int64_t c = 0; c < a.width; ++c) keep[ids[c]] = 1.0f;
  }
}

struct GradArgs {
  const float* x;
  int64_t ldx;
  float* out;
  int64_t ldo, vocab, width;
  const float *lse, *coef, *shift;  // shift may be null
  const int64_t* idx;
  const uint8_t* kept;
  const float* support;
  const int64_t* labels;
  const float* label_value;
};

void grad_rows(const GradArgs& a, int64_t begin, int64_t end) {
  const int64_t vectors = a.vocab / kLanes;
  for (int64_t r = begin; r < end; ++r) {
    const float* row = a.x + r * a.ldx;
    float* dst = a.out + r * a.ldo;
    const vf vl = splat(a.lse[r]), vc = splat(a.coef[r]);
    const float shift = a.shift ? a.shift[r] : 0.0f;
    const vf vs = splat(shift);
    for (int64_t u = 0; u < vectors; ++u) {
      vf g = vc * vexp(load(row + u * kLanes) - vl) - vs;
      std::memcpy(dst + u * kLanes, &g, sizeof g);
    }
    for (int64_t j = vectors * kLanes; j < a.vocab; ++j) dst[j] = a.coef[r] * std::exp(row[j] - a.lse[r]) - shift;
    const int64_t* ids = a.idx + r * a.width;
    const uint8_t* kept = a.kept + r * a.width;
    const float* values = a.support + r * a.width;
    for (int64_t c = 0; c < a.width; ++c) {
      if (kept[c]) dst[ids[c]] = values[c];
    }
    dst[a.labels[r]] += a.label_value[r];
  }
}

template <typename Args>
void parallel_rows(void (*fn)(const Args&, int64_t, int64_t), const Args& args, int64_t rows, int64_t threads) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 8));  // a thread for fewer rows costs more
  if (threads == 1) {
    fn(args, 0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t step = (rows + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = std::min(rows, t * step), end = std::min(rows, (t + 1) * step);
    pool.emplace_back(fn, std::cref(args), begin, end);
  }
  fn(args, 0, std::min(rows, step));
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// ABI version: `_native.py` refuses a library whose version differs from the one it expects.
int mtkd_kd_rows_version() { return 1; }

// x: rows x vocab float32 logits (row r at x + r * ld); idx / kept: (rows, width) int64 ids in [0, vocab) and
// uint8 flags; labels: (rows,) int64 ids in [0, vocab); mode 0 bucket, 1 spread. Outputs: lse, z_label, aux
// (rows,) and x_kept (rows, width), float32.
void mtkd_kd_stats(const float* x, int64_t rows, int64_t vocab, int64_t ld, const int64_t* idx, const uint8_t* kept,
                   int64_t width, const int64_t* labels, int64_t mode, float* lse, float* x_kept, float* z_label,
                   float* aux, int64_t threads) {
  const StatsArgs args{x, vocab, ld, width, idx, kept, labels, static_cast<int>(mode), lse, x_kept, z_label, aux};
  parallel_rows(stats_rows, args, rows, threads);
}

// out (row r at out + r * ldo) := coef * exp(x - lse) - shift, then out[idx] := support where kept, then
// out[label] += label_value. `out` may equal `x` (same ld). shift may be null.
void mtkd_kd_grad(const float* x, int64_t ldx, float* out, int64_t ldo, int64_t rows, int64_t vocab,
                  const float* lse, const float* coef, const float* shift, const int64_t* idx, const uint8_t* kept,
                  int64_t width, const float* support, const int64_t* labels, const float* label_value,
                  int64_t threads) {
  const GradArgs args{x, ldx, out, ldo, vocab, width, lse, coef, shift, idx, kept, support, labels, label_value};
  parallel_rows(grad_rows, args, rows, threads);
}

}  // extern "C"
