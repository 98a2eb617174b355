// Column sums of a float32 (rows, C) tensor, for the bias gradients of the fully connected layers and GEGLU's
// projection: MindSpore's ReduceSum over the first axis took 27 ms of a 0.68 s svd_small training step. The rows
// are split between the threads, each adding its rows into a slice of its own in double; the slices are added at
// the end.
//
// And a row added to every row of its group, x (G, R, C) + y (G, 1, C): the residual of a cross-attention to one
// context token, whose output is one row per context. MindSpore's broadcasting Add keeps index tables as large as
// its output in a graph, and tiling the row first writes and reads a tensor as large as x.
//
// And the blend of two tensors of one shape, alpha * xs + (1 - alpha) * xt, with one alpha for all values or one per
// equal slice (the spatial and temporal paths of the video blocks, the frames' slices where image-only frames are
// flagged): one pass, where MindSpore's operators take three.
//
// Entry points with MindSpore's AOT signature: params holds the inputs, then the output.

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kParallelMin = 1 << 18;  // values; fewer run on one thread
constexpr int64_t kBlendPiece = 1 << 14;    // values of one slice a thread blends at a time

}  // namespace

// (x (rows, C)) -> (C,)
extern "C" int SumRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 2 || ndims[0] != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t rows = shapes[0][0], c = shapes[0][1];
  const int threads = rows * c >= kParallelMin ? omp_get_max_threads() : 1;
  std::vector<double> partial(static_cast<std::size_t>(c * threads), 0.0);
#pragma omp parallel num_threads(threads)
  {
    double *acc = partial.data() + c * omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float *xr = x + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) acc[j] += xr[j];
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    double sum = 0.0;
    for (int t = 0; t < threads; ++t) sum += partial[c * t + j];
    out[j] = static_cast<float>(sum);
  }
  return 0;
}

// (x (G, R, C), y (G, 1, C)) -> x + y, (G, R, C)
extern "C" int AddRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3 || ndims[0] != 3 || ndims[1] != 3) return 1;
  const int64_t groups = shapes[0][0], rows = shapes[0][1], c = shapes[0][2];
  if (shapes[1][0] != groups || shapes[1][1] != 1 || shapes[1][2] != c) return 1;
  const float *x = static_cast<const float *>(params[0]), *y = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
#pragma omp parallel for schedule(static) if (groups * rows * c >= kParallelMin)
  for (int64_t r = 0; r < groups * rows; ++r) {
    const float *xr = x + r * c, *yr = y + r / rows * c;
    float *o = out + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) o[j] = xr[j] + yr[j];
  }
  return 0;
}

// (xs, xt, alpha (G,)) -> alpha[g] * xs + (1 - alpha[g]) * xt, where g numbers the G equal consecutive slices of the
// flattened xs and xt
extern "C" int Blend(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4 || ndims[0] != ndims[1] || ndims[2] != 1) return 1;
  int64_t size = 1;
  for (int i = 0; i < ndims[0]; ++i) {
    if (shapes[0][i] != shapes[1][i]) return 1;
    size *= shapes[0][i];
  }
  const int64_t groups = shapes[2][0];
  if (groups < 1 || size % groups != 0) return 1;
  const int64_t slice = size / groups, pieces = (slice + kBlendPiece - 1) / kBlendPiece;
  const float *xs = static_cast<const float *>(params[0]), *xt = static_cast<const float *>(params[1]),
              *alpha = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
#pragma omp parallel for schedule(static) if (size >= kParallelMin)
  for (int64_t item = 0; item < groups * pieces; ++item) {
    const int64_t g = item / pieces, begin = g * slice + item % pieces * kBlendPiece;
    const int64_t end = std::min(begin + kBlendPiece, (g + 1) * slice);
    const float a = alpha[g], b = 1.0f - a;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = a * xs[i] + b * xt[i];
  }
  return 0;
}
