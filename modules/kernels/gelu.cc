// Exact (erf) GELU and the gated GEGLU for MindSpore's CPU backend, as AOT custom operators.
//
// GELU(x) = x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2. The erfc form has no cancellation for negative x, where
// (1 + erf(x / sqrt 2)) / 2 loses digits. The loops are vectorised by the compiler: erfcf and expf are declared
// with their SIMD variants, which glibc's vector math library (libmvec, glibc 2.35 and later) provides, and they
// run on all cores with OpenMP. float32 only; the Python side casts other types.
//
// Every entry point has MindSpore's AOT signature: params holds the inputs, then the outputs.

#include <cmath>
#include <cstdint>

extern "C" float erfcf(float) noexcept __attribute__((simd("notinbranch")));
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));

namespace {

// Below this many values a kernel runs on one thread: waking OpenMP's threads costs more than it saves, and after
// each parallel region they spin for a while, taking cores from MindSpore's own threads.
constexpr int64_t kParallelMin = 1 << 20;

constexpr float kMinusSqrtHalf = -0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline int64_t Count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Phi(x) + x * phi(x): the derivative of x * Phi(x).
#pragma omp declare simd notinbranch
inline float GeluGrad(float x) {
  return 0.5f * erfcf(x * kMinusSqrtHalf) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

#pragma omp declare simd notinbranch
inline float Gelu(float x) { return 0.5f * x * erfcf(x * kMinusSqrtHalf); }

}  // namespace

// GeluForward(x) -> y, same shape.
extern "C" int GeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = Count(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = Gelu(x[i]);
  return 0;
}

// GeluBackward(x, dy) -> dx.
extern "C" int GeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = Count(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * GeluGrad(x[i]);
  return 0;
}

// GegluForward(p, bias) -> y: p is (..., 2d), bias (2d,) (the projection's, added here rather than on its own);
// h and g are the halves of p + bias, y = h * GELU(g), (..., d).
extern "C" int GegluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 3) return 1;
  const float *p = static_cast<const float *>(params[0]);
  const float *bh = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t d = shapes[2][ndims[2] - 1];
  const int64_t rows = Count(ndims[2], shapes[2]) / d;
  const float *bg = bh + d;
#pragma omp parallel for schedule(static) if (rows * d >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float *h = p + r * 2 * d;
    const float *g = h + d;
    float *out = y + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) out[j] = (h[j] + bh[j]) * Gelu(g[j] + bg[j]);
  }
  return 0;
}

// GegluBackward(p, bias, dy) -> dp: dp[..., :d] = dy * GELU(g), dp[..., d:] = dy * h * GELU'(g), h and g as in the
// forward pass (the bias's gradient is the sum of dp over rows).
extern "C" int GegluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *p = static_cast<const float *>(params[0]);
  const float *bh = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dp = static_cast<float *>(params[3]);
  const int64_t d = shapes[2][ndims[2] - 1];
  const int64_t rows = Count(ndims[2], shapes[2]) / d;
  const float *bg = bh + d;
#pragma omp parallel for schedule(static) if (rows * d >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float *h = p + r * 2 * d;
    const float *g = h + d;
    const float *dout = dy + r * d;
    float *dh = dp + r * 2 * d;
    float *dg = dh + d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const float hj = h[j] + bh[j], gj = g[j] + bg[j];
      dh[j] = dout[j] * Gelu(gj);
      dg[j] = dout[j] * hj * GeluGrad(gj);
    }
  }
  return 0;
}
