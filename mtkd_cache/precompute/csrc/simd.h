// Vector helpers shared by the package's C++ kernels (topk_rows.cpp, mtkd_train's kd_rows.cpp): 16-lane
// float32 vectors as GCC/clang vector extensions (AVX-512 with -march=native, two AVX2 or four SSE registers
// otherwise), their loads, horizontal max / sum, a lane test and a vector exp.
//
// The builder (`mtkd_cache/precompute/native.py`) passes this folder with -I and hashes this file into every
// kernel's name, so a change here rebuilds every kernel.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mtkd_simd {

constexpr int kLanes = 16;  // 64-byte vectors: AVX-512 with -march=native, two AVX2 or four SSE registers otherwise
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr int64_t kSumBlock = 16;  // vectors per float32 partial sum (256 logits)

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf splat(float x) { return vf{} + x; }

inline vf vmax2(vf a, vf b) { return a > b ? a : b; }

inline float hmax(vf v) {  // a tree of 4 shuffles: 16 lanes -> 1
  v = vmax2(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax2(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax2(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax2(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

inline double hsum(vf v) {
  vf h = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  double s = 0.0;
  for (int i = 0; i < kLanes / 2; ++i) s += h[i];
  return s;
}

inline bool any_lane(vi mask) {  // is any lane of a comparison's result true (-1)?
#if defined(__AVX512F__)
  __m512i m;
  std::memcpy(&m, &mask, sizeof m);
  return _mm512_test_epi32_mask(m, m) != 0;
#elif defined(__AVX2__)
  __m256i lo, hi;
  std::memcpy(&lo, &mask, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&mask) + sizeof lo, sizeof hi);
  return !_mm256_testz_si256(_mm256_or_si256(lo, hi), _mm256_or_si256(lo, hi));
#else
  int32_t any = 0;
  for (int i = 0; i < kLanes; ++i) any |= mask[i];
  return any != 0;
#endif
}

// exp(x) for x <= 0 in float32 (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial,
// within 2 ulp of the true value); 0 below -87.3 (no subnormals) and NaN for NaN.
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654475f);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  vf xc = x < lo ? lo : x;
  vf t = xc * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vi ni = (vi)t - (vi)magic;
  vf r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  vi bits = (ni + 127) << 23;
  vf e = p * (vf)bits;
  return x < lo ? vf{} : e;
}

}  // namespace mtkd_simd
