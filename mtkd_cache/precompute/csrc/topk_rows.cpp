// The O(V) reductions of `extract._topk_blocks` on the CPU, one row at a time in two reads of the row.
//
// Built on first use by `mtkd_cache/precompute/native.py` (plain C++17, no torch headers) and called
// through ctypes, which releases the GIL, so the reduction worker threads run it side by side. Each
// row (V float32 logits, 196 KiB at V = 49,152) stays in the core's L2 cache between its two reads:
//
//   read 1: the row max, an exact non-finite test (the sum of v * 0 is NaN as soon as one v is NaN
//           or +-inf) and the maxima of groups of 64 logits; the k-th largest group max `bound`
//           is a lower bound of the k-th largest logit (k groups reach it);
//   read 2: e = exp(v - max) once per logit, dotted with (v - max) for the entropy and summed over
//           the logits below `bound`, which are never kept; the few logits >= bound (about k to
//           2k) are set aside with their e, and the k largest of them kept. The others' e join the
//           sum, so the tail is summed from the entries it describes (precise when tiny, never
//           negative), as in the torch path.
//
// Outputs per row, as `_topk_blocks` defines them: the k indices sorted ascending with their
// log-probabilities, the tail, the entropy, the top-1 probability and a finite flag, exact for the
// row's (tempered) float32 values. Rows that are not finite get defined but meaningless outputs.
// Sums are taken in float32 lanes over 256 logits and added in double. Ties at the k-th value may
// keep other columns than torch.topk.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using namespace mtkd_simd;

constexpr int64_t kTile = 64;  // vectors per tile: lane l of a tile is a group of 64 logits 16 apart

inline int32_t order_key(float x) {  // a signed integer that orders like the float (finite x)
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
}

struct Candidate {
  float value;  // the logit
  float e;      // exp(logit - row max), as read 2 computed it
  int64_t index;
};

