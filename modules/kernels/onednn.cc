// 2D convolution and fully connected layers for MindSpore's CPU backend as AOT custom operators (forward, gradient of
// the input, gradients of the weight and bias), through the oneDNN library that MindSpore itself ships (libdnnl.so.2,
// oneDNN 2.2). The fully connected layers are at the end of the file.
//
// MindSpore's own Conv2D asks oneDNN for a convolution on plain NCHW tensors, which oneDNN runs as an im2col GEMM
// (`gemm:jit`) at well under half of what the machine's direct kernels reach. Here the primitives are created with
// the layouts left to oneDNN (`format_tag::any`), so it picks its blocked direct kernels (`jit:avx2`,
// `brgconv:avx512_core`, ...), and Winograd's algorithm for 3x3 convolutions where it has one and it pays
// (`PreferWinograd`); the inputs are reordered into those layouts and the result back to NCHW, which costs a few
// percent of the convolution. 3x3 convolutions of images of at most 16 pixels run as the kernel's own Winograd, whose
// weight transform stays in the cache (`FusedWinogradForward`, AVX-512 only); other outputs of a few pixels per
// sample as GEMMs (`GemmForward`); the temporal (3, 1) convolutions as Winograd's F(2, 3) along time in GEMMs
// (`TemporalWinogradForward`). The blocked copies, transforms and oneDNN's working memory come from scratch buffers
// kept until `SvdConvRelease`, and the forward pass runs in pieces (of the batch, else of the columns) that bound
// them.
//
// MindSpore's libdnnl is built for the THREADPOOL runtime: it runs in parallel only through a thread pool that the
// caller hands it with the stream. `Pool` is that pool; its idle workers sleep rather than spin, so they never take
// cores from MindSpore's own threads between calls.
//
// Entry points have MindSpore's AOT signature: params holds the inputs, then the outputs. Every operator takes the
// geometry as a six-element int64 input (stride along H and W, padding top, bottom, left, right); the number of
// groups is C_in / the weight's second dimension. float32 only; the Python side casts other types.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "oneapi/dnnl/dnnl.hpp"
#include "linear_entry.h"
#include "oneapi/dnnl/dnnl_threadpool.hpp"
#include "softmax_row.h"

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

// A fixed set of workers; `parallel_for` hands out the n items through an atomic counter and the calling thread
// works too. Idle workers wait on a condition variable.
class Pool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit Pool(int threads) : threads_(threads < 1 ? 1 : threads) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~Pool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto &t : workers_) t.join();
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return inside_; }
  uint64_t get_flags() const override { return 0; }
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 1 || threads_ == 1 || inside_) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      total_ = n;
      next_.store(0);
      busy_.store(threads_ - 1);
      ++generation_;
    }
    wake_.notify_all();
    Run();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_.load() == 0; });
  }

 private:
  void Run() {
    inside_ = true;
    for (int i; (i = next_.fetch_add(1)) < total_;) (*fn_)(i, total_);
    inside_ = false;
  }
  void Work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      Run();
      if (busy_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }
  static thread_local bool inside_;
  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  const std::function<void(int, int)> *fn_ = nullptr;
  int total_ = 0;
  std::atomic<int> next_{0}, busy_{0};
};
thread_local bool Pool::inside_ = false;

// One convolution's shapes: input (n, c, h, w), weight (o, c / groups, kh, kw), output (n, o, oh, ow).
struct Geometry {
  int64_t n, c, h, w, o, kh, kw, oh, ow, groups;
  memory::dims strides, pad_l, pad_r;
  bool inference = false;  // a forward pass outside training: Winograd may take more working memory

  std::array<int64_t, 14> Key() const {
    return {n, c, h, w, o, kh, kw, groups, strides[0], strides[1], pad_l[0], pad_l[1], pad_r[0], pad_r[1]};
  }
  memory::dims SrcDims() const { return {n, c, h, w}; }
  memory::dims DstDims() const { return {n, o, oh, ow}; }
  memory::dims WeightDims() const {
    if (groups == 1) return {o, c, kh, kw};
    return {groups, o / groups, c / groups, kh, kw};
  }
  Tag WeightTag() const { return groups == 1 ? Tag::oihw : Tag::goihw; }
};

// The layouts MindSpore holds a geometry's tensors in: NCHW, where a row may be longer than the geometry's
// (`row`, `out_row`: the columns of a call that the forward pass splits into pieces of columns).
struct Plain {
  memory::desc src, dst, weight, bias;
  explicit Plain(const Geometry &g, int64_t row = 0, int64_t out_row = 0)
      : src(g.SrcDims(), kF32, Strides(g.c, g.h, row ? row : g.w)),
        dst(g.DstDims(), kF32, Strides(g.o, g.oh, out_row ? out_row : g.ow)),
        weight(g.WeightDims(), kF32, g.WeightTag()),
        bias({g.o}, kF32, Tag::x) {}
  static memory::dims Strides(int64_t c, int64_t h, int64_t row) { return {c * h * row, h * row, row, 1}; }
};

// params: x (n, c, h, w), weight (o, c / g, kh, kw), geometry (6,) or (7,), the seventh 1 outside training; shapes
// as MindSpore gives them. A 5-D x (n, c, t, h, w) with a weight (o, c, kt, 1, 1), a temporal convolution, is the
// 2-D convolution of (n, c, t, h*w) with (o, c, kt, 1): the same memory.
Geometry Read(void **params, int *ndims, int64_t **shapes) {
  const int64_t *x = shapes[0], *wt = shapes[1];
  const int64_t *g = static_cast<const int64_t *>(params[2]);
  const int64_t width = ndims[0] == 5 ? x[3] * x[4] : x[3];
  Geometry geo{x[0], x[1], x[2], width, wt[0], wt[2], wt[3], 0, 0, x[1] / wt[1], {g[0], g[1]}, {g[2], g[4]},
               {g[3], g[5]}};
  geo.inference = shapes[2][0] > 6 && g[6] != 0;
  geo.oh = (geo.h + g[2] + g[3] - geo.kh) / g[0] + 1;
  geo.ow = (geo.w + g[4] + g[5] - geo.kw) / g[1] + 1;
  return geo;
}

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::unique_ptr<Pool> pool;
  dnnl::stream stream;
  std::mutex mutex;  // one convolution at a time: the caches and the scratch buffers below are shared

  void SetThreads(int threads) {
    if (pool && pool->get_num_threads() == threads) return;
    stream = dnnl::stream();
    pool = std::make_unique<Pool>(threads);
    stream = dnnl::threadpool_interop::make_stream(engine, pool.get());
  }
};

Runtime &Rt() {
  static Runtime *rt = [] {
    auto *r = new Runtime();  // never destroyed: workers must not be joined during static destruction
    r->SetThreads(static_cast<int>(std::thread::hardware_concurrency()));
    return r;
  }();
  return *rt;
}

// Runs `items` pieces of work over the pool's threads, each making its SGEMM calls single-threaded: `work(item, one)`
// hands `one`, a pool of the running thread alone, to `dnnl::threadpool_interop::sgemm`, and says whether every call
// succeeded. Throws if one did not.
void SerialGemms(int items, const std::function<bool(int, Pool &)> &work) {
  std::atomic<int> failed{0};
  Rt().pool->parallel_for(items, [&](int item, int) {
    thread_local Pool one(1);
    if (!work(item, one)) failed = 1;
  });
  if (failed.load()) throw std::runtime_error("SGEMM failed");
}

