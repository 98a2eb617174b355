// Fully connected layers (y = x W^T + b, W (out, in) as PyTorch keeps it) and their gradients through the matmul
// primitive of oneDNN 3 (libdnnl.so.3 of the `onednn-cpu-gomp` package, OpenMP threads), as AOT custom operators for
// MindSpore's CPU backend. oneDNN 3 runs an fp32 matmul on AVX-512 cores as `brg:avx512_core`, a BRGEMM kernel
// that reaches 1.2-1.4 times the `gemm:jit` SGEMM of the oneDNN 2.2 inside MindSpore on the SVD UNet's layers
// (benchmarks/bench_linear.py). The convolutions stay on oneDNN 2.2 (`onednn.cc`): oneDNN 3 has no Winograd kernel.
//
// The two libraries load side by side: each is reached only through its own soname, and MindSpore loads its libdnnl
// privately. This file declares the few functions of oneDNN 3's C API it calls (opaque handles, a handful of enum
// values, all part of the library's stable ABI) rather than needing the headers, whose package would overwrite the
// oneDNN 2.2 headers `onednn.cc` is built with; `SvdMatmulVersion` lets the loader check the library's major version.
//
// Entry points have MindSpore's AOT signature: params holds the inputs, then the outputs. The Linear* ones come from
// `linear_entry.h`, as `onednn.cc`'s do. float32 only.

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <utility>
#include <mutex>

#include "linear_entry.h"

extern "C" {
typedef int dnnl_status_t;  // 0: success
typedef int64_t dnnl_dim_t;
typedef dnnl_dim_t dnnl_dims_t[12];
typedef struct dnnl_engine *dnnl_engine_t;
typedef struct dnnl_stream *dnnl_stream_t;
typedef struct dnnl_memory_desc *dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc *const_dnnl_memory_desc_t;
typedef struct dnnl_memory *dnnl_memory_t;
typedef struct dnnl_primitive_desc *dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc *const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive *dnnl_primitive_t;
typedef const struct dnnl_primitive *const_dnnl_primitive_t;
typedef struct dnnl_primitive_attr *dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr *const_dnnl_primitive_attr_t;
typedef struct dnnl_post_ops *dnnl_post_ops_t;
typedef const struct dnnl_post_ops *const_dnnl_post_ops_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;
typedef struct {
  int major, minor, patch;
  const char *hash;
  unsigned cpu_runtime, gpu_runtime;
} dnnl_version_t;

const dnnl_version_t *dnnl_version(void);
dnnl_status_t dnnl_engine_create(dnnl_engine_t *engine, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t *stream, dnnl_engine_t engine, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t stream);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t *desc, int ndims, const dnnl_dims_t dims,
                                               int data_type, int tag);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t desc);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t desc);
dnnl_status_t dnnl_memory_create(dnnl_memory_t *memory, const_dnnl_memory_desc_t desc, dnnl_engine_t engine,
                                 void *handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t memory);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t *attr);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t attr, int mode);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t attr);
dnnl_status_t dnnl_primitive_attr_set_post_ops(dnnl_primitive_attr_t attr, const_dnnl_post_ops_t post_ops);
dnnl_status_t dnnl_post_ops_create(dnnl_post_ops_t *post_ops);
dnnl_status_t dnnl_post_ops_destroy(dnnl_post_ops_t post_ops);
dnnl_status_t dnnl_post_ops_append_eltwise(dnnl_post_ops_t post_ops, int alg, float alpha, float beta);
dnnl_status_t dnnl_post_ops_append_binary(dnnl_post_ops_t post_ops, int alg, const_dnnl_memory_desc_t src1);
dnnl_status_t dnnl_matmul_primitive_desc_create(dnnl_primitive_desc_t *pd, dnnl_engine_t engine,
                                                const_dnnl_memory_desc_t src, const_dnnl_memory_desc_t weights,
                                                const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst,
                                                const_dnnl_primitive_attr_t attr);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t pd, int what, int index);
dnnl_status_t dnnl_primitive_desc_query(const_dnnl_primitive_desc_t pd, int what, int index, void *result);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t *primitive, const_dnnl_primitive_desc_t pd);
dnnl_status_t dnnl_primitive_execute(const_dnnl_primitive_t primitive, dnnl_stream_t stream, int nargs,
                                     const dnnl_exec_arg_t *args);
}

