// The optimizer's two passes over the trained parameters, for MindSpore's CPU backend as AOT custom operators.
//
// - SumSquares: the squared L2 norm of a float32 gradient, summed in double, in one read-only pass. MindSpore's
//   norm writes the squares out and reduces them (Square, then ReduceSum): two passes and a gradient-sized
//   temporary per parameter.
// - AdamWStep: AdamW on one parameter in one pass that reads the gradient and updates the parameter and both
//   moments where they are, the gradient multiplied by a factor (loss-scale unscaling and norm clipping) as it is
//   read; with the guard on, an infinite or NaN product counts as zero, so that a skipped step (betas of 1 and a
//   learning rate of 0) leaves everything as it was. The formula is that of MindSpore's AdamWeightDecay, whose
//   learning rate, epsilon and decay the caller sets for torch's AdamW:
//     m += (g - m) (1 - b1);  v += (g^2 - v) (1 - b2);  p -= lr (m / (sqrt(v) + eps) + wd p)
//   Unscaling, masking and the update take five passes and two temporaries with MindSpore's operators.
//
// Entry points have MindSpore's AOT signature: params holds the inputs, then the outputs. AdamWStep's output is
// one value (0) that the graph orders the next step after: the kernel's real results are the three updated inputs.

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kParallelMin = 1 << 18;  // values; fewer run on one thread

int64_t Count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

}  // namespace

extern "C" int SumSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 2) return 1;
  const float *g = static_cast<const float *>(params[0]);
  const int64_t n = Count(ndims[0], shapes[0]);
  double sum = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : sum) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(g[i]) * g[i];
  static_cast<float *>(params[1])[0] = static_cast<float>(sum);
  return 0;
}

// inputs: param, m, v, g (same shape), settings (8 values: factor, lr, b1, b2, eps, wd, guard, unused)
extern "C" int AdamWStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 6) return 1;
  float *p = static_cast<float *>(params[0]);
  float *m = static_cast<float *>(params[1]);
  float *v = static_cast<float *>(params[2]);
  const float *g = static_cast<const float *>(params[3]);
  const float *s = static_cast<const float *>(params[4]);
  const int64_t n = Count(ndims[0], shapes[0]);
  const float factor = s[0], lr = s[1], one_b1 = 1.0f - s[2], one_b2 = 1.0f - s[3], eps = s[4], wd = s[5];
  const bool guard = s[6] != 0.0f;
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i] * factor;
    if (guard && !std::isfinite(gi)) gi = 0.0f;
    const float mi = m[i] + (gi - m[i]) * one_b1;
    const float vi = v[i] + (gi * gi - v[i]) * one_b2;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * (mi / (std::sqrt(vi) + eps) + wd * p[i]);
  }
  static_cast<float *>(params[5])[0] = 0.0f;
  return 0;
}
