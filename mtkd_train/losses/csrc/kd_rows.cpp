// The two O(P V) passes of the fused KD + CE objective at T = 1 on float32 CPU logits, one row at a time.
//
// Built on first use by `mtkd_train/losses/_native.py` with the builder of the precompute's top-k kernel
// (plain C++17, no torch headers) and called through ctypes. Each call splits its rows over `threads`
// std::threads (the process's torch thread count). A row (V float32 logits, 32 KiB at V = 8,192) stays in
// the core's L1/L2 cache while the kernel reads it, so the sparse reads and writes at the support's k ids
// cost what they cost in cache, not a gather or a scatter over the whole (P, V) tensor.
//
//   mtkd_kd_stats: per row, lse = logsumexp(x); the logits at the support ids and at the label;
//     bucket: log sum_{v not in S} exp(x_v) from r = 1 - sum_S exp(x_j - lse) in double, and where
//     r < 1e-2 (a confident student) as a log-sum-exp of the off-support entries themselves around their
//     own max (a 0/1 mask of S; two more reads of such a row): no cancellation and no underflow;
//     spread: sum_v x_v.
//   mtkd_kd_grad: per row, out := coef * exp(x - lse) - shift (as sign(coef) * exp(x - lse + log|coef|), so a
//     confident row's huge t / r and tiny q meet in the exponent); then the support's values written over
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

// Read 1 of a row: its max, and whether a logit is NaN or +inf (then lse is set as torch's is);
// read 2: sum(exp(x - max)). Returns lse.
float row_lse(const float* row, int64_t vocab) {
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
    if (nan || inf) return nan ? NAN : INFINITY;
  }
  if (m == -INFINITY) return -INFINITY;  // every logit -inf
  const vf vm = splat(m);
  double sum = 0.0;
  for (int64_t start = 0; start < vectors; start += kSumBlock) {
    vf acc = vf{};
    const int64_t stop = std::min(vectors, start + kSumBlock);
    for (int64_t u = start; u < stop; ++u) acc += vexp(load(row + u * kLanes) - vm);
    sum += hsum(acc);
  }
  for (int64_t j = vectors * kLanes; j < vocab; ++j) sum += std::exp(row[j] - m);
  return static_cast<float>(m + std::log(sum));
}

// log sum_{v not in S} exp(row[v]), as m_off + log sum exp(row[v] - m_off) around the off-support max m_off
// (keep: 1 off the support, 0 on it): the off-support mass summed from the entries it describes, with no
// term underflowing however far below the support they lie (a confident student). Two more reads of the
// row, for the rows where 1 - sum_S q < risky only.
float masked_log_mass(const float* row, const float* keep, int64_t vocab) {
  const int64_t vectors = vocab / kLanes;
  const vf none = splat(-INFINITY);
  vf vm = none;
  for (int64_t u = 0; u < vectors; ++u) {
    vf v = load(row + u * kLanes);
    vm = vmax2(vm, load(keep + u * kLanes) > 0.0f ? v : none);
  }
  float m = vectors ? hmax(vm) : -INFINITY;
  for (int64_t j = vectors * kLanes; j < vocab; ++j) m = keep[j] > 0.0f && row[j] > m ? row[j] : m;
  if (!std::isfinite(m)) return m;  // nothing off the support (or only -inf there): log 0
  const vf vmo = splat(m);
  double total = 0.0;
  for (int64_t start = 0; start < vectors; start += kSumBlock) {
    vf acc = vf{};
    const int64_t stop = std::min(vectors, start + kSumBlock);
    for (int64_t u = start; u < stop; ++u) acc += vexp(load(row + u * kLanes) - vmo) * load(keep + u * kLanes);
    total += hsum(acc);
  }
  for (int64_t j = vectors * kLanes; j < vocab; ++j) total += static_cast<double>(std::exp(row[j] - m) * keep[j]);
  return static_cast<float>(m + std::log(total));
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
  int mode;      // 0 bucket, 1 spread
  double risky;  // _fused_math.RISKY_REST: below this 1 - sum_S q, the off-support mass is summed exactly
  float *lse, *x_kept, *z_label, *aux;
};