// Scratch space for the blocked copies and oneDNN's working memory, kept between calls (allocating and first
// touching a few hundred megabytes at every call of the VAE's decoder cost about half of its convolution time) until
// `SvdConvRelease`, which the pipeline calls between its stages. One buffer holds all of a call's parts side by side,
// so it grows to the largest call's total rather than to the sum of each part's largest.
struct Scratch {
  void *ptr = nullptr;
  size_t size = 0;
  void *Get(size_t bytes) {
    if (bytes > size) {
      std::free(ptr);
      ptr = std::aligned_alloc(64, bytes);
      size = ptr ? bytes : 0;
      if (!ptr) throw std::bad_alloc();
    }
    return ptr;
  }
  void Release() {
    std::free(ptr);
    ptr = nullptr;
    size = 0;
  }
};
Scratch scratch;

size_t Round(size_t bytes) { return (bytes + 63) / 64 * 64; }

// The room a tensor takes in the scratch buffer: none when MindSpore's layout is the one the primitive wants.
size_t Need(const memory::desc &plain, const memory::desc &wanted) {
  return plain == wanted ? 0 : Round(wanted.get_size());
}

// One call's part of the scratch buffer, handed out in order.
struct Arena {
  char *base;
  size_t used = 0;
  explicit Arena(size_t bytes) : base(static_cast<char *>(scratch.Get(bytes))) {}
  void *Take(size_t bytes) {
    void *at = base + used;
    used += Round(bytes);
    return at;
  }
};

// A tensor that MindSpore holds in a plain layout, seen in the layout the primitive wants: the same memory when they
// agree, else room in the arena, filled by a reorder when `fill`.
memory View(const memory::desc &plain, const memory::desc &wanted, void *data, Arena &arena, bool fill) {
  Runtime &rt = Rt();
  memory user(plain, rt.engine, data);
  if (plain == wanted) return user;
  memory blocked(wanted, rt.engine, arena.Take(wanted.get_size()));
  if (fill) dnnl::reorder(user, blocked).execute(rt.stream, user, blocked);
  return blocked;
}

// Copies `result` back into MindSpore's plain tensor at `data` when it was computed in another layout.
void Return(memory &result, const memory::desc &plain, void *data) {
  Runtime &rt = Rt();
  if (result.get_desc() == plain) return;
  memory user(plain, rt.engine, data);
  dnnl::reorder(result, user).execute(rt.stream, result, user);
}

struct Primitives {
  dnnl::convolution_forward::primitive_desc forward;
  dnnl::convolution_forward forward_run;
  dnnl::convolution_backward_data::primitive_desc data;
  dnnl::convolution_backward_data data_run;
  dnnl::convolution_backward_weights::primitive_desc weights;
  dnnl::convolution_backward_weights weights_run;
};

// oneDNN's working memory (Winograd's transformed tiles, ...) is given at each call from `scratch` rather than held
// by every primitive for the life of the process, which kept gigabytes for the VAE's decoder.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The working memory a primitive asks for, from the arena.
memory Workspace(const memory::desc &desc, Arena &arena) {
  return memory(desc, Rt().engine, desc.get_size() ? arena.Take(desc.get_size()) : nullptr);
}

// Whether a geometry may run Winograd's F(4x4, 3x3), which oneDNN has for AVX-512 cores: 3x3, stride 1, one group.
bool WinogradShape(const Geometry &g) {
  return g.kh == 3 && g.kw == 3 && g.strides[0] == 1 && g.strides[1] == 1 && g.groups == 1;
}

// The primitives of one geometry and algorithm, created on first use (the gradients' only when asked for, and
// always direct); null when oneDNN has no Winograd kernel for this CPU or geometry.
Primitives *Get(const Geometry &g, bool gradients, bool winograd) {
  static std::map<std::pair<std::array<int64_t, 14>, bool>, std::unique_ptr<Primitives>> cache;
  auto &slot = cache[{g.Key(), winograd}];
  const dnnl::engine &engine = Rt().engine;
  const memory::desc src(g.SrcDims(), kF32, Tag::any), dst(g.DstDims(), kF32, Tag::any),
      weight(g.WeightDims(), kF32, Tag::any), bias({g.o}, kF32, Tag::x);
  if (!slot) {
    const auto kind = winograd ? dnnl::algorithm::convolution_winograd : dnnl::algorithm::convolution_direct;
    dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training, kind, src, weight, bias, dst, g.strides,
                                      g.pad_l, g.pad_r);
    auto p = std::make_unique<Primitives>();
    try {
      p->forward = dnnl::convolution_forward::primitive_desc(d, UserScratchpad(), engine);
    } catch (const dnnl::error &) {
      if (!winograd) throw;
      return nullptr;  // the slot stays empty: asked again, it fails again
    }
    p->forward_run = dnnl::convolution_forward(p->forward);
    slot = std::move(p);
  }
  Primitives &p = *slot;
  if (gradients && !p.data) {
    const auto algorithm = dnnl::algorithm::convolution_direct;
    dnnl::convolution_backward_data::desc d(algorithm, src, weight, dst, g.strides, g.pad_l, g.pad_r);
    p.data = dnnl::convolution_backward_data::primitive_desc(d, UserScratchpad(), engine, p.forward);
    p.data_run = dnnl::convolution_backward_data(p.data);
    dnnl::convolution_backward_weights::desc w(algorithm, src, weight, bias, dst, g.strides, g.pad_l, g.pad_r);
    p.weights = dnnl::convolution_backward_weights::primitive_desc(w, UserScratchpad(), engine, p.forward);
    p.weights_run = dnnl::convolution_backward_weights(p.weights);
  }
  return &p;
}

// The forward pass runs in pieces that bound the memory growing with the batch (blocked copies of the input and
// output, Winograd's transformed tiles: about 4.6 times the input) to this many bytes where the geometry allows, so
// that the VAE decoder's largest layers (14 frames of 128 channels at 128x128) do not hold about 770 MB beside
// MindSpore's own tensors. What does not grow with the batch (Winograd's transformed weights) is not split: a piece
// is a divisor of the batch. When one sample is still over the bound and the kernel is one column wide without
// padding along W (the temporal convolutions: (kt, 1) over (T, H*W), a batch of one clip), a piece is also a divisor
// of the columns. SVD_CONV_CHUNK_BYTES sets another bound (the tests use a small one).
size_t ChunkBytes() {
  const char *env = std::getenv("SVD_CONV_CHUNK_BYTES");
  return env != nullptr ? std::strtoull(env, nullptr, 10) : size_t(128) << 20;
}

// The smallest divisor of `n` that is at least `want` (n itself when none is smaller).
int64_t DivisorAtLeast(int64_t n, int64_t want) {
  for (int64_t k = want < 1 ? 1 : want; k < n; ++k)
    if (n % k == 0) return k;
  return n;
}

// A geometry's forward primitives: Winograd's when asked for and oneDNN has them for it (a piece of a call, or one
// sample of it, may lack them where the whole call has them), else the direct ones.
Primitives &ForwardPrimitives(const Geometry &g, bool winograd) {
  Primitives *p = winograd ? Get(g, false, true) : nullptr;
  return p != nullptr ? *p : *Get(g, false, false);
}

// The working memory of one forward call beside MindSpore's tensors: blocked copies and oneDNN's scratchpad.
size_t ForwardBytes(const Geometry &g, bool winograd) {
  const auto &f = ForwardPrimitives(g, winograd).forward;
  const Plain plain(g);
  size_t bytes = f.scratchpad_desc().get_size();
  if (f.src_desc() != plain.src) bytes += f.src_desc().get_size();
  if (f.dst_desc() != plain.dst) bytes += f.dst_desc().get_size();
  return bytes;
}