// The k-th largest of `values` (finite), exactly: a bisection on their order keys, each step one count.
float kth_largest(const std::vector<float>& values, int64_t k, std::vector<int32_t>& keys) {
  keys.resize(values.size());
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  for (size_t i = 0; i < values.size(); ++i) {
    keys[i] = order_key(values[i]);
    lo = std::min(lo, keys[i]);
    hi = std::max(hi, keys[i]);
  }
  while (lo < hi) {  // invariant: at least k keys are >= lo; fewer than k are > hi
    const int32_t mid = static_cast<int32_t>(lo + (static_cast<int64_t>(hi) - lo + 1) / 2);
    int64_t count = 0;
    for (int32_t key : keys) count += key >= mid;
    if (count >= k) lo = mid; else hi = mid - 1;
  }
  const int32_t bits = lo >= 0 ? lo : lo ^ 0x7FFFFFFF;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

struct Scratch {
  std::vector<float> group_max;
  std::vector<int32_t> keys;
  std::vector<Candidate> candidates;
};

// Read 1: the row max and the top-k bound (see the file's comment); false when a logit is not finite.
bool read_one(const float* row, int64_t vocab, int64_t k, Scratch& s, float& row_max, float& bound) {
  const int64_t vectors = vocab / kLanes, body = vectors * kLanes;
  const int64_t groups = (vectors + kTile - 1) / kTile * kLanes;  // the last tile may be short
  s.group_max.resize(groups);
  vf vmax = splat(-INFINITY), probe = vf{};
  for (int64_t tile = 0; tile * kTile < vectors; ++tile) {
    const float* at = row + tile * kTile * kLanes;
    const int64_t n = std::min(kTile, vectors - tile * kTile);
    vf m0 = splat(-INFINITY), m1 = m0, p0 = vf{}, p1 = vf{};
    int64_t t = 0;
    for (; t + 1 < n; t += 2) {  // two chains, so that the loads and maxes overlap
      vf a = load(at + t * kLanes), b = load(at + (t + 1) * kLanes);
      p0 += a * 0.0f;
      p1 += b * 0.0f;
      m0 = vmax2(m0, a);
      m1 = vmax2(m1, b);
    }
    if (t < n) {
      vf a = load(at + t * kLanes);
      p0 += a * 0.0f;
      m0 = vmax2(m0, a);
    }
    vf m = vmax2(m0, m1);
    probe += p0 + p1;
    std::memcpy(s.group_max.data() + tile * kLanes, &m, sizeof m);
    vmax = vmax2(vmax, m);
  }
  float smax = groups ? hmax(vmax) : -INFINITY;
  bool finite = true;
  for (int i = 0; i < kLanes; ++i) finite = finite && probe[i] == 0.0f;
  for (int64_t j = body; j < vocab; ++j) {
    finite = finite && std::isfinite(row[j]);
    smax = row[j] > smax ? row[j] : smax;
  }
  row_max = smax;
  // too few groups to gain (or NaN, which has no order): every logit is a candidate
  bound = finite && groups >= 2 * k ? kth_largest(s.group_max, k, s.keys) : -INFINITY;
  return finite;
}

inline void keep_candidates(int64_t first, vf v, vf e, float bound, std::vector<Candidate>& out) {
  for (int i = 0; i < kLanes; ++i) {
    if (v[i] >= bound) out.push_back({v[i], e[i], first + i});
  }
}

void one_row(const float* row, int64_t vocab, int64_t k, Scratch& s, int64_t* out_idx, float* out_logp,
             float* out_tail, float* out_entropy, float* out_top1, uint8_t* out_finite) {
  float row_max, bound;
  bool finite = read_one(row, vocab, k, s, row_max, bound);
  if (!finite) row_max = 0.0f;  // the outputs are meaningless; keep the arithmetic defined
  // read 2
  std::vector<Candidate>& cand = s.candidates;
  cand.clear();
  double below = 0.0, weighted = 0.0;  // sum of e over the logits < bound; sum of e * (v - max)
  const vf vm = splat(row_max), vb = splat(bound);
  const int64_t vectors = vocab / kLanes;
  for (int64_t start = 0; start < vectors; start += kSumBlock) {
    vf acc_below = vf{}, acc_weighted = vf{};
    const int64_t stop = std::min(vectors, start + kSumBlock);
    for (int64_t t = start; t < stop; ++t) {
      vf v = load(row + t * kLanes);
      vf shifted = v - vm;
      vf e = vexp(shifted);
      vi high = v >= vb;
      acc_below += high ? vf{} : e;
      acc_weighted += e * shifted;
      if (any_lane(high)) keep_candidates(t * kLanes, v, e, bound, cand);
    }
    below += hsum(acc_below);
    weighted += hsum(acc_weighted);
  }
  for (int64_t j = vectors * kLanes; j < vocab; ++j) {
    const float shifted = row[j] - row_max;
    const float e = std::exp(shifted);
    weighted += static_cast<double>(e) * shifted;
    if (row[j] >= bound) cand.push_back({row[j], e, j}); else below += e;
  }
  if (static_cast<int64_t>(cand.size()) < k) {  // NaN rows only: their outputs are meaningless
    finite = false;
    cand.clear();
    for (int64_t j = 0; j < k; ++j) cand.push_back({0.0f, 1.0f, j});
  }
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(),
                   [](const Candidate& a, const Candidate& b) { return a.value > b.value; });
  double kept = 0.0;
  for (int64_t i = 0; i < k; ++i) kept += cand[i].e;
  for (size_t i = k; i < cand.size(); ++i) below += cand[i].e;  // candidates not kept: the tail's too
  const double total = below + kept;  // S >= 1: the max contributes exp(0) = 1
  const float log_total = static_cast<float>(std::log(total));
  const double entropy = std::log(total) - weighted / total;
  std::sort(cand.begin(), cand.begin() + k, [](const Candidate& a, const Candidate& b) { return a.index < b.index; });
  for (int64_t i = 0; i < k; ++i) {
    out_idx[i] = cand[i].index;
    out_logp[i] = (cand[i].value - row_max) - log_total;
  }
  const double tail = below / total;
  *out_tail = static_cast<float>(tail < 0.0 ? 0.0 : (tail > 1.0 ? 1.0 : tail));
  *out_entropy = static_cast<float>(entropy);
  *out_top1 = static_cast<float>(1.0 / total);
  *out_finite = finite && std::isfinite(row_max) && std::isfinite(entropy);
}

}  // namespace

extern "C" {

// ABI version: `native.py` refuses a library whose version differs from the one it expects.
int mtkd_topk_rows_version() { return 1; }

// rows x vocab float32 logits (row i at x + i * stride), already divided by the temperature.
// out_idx (rows, k) int64, out_logp (rows, k), out_tail / out_entropy / out_top1 (rows,) float32,
// out_finite (rows,) uint8. 1 <= k <= vocab.
void mtkd_topk_rows(const float* x, int64_t rows, int64_t vocab, int64_t stride, int64_t k, int64_t* out_idx,
                    float* out_logp, float* out_tail, float* out_entropy, float* out_top1, uint8_t* out_finite) {
  Scratch scratch;
  for (int64_t r = 0; r < rows; ++r) {
    one_row(x + r * stride, vocab, k, scratch, out_idx + r * k, out_logp + r * k, out_tail + r, out_entropy + r,
            out_top1 + r, out_finite + r);
  }
}

}  // extern "C"
