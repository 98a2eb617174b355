// The softmax of one row of float32 values, shared by the softmax kernel (softmax.cc) and the attention kernel
// (onednn.cc): the maximum, then exp(x - max) summed, then scaled by 1 / sum; `y` may be `x`. exp is glibc's
// vectorised expf (libmvec).
#pragma once

#include <cmath>
#include <cstdint>

extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));

inline void SoftmaxRow(const float *x, float *y, int64_t len) {
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < len; ++j) top = x[j] > top ? x[j] : top;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const float e = expf(x[j] - top);
    y[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) y[j] *= inv;
}