// (samples, columns) of one piece of the forward pass.
std::pair<int64_t, int64_t> Piece(const Geometry &g, bool winograd) {
  const size_t whole = ForwardBytes(g, winograd), budget = ChunkBytes();
  size_t fixed = 0;
  if (g.n > 1 && whole > budget) {  // the part of one sample's call that a batch of n does not multiply
    Geometry one = g;
    one.n = 1;
    const size_t single = ForwardBytes(one, winograd), per = (whole - single) / static_cast<size_t>(g.n - 1);
    fixed = single > per ? single - per : 0;
  }
  const size_t per_sample = (whole - fixed) / static_cast<size_t>(g.n) + 1;
  const int64_t over = static_cast<int64_t>((per_sample * g.n + budget - 1) / budget);  // pieces needed
  const int64_t samples = g.n / DivisorAtLeast(g.n, over);
  const bool columns = g.kw == 1 && g.strides[1] == 1 && g.pad_l[1] == 0 && g.pad_r[1] == 0;
  if (samples > 1 || !columns || per_sample <= budget) return {samples, g.w};
  return {1, g.w / DivisorAtLeast(g.w, static_cast<int64_t>((per_sample + budget - 1) / budget))};
}

// The forward pass with one algorithm, in pieces.
void RunForward(Geometry g, void **params, bool winograd) {
  Runtime &rt = Rt();
  const int64_t n = g.n, width = g.w;
  std::tie(g.n, g.w) = Piece(g, winograd);
  g.ow = g.w == width ? g.ow : g.w;  // split columns only where the output has the input's
  Primitives &p = ForwardPrimitives(g, winograd);
  const int64_t out_width = g.w == width ? g.ow : width;
  const Plain plain(g, width, out_width);
  const auto &f = p.forward;
  Arena arena(Need(plain.weight, f.weights_desc()) + Need(plain.src, f.src_desc()) + Need(plain.dst, f.dst_desc()) +
              Round(f.scratchpad_desc().get_size()));
  memory w = View(plain.weight, f.weights_desc(), params[1], arena, true);
  memory bias(plain.bias, rt.engine, params[3]);
  const size_t pieces_start = arena.used;  // every piece takes the same room after the weights
  const int64_t src_sample = g.c * g.h * width, dst_sample = g.o * g.oh * out_width;
  for (int64_t i = 0; i < n; i += g.n) {
    for (int64_t j = 0; j < width; j += g.w) {
      float *in = static_cast<float *>(params[0]) + i * src_sample + j;
      float *out = static_cast<float *>(params[4]) + i * dst_sample + j;
      arena.used = pieces_start;
      memory x = View(plain.src, f.src_desc(), in, arena, true);
      memory y = View(plain.dst, f.dst_desc(), out, arena, false);
      p.forward_run.execute(rt.stream, {{DNNL_ARG_SRC, x},
                                        {DNNL_ARG_WEIGHTS, w},
                                        {DNNL_ARG_BIAS, bias},
                                        {DNNL_ARG_DST, y},
                                        {DNNL_ARG_SCRATCHPAD, Workspace(f.scratchpad_desc(), arena)}});
      Return(y, plain.dst, out);
    }
  }
}

bool UseGemm(const Geometry &g);
void GemmForward(const Geometry &g, void **params);
bool UseTemporalWinograd(const Geometry &g);
void TemporalWinogradForward(const Geometry &g, void **params);
bool UseFusedWinograd(const Geometry &g);
void FusedWinogradForward(const Geometry &g, void **params);

// Whether Winograd's F(4x4, 3x3) beats the direct kernel that oneDNN picked. It takes 4x fewer multiplications but
// transforms the weights at every call, and how that nets out depends on the direct kernel. Against the older
// `jit:avx512_common` (an Intel Xeon with AMX, where oneDNN 2.2 has no fp32 `brgconv`) it took 0.15-0.85x the time on
// every SVD shape with 64 or more channels in and out, from 28 x 4 x 4 to 14 x 64 x 64 pixels, and 1.2-1.8x on the
// thin ones (8 -> 320, 320 -> 4, 128 -> 3). Against `brgconv:avx512_core` (an AMD EPYC) it took 1.7x at 28 x 8 x 8
// and 0.7x at 28 x 16 x 16, so there it runs from 4,096 output pixels per call. Its working memory holds the
// transformed weights, 4x the weights whatever the batch, which the scratch buffer keeps until released: a geometry
// whose working memory for one sample is over kWinogradMaxBytes (kWinogradInferenceBytes outside training) runs
// direct. In training that is the UNet's 4x4 level's 2560 -> 1280 and 1920 -> 1280 (472 and 354 MB): 275 MiB less
// at the full-size training step's peak (21,256 MiB against 21,531 with no bound; a 128 MB bound, which also sent
// every convolution with 1280 channels out to the direct kernel, peaked at 21,109 and took 0.39 s more). Outside
// training they take Winograd: a generation's sampling peaks below its decoding, which frees the buffer first, and
// the 4x4 level's convolutions took 0.63-0.84 s per UNet evaluation against 0.75-1.14 s (in-process alternation).
// Where the kernel's own Winograd runs (AVX-512, `UseFusedWinograd`), those levels no longer come here.
constexpr int64_t kMinWinogradChannels = 64, kBrgconvWinogradPixels = 4096;
constexpr size_t kWinogradMaxBytes = size_t(256) << 20, kWinogradInferenceBytes = size_t(512) << 20;

bool PreferWinograd(const Geometry &g) {
  if (g.c < kMinWinogradChannels || g.o < kMinWinogradChannels) return false;
  Geometry one = g;
  one.n = 1;
  if (ForwardBytes(one, true) > (g.inference ? kWinogradInferenceBytes : kWinogradMaxBytes)) return false;
  const std::string direct = Get(g, false, false)->forward.impl_info_str();
  return direct.rfind("brg", 0) != 0 || g.n * g.oh * g.ow >= kBrgconvWinogradPixels;
}

// (x, weight, geometry, bias) -> y. SVD_CONV_WINOGRAD=1 takes Winograd wherever oneDNN has it, =0 never (the
// temporal F(2, 3) and the kernel's own small-image Winograd included).
void Forward(Geometry g, void **params) {
  const char *env = std::getenv("SVD_CONV_WINOGRAD");
  const char setting = env != nullptr ? env[0] : 'a';
  if (setting != '0' && UseFusedWinograd(g)) return FusedWinogradForward(g, params);
  if (UseGemm(g)) return GemmForward(g, params);
  if (setting != '0' && UseTemporalWinograd(g)) return TemporalWinogradForward(g, params);
  bool winograd = setting != '0' && WinogradShape(g) && Get(g, false, true) != nullptr;
  if (winograd && setting != '1') {
    static std::map<std::pair<std::array<int64_t, 14>, bool>, bool> preferred;
    const std::pair<std::array<int64_t, 14>, bool> key{g.Key(), g.inference};
    const auto known = preferred.find(key);
    winograd = known != preferred.end() ? known->second : (preferred[key] = PreferWinograd(g));
  }
  RunForward(g, params, winograd);
}

// (x, weight, geometry, dy) -> dx
void BackwardData(Geometry g, void **params) {
  Runtime &rt = Rt();
  Primitives &p = *Get(g, true, false);
  const Plain plain(g);
  const auto &d = p.data;
  Arena arena(Need(plain.dst, d.diff_dst_desc()) + Need(plain.weight, d.weights_desc()) +
              Need(plain.src, d.diff_src_desc()) + Round(d.scratchpad_desc().get_size()));
  memory dy = View(plain.dst, d.diff_dst_desc(), params[3], arena, true);
  memory w = View(plain.weight, d.weights_desc(), params[1], arena, true);
  memory dx = View(plain.src, d.diff_src_desc(), params[4], arena, false);
  p.data_run.execute(rt.stream, {{DNNL_ARG_DIFF_DST, dy},
                                 {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_DIFF_SRC, dx},
                                 {DNNL_ARG_SCRATCHPAD, Workspace(d.scratchpad_desc(), arena)}});
  Return(dx, plain.src, params[4]);
}