namespace {

// Enum values of oneDNN 3's C API.
constexpr int kCpu = 1;               // dnnl_cpu
constexpr int kInOrder = 1;           // dnnl_stream_in_order
constexpr int kF32 = 3;               // dnnl_f32
constexpr int kAb = 3, kBa = 14;      // dnnl_ab (row-major), dnnl_ba (the transpose of a row-major tensor)
constexpr int kUserScratchpad = 1;    // dnnl_scratchpad_mode_user
constexpr int kQueryImplInfo = 8;     // dnnl_query_impl_info_str
constexpr int kQueryExecArg = 255;   // dnnl_query_exec_arg_md: the memory descriptor of an argument
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgBias = 41, kArgScratchpad = 80;  // DNNL_ARG_*
constexpr int kArgPostOp0Src1 = 32770;  // DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1
constexpr int kGeluErf = 49;            // dnnl_eltwise_gelu_erf
constexpr int kBinaryAdd = 131056;      // dnnl_binary_add
constexpr int kBinaryMul = 131057;      // dnnl_binary_mul

struct Error {};

void Check(dnnl_status_t status) {
  if (status != 0) throw Error{};
}

struct Runtime {
  dnnl_engine_t engine = nullptr;
  dnnl_stream_t stream = nullptr;
  int threads = 0;
  std::mutex mutex;  // one call at a time: the primitive cache and the scratch buffer are shared
  void *scratch = nullptr;
  size_t scratch_size = 0;

  void *Scratch(size_t bytes) {
    if (bytes > scratch_size) {
      std::free(scratch);
      scratch = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      scratch_size = scratch ? bytes : 0;
      if (!scratch) throw Error{};
    }
    return scratch;
  }
};

Runtime &Rt() {
  static Runtime *rt = [] {
    auto *r = new Runtime();  // never destroyed, like the library's own state
    Check(dnnl_engine_create(&r->engine, kCpu, 0));
    Check(dnnl_stream_create(&r->stream, r->engine, kInOrder));
    r->threads = omp_get_max_threads();
    return r;
  }();
  return *rt;
}

// A memory descriptor, destroyed with its owner.
struct Desc {
  dnnl_memory_desc_t md = nullptr;
  Desc(dnnl_dim_t rows, dnnl_dim_t cols, int tag) {
    dnnl_dims_t dims = {rows, cols};
    Check(dnnl_memory_desc_create_with_tag(&md, 2, dims, kF32, tag));
  }
  ~Desc() { dnnl_memory_desc_destroy(md); }
  Desc(const Desc &) = delete;
  Desc &operator=(const Desc &) = delete;
};

// The first four are LinearKind's (`linear_entry.h`); kGelu and kTimesGate are kForward followed by the exact GELU,
// or by a product with a second (m, n) tensor: the two halves of a GEGLU projection; kPlus is kForward plus a second
// (m, n) tensor: a residual.
enum class Kind { kForward, kForwardNoBias, kData, kWeights, kGelu, kTimesGate, kPlus };

// One matmul primitive, created on first use per kind and shape: `a` (rows, depth) times `b` (depth, cols), plain
// tensors with the layouts below, plus a bias over the columns for kForward.
struct Matmul {
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t run = nullptr;
  size_t scratch_bytes = 0;
};

Matmul &Get(Kind kind, const Rows &r) {
  static std::map<std::array<int64_t, 4>, Matmul> cache;
  Matmul &mm = cache[{static_cast<int64_t>(kind), r.m, r.k, r.n}];
  if (mm.run != nullptr) return mm;
  const bool forward = kind != Kind::kData && kind != Kind::kWeights;
  const bool bias = forward && kind != Kind::kForwardNoBias;
  // forward: y (m, n) = x (m, k) W^T (k, n); data: dx (m, k) = dy (m, n) W (n, k); weights: dW (n, k) = dy^T x
  const Desc a = forward ? Desc(r.m, r.k, kAb) : kind == Kind::kData ? Desc(r.m, r.n, kAb) : Desc(r.n, r.m, kBa);
  const Desc b = forward ? Desc(r.k, r.n, kBa) : kind == Kind::kData ? Desc(r.n, r.k, kAb) : Desc(r.m, r.k, kAb);
  const Desc c = forward ? Desc(r.m, r.n, kAb) : kind == Kind::kData ? Desc(r.m, r.k, kAb) : Desc(r.n, r.k, kAb);
  const Desc bias_desc(1, r.n, kAb);
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_post_ops_t post = nullptr;
  Check(dnnl_primitive_attr_create(&attr));
  dnnl_status_t status = dnnl_primitive_attr_set_scratchpad_mode(attr, kUserScratchpad);
  if (status == 0 && (kind == Kind::kGelu || kind == Kind::kTimesGate || kind == Kind::kPlus)) {
    status = dnnl_post_ops_create(&post);
    if (status == 0)
      status = kind == Kind::kGelu ? dnnl_post_ops_append_eltwise(post, kGeluErf, 0.f, 0.f)
                                   : dnnl_post_ops_append_binary(post, kind == Kind::kPlus ? kBinaryAdd : kBinaryMul,
                                                                 c.md);
    if (status == 0) status = dnnl_primitive_attr_set_post_ops(attr, post);
  }
  if (status == 0)
    status = dnnl_matmul_primitive_desc_create(&mm.pd, Rt().engine, a.md, b.md, bias ? bias_desc.md : nullptr, c.md,
                                               attr);
  if (post != nullptr) dnnl_post_ops_destroy(post);
  dnnl_primitive_attr_destroy(attr);
  Check(status);
  Check(dnnl_primitive_create(&mm.run, mm.pd));
  mm.scratch_bytes = dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(mm.pd, kQueryExecArg, kArgScratchpad));
  return mm;
}

