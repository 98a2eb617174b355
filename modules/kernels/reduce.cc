// Column sums of a float32 (rows, C) tensor, for the bias gradients of the fully connected layers and GEGLU's
// projection: MindSpore's ReduceSum over the first axis took 27 ms of a 0.68 s svd_small training step. The rows
// are split between the threads, each adding its rows into a slice of its own in double; the slices are added at
// the end.
//
// And a row added to every row of its group, x (G, R, C) + y (G, 1, C): the residual of a cross-attention to one
// context token, whose output is one row per context. MindSpore's broadcasting Add keeps index tables as large as
// its output in a graph, and tiling the row first writes and reads a tensor as large as x.
//
// Entry points with MindSpore's AOT signature: params holds the inputs, then the output.

#include <omp.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kParallelMin = 1 << 18;  // values; fewer run on one thread

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