// (x, weight, geometry, dy) -> (dweight, dbias)
void BackwardWeights(Geometry g, void **params) {
  Runtime &rt = Rt();
  Primitives &p = *Get(g, true, false);
  const Plain plain(g);
  const auto &b = p.weights;
  Arena arena(Need(plain.src, b.src_desc()) + Need(plain.dst, b.diff_dst_desc()) +
              Need(plain.weight, b.diff_weights_desc()) + Round(b.scratchpad_desc().get_size()));
  memory x = View(plain.src, b.src_desc(), params[0], arena, true);
  memory dy = View(plain.dst, b.diff_dst_desc(), params[3], arena, true);
  memory dw = View(plain.weight, b.diff_weights_desc(), params[4], arena, false);
  memory db(plain.bias, rt.engine, params[5]);
  p.weights_run.execute(rt.stream, {{DNNL_ARG_SRC, x},
                                    {DNNL_ARG_DIFF_DST, dy},
                                    {DNNL_ARG_DIFF_WEIGHTS, dw},
                                    {DNNL_ARG_DIFF_BIAS, db},
                                    {DNNL_ARG_SCRATCHPAD, Workspace(b.scratchpad_desc(), arena)}});
  Return(dw, plain.weight, params[4]);
}

// Runs `body` one call at a time (the caches and the scratch buffer are shared) and waits for the stream. The status
// is 1 for a wrong number of parameters, `body`'s own when non-zero, and 2 for any exception (a shape oneDNN
// rejects, memory exhausted).
int Locked(int nparam, int expected, const std::function<int()> &body) {
  if (nparam != expected) return 1;
  try {
    Runtime &rt = Rt();
    std::lock_guard<std::mutex> lock(rt.mutex);
    if (const int status = body()) return status;
    rt.stream.wait();
    return 0;
  } catch (...) {
    return 2;
  }
}

// A convolution entry point: `body` on the call's geometry.
int Guard(int nparam, int expected, void (*body)(Geometry, void **), void **params, int *ndims, int64_t **shapes) {
  return Locked(nparam, expected, [&] {
    if ((ndims[0] != 4 && ndims[0] != 5) || ndims[1] != ndims[0]) return 1;
    body(Read(params, ndims, shapes), params);
    return 0;
  });
}

// Fully connected layers: y = x W^T + b with W (out, in) as PyTorch keeps it, through oneDNN's matmul (`gemm:jit`:
// the JIT SGEMM with the bias added in its epilogue). MindSpore's own MatMul is as fast alone but needs a separate
// BiasAdd pass over the output. x may have any rank: its leading axes are the rows (`linear_entry.h`).

// One matmul, created on first use per shape: `a` (rows, depth) times `b` (depth, cols), each plain with the given
// layout tag (ab: row-major, ba: the transpose of a row-major tensor), plus an optional bias over the columns.
struct Gemm {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul run;
};

enum class GemmKind { kForward, kForwardNoBias, kData, kWeights };  // LinearKind's order

Gemm &GetGemm(GemmKind kind, const Rows &r) {
  static std::map<std::array<int64_t, 4>, Gemm> cache;
  Gemm &g = cache[{static_cast<int64_t>(kind), r.m, r.k, r.n}];
  if (g.run) return g;
  memory::desc a, b, c, bias;
  switch (kind) {
    case GemmKind::kForward:  // y (m, n) = x (m, k) W^T (k, n)
    case GemmKind::kForwardNoBias:
      a = memory::desc({r.m, r.k}, kF32, Tag::ab);
      b = memory::desc({r.k, r.n}, kF32, Tag::ba);
      c = memory::desc({r.m, r.n}, kF32, Tag::ab);
      if (kind == GemmKind::kForward) bias = memory::desc({1, r.n}, kF32, Tag::ab);
      break;
    case GemmKind::kData:  // dx (m, k) = dy (m, n) W (n, k)
      a = memory::desc({r.m, r.n}, kF32, Tag::ab);
      b = memory::desc({r.n, r.k}, kF32, Tag::ab);
      c = memory::desc({r.m, r.k}, kF32, Tag::ab);
      break;
    case GemmKind::kWeights:  // dW (n, k) = dy^T (n, m) x (m, k)
      a = memory::desc({r.n, r.m}, kF32, Tag::ba);
      b = memory::desc({r.m, r.k}, kF32, Tag::ab);
      c = memory::desc({r.n, r.k}, kF32, Tag::ab);
      break;
  }
  dnnl::matmul::desc d = kind == GemmKind::kForward ? dnnl::matmul::desc(a, b, bias, c) : dnnl::matmul::desc(a, b, c);
  g.pd = dnnl::matmul::primitive_desc(d, UserScratchpad(), Rt().engine);
  g.run = dnnl::matmul(g.pd);
  return g;
}

// One GEMM (operands as in `GetGemm`), its working memory from the scratch buffer.
void RunGemm(GemmKind kind, const Rows &r, void *a, void *b, void *bias, void *c) {
  Runtime &rt = Rt();
  Gemm &g = GetGemm(kind, r);
  Arena arena(Round(g.pd.scratchpad_desc().get_size()));
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(g.pd.src_desc(), rt.engine, a)},
                                       {DNNL_ARG_WEIGHTS, memory(g.pd.weights_desc(), rt.engine, b)},
                                       {DNNL_ARG_DST, memory(g.pd.dst_desc(), rt.engine, c)},
                                       {DNNL_ARG_SCRATCHPAD, Workspace(g.pd.scratchpad_desc(), arena)}};
  if (bias != nullptr) args.emplace(DNNL_ARG_BIAS, memory(g.pd.bias_desc(), rt.engine, bias));
  g.run.execute(rt.stream, args);
}

// A convolution whose output has a few pixels per sample (the UNet's 2x2 level where the fused Winograd does not
// run: without AVX-512; the downsamplers' 2x2 outputs) runs as a GEMM over the whole batch: the input's patches as
// rows (im2col, taps past the border as zeros), times the weight as MindSpore holds it ((O, C x kh x kw), no
// reorder). oneDNN's direct kernels block their registers along the output row, which has 2 pixels there, and
// reach a fraction of the machine's GEMM; their weight reorder also reads and writes the whole weight at every call.
// Each thread takes a slice of the output channels, one single-threaded SGEMM of all rows times its slice of the
// weight, and writes its columns of the result to NCHW with the bias added. oneDNN 2.2's matmul on the same pool ran
// these GEMMs (112 rows, 11,520 deep, 1,280 out) at about the rate of one thread: the slices took 0.29 s per UNet
// evaluation against its 0.35 s (in-process alternation, 4 rounds), and 14 ms against 27 ms for one such GEMM alone
// with its weights out of cache.
constexpr int64_t kGemmMaxPixels = 4;

bool UseGemm(const Geometry &g) {
  const char *env = std::getenv("SVD_CONV_GEMM");
  if (env != nullptr && env[0] == '0') return false;
  return g.groups == 1 && g.oh * g.ow <= kGemmMaxPixels;
}