// Runs one matmul (operands as in `Get`) and waits for it.
void Run(Kind kind, const Rows &r, void *a, void *b, void *bias, void *c, void *second = nullptr) {
  Runtime &rt = Rt();
  Matmul &mm = Get(kind, r);
  void *scratch = mm.scratch_bytes ? rt.Scratch(mm.scratch_bytes) : nullptr;
  const std::array<std::pair<int, void *>, 6> given = {
      {{kArgSrc, a}, {kArgWeights, b}, {kArgDst, c}, {kArgBias, bias}, {kArgScratchpad, scratch}, {kArgPostOp0Src1, second}}};
  dnnl_exec_arg_t args[6];
  int nargs = 0;
  dnnl_status_t status = 0;
  for (const auto &[id, ptr] : given) {
    if (ptr == nullptr) continue;
    args[nargs].arg = id;
    status = dnnl_memory_create(&args[nargs].memory, dnnl_primitive_desc_query_md(mm.pd, kQueryExecArg, id),
                                rt.engine, ptr);
    if (status != 0) break;
    ++nargs;
  }
  if (status == 0) {
    omp_set_num_threads(rt.threads);  // the team size of this calling thread's OpenMP regions
    status = dnnl_primitive_execute(mm.run, rt.stream, nargs, args);
    if (status == 0) status = dnnl_stream_wait(rt.stream);
  }
  for (int i = 0; i < nargs; ++i) dnnl_memory_destroy(args[i].memory);
  Check(status);
}

// Runs `body` one call at a time; 1 for a wrong number of parameters, 2 for any failure (a shape oneDNN rejects,
// memory exhausted).
int Locked(int nparam, int expected, const std::function<void()> &body) {
  if (nparam != expected) return 1;
  try {
    Runtime &rt = Rt();
    std::lock_guard<std::mutex> lock(rt.mutex);
    body();
    return 0;
  } catch (...) {
    return 2;
  }
}

}  // namespace

// The loaded libdnnl's major version (the loader wants 3).
extern "C" int SvdMatmulVersion() { return dnnl_version()->major; }

// The implementation oneDNN picks for a matmul of m rows, k in and n out features: kind 0 the forward pass with bias,
// 1 without, 2 the input's gradient, 3 the weight's; empty if it cannot create one. For the benchmarks' notes.
extern "C" const char *SvdMatmulImpl(int kind, int64_t m, int64_t k, int64_t n) {
  const char *info = "";
  Locked(0, 0, [&] {
    const Matmul &mm = Get(static_cast<Kind>(kind), Rows{m, k, n});
    Check(dnnl_primitive_desc_query(mm.pd, kQueryImplInfo, 0, &info));
  });
  return info;
}

