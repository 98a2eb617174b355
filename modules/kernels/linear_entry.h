// The fully connected layers' AOT entry points (LinearForward, LinearForwardNoBias, LinearBackwardData,
// LinearBackwardWeights), shared by `onednn.cc` (oneDNN 2.2's matmul) and `matmul.cc` (oneDNN 3's): how each
// call's MindSpore parameters become one matmul's operands. The including source defines `RunLinear`, which runs
// that matmul with MindSpore's status convention (0 done, 1 a wrong number of parameters, 2 a failure).
#pragma once

#include <cstdint>

struct Rows {
  int64_t m, k, n;  // rows, in features, out features
};

// The rows and last axis of x (..., k), with n out features.
inline Rows ReadRows(int xdims, const int64_t *x, int64_t n) {
  Rows r{1, x[xdims - 1], n};
  for (int i = 0; i < xdims - 1; ++i) r.m *= x[i];
  return r;
}

// The four products, in the order the including sources' own kind enums begin with. With x (m, k), W (n, k):
// forward y (m, n) = x W^T (+ bias); data dx (m, k) = dy W; weights dW (n, k) = dy^T x.
enum class LinearKind { kForward, kForwardNoBias, kData, kWeights };

// One call's operands: `a` times `b` (plus `bias`) into `c`, the shapes in `rows`.
struct LinearOperands {
  Rows rows;
  void *a, *b, *bias, *c;
};

inline LinearOperands ReadLinear(LinearKind kind, void **params, int *ndims, int64_t **shapes) {
  switch (kind) {
    case LinearKind::kForward:  // (x (..., k), weight (n, k), bias (n,)) -> y (..., n)
      return {ReadRows(ndims[0], shapes[0], shapes[1][0]), params[0], params[1], params[2], params[3]};
    case LinearKind::kForwardNoBias:  // (x (..., k), weight (n, k)) -> y (..., n)
      return {ReadRows(ndims[0], shapes[0], shapes[1][0]), params[0], params[1], nullptr, params[2]};
    case LinearKind::kData: {  // (dy (..., n), weight (n, k)) -> dx (..., k)
      Rows r = ReadRows(ndims[0], shapes[0], shapes[1][0]);
      r.k = shapes[1][1];  // the rows of dy are those of x; its last axis is n
      return {r, params[0], params[1], nullptr, params[2]};
    }
    case LinearKind::kWeights:  // (x (..., k), dy (..., n)) -> dweight (n, k)
      break;
  }
  return {ReadRows(ndims[0], shapes[0], shapes[1][ndims[1] - 1]), params[1], params[0], nullptr, params[2]};
}

// Defined by the including source.
int RunLinear(LinearKind kind, int nparam, int expected, void **params, int *ndims, int64_t **shapes);

extern "C" int LinearForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return RunLinear(LinearKind::kForward, nparam, 4, params, ndims, shapes);
}

extern "C" int LinearForwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                   void *) {
  return RunLinear(LinearKind::kForwardNoBias, nparam, 3, params, ndims, shapes);
}

extern "C" int LinearBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                  void *) {
  return RunLinear(LinearKind::kData, nparam, 3, params, ndims, shapes);
}

extern "C" int LinearBackwardWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  return RunLinear(LinearKind::kWeights, nparam, 3, params, ndims, shapes);
}