void GemmForward(const Geometry &g, void **params) {
  Runtime &rt = Rt();
  const int64_t pixels = g.oh * g.ow, taps = g.kh * g.kw, depth = g.c * taps, m = g.n * pixels;
  const size_t col_bytes = Round(sizeof(float) * m * depth), out_bytes = Round(sizeof(float) * m * g.o);
  Arena arena(col_bytes + out_bytes);
  float *col = static_cast<float *>(arena.Take(col_bytes)), *rows = static_cast<float *>(arena.Take(out_bytes));
  const float *x = static_cast<const float *>(params[0]);
  rt.pool->parallel_for(static_cast<int>(m), [&](int row, int) {
    const int64_t b = row / pixels, oy = row % pixels / g.ow, ox = row % g.ow;
    float *dst = col + row * depth;
    for (int64_t c = 0; c < g.c; ++c) {
      const float *plane = x + (b * g.c + c) * g.h * g.w;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.strides[0] - g.pad_l[0] + ky;
        for (int64_t kx = 0; kx < g.kw; ++kx, ++dst) {
          const int64_t ix = ox * g.strides[1] - g.pad_l[1] + kx;
          *dst = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w ? plane[iy * g.w + ix] : 0.0f;
        }
      }
    }
  });
  const auto *weight = static_cast<const float *>(params[1]), *bias = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int parts = rt.pool->get_num_threads();
  SerialGemms(parts, [&](int part, Pool &one) {
    const int64_t first = g.o * part / parts, last = g.o * (part + 1) / parts;
    if (first == last) return true;
    // rows (m, o) = col (m, depth) weight^T, this part's columns
    if (dnnl::threadpool_interop::sgemm('N', 'T', m, last - first, depth, 1.0f, col, depth, weight + first * depth,
                                        depth, 0.0f, rows + first, g.o, &one) != dnnl::status::success)
      return false;
    for (int64_t b = 0; b < g.n; ++b)  // rows (n, pixels, o) -> y (n, o, pixels)
      for (int64_t o = first; o < last; ++o) {
        const float *in = rows + b * pixels * g.o + o;
        float *out = y + (b * g.o + o) * pixels;
        for (int64_t p = 0; p < pixels; ++p) out[p] = in[p * g.o] + bias[o];
      }
    return true;
  });
}

// Small images with many channels (the UNet's 4x4 and 2x2 levels at 128x128 pixels) run 3x3 convolutions as a
// Winograd F(m x m, 3x3) (m = 4, or 2 where that takes fewer products: 2x2 images) whose weight transform never
// leaves the cache. oneDNN's Winograd writes the transformed weights (4x the weights) to memory and reads them back at
// every call, which at these sizes costs more than the products; here each thread transforms a block of output
// channels for a block of input channels into a buffer the size of its L2 cache and multiplies it at once with the
// transformed input V (the (alpha^2, C, columns) tiles of every sample, alpha = m + 2), accumulating the products M
// (alpha^2, block, columns) in a second such buffer, and transforms M into its outputs when the block is done. The
// products run in an AVX-512 kernel that holds NO output channels x NV vectors of 16 columns in registers. The
// transforms are Lavin and Gray's (interpolation points 0, 1, -1, 2, -2 for m = 4):
//   F(4, 3): V = B^T d B, U = G g G^T, y = A^T M A with
//     B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
//     G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1],
//     A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1];
//   F(2, 3): B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//     A^T = [1 1 1 0; 0 1 -1 -1].
// Needs AVX-512 at build time, C a multiple of 16, and stride 1 with one pixel of padding on every side.
#if defined(__AVX512F__)
constexpr bool kFusedWinogradBuilt = true;

// The 1-D transforms along one axis, the k-th element of the input at [k * is] and of the output at [k * os]: the
// kernel's and the input's on vectors of 16 lanes, the output's on single values.
struct Winograd4 {
  static constexpr int kM = 4, kAlpha = 6;
  static void Kernel(const __m512 *g, int is, __m512 *u, int os) {
    const __m512 a = g[0], b = g[is], c = g[2 * is], ac = _mm512_add_ps(a, c), sixth = _mm512_set1_ps(-1.0f / 6);
    const __m512 p = _mm512_fmadd_ps(a, _mm512_set1_ps(1.0f / 24), _mm512_mul_ps(c, _mm512_set1_ps(1.0f / 6)));
    const __m512 q = _mm512_mul_ps(b, _mm512_set1_ps(1.0f / 12));
    u[0] = _mm512_mul_ps(a, _mm512_set1_ps(0.25f));
    u[os] = _mm512_mul_ps(_mm512_add_ps(ac, b), sixth);
    u[2 * os] = _mm512_mul_ps(_mm512_sub_ps(ac, b), sixth);
    u[3 * os] = _mm512_add_ps(p, q);
    u[4 * os] = _mm512_sub_ps(p, q);
    u[5 * os] = c;
  }
  static void Input(const __m512 *d, int is, __m512 *v, int os) {
    const __m512 d0 = d[0], d1 = d[is], d2 = d[2 * is], d3 = d[3 * is], d4 = d[4 * is], d5 = d[5 * is];
    const __m512 four = _mm512_set1_ps(4.0f), five = _mm512_set1_ps(5.0f);
    const __m512 a = _mm512_fnmadd_ps(four, d2, d4), b = _mm512_fnmadd_ps(four, d1, d3);  // d4 - 4 d2, d3 - 4 d1
    const __m512 e = _mm512_sub_ps(d4, d2), f = _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_sub_ps(d3, d1));
    v[0] = _mm512_add_ps(_mm512_fnmadd_ps(five, d2, _mm512_mul_ps(four, d0)), d4);
    v[os] = _mm512_add_ps(a, b);
    v[2 * os] = _mm512_sub_ps(a, b);
    v[3 * os] = _mm512_add_ps(e, f);
    v[4 * os] = _mm512_sub_ps(e, f);
    v[5 * os] = _mm512_add_ps(_mm512_fnmadd_ps(five, d3, _mm512_mul_ps(four, d1)), d5);
  }
  static void Output(const float *m, int is, float *y, int os) {
    const float a = m[is] + m[2 * is], b = m[is] - m[2 * is], c = m[3 * is] + m[4 * is], d = m[3 * is] - m[4 * is];
    y[0] = m[0] + a + c;
    y[os] = b + 2 * d;
    y[2 * os] = a + 4 * c;
    y[3 * os] = b + 8 * d + m[5 * is];
  }
};

struct Winograd2 {
  static constexpr int kM = 2, kAlpha = 4;
  static void Kernel(const __m512 *g, int is, __m512 *u, int os) {
    const __m512 half = _mm512_set1_ps(0.5f), ac = _mm512_mul_ps(_mm512_add_ps(g[0], g[2 * is]), half),
                 b = _mm512_mul_ps(g[is], half);
    u[0] = g[0];
    u[os] = _mm512_add_ps(ac, b);
    u[2 * os] = _mm512_sub_ps(ac, b);
    u[3 * os] = g[2 * is];
  }
  static void Input(const __m512 *d, int is, __m512 *v, int os) {
    v[0] = _mm512_sub_ps(d[0], d[2 * is]);
    v[os] = _mm512_add_ps(d[is], d[2 * is]);
    v[2 * os] = _mm512_sub_ps(d[2 * is], d[is]);
    v[3 * os] = _mm512_sub_ps(d[is], d[3 * is]);
  }
  static void Output(const float *m, int is, float *y, int os) {
    y[0] = m[0] + m[is] + m[2 * is];
    y[os] = m[is] - m[2 * is] - m[3 * is];
  }
};

// A 2-D transform, R x R -> S x S: `fn` along the columns, then along the rows.
template <int R, int S, typename T, typename Fn>
void Transform2D(const T *in, T *out, Fn fn) {
  T t[S * R];
  for (int j = 0; j < R; ++j) fn(in + j, R, t + j, R);
  for (int i = 0; i < S; ++i) fn(t + i * R, 1, out + i * S, 1);
}

