// GroupNorm over (N, C, *) with a per-channel affine, optionally followed by SiLU, for MindSpore's CPU backend as
// AOT custom operators, with their gradients.
//
// One pass reads a group's values for its mean, a second for its variance (both summed in double), and a third
// writes z = x * a + s (a = rstd * weight, s = bias - mean * a), or z * sigmoid(z) with SiLU. MindSpore's own
// operators take about ten passes over memory for the same work (LayerNorm, the per-channel scale and shift,
// sigmoid, multiply). The forward pass also gives each (sample, group)'s mean and 1 / std, which the gradient
// reuses. float32 only; the Python side casts other types.
//
// Entry points have MindSpore's AOT signature: params holds the inputs, then the outputs. The number of groups is
// read from the shape of the mean output (N, G); eps is a one-element input.

#include <omp.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));

namespace {

constexpr int64_t kParallelMin = 1 << 20;  // values; fewer run on one thread (see gelu.cc)

#pragma omp declare simd notinbranch
inline float Sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

struct Layout {
  int64_t n;       // samples
  int64_t groups;  // groups per sample
  int64_t width;   // channels per group
  int64_t plane;   // values per channel (the product of the axes after the channels)
  int64_t row() const { return width * plane; }
};

Layout Read(int ndim, const int64_t *shape, const int64_t *stats_shape) {
  Layout l{shape[0], stats_shape[1], 0, 1};
  l.width = shape[1] / l.groups;
  for (int i = 2; i < ndim; ++i) l.plane *= shape[i];
  return l;
}

template <bool kSilu>
void Forward(const float *x, const float *weight, const float *bias, float eps, Layout l, float *y, float *mean,
             float *rstd) {
  const int64_t len = l.row();
#pragma omp parallel for schedule(static) if (l.n * l.groups * len >= kParallelMin)
  for (int64_t r = 0; r < l.n * l.groups; ++r) {
    const float *xr = x + r * len;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) sum += xr[j];
    const double mu = sum / static_cast<double>(len);
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < len; ++j) {
      const double t = xr[j] - mu;
      sq += t * t;
    }
    const float m = static_cast<float>(mu);
    const float rs = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(len) + eps));
    mean[r] = m;
    rstd[r] = rs;
    float *yr = y + r * len;
    if (l.plane == 1 && !kSilu) {  // LayerNorm: a row of channels, vectorised along them
#pragma omp simd
      for (int64_t k = 0; k < l.width; ++k) yr[k] = (xr[k] - m) * rs * weight[k] + bias[k];
      continue;
    }
    const int64_t c0 = (r % l.groups) * l.width;
    for (int64_t k = 0; k < l.width; ++k) {
      const float a = rs * weight[c0 + k];
      const float s = bias[c0 + k] - m * a;
      const float *xc = xr + k * l.plane;
      float *yc = yr + k * l.plane;
#pragma omp simd
      for (int64_t j = 0; j < l.plane; ++j) {
        const float z = xc[j] * a + s;
        yc[j] = kSilu ? z * Sigmoid(z) : z;
      }
    }
  }
}

// With xh = (x - mean) * rstd and dz the gradient at z = xh * w + b (through SiLU when fused):
// dbias[c] = sum dz, dweight[c] = sum dz * xh, dx = rstd * (dz * w - mean(dz * w) - xh * mean(dz * w * xh)), the
// means over the (sample, group) row. Threads split the groups, so each owns its channels' dweight and dbias.
template <bool kSilu>
void Backward(const float *x, const float *weight, const float *bias, const float *mean, const float *rstd,
              const float *dy, Layout l, float *dx, float *dweight, float *dbias) {
  const int64_t len = l.row();
#pragma omp parallel for schedule(static) if (l.n * len * l.groups >= kParallelMin)
  for (int64_t g = 0; g < l.groups; ++g) {
    const int64_t c0 = g * l.width;
    for (int64_t k = 0; k < l.width; ++k) dweight[c0 + k] = dbias[c0 + k] = 0.0f;
    for (int64_t n = 0; n < l.n; ++n) {
      const int64_t r = n * l.groups + g;
      const float m = mean[r], rs = rstd[r];
      double sum_dxh = 0.0, sum_dxh_xh = 0.0;  // sums over the row of dz * w and dz * w * xh
      for (int64_t k = 0; k < l.width; ++k) {
        const float w = weight[c0 + k], b = bias[c0 + k];
        const int64_t at = r * len + k * l.plane;
        const float *xc = x + at, *dyc = dy + at;
        float *dzc = dx + at;  // dz is kept in dx until the row's sums are known
        double db = 0.0, dw = 0.0;
#pragma omp simd reduction(+ : db, dw)
        for (int64_t j = 0; j < l.plane; ++j) {
          const float xh = (xc[j] - m) * rs;
          float dz = dyc[j];
          if (kSilu) {
            const float z = xh * w + b;
            const float sg = Sigmoid(z);
            dz *= sg * (1.0f + z * (1.0f - sg));
          }
          dzc[j] = dz;
          db += dz;
          dw += dz * xh;
        }
        dbias[c0 + k] += static_cast<float>(db);
        dweight[c0 + k] += static_cast<float>(dw);
        sum_dxh += db * w;
        sum_dxh_xh += dw * w;
      }
      const float mean_dxh = static_cast<float>(sum_dxh / static_cast<double>(len));
      const float mean_dxh_xh = static_cast<float>(sum_dxh_xh / static_cast<double>(len));
      for (int64_t k = 0; k < l.width; ++k) {
        const float w = weight[c0 + k];
        const int64_t at = r * len + k * l.plane;
        const float *xc = x + at;
        float *dxc = dx + at;
#pragma omp simd
        for (int64_t j = 0; j < l.plane; ++j) {
          const float xh = (xc[j] - m) * rs;
          dxc[j] = rs * (dxc[j] * w - mean_dxh - xh * mean_dxh_xh);
        }
      }
    }
  }
}