// Frees the scratch buffer (the next call allocates it again).
extern "C" void SvdMatmulRelease() {
  Runtime &rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mutex);
  std::free(rt.scratch);
  rt.scratch = nullptr;
  rt.scratch_size = 0;
}

// Sets the number of OpenMP threads the matmuls run on (the machine's cores until called).
extern "C" void SvdMatmulSetThreads(int threads) {
  Runtime &rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.threads = threads < 1 ? 1 : threads;
}

// The fully connected layers' entry points are those of `linear_entry.h`.
int RunLinear(LinearKind kind, int nparam, int expected, void **params, int *ndims, int64_t **shapes) {
  return Locked(nparam, expected, [&] {
    const LinearOperands o = ReadLinear(kind, params, ndims, shapes);
    Run(static_cast<Kind>(kind), o.rows, o.a, o.b, o.bias, o.c);
  });
}

// GEGLU's projection and gating in two matmuls with fused epilogues: (x (..., k), weight (2h, k), bias (2h,)) ->
// y (..., h) = (x Wa^T + ba) * gelu(x Wg^T + bg), Wa and Wg the first and second h rows of weight (ba, bg likewise).
// The gelu half is written to a buffer that the second matmul's epilogue multiplies in, so the (..., 2h) projection
// is never written and no separate gating pass reads it. The rows go in pieces whose gate takes at most
// 64 MB (SVD_GEGLU_GATE_BYTES), so the buffer, kept between calls, stays small at any resolution (two pieces at the
// SVD UNet's first level for 2 x 14 frames of 128x128, whose gate would take 73 MB).
size_t GateBytes() {
  const char *env = std::getenv("SVD_GEGLU_GATE_BYTES");
  const long long bytes = env != nullptr ? std::atoll(env) : 0;
  return bytes > 0 ? static_cast<size_t>(bytes) : size_t(64) << 20;
}

extern "C" int GegluLinearForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                  void *) {
  return Locked(nparam, 4, [&] {
    const int64_t h = shapes[1][0] / 2;
    const Rows all = ReadRows(ndims[0], shapes[0], h);
    const int64_t piece = std::max<int64_t>(1, std::min<int64_t>(all.m, GateBytes() / (sizeof(float) * h)));
    Runtime &rt = Rt();
    auto *x = static_cast<float *>(params[0]), *y = static_cast<float *>(params[3]);
    auto *weight = static_cast<float *>(params[1]), *bias = static_cast<float *>(params[2]);
    for (int64_t row = 0; row < all.m; row += piece) {
      const Rows r{std::min(piece, all.m - row), all.k, h};
      // the gate goes after the larger of the two matmuls' working memories, in the one scratch buffer
      const size_t offset =
          (std::max(Get(Kind::kGelu, r).scratch_bytes, Get(Kind::kTimesGate, r).scratch_bytes) + 63) / 64 * 64;
      auto *gate =
          reinterpret_cast<float *>(static_cast<char *>(rt.Scratch(offset + sizeof(float) * r.m * h)) + offset);
      Run(Kind::kGelu, r, x + row * all.k, weight + h * all.k, bias + h, gate);
      Run(Kind::kTimesGate, r, x + row * all.k, weight, bias, y + row * h, gate);
    }
  });
}

// A fully connected layer plus a residual in the matmul's epilogue: (x (..., k), weight (n, k), bias (n,),
// residual (..., n)) -> y (..., n) = x W^T + b + residual, with no separate pass over the output to add it.
extern "C" int LinearResidualForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  return Locked(nparam, 5, [&] {
    const Rows r = ReadRows(ndims[0], shapes[0], shapes[1][0]);
    if (ReadRows(ndims[3], shapes[3], r.n).m != r.m || shapes[3][ndims[3] - 1] != r.n) throw Error{};
    Run(Kind::kPlus, r, params[0], params[1], params[2], params[4], params[3]);
  });
}