// The 3x3 taps of 16 consecutive input channels (one weight row, 144 floats) as nine vectors, g[t] lane l = tap t of
// channel l: permutes of the nine loaded vectors (gathers are slower on CPUs with the gather-data-sampling fix).
class TapSplit {
 public:
  TapSplit() {
    for (int t = 0; t < 9; ++t)
      for (int p = 0; p < 5; ++p) {
        alignas(64) int32_t at[16] = {};
        __mmask16 mask = 0;
        for (int l = 0; l < 16; ++l)
          if (9 * l + t >= 32 * p && 9 * l + t < 32 * p + 32) {
            at[l] = 9 * l + t - 32 * p;
            mask = static_cast<__mmask16>(mask | (1u << l));
          }
        index_[t][p] = _mm512_load_si512(at);
        mask_[t][p] = mask;
      }
  }
  void operator()(const float *src, __m512 *g) const {
    __m512 z[10];
    for (int r = 0; r < 9; ++r) z[r] = _mm512_loadu_ps(src + 16 * r);
    z[9] = _mm512_setzero_ps();
    for (int t = 0; t < 9; ++t) {
      __m512 acc = _mm512_setzero_ps();
      for (int p = 0; p < 5; ++p)
        acc = _mm512_mask_mov_ps(acc, mask_[t][p], _mm512_permutex2var_ps(z[2 * p], index_[t][p], z[2 * p + 1]));
      g[t] = acc;
    }
  }

 private:
  __m512i index_[9][5];
  __mmask16 mask_[9][5];
};

// m (NO rows x 16 NV columns) = U V over `depth` input channels (a multiple of 16), or m += U V unless `first`: U
// row r, channel c at u[r * row + c / 16 * block + c % 16], V row c at v[c * vrow]; m row r at m[r * mrow].
template <int NO, int NV>
void WinogradProducts(const float *u, int64_t row, int64_t block, const float *v, int64_t vrow, int64_t depth,
                      float *m, int64_t mrow, bool first) {
  __m512 acc[NO][NV];
  for (int r = 0; r < NO; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < depth; c0 += 16, u += block, v += 16 * vrow)
    for (int c = 0; c < 16; ++c) {
      __m512 b[NV];
      for (int j = 0; j < NV; ++j) {
        b[j] = _mm512_loadu_ps(v + c * vrow + 16 * j);
        asm("" : "+v"(b[j]));  // held in a register: as memory operands of the FMAs it is loaded NO times
      }
      for (int r = 0; r < NO; ++r) {
        const __m512 a = _mm512_set1_ps(u[r * row + c]);
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
      }
    }
  // this block's sum added to the earlier blocks' (rather than accumulated on from them): shorter chains of roundings
  for (int r = 0; r < NO; ++r)
    for (int j = 0; j < NV; ++j) {
      float *at = m + r * mrow + 16 * j;
      _mm512_storeu_ps(at, first ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(at), acc[r][j]));
    }
}

using ProductsFn = void (*)(const float *, int64_t, int64_t, const float *, int64_t, int64_t, float *, int64_t, bool);
// By NV (1..7), the register block: NO x NV accumulators, NV vectors of V and one of U within the 32 registers.
constexpr int kProductRows[8] = {0, 28, 14, 9, 6, 5, 4, 3};
constexpr ProductsFn kProducts[8] = {nullptr,
                                     &WinogradProducts<28, 1>,
                                     &WinogradProducts<14, 2>,
                                     &WinogradProducts<9, 3>,
                                     &WinogradProducts<6, 4>,
                                     &WinogradProducts<5, 5>,
                                     &WinogradProducts<4, 6>,
                                     &WinogradProducts<3, 7>};

constexpr int64_t kFusedProductBytes = 256 << 10, kFusedInputBytes = 512 << 10, kFusedWeightBytes = 768 << 10;

template <typename T>
void FusedWinogradRun(const Geometry &g, void **params) {
  constexpr int m = T::kM, alpha = T::kAlpha, points = alpha * alpha;
  static const TapSplit split;
  Runtime &rt = Rt();
  const auto *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]),
             *bias = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t c_in = g.c, c_out = g.o, h = g.h, w = g.w;
  const int64_t th = (h + m - 1) / m, tw = (w + m - 1) / m, tiles = th * tw, cols = g.n * tiles;
  // NV vectors of 16 columns per register block, chosen to pad the columns least
  const int64_t vectors = (cols + 15) / 16;
  int nv = 7;
  for (int k = 7; k >= 1; --k)
    if ((vectors + k - 1) / k * k < (vectors + nv - 1) / nv * nv) nv = k;
  const int64_t padded = (vectors + nv - 1) / nv * nv * 16;  // columns in V and M
  const int rows = kProductRows[nv];
  // Blocks that keep a thread's working set within its L2 cache: the products M of out_block output channels
  // (points, out_block, padded) about kFusedProductBytes, and for each block of in_block input channels the rows of
  // V it multiplies (points, in_block, padded) and its U (points, out_block, in_block) about kFusedInputBytes and
  // kFusedWeightBytes.
  const int64_t column_bytes = int64_t(sizeof(float)) * points * padded;
  const int64_t out_block = rows * std::max<int64_t>(1, kFusedProductBytes / column_bytes / rows);
  const int64_t in_fit = std::min(kFusedInputBytes / column_bytes,
                                  kFusedWeightBytes / (int64_t(sizeof(float)) * points * out_block));
  const int64_t in_block = std::min(c_in, 16 * std::max<int64_t>(1, in_fit / 16));
  // each column's sample and its tile's top-left input pixel (the padding columns repeat the last tile, unused)
  std::vector<int32_t> sample(padded), top(padded), left(padded);
  for (int64_t col = 0; col < padded; ++col) {
    const int64_t t = std::min(col, cols - 1);
    sample[col] = static_cast<int32_t>(t / tiles);
    top[col] = static_cast<int32_t>(t % tiles / tw * m - 1);
    left[col] = static_cast<int32_t>(t % tw * m - 1);
  }
  const size_t v_bytes = Round(sizeof(float) * points * c_in * padded);
  Arena arena(v_bytes);
  float *v = static_cast<float *>(arena.Take(v_bytes));
  const int64_t vectors_padded = padded / 16;
  rt.pool->parallel_for(static_cast<int>(c_in * vectors_padded), [&](int item, int) {  // V, 16 columns at a time
    const int64_t c = item / vectors_padded, col = item % vectors_padded * 16;
    const __m512i y0 = _mm512_loadu_si512(top.data() + col), x0 = _mm512_loadu_si512(left.data() + col);
    const __m512i plane = _mm512_mullo_epi32(
        _mm512_add_epi32(
            _mm512_mullo_epi32(_mm512_loadu_si512(sample.data() + col), _mm512_set1_epi32(static_cast<int32_t>(c_in))),
            _mm512_set1_epi32(static_cast<int32_t>(c))),
        _mm512_set1_epi32(static_cast<int32_t>(h * w)));
    __m512 d[points], t[points];
    for (int i = 0; i < alpha; ++i) {
      const __m512i iy = _mm512_add_epi32(y0, _mm512_set1_epi32(i));
      const __mmask16 in_y = _mm512_cmpge_epi32_mask(iy, _mm512_setzero_si512()) &
                             _mm512_cmplt_epi32_mask(iy, _mm512_set1_epi32(static_cast<int32_t>(h)));
      const __m512i row = _mm512_add_epi32(plane, _mm512_mullo_epi32(iy, _mm512_set1_epi32(static_cast<int32_t>(w))));
      for (int j = 0; j < alpha; ++j) {
        const __m512i ix = _mm512_add_epi32(x0, _mm512_set1_epi32(j));
        const __mmask16 in = in_y & _mm512_cmpge_epi32_mask(ix, _mm512_setzero_si512()) &
                             _mm512_cmplt_epi32_mask(ix, _mm512_set1_epi32(static_cast<int32_t>(w)));
        d[i * alpha + j] = in == 0 ? _mm512_setzero_ps()
                                   : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, _mm512_add_epi32(row, ix), x, 4);
      }
    }
    Transform2D<alpha, alpha>(d, t, T::Input);
    for (int k = 0; k < points; ++k) _mm512_storeu_ps(v + (k * c_in + c) * padded + col, t[k]);
  });
  const int64_t blocks = (c_out + out_block - 1) / out_block;
  rt.pool->parallel_for(static_cast<int>(blocks), [&](int item, int) {
    const int64_t o0 = item * out_block, on = std::min(out_block, c_out - o0);
    thread_local std::vector<float> u_buffer, m_buffer;
    u_buffer.resize(points * out_block * in_block);
    m_buffer.resize(points * out_block * padded);
    float *u = u_buffer.data(), *mm = m_buffer.data();
    for (int64_t c0 = 0; c0 < c_in; c0 += in_block) {
      const int64_t depth = std::min(in_block, c_in - c0), per_row = depth / 16;
      // U of this block: output channel r, 16 input channels from c at u[((r * per_row + c / 16) * points + k) * 16]
      for (int64_t r = 0; r < out_block; ++r) {
        const int64_t o = std::min(o0 + r, c_out - 1);  // rows past the last channel repeat it (results unused)
        for (int64_t c = 0; c < depth; c += 16) {
          __m512 taps[9], t[points];
          split(weight + (o * c_in + c0 + c) * 9, taps);
          Transform2D<3, alpha>(taps, t, T::Kernel);
          float *to = u + (r * per_row + c / 16) * points * 16;
          for (int k = 0; k < points; ++k) _mm512_storeu_ps(to + k * 16, t[k]);
        }
      }
      for (int k = 0; k < points; ++k)
        for (int64_t r = 0; r < out_block; r += rows)
          for (int64_t col = 0; col < padded; col += 16 * nv)
            kProducts[nv](u + (r * per_row * points + k) * 16, per_row * points * 16, points * 16,
                          v + (k * c_in + c0) * padded + col, padded, depth, mm + (k * out_block + r) * padded + col,
                          padded, c0 == 0);
    }
    float in[points], out[m * m];
    for (int64_t r = 0; r < on; ++r) {
      const float b = bias[o0 + r];
      for (int64_t col = 0; col < cols; ++col) {
        for (int k = 0; k < points; ++k) in[k] = mm[(k * out_block + r) * padded + col];
        Transform2D<alpha, m>(in, out, T::Output);
        const int64_t y0 = top[col] + 1, x0 = left[col] + 1;
        float *plane = y + (sample[col] * c_out + o0 + r) * h * w;
        for (int i = 0; i < m && y0 + i < h; ++i)
          for (int j = 0; j < m && x0 + j < w; ++j) plane[(y0 + i) * w + x0 + j] = out[i * m + j] + b;
      }
    }
  });
}
#else
constexpr bool kFusedWinogradBuilt = false;
#endif