void stats_rows(const StatsArgs& a, int64_t begin, int64_t end) {
  std::vector<float> keep;  // 1 off the support, 0 on it; built on the first risky row, restored after each
  for (int64_t r = begin; r < end; ++r) {
    const float* row = a.x + r * a.ld;
    const int64_t* ids = a.idx + r * a.width;
    const uint8_t* kept = a.kept + r * a.width;
    const float lse = row_lse(row, a.vocab);
    a.lse[r] = lse;
    for (int64_t c = 0; c < a.width; ++c) a.x_kept[r * a.width + c] = row[ids[c]];
    a.z_label[r] = row[a.labels[r]];
    if (a.mode == 1) {  // spread: the row's sum
      a.aux[r] = static_cast<float>(row_total(row, a.vocab));
      continue;
    }
    bool any = false;
    double q_sum = 0.0;  // the support's mass, from the logits just gathered (in cache)
    for (int64_t c = 0; c < a.width; ++c) {
      if (!kept[c]) continue;
      any = true;
      q_sum += std::exp(static_cast<double>(row[ids[c]]) - static_cast<double>(lse));
    }
    if (!any) {  // no support: the bucket is the whole row
      a.aux[r] = lse;
      continue;
    }
    const double rest = std::max(0.0, 1.0 - q_sum);
    if (!(rest < a.risky)) {
      a.aux[r] = static_cast<float>(std::log(rest)) + lse;
      continue;
    }
    // a confident row: the exact off-support log-mass, no cancellation and no underflow
    if (keep.empty()) keep.assign(a.vocab, 1.0f);
    for (int64_t c = 0; c < a.width; ++c) keep[ids[c]] = 0.0f;  // padding points at a kept id
    a.aux[r] = masked_log_mass(row, keep.data(), a.vocab);
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
    // coef * exp(x - lse) = sign * exp(x - (lse - log|coef|)): a huge coef (t / r of a confident row) meets
    // a tiny q inside the exponent, so neither underflows to 0 nor overflows to inf before they meet
    const float coef = a.coef[r];
    const float sign = coef < 0.0f ? -1.0f : 1.0f;
    const float shifted = static_cast<float>(static_cast<double>(a.lse[r]) - std::log(std::fabs(static_cast<double>(coef))));
    const float base = std::isnan(coef) ? NAN : shifted;  // coef 0: base +inf, every term exp(-inf) = 0
    const float shift = a.shift ? a.shift[r] : 0.0f;
    const vf vb = splat(base), vsign = splat(sign), vs = splat(shift);
    for (int64_t u = 0; u < vectors; ++u) {
      vf g = vsign * vexp(load(row + u * kLanes) - vb) - vs;
      std::memcpy(dst + u * kLanes, &g, sizeof g);
    }
    for (int64_t j = vectors * kLanes; j < a.vocab; ++j) dst[j] = sign * std::exp(row[j] - base) - shift;
    const int64_t* ids = a.idx + r * a.width;
    const uint8_t* kept = a.kept + r * a.width;
    const float* values = a.support + r * a.width;
    for (int64_t c = 0; c < a.width; ++c) {
      if (kept[c]) dst[ids[c]] = values[c];
    }
    dst[a.labels[r]] += a.label_value[r];
  }
}

// Rows split over up to `threads` threads (this one included). A thread that cannot be started leaves its
// rows to this thread; every started thread is joined.
template <typename Args>
void parallel_rows(void (*fn)(const Args&, int64_t, int64_t), const Args& args, int64_t rows, int64_t threads) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 8));  // a thread for fewer rows costs more
  const int64_t step = (rows + threads - 1) / threads;
  std::vector<std::thread> pool;
  int64_t started = 1;  // ranges [0, started) are this thread's first range and the started threads'
  try {
    pool.reserve(threads - 1);
    for (; started < threads; ++started) {
      const int64_t begin = std::min(rows, started * step), end = std::min(rows, (started + 1) * step);
      pool.emplace_back(fn, std::cref(args), begin, end);
    }
  } catch (...) {  // no more threads: the rest runs here
  }
  fn(args, 0, std::min(rows, step));
  if (started < threads) fn(args, std::min(rows, started * step), rows);
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// ABI version: `_native.py` refuses a library whose version differs from the one it expects.
int mtkd_kd_rows_version() { return 2; }

// x: rows x vocab float32 logits (row r at x + r * ld); idx / kept: (rows, width) int64 ids in [0, vocab) and
// uint8 flags; labels: (rows,) int64 ids in [0, vocab); mode 0 bucket, 1 spread; risky: the threshold on
// 1 - sum_S q below which the off-support mass is summed exactly. Outputs: lse, z_label, aux (rows,) and
// x_kept (rows, width), float32. Returns 0, or 1 when the kernel failed (out of memory): outputs undefined.
int mtkd_kd_stats(const float* x, int64_t rows, int64_t vocab, int64_t ld, const int64_t* idx, const uint8_t* kept,
                  int64_t width, const int64_t* labels, int64_t mode, double risky, float* lse, float* x_kept,
                  float* z_label, float* aux, int64_t threads) {
  try {
    const StatsArgs args{x, vocab, ld, width, idx, kept, labels, static_cast<int>(mode), risky, lse, x_kept,
                         z_label, aux};
    parallel_rows(stats_rows, args, rows, threads);
    return 0;
  } catch (...) {
    return 1;
  }
}

// out (row r at out + r * ldo) := coef * exp(x - lse) - shift, then out[idx] := support where kept, then
// out[label] += label_value. `out` may equal `x` (same ld). shift may be null. Returns 0, or 1 on failure.
int mtkd_kd_grad(const float* x, int64_t ldx, float* out, int64_t ldo, int64_t rows, int64_t vocab,
                 const float* lse, const float* coef, const float* shift, const int64_t* idx, const uint8_t* kept,
                 int64_t width, const float* support, const int64_t* labels, const float* label_value,
                 int64_t threads) {
  try {
    const GradArgs args{x, ldx, out, ldo, vocab, width, lse, coef, shift, idx, kept, support, labels, label_value};
    parallel_rows(grad_rows, args, rows, threads);
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