// (x, weight, bias, eps) -> (y, mean, rstd); mean and rstd are (N, G).
template <bool kSilu>
int ForwardEntry(int nparam, void **params, int *ndims, int64_t **shapes) {
  if (nparam != 7) return 1;
  const Layout l = Read(ndims[0], shapes[0], shapes[5]);
  Forward<kSilu>(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), *static_cast<const float *>(params[3]), l,
                 static_cast<float *>(params[4]), static_cast<float *>(params[5]), static_cast<float *>(params[6]));
  return 0;
}

// (x, weight, bias, mean, rstd, dy) -> (dx, dweight, dbias).
template <bool kSilu>
int BackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes) {
  if (nparam != 9) return 1;
  const Layout l = Read(ndims[0], shapes[0], shapes[3]);
  Backward<kSilu>(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                  static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                  static_cast<const float *>(params[4]), static_cast<const float *>(params[5]), l,
                  static_cast<float *>(params[6]), static_cast<float *>(params[7]), static_cast<float *>(params[8]));
  return 0;
}

}  // namespace

extern "C" int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                void *) {
  return ForwardEntry<false>(nparam, params, ndims, shapes);
}

extern "C" int GroupNormSiluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                    void *) {
  return ForwardEntry<true>(nparam, params, ndims, shapes);
}

extern "C" int GroupNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                 void *) {
  return BackwardEntry<false>(nparam, params, ndims, shapes);
}

extern "C" int GroupNormSiluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  return BackwardEntry<true>(nparam, params, ndims, shapes);
}

// LayerNorm's gradient: the forward is GroupNormForward with one group over (rows, C), whose backward above splits
// its work by group and so would run on one thread. Here the rows are split between the threads: each row's two
// sums give its dx in a second pass, and each thread sums its rows' weight and bias gradients (in double) into a
// slice of its own, added up at the end.
// (x, weight, mean, rstd, dy) -> (dx, dweight, dbias); x and dy (rows, C), mean and rstd (rows, 1).
extern "C" int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                 void *) {
  if (nparam != 8) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float *mean = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dweight = static_cast<float *>(params[6]);
  float *dbias = static_cast<float *>(params[7]);
  const int64_t c = shapes[0][ndims[0] - 1];
  int64_t rows = 1;
  for (int i = 0; i < ndims[0] - 1; ++i) rows *= shapes[0][i];
  const int threads = rows * c >= kParallelMin ? omp_get_max_threads() : 1;
  std::vector<double> partial(static_cast<std::size_t>(2 * c * threads), 0.0);
#pragma omp parallel num_threads(threads)
  {
    double *pw = partial.data() + 2 * c * omp_get_thread_num();
    double *pb = pw + c;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float *xr = x + r * c, *dyr = dy + r * c;
      float *dxr = dx + r * c;
      const float m = mean[r], rs = rstd[r];
      double sum_g = 0.0, sum_g_xh = 0.0;  // sums over the row of dy * w and dy * w * xh
#pragma omp simd reduction(+ : sum_g, sum_g_xh)
      for (int64_t j = 0; j < c; ++j) {
        const float xh = (xr[j] - m) * rs;
        const float g = dyr[j] * weight[j];
        sum_g += g;
        sum_g_xh += g * xh;
        pw[j] += dyr[j] * xh;
        pb[j] += dyr[j];
      }
      const float mean_g = static_cast<float>(sum_g / static_cast<double>(c));
      const float mean_g_xh = static_cast<float>(sum_g_xh / static_cast<double>(c));
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float xh = (xr[j] - m) * rs;
        dxr[j] = rs * (dyr[j] * weight[j] - mean_g - xh * mean_g_xh);
      }
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    double w = 0.0, b = 0.0;
    for (int t = 0; t < threads; ++t) {
      w += partial[2 * c * t + j];
      b += partial[2 * c * t + c + j];
    }
    dweight[j] = static_cast<float>(w);
    dbias[j] = static_cast<float>(b);
  }
  return 0;
}