// Where the fused Winograd runs: 3x3, stride 1, one pixel of padding on every side, one group, channels in a
// multiple of 16, images of at most kFusedMaxPixels, offsets within int32.
constexpr int64_t kFusedMaxPixels = 16;

bool UseFusedWinograd(const Geometry &g) {
  const char *env = std::getenv("SVD_CONV_FUSED");
  if (!kFusedWinogradBuilt || (env != nullptr && env[0] == '0')) return false;
  return g.kh == 3 && g.kw == 3 && g.groups == 1 && g.strides[0] == 1 && g.strides[1] == 1 && g.pad_l[0] == 1 &&
         g.pad_l[1] == 1 && g.pad_r[0] == 1 && g.pad_r[1] == 1 && g.c % 16 == 0 && g.h * g.w <= kFusedMaxPixels &&
         g.n * std::max(g.c, g.o) * g.h * g.w < (int64_t(1) << 31);
}

// F(2x2, 3x3) where it takes fewer products than F(4x4, 3x3) (images of 2 pixels a side), else F(4x4, 3x3).
void FusedWinogradForward(const Geometry &g, void **params) {
#if defined(__AVX512F__)
  const auto products = [&](int64_t m) { return (g.h + m - 1) / m * ((g.w + m - 1) / m) * (m + 2) * (m + 2); };
  if (products(2) < products(4)) return FusedWinogradRun<Winograd2>(g, params);
  FusedWinogradRun<Winograd4>(g, params);
#endif
}

// A temporal convolution (a (3, 1) kernel over (T, H*W), stride 1, padding 1 along T and none along W, one group,
// at least kMinWinogradChannels in and out) runs as Winograd's F(2, 3) along T: each pair of output frames comes
// from four input frames d0..d3 through four products instead of six, so four GEMMs (the weight's transforms
// U (O, C) times the input's V (C, columns)) do two thirds of the direct kernel's multiplications. The transforms
// are sums and differences (the weight's also halves them), exact but for one rounding:
//   V = (d0 - d2, d1 + d2, d2 - d1, d1 - d3),  U = (w0, (w0 + w1 + w2) / 2, (w0 - w1 + w2) / 2, w2),
//   y(2j) = M0 + M1 + M2,  y(2j + 1) = M1 - M2 - M3,  M = U V,  d_i = x(2j - 1 + i), zero past the ends.
// The columns are (sample, pair of frames, pixel); they go in pieces of pixels that keep V and M under the chunk
// bound. The GEMMs read the weight transform and V as they are (no reorder of any tensor), each thread one
// single-threaded SGEMM per item (a transform and a slice of the output channels).
bool UseTemporalWinograd(const Geometry &g) {
  return g.kh == 3 && g.kw == 1 && g.groups == 1 && g.strides[0] == 1 && g.strides[1] == 1 && g.pad_l[0] == 1 &&
         g.pad_r[0] == 1 && g.pad_l[1] == 0 && g.pad_r[1] == 0 && g.c >= kMinWinogradChannels &&
         g.o >= kMinWinogradChannels;
}

void TemporalWinogradForward(const Geometry &g, void **params) {
  Runtime &rt = Rt();
  const int64_t frames = g.h, hw = g.w, pairs = (frames + 1) / 2;
  const auto *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]),
             *bias = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  // pixels per piece: V (4, C, columns) and M (4, O, columns) within the bound, at least one pixel
  const size_t per_pixel = sizeof(float) * 4 * (g.c + g.o) * g.n * pairs;
  const int64_t width = std::max<int64_t>(1, std::min<int64_t>(hw, static_cast<int64_t>(ChunkBytes() / per_pixel)));
  const int64_t most = g.n * pairs * width;  // columns of a piece
  const size_t u_bytes = Round(sizeof(float) * 4 * g.o * g.c), v_bytes = Round(sizeof(float) * 4 * g.c * most),
               m_bytes = Round(sizeof(float) * 4 * g.o * most), zero_bytes = Round(sizeof(float) * width);
  Arena arena(u_bytes + v_bytes + m_bytes + zero_bytes);
  auto *u = static_cast<float *>(arena.Take(u_bytes)), *v = static_cast<float *>(arena.Take(v_bytes)),
       *mm = static_cast<float *>(arena.Take(m_bytes)), *zeros = static_cast<float *>(arena.Take(zero_bytes));
  std::fill(zeros, zeros + width, 0.0f);  // the frames past the clip's ends
  const int64_t oc = g.o * g.c;
  rt.pool->parallel_for(static_cast<int>(g.o), [&](int o, int) {
    for (int64_t c = 0; c < g.c; ++c) {
      const float *w = weight + (o * g.c + c) * 3;
      const int64_t at = o * g.c + c;
      u[at] = w[0];
      u[oc + at] = 0.5f * (w[0] + w[1] + w[2]);
      u[2 * oc + at] = 0.5f * (w[0] - w[1] + w[2]);
      u[3 * oc + at] = w[2];
    }
  });
  const int parts = rt.pool->get_num_threads();
  for (int64_t p0 = 0; p0 < hw; p0 += width) {
    const int64_t pw = std::min(width, hw - p0), cols = g.n * pairs * pw;
    rt.pool->parallel_for(static_cast<int>(g.c), [&](int c, int) {  // V (4, C, (n, pair, pixel))
      for (int64_t n = 0; n < g.n; ++n) {
        const float *plane = x + (n * g.c + c) * frames * hw + p0;
        for (int64_t j = 0; j < pairs; ++j) {
          const int64_t t = 2 * j - 1;  // d_i = frame t + i
          const float *d[4];
          for (int i = 0; i < 4; ++i) d[i] = t + i >= 0 && t + i < frames ? plane + (t + i) * hw : zeros;
          float *v0 = v + c * cols + (n * pairs + j) * pw;
          float *v1 = v0 + g.c * cols, *v2 = v1 + g.c * cols, *v3 = v2 + g.c * cols;
          for (int64_t q = 0; q < pw; ++q) {
            v0[q] = d[0][q] - d[2][q];
            v1[q] = d[1][q] + d[2][q];
            v2[q] = d[2][q] - d[1][q];
            v3[q] = d[1][q] - d[3][q];
          }
        }
      }
    });
    SerialGemms(4 * parts, [&](int item, Pool &one) {  // M_k (O, cols) = U_k (O, C) V_k (C, cols)
      const int64_t k = item / parts, part = item % parts;
      const int64_t first = g.o * part / parts, last = g.o * (part + 1) / parts;
      return first == last ||
             dnnl::threadpool_interop::sgemm('N', 'N', last - first, cols, g.c, 1.0f, u + k * oc + first * g.c, g.c,
                                             v + k * g.c * cols, cols, 0.0f, mm + (k * g.o + first) * cols, cols,
                                             &one) == dnnl::status::success;
    });
    rt.pool->parallel_for(static_cast<int>(g.o), [&](int o, int) {  // y from M, with the bias
      const int64_t plane = g.o * cols;
      for (int64_t n = 0; n < g.n; ++n)
        for (int64_t j = 0; j < pairs; ++j) {
          const float *m0 = mm + o * cols + (n * pairs + j) * pw;
          const float *m1 = m0 + plane, *m2 = m1 + plane, *m3 = m2 + plane;
          float *even = y + ((n * g.o + o) * frames + 2 * j) * hw + p0;
          for (int64_t q = 0; q < pw; ++q) even[q] = m0[q] + m1[q] + m2[q] + bias[o];
          if (2 * j + 1 == frames) continue;
          float *odd = even + hw;
          for (int64_t q = 0; q < pw; ++q) odd[q] = m1[q] - m2[q] - m3[q] + bias[o];
        }
    });
  }
}

