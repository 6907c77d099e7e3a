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
//     r < 1e-2 (a confident student) from a third, vectorised read that sums the off-support entries
//     themselves (a 0/1 mask of S); spread: sum_v x_v.
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

constexpr double kRiskyRest = 1e-2;  // _fused_math.RISKY_REST

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

// sum over v of exp(row[v] - lse) * keep[v] (keep: 1 off the support, 0 on it) in double, from float32 lanes
// over 256 logits: the off-support mass summed from the entries it describes, so a confident row keeps its
// digits. A third read of the row, for the rows where 1 - sum_S q < kRiskyRest only.
double masked_mass(const float* row, const float* keep, int64_t vocab, float lse) {
  const int64_t vectors = vocab / kLanes;
  const vf vl = splat(lse);
  double total = 0.0;
  for (int64_t start = 0; start < vectors; start += kSumBlock) {
    vf acc = vf{};
    const int64_t stop = std::min(vectors, start + kSumBlock);
    for (int64_t u = start; u < stop; ++u) acc += vexp(load(row + u * kLanes) - vl) * load(keep + u * kLanes);
    total += hsum(acc);
  }
  for (int64_t j = vectors * kLanes; j < vocab; ++j) total += static_cast<double>(std::exp(row[j] - lse) * keep[j]);
  return total;
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
    double rest = std::max(0.0, 1.0 - q_sum);
    if (rest < kRiskyRest) {  // a confident row: the exact off-support sum, no cancellation
      if (keep.empty()) keep.assign(a.vocab, 1.0f);
      for (int64_t c = 0; c < a.width; ++c) keep[ids[c]] = 0.0f;  // padding points at a kept id
      rest = masked_mass(row, keep.data(), a.vocab, lse);
      for (int64_t c = 0; c < a.width; ++c) keep[ids[c]] = 1.0f;
    }
    a.aux[r] = static_cast<float>(std::log(rest)) + lse;
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