// Multi-head softmax attention on the tokens as the projections give them, (B, L, H*D): each head is a column slice
// of every row, which the GEMMs read and write with the row stride H*D, so no permutation to (B, H, L, D) and back.
// The work is split into (batch, head, block of query rows) items over the threads; each item computes its block
// of scores with one single-threaded GEMM, takes the softmax of each row in place and multiplies by V with a second
// GEMM. A block holds at most kScoreFloats scores (at least kMinQueryRows rows), so the whole (B, H, Lq, Lk) score
// tensor never exists: at 576x1024 the first level's self-attention would need 17 GB for it per frame batch of 25.
constexpr int64_t kScoreFloats = 1 << 20;
constexpr int64_t kMinQueryRows = 16;

// params: q (B, Lq, H*D), k and v (B, Lk, H*D), options (heads, channels first) int64; out (B, Lq, H*D) =
// softmax(q k^T / sqrt(D)) v per head. Channels first, every tensor is (B, H*D, L) instead (the VAE's attention on
// (B, C, H*W)): the GEMMs read and write the transposes.
int Attention(void **params, int *ndims, int64_t **shapes) {
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] != 1 || shapes[3][0] != 2) return 1;
  const int64_t *options = static_cast<const int64_t *>(params[3]);
  const int64_t heads = options[0];
  const bool first = options[1] != 0;
  const int64_t b = shapes[0][0], lq = shapes[0][first ? 2 : 1], inner = shapes[0][first ? 1 : 2],
                lk = shapes[1][first ? 2 : 1];
  for (int i = 1; i < 3; ++i)
    if (shapes[i][0] != b || shapes[i][first ? 2 : 1] != lk || shapes[i][first ? 1 : 2] != inner) return 1;
  if (heads < 1 || inner % heads != 0 || lk < 1) return 1;
  const int64_t d = inner / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t block = std::min(lq, std::max(kMinQueryRows, kScoreFloats / lk));
  const int64_t blocks = (lq + block - 1) / block;
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]),
              *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[4]);
  SerialGemms(static_cast<int>(b * heads * blocks), [&](int item, Pool &one) {
    thread_local std::vector<float> scores;
    const int64_t i = item / (heads * blocks), h = item / blocks % heads, r0 = item % blocks * block;
    const int64_t rows = std::min(block, lq - r0);
    if (scores.size() < static_cast<size_t>(rows * lk)) scores.resize(rows * lk);
    float *s = scores.data();
    dnnl::status ok;
    if (first) {  // head h is rows h*D.. of each (H*D, L) plane; query row r is column r
      const float *qi = q + (i * inner + h * d) * lq + r0, *ki = k + (i * inner + h * d) * lk,
                  *vi = v + (i * inner + h * d) * lk;
      float *oi = out + (i * inner + h * d) * lq + r0;
      ok = dnnl::threadpool_interop::sgemm('T', 'N', rows, lk, d, scale, qi, lq, ki, lk, 0.0f, s, lk, &one);
      if (ok == dnnl::status::success) {
        for (int64_t r = 0; r < rows; ++r) SoftmaxRow(s + r * lk, s + r * lk, lk);
        ok = dnnl::threadpool_interop::sgemm('N', 'T', d, rows, lk, 1.0f, vi, lk, s, lk, 0.0f, oi, lq, &one);
      }
    } else {  // head h is columns h*D.. of each (L, H*D) row
      const float *qi = q + (i * lq + r0) * inner + h * d, *ki = k + i * lk * inner + h * d,
                  *vi = v + i * lk * inner + h * d;
      float *oi = out + (i * lq + r0) * inner + h * d;
      ok = dnnl::threadpool_interop::sgemm('N', 'T', rows, lk, d, scale, qi, inner, ki, inner, 0.0f, s, lk, &one);
      if (ok == dnnl::status::success) {
        for (int64_t r = 0; r < rows; ++r) SoftmaxRow(s + r * lk, s + r * lk, lk);
        ok = dnnl::threadpool_interop::sgemm('N', 'N', rows, d, lk, 1.0f, s, lk, vi, inner, 0.0f, oi, inner, &one);
      }
    }
    return ok == dnnl::status::success;
  });
  return 0;
}
}  // namespace

// Sets the number of threads the convolutions run on (the machine's cores until called).
extern "C" void SvdConvSetThreads(int threads) {
  Runtime &rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.SetThreads(threads);
}

// Frees the scratch buffers (the next convolution allocates them again).
extern "C" void SvdConvRelease() {
  Runtime &rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mutex);
  scratch.Release();
}

extern "C" int ConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return Guard(nparam, 5, Forward, params, ndims, shapes);
}

extern "C" int ConvBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                void *) {
  return Guard(nparam, 5, BackwardData, params, ndims, shapes);
}

extern "C" int ConvBackwardWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                   void *) {
  return Guard(nparam, 6, BackwardWeights, params, ndims, shapes);
}

// (q, k, v, options) -> out; see `Attention`.
extern "C" int AttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                void *) {
  return Locked(nparam, 5, [&] { return Attention(params, ndims, shapes); });
}

// The fully connected layers' entry points are those of `linear_entry.h`.
int RunLinear(LinearKind kind, int nparam, int expected, void **params, int *ndims, int64_t **shapes) {
  return Locked(nparam, expected, [&] {
    const LinearOperands o = ReadLinear(kind, params, ndims, shapes);
    RunGemm(static_cast<GemmKind>(kind), o.rows, o.a, o.b, o.bias, o.c);
    return 0;
  });
}
