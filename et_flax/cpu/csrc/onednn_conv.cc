// A convolution layer, y = act(conv(x, w) + b [+ s]), and its gradients
// through oneDNN, as XLA FFI handlers.
//
// Built at first use by et_flax/cpu/onednn.py (g++, the onednn-cpu-gomp library
// and its devel headers, jaxlib's FFI headers). Tensors cross the boundary in
// JAX's layouts: activations NHWC, kernels HWIO, all float32. Inside, the
// activations stay NHWC, untouched: oneDNN's NHWC kernels (brgconv) run on
// JAX's arrays as they are, and narrow 1x1 layers on oneDNN's blocked layout
// where it is NHWC byte for byte (`Act`). Kernels are reordered to oneDNN's
// layout at each call.
//
// Handlers (attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left,
// pad_right, activation = 0 none | 1 relu | 2 tanh):
//   et_onednn_conv_fwd           (x, w, b)    -> y = act(conv(x, w) + b)
//   et_onednn_conv_fwd_residual  (x, w, b, s) -> y = act(conv(x, w) + b + s)
//   et_onednn_conv_bwd           (x, w, y, dy) -> (g, dx, dw, db)
//                                (one more attribute: input_gradient)
// where g = dy * act'(.) is the gradient at the pre-activation (and so the
// shortcut's), dx, dw and db the gradients of x, w and the bias (g summed
// over the pixels while each piece of it is in cache, along rows in float32
// and the rows in float64: oneDNN's own bias gradient adds one value at a
// time in float32). Without an activation g is dy and is not written; without
// input_gradient (x is not differentiated, e.g. the images) dx is not
// written: an output left untouched costs XLA no page of memory. Every shape is checked here against the attributes. The bias,
// shortcut and activation run as oneDNN post-ops in the convolution's own
// pass over memory.
//
// Calls run one at a time, on the XLA thread that reaches them. Each call is
// split along the batch into pieces whose sizes depend on the batch and the
// cores at start only (`Split`); the calling thread and the pool's helpers take the pieces from
// a shared counter, each piece on one thread with oneDNN single-threaded, so
// a thread the system pauses (another process on its core) delays at most
// the piece it holds, where a static share per thread would hold up the
// whole call. A weight gradient is summed over the pieces in their order:
// the bits do not depend on how many threads ran them. The pool's size is
// the threads last set (EtOnednnSetThreads; by default all cores, or
// $OMP_NUM_THREADS). Primitives are built once per shape and cached. The
// caches, the engine, the pool and the call buffers are never destroyed: a
// calling or helper thread may still be in a call while the process exits.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// OpenMP's, from the libgomp that libdnnl links.
extern "C" void omp_set_num_threads(int);
extern "C" int omp_get_max_threads();

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

enum Activation : int64_t { kNone = 0, kRelu = 1, kTanh = 2 };

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t o, kh, kw;       // kernel
  int64_t oh, ow;          // output
  int64_t sh, sw, pt, pb, pl, pr;

  auto key() const {
    return std::make_tuple(n, h, w, c, o, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr);
  }
  memory::dims src_dims() const { return {n, c, h, w}; }
  memory::dims wei_dims() const { return {o, c, kh, kw}; }
  memory::dims bia_dims() const { return {o}; }
  memory::dims dst_dims() const { return {n, o, oh, ow}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

// The threads of the next calls (0: every core, or $OMP_NUM_THREADS), set
// from Python at any time; applied between calls.
std::atomic<int> requested_threads{0};
std::atomic<int> applied_threads{0};  // the threads of the last call

// Since the process started, per kind of call (its direction and shapes):
// the calls and their wall time, so that a caller can compare the calls'
// speed on different numbers of threads kind by kind, whatever mix of calls
// falls in each window (EtOnednnKindStats). A call that built a primitive (a
// kind's first) is counted apart, in `builds`: it times the build, not the
// threads, and says that a model is starting, whose first step is slow
// throughout (its buffers' pages are new).
struct KindStats {
  int64_t calls = 0, nanos = 0, builds = 0;
};
std::mutex kind_mu;
auto* kind_stats = new std::map<uint64_t, KindStats>;  // never destroyed (see the top)
thread_local bool built_plan = false;  // the calling thread's call built a primitive

// A kind's id: its fields, hashed (FNV-1a over their bytes).
uint64_t KindId(std::initializer_list<int64_t> fields) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t f : fields)
    for (int i = 0; i < 8; ++i)
      h = (h ^ ((static_cast<uint64_t>(f) >> (8 * i)) & 0xff)) * 1099511628211ull;
  return h;
}

// The pool's size for the call running now (set between calls, under the
// call lock; read by the call's calling thread).
int call_threads = 1;

// Pieces per core: enough that a thread the system pauses holds up little.
constexpr int64_t kPiecesPerCore = 4;
int64_t start_cores = 2;  // the cores at start (the first call)
int64_t max_pieces = 8;  // kPiecesPerCore * start_cores

dnnl::engine& Engine() {
  static auto* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// How one tensor gets from JAX's layout to the primitive's and back.
struct Port {
  memory::desc user;      // JAX's layout (nhwc, hwio or x)
  memory::desc inner;     // the primitive's layout
  bool same = true;       // inner is user byte for byte: no reorder
  dnnl::reorder to_inner, to_user;

  Port() = default;
  Port(const memory::desc& user_md, const memory::desc& inner_md, bool alias)
      : user(user_md), inner(inner_md), same(alias || user_md == inner_md) {
    if (same) return;
    to_inner = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user, Engine(), inner));
    to_user = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), inner, Engine(), user));
  }
};

// A blocked activation layout equals NHWC in memory when it has one block of
// all the channels: nChw16c with 16 channels, nChw8c with 8, ...
bool AliasesNhwc(const memory::desc& inner, int64_t channels) {
  for (auto [tag, block] : {std::pair{Tag::nChw16c, 16}, std::pair{Tag::nChw8c, 8},
                            std::pair{Tag::nChw4c, 4}}) {
    if (channels == block && inner == memory::desc(inner.get_dims(), Dt::f32, tag))
      return true;
  }
  return false;
}

memory::desc Any(const memory::dims& d) { return memory::desc(d, Dt::f32, Tag::any); }

// The activations' layout the primitives are created for: NHWC, where
// oneDNN runs its brgconv kernels on JAX's arrays as they are, except for 1x1
// kernels of up to 16 channels whose blocked layout (oneDNN's own choice) is
// NHWC byte for byte (nChw16c at 16 channels on AVX-512), where its jit_1x1
// kernels are faster. Measured per pass on plain E.T.'s layers
// (docs/performance.md, "Layouts"): 3x3 on NHWC 12.3 / 11.5 / 11.7 ms
// (forward / input / weight gradient, 128 images) against 15.8 / 15.1 / 13.6
// on nChw16c; 1x1 6.0 ms in all on nChw16c against 7.6 on NHWC. A blocked
// layout that is not NHWC in memory would be reordered in and out at every
// call.
bool Blocked(const Geometry& g) {
  if (g.c > 16 || g.o > 16 || g.kh != 1 || g.kw != 1) return false;
  dnnl::primitive_attr attr;
  auto pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Any(g.src_dims()), Any(g.wei_dims()), Any(g.bia_dims()), Any(g.dst_dims()),
      g.strides(), g.pad_l(), g.pad_r(), attr);
  return AliasesNhwc(pd.src_desc(), g.c) && AliasesNhwc(pd.dst_desc(), g.o);
}

memory::desc Act(const Geometry& g, const memory::dims& d) {
  return memory::desc(d, Dt::f32, Blocked(g) ? Tag::any : Tag::nhwc);
}

struct Ports {
  Port src, wei, bia, dst;
};

Ports MakePorts(const Geometry& g, const memory::desc& src, const memory::desc& wei,
                const memory::desc& bia, const memory::desc& dst) {
  return Ports{
      Port(memory::desc(g.src_dims(), Dt::f32, Tag::nhwc), src, AliasesNhwc(src, g.c)),
      Port(memory::desc(g.wei_dims(), Dt::f32, Tag::hwio), wei, false),
      Port(memory::desc(g.bia_dims(), Dt::f32, Tag::x), bia, false),
      Port(memory::desc(g.dst_dims(), Dt::f32, Tag::nhwc), dst, AliasesNhwc(dst, g.o))};
}

dnnl::primitive_attr Attr(const dnnl::post_ops& ops = dnnl::post_ops()) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_post_ops(ops);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g,
                                                      const dnnl::primitive_attr& attr) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Act(g, g.src_dims()), Any(g.wei_dims()), Any(g.bia_dims()), Act(g, g.dst_dims()),
      g.strides(), g.pad_l(), g.pad_r(), attr);
}

struct ForwardPlan {
  dnnl::convolution_forward prim;
  size_t scratch_bytes;
  Ports ports;
  Port shortcut;
};

ForwardPlan MakeForwardPlan(const Geometry& g, bool residual, int64_t activation) {
  // The layouts oneDNN picks without post-ops; the shortcut is then given in
  // the output's layout, so that the sum is elementwise in memory.
  auto plain = ForwardDesc(g, Attr());
  dnnl::post_ops ops;
  if (residual) ops.append_binary(dnnl::algorithm::binary_add, plain.dst_desc());
  if (activation == kRelu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (activation == kTanh) ops.append_eltwise(dnnl::algorithm::eltwise_tanh, 0.f, 0.f);
  auto pd = ForwardDesc(g, Attr(ops));
  if (pd.dst_desc() != plain.dst_desc())
    throw std::runtime_error("the fused convolution chose another output layout");
  ForwardPlan plan{dnnl::convolution_forward(pd), pd.scratchpad_desc().get_size(),
                   MakePorts(g, pd.src_desc(), pd.weights_desc(), pd.bias_desc(),
                             pd.dst_desc()),
                   Port()};
  plan.shortcut = plan.ports.dst;
  return plan;
}

struct BackwardPlan {
  dnnl::convolution_backward_data data;
  dnnl::convolution_backward_weights weights;
  size_t data_scratch_bytes, weights_scratch_bytes;
  Ports data_ports, weights_ports;
};

BackwardPlan MakeBackwardPlan(const Geometry& g) {
  auto fwd = ForwardDesc(g, Attr());
  auto data_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Act(g, g.src_dims()),
      Any(g.wei_dims()), Act(g, g.dst_dims()), g.strides(), g.pad_l(), g.pad_r(), fwd, Attr());
  auto weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Act(g, g.src_dims()),
      Any(g.wei_dims()), Act(g, g.dst_dims()), g.strides(), g.pad_l(), g.pad_r(), fwd, Attr());
  return BackwardPlan{
      dnnl::convolution_backward_data(data_pd),
      dnnl::convolution_backward_weights(weights_pd),
      data_pd.scratchpad_desc().get_size(),
      weights_pd.scratchpad_desc().get_size(),
      MakePorts(g, data_pd.diff_src_desc(), data_pd.weights_desc(),
                memory::desc(g.bia_dims(), Dt::f32, Tag::x), data_pd.diff_dst_desc()),
      MakePorts(g, weights_pd.src_desc(), weights_pd.diff_weights_desc(),
                memory::desc(g.bia_dims(), Dt::f32, Tag::x), weights_pd.diff_dst_desc())};
}

template <typename Plan, typename Key, typename Make>
const Plan& Cached(const Key& key, Make make) {
  static auto* mu = new std::mutex;
  static auto* plans = new std::map<Key, std::unique_ptr<Plan>>;
  std::lock_guard<std::mutex> lock(*mu);
  auto& slot = (*plans)[key];
  if (!slot) {
    slot = std::make_unique<Plan>(make());
    built_plan = true;
  }
  return *slot;
}

// Scratchpads and reordered tensors, kept from call to call: a piece's n-th
// buffer reuses the n-th block of its thread's arena, grown when too small.
// A thread runs one piece at a time, so no two pieces share a block; reusing
// them spares a page fault per touched page at every call.
class Arena {
 public:
  void* take(size_t bytes) {
    if (next_ == blocks_.size()) blocks_.push_back({nullptr, 0});
    auto& [block, size] = blocks_[next_++];
    if (size < bytes) {
      block.reset(new char[bytes + 64]);
      size = bytes;
    }
    auto p = reinterpret_cast<uintptr_t>(block.get());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }
  void rewind() { next_ = 0; }

 private:
  std::vector<std::pair<std::unique_ptr<char[]>, size_t>> blocks_;
  size_t next_ = 0;
};

// This thread's arena, for the piece it runs.
Arena& PieceArena() {
  static thread_local Arena* arena = new Arena;  // never destroyed (see the top)
  return *arena;
}

// The arena for what a call's pieces share (one call at a time): weights and bias in
// the primitives' layouts, the weight gradient's partial sums.
Arena& SharedArena() {
  static auto* arena = new Arena;
  return *arena;
}

// This thread's stream.
dnnl::stream& ThreadStream() {
  static thread_local dnnl::stream* stream = new dnnl::stream(Engine());
  return *stream;
}

// The buffers of one piece, from its thread's arena.
class CallMemory {
 public:
  explicit CallMemory(dnnl::stream& s) : s_(s) { PieceArena().rewind(); }

  void* take(size_t bytes) { return PieceArena().take(bytes); }

  memory scratchpad(size_t bytes) {
    return memory(memory::desc({static_cast<int64_t>(bytes)}, Dt::u8, Tag::x), Engine(),
                  bytes ? take(bytes) : nullptr);
  }

  // `port`'s tensor in the primitive's layout, from JAX's buffer `data`.
  memory input(const Port& port, void* data) {
    if (port.same) return memory(port.inner, Engine(), data);
    memory user(port.user, Engine(), data);
    memory inner(port.inner, Engine(), take(port.inner.get_size()));
    port.to_inner.execute(s_, user, inner);
    return inner;
  }

  // Where the primitive writes `port`'s tensor; `finish` copies it to `data`.
  memory output(const Port& port, void* data) {
    if (port.same) return memory(port.inner, Engine(), data);
    return memory(port.inner, Engine(), take(port.inner.get_size()));
  }

  void finish(const Port& port, memory& inner, void* data) {
    if (port.same) return;
    memory user(port.user, Engine(), data);
    port.to_user.execute(s_, inner, user);
  }

 private:
  dnnl::stream& s_;
};

// What a call's pieces share, made once by the calling thread before they run:
// a tensor in each layout the pieces' primitives take it in.
class SharedInputs {
 public:
  SharedInputs() { SharedArena().rewind(); }

  memory get(const Port& port, void* data) {
    if (port.same) return memory(port.inner, Engine(), data);
    for (auto& [d, md, m] : made_)
      if (d == data && md == port.inner) return m;
    memory user(port.user, Engine(), data);
    memory inner(port.inner, Engine(), SharedArena().take(port.inner.get_size()));
    port.to_inner.execute(ThreadStream(), user, inner);
    ThreadStream().wait();
    made_.emplace_back(data, port.inner, inner);
    return inner;
  }

 private:
  std::vector<std::tuple<void*, memory::desc, memory>> made_;
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2],
                  sh, sw, pt, pb, pl, pr};
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}

bool Same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// x, w and y against each other and the attributes: y must be the output
// the geometry gives, at least 1x1, with padding >= 0 and strides >= 1.
ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                       ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr, int64_t activation) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("x, w and y must have rank 4 (NHWC, HWIO, NHWC)");
  if (x[3] != w[2] || y[3] != w[3] || x[0] != y[0])
    return ffi::Error::InvalidArgument("x, w and y shapes do not match (NHWC, HWIO, NHWC): " +
                                       Dims(x) + ", " + Dims(w) + ", " + Dims(y));
  if (sh < 1 || sw < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0)
    return ffi::Error::InvalidArgument("strides must be >= 1 and padding >= 0");
  int64_t oh = (x[1] + pt + pb - w[0]) / sh + 1, ow = (x[2] + pl + pr - w[1]) / sw + 1;
  if (x[1] + pt + pb < w[0] || x[2] + pl + pr < w[1] || y[1] != oh || y[2] != ow)
    return ffi::Error::InvalidArgument("y " + Dims(y) + " is not the output of x " + Dims(x) +
                                       " and w " + Dims(w) + " with these strides and padding");
  if (activation < kNone || activation > kTanh)
    return ffi::Error::InvalidArgument("activation must be 0 (none), 1 (relu) or 2 (tanh), got " +
                                       std::to_string(activation));
  return ffi::Error::Success();
}

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// A call's pieces, at most `count` (and `max_pieces`), their sizes differing
// by at most one image: set by the batch, the geometry and the cores at
// start, never by the threads in use, so that the sums over pieces are the
// same whatever runs them.
struct Piece {
  int64_t offset, size;
};

std::vector<Piece> Split(int64_t n, int64_t count = max_pieces) {
  count = std::max<int64_t>(1, std::min({n, count, max_pieces}));
  int64_t size = n / count, larger = n % count, offset = 0;
  std::vector<Piece> pieces;
  for (int64_t i = 0; i < count; ++i) {
    int64_t s = size + (i < larger ? 1 : 0);
    pieces.push_back({offset, s});
    offset += s;
  }
  return pieces;
}

// The threads that run a call's pieces: the calling thread and helpers, each
// taking the next piece from the call's counter until none is left. The
// caller waits only for pieces taken, never for a helper that has not
// woken yet: a helper that wakes late finds nothing left.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool;  // never destroyed: its threads outlive exit
    return *pool;
  }

  // Runs piece(0) .. piece(count - 1) on this thread and up to `threads` - 1
  // helpers; returns when all have run, rethrowing the first exception.
  void Run(int count, int threads, const std::function<void(int)>& piece) {
    auto job = std::make_shared<Job>(count, piece);
    if (count > 1 && threads > 1) {
      std::lock_guard<std::mutex> lock(mu_);
      while (helpers_ < threads - 1) {
        std::thread([this, id = helpers_] { Help(id); }).detach();
        ++helpers_;
      }
      job_ = job;
      wanted_ = threads - 1;
      ++generation_;
      cv_.notify_all();
    }
    job->Work();
    job->Wait();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (job_ == job) job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  struct Job {
    Job(int n, const std::function<void(int)>& f) : count(n), piece(f) {}

    void Work() {
      for (int i; (i = next.fetch_add(1)) < count;) {
        try {
          piece(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
        }
        if (done.fetch_add(1) + 1 == count) {
          std::lock_guard<std::mutex> lock(mu);
          cv.notify_all();
        }
      }
    }

    void Wait() {
      // The last piece is usually a fraction of a millisecond away: a short
      // spin, then sleep.
      for (int spin = 0; spin < 4096; ++spin) {
        if (done.load() == count) return;
        Pause();
      }
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done.load() == count; });
    }

    const int count;
    const std::function<void(int)>& piece;  // the caller's; used only while pieces are left
    std::atomic<int> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
    std::exception_ptr error;
  };

  void Help(int id) {
    omp_set_num_threads(1);  // oneDNN single-threaded in this thread's pieces
    uint64_t seen = 0;
    while (true) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id < wanted_) job = job_;
      }
      if (job) job->Work();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  int helpers_ = 0, wanted_ = 0;
  uint64_t generation_ = 0;
};

// Calls run one at a time, each on the XLA thread that reaches it, spread
// over the pool. The calling thread works on pieces itself, so a call costs
// no hand-over to another thread and back; two calls at once (XLA runs
// independent ops concurrently) wait for each other rather than
// oversubscribe the cores.
class Executor {
 public:
  static Executor& Get() {
    static Executor* executor = new Executor();  // never destroyed (see the top)
    return *executor;
  }

  void Run(uint64_t kind, const std::function<void()>& task) {
    thread_local bool single = [] {
      omp_set_num_threads(1);  // oneDNN single-threaded in this thread's pieces
      return true;
    }();
    (void)single;
    std::lock_guard<std::mutex> lock(call_mu_);
    int threads = requested_threads.load(std::memory_order_relaxed);
    call_threads = threads > 0 ? threads : default_threads_;
    applied_threads.store(call_threads, std::memory_order_relaxed);
    built_plan = false;
    auto start = std::chrono::steady_clock::now();
    task();
    int64_t nanos = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
    std::lock_guard<std::mutex> stats_lock(kind_mu);
    KindStats& stats = (*kind_stats)[kind];
    if (built_plan) {
      ++stats.builds;
      return;
    }
    ++stats.calls;
    stats.nanos += nanos;
  }

 private:
  // Read on the first calling thread before it sets its own count to 1.
  Executor() : default_threads_(std::max(1, omp_get_max_threads())) {
    start_cores = default_threads_;  // every core, or $OMP_NUM_THREADS
    max_pieces = kPiecesPerCore * start_cores;
  }

  const int default_threads_;
  std::mutex call_mu_;
};

template <typename F>
ffi::Error Guarded(uint64_t kind, F body) {
  std::string error;
  auto guarded = [&] {
    try {
      body();
    } catch (const dnnl::error& e) {
      error = std::string("oneDNN convolution failed: ") + e.what() + " (status " +
              std::to_string(e.status) + ")";
    } catch (const std::exception& e) {
      error = std::string("oneDNN convolution failed: ") + e.what();
    } catch (...) {
      error = "oneDNN convolution failed: an unknown exception";
    }
  };
  try {
    Executor::Get().Run(kind, guarded);
  } catch (const std::exception& e) {
    error = std::string("oneDNN convolution could not run: ") + e.what();
  } catch (...) {
    error = "oneDNN convolution could not run: an unknown exception";
  }
  if (!error.empty()) return ffi::Error::Internal(error);
  return ffi::Error::Success();
}

// The plan of each piece size of a call (at most two), made by the calling thread.
template <typename Plan, typename Make>
std::map<int64_t, const Plan*> PiecePlans(const std::vector<Piece>& pieces, Make make) {
  std::map<int64_t, const Plan*> plans;
  for (const Piece& p : pieces)
    if (!plans.count(p.size)) plans[p.size] = &make(p.size);
  return plans;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                   const float* shortcut, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                   int64_t activation) {
  if (auto err = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb,
                             pl, pr, activation);
      err.failure())
    return err;
  if (b.element_count() != y->dimensions()[3] || b.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("the bias must have shape (" +
                                       std::to_string(y->dimensions()[3]) + ",), got " +
                                       Dims(b.dimensions()));
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  bool residual = shortcut != nullptr;
  const uint64_t kind = KindId({0, g.n, g.h, g.w, g.c, g.o, g.kh, g.kw, g.sh, g.sw, g.pt, g.pb,
                                g.pl, g.pr, residual, activation});
  return Guarded(kind, [&] {
    auto pieces = Split(g.n);
    auto plans = PiecePlans<ForwardPlan>(pieces, [&](int64_t n) -> const ForwardPlan& {
      Geometry pg = g;
      pg.n = n;
      return Cached<ForwardPlan>(std::make_tuple(pg.key(), residual, activation),
                                 [&] { return MakeForwardPlan(pg, residual, activation); });
    });
    SharedInputs shared;
    std::map<int64_t, std::pair<memory, memory>> weights;  // and bias, per piece size
    for (auto& [n, plan] : plans)
      weights[n] = {shared.get(plan->ports.wei, w.untyped_data()),
                    shared.get(plan->ports.bia, b.untyped_data())};
    const int64_t in = g.h * g.w * g.c, out = g.oh * g.ow * g.o;
    Pool::Get().Run(static_cast<int>(pieces.size()), call_threads, [&](int i) {
      const Piece& p = pieces[i];
      const ForwardPlan& plan = *plans.at(p.size);
      dnnl::stream& s = ThreadStream();
      CallMemory mem(s);
      float* yp = y->typed_data() + p.offset * out;
      memory dst = mem.output(plan.ports.dst, yp);
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, mem.input(plan.ports.src, x.typed_data() + p.offset * in)},
          {DNNL_ARG_WEIGHTS, weights.at(p.size).first},
          {DNNL_ARG_BIAS, weights.at(p.size).second},
          {DNNL_ARG_DST, dst},
          {DNNL_ARG_SCRATCHPAD, mem.scratchpad(plan.scratch_bytes)}};
      if (residual)
        args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                     mem.input(plan.shortcut, const_cast<float*>(shortcut) + p.offset * out)});
      plan.prim.execute(s, args);
      mem.finish(plan.ports.dst, dst, yp);
      s.wait();
    });
  });
}

ffi::Error FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t activation) {
  return Forward(x, w, b, nullptr, y, sh, sw, pt, pb, pl, pr, activation);
}

ffi::Error FwdResidualImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> s,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr, int64_t activation) {
  if (!Same(s.dimensions(), y->dimensions()))
    return ffi::Error::InvalidArgument("the shortcut " + Dims(s.dimensions()) +
                                       " must have the output's shape " + Dims(y->dimensions()));
  return Forward(x, w, b, s.typed_data(), y, sh, sw, pt, pb, pl, pr, activation);
}

// g = dy * act'(pre-activation), from y = act(pre-activation): oneDNN's
// elementwise backward "use_dst" algorithms, on the tensors as they are.
struct ActivationPlan {
  dnnl::eltwise_backward prim;
  size_t scratch_bytes;
  memory::desc md;
};

ActivationPlan MakeActivationPlan(const memory::dims& dims, int64_t activation) {
  memory::desc md(dims, Dt::f32, Tag::nhwc);
  auto alg = activation == kRelu ? dnnl::algorithm::eltwise_relu_use_dst_for_bwd
                                 : dnnl::algorithm::eltwise_tanh_use_dst_for_bwd;
  auto fwd = dnnl::eltwise_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, alg, md, md, 0.f, 0.f, Attr());
  auto pd = dnnl::eltwise_backward::primitive_desc(Engine(), alg, md, md, md, 0.f, 0.f,
                                                   fwd, Attr());
  return ActivationPlan{dnnl::eltwise_backward(pd), pd.scratchpad_desc().get_size(), md};
}

// The plans of one piece size of a backward call.
struct BackwardPiecePlans {
  const BackwardPlan* conv;
  const ActivationPlan* activation;  // null without an activation
};

// acc[o] += the sum of channel o of g's `rows` rows of `row_pixels` pixels
// (NHWC, `channels` channels): each row summed in float32, the rows added in
// float64, so that the error stays near float32's rounding of the total.
// (-O3 here: the build's -O2 leaves the row loop unvectorized.)
__attribute__((optimize("O3"))) void SumChannels(const float* g, int64_t rows,
                                                 int64_t row_pixels, int64_t channels,
                                                 double* acc) {
  thread_local std::vector<float> row;
  row.resize(channels);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(row.begin(), row.end(), 0.f);
    const float* p = g + r * row_pixels * channels;
    for (int64_t q = 0; q < row_pixels; ++q)
      for (int64_t o = 0; o < channels; ++o) row[o] += p[q * channels + o];
    for (int64_t o = 0; o < channels; ++o) acc[o] += row[o];
  }
}

// sum[k] = parts[0][k] + parts[1][k] + ... in that order, for k < count, the
// elements split between the pool's threads.
void SumInOrder(const std::vector<float*>& parts, float* sum, int64_t count) {
  constexpr int64_t kChunk = 1 << 14;
  int chunks = static_cast<int>((count + kChunk - 1) / kChunk);
  Pool::Get().Run(chunks, call_threads, [&](int c) {
    int64_t begin = c * kChunk, end = std::min(count, begin + kChunk);
    for (int64_t k = begin; k < end; ++k) {
      float total = parts[0][k];
      for (size_t p = 1; p < parts.size(); ++p) total += parts[p][k];
      sum[k] = total;
    }
  });
}

// A backward call's pieces: each adds a weight gradient of its own, written
// and then summed, so a layer whose kernel outweighs its activations (deep
// VGG16 and ResNet50 layers: a 4 MB kernel against 32 KB an image) takes
// fewer pieces, where each piece's activations at least match its kernel's
// gradient; but no fewer than two per core at start, so that two threads per
// core (onednn_threads='auto' under load) each have one.
int64_t BackwardPieces(const Geometry& g) {
  const int64_t kernel = g.o * g.c * g.kh * g.kw;
  const int64_t per_image = g.h * g.w * g.c + g.oh * g.ow * g.o;  // x and dy
  return std::max(2 * start_cores, g.n * per_image / std::max<int64_t>(kernel, 1));
}

ffi::Error BwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> y,
                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> g_out,
                   ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                   ffi::ResultBuffer<ffi::F32> db, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t activation,
                   bool input_gradient) {
  if (auto err = CheckShapes(x.dimensions(), w.dimensions(), y.dimensions(), sh, sw, pt, pb,
                             pl, pr, activation);
      err.failure())
    return err;
  if (!Same(dy.dimensions(), y.dimensions()) || !Same(g_out->dimensions(), y.dimensions()) ||
      !Same(dx->dimensions(), x.dimensions()) || !Same(dw->dimensions(), w.dimensions()))
    return ffi::Error::InvalidArgument(
        "dy and the results must have the shapes of y, y, x and w: dy " + Dims(dy.dimensions()) +
        ", g " + Dims(g_out->dimensions()) + ", dx " + Dims(dx->dimensions()) + ", dw " +
        Dims(dw->dimensions()) + " for x " + Dims(x.dimensions()) + ", w " +
        Dims(w.dimensions()) + ", y " + Dims(y.dimensions()));
  if (db->dimensions().size() != 1 || db->dimensions()[0] != w.dimensions()[3])
    return ffi::Error::InvalidArgument("db must have shape (" +
                                       std::to_string(w.dimensions()[3]) + ",), got " +
                                       Dims(db->dimensions()));
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y.dimensions(), sh, sw, pt, pb, pl, pr);
  const uint64_t kind = KindId({1, g.n, g.h, g.w, g.c, g.o, g.kh, g.kw, g.sh, g.sw, g.pt, g.pb,
                                g.pl, g.pr, input_gradient, activation});
  return Guarded(kind, [&] {
    auto pieces = Split(g.n, BackwardPieces(g));
    auto plans = PiecePlans<BackwardPiecePlans>(
        pieces, [&](int64_t n) -> const BackwardPiecePlans& {
          Geometry pg = g;
          pg.n = n;
          return Cached<BackwardPiecePlans>(std::make_tuple(pg.key(), activation), [&] {
            const ActivationPlan* act = nullptr;
            if (activation != kNone)
              act = &Cached<ActivationPlan>(
                  std::make_tuple(pg.n, pg.o, pg.oh, pg.ow, activation),
                  [&] { return MakeActivationPlan(pg.dst_dims(), activation); });
            return BackwardPiecePlans{
                &Cached<BackwardPlan>(pg.key(), [&] { return MakeBackwardPlan(pg); }), act};
          });
        });
    SharedInputs shared;
    std::map<int64_t, memory> data_weights;  // w in each piece size's backward-data layout
    if (input_gradient)
      for (auto& [n, plan] : plans)
        data_weights[n] = shared.get(plan->conv->data_ports.wei, w.untyped_data());
    // Each piece's weight gradient, in its primitive's layout; with one
    // piece, dw itself where that layout is JAX's.
    std::vector<memory> partial;
    for (const Piece& p : pieces) {
      const Port& port = plans.at(p.size)->conv->weights_ports.wei;
      void* data = pieces.size() == 1 && port.same
                       ? dw->untyped_data()
                       : SharedArena().take(port.inner.get_size());
      partial.emplace_back(port.inner, Engine(), data);
    }
    // Each piece's bias gradient, in float64, summed in order below.
    std::vector<double> bias_parts(pieces.size() * g.o, 0.0);
    const int64_t in = g.h * g.w * g.c, out = g.oh * g.ow * g.o;
    Pool::Get().Run(static_cast<int>(pieces.size()), call_threads, [&](int i) {
      const Piece& p = pieces[i];
      const BackwardPiecePlans& plan = *plans.at(p.size);
      dnnl::stream& s = ThreadStream();
      CallMemory mem(s);
      float* xp = x.typed_data() + p.offset * in;
      // Without an activation the pre-activation's gradient is dy itself: g
      // is not written (the caller uses dy).
      float* diff_dst = dy.typed_data() + p.offset * out;
      if (plan.activation != nullptr) {
        float* gp = g_out->typed_data() + p.offset * out;
        const ActivationPlan& act = *plan.activation;
        act.prim.execute(s, {{DNNL_ARG_DIFF_DST, memory(act.md, Engine(), diff_dst)},
                             {DNNL_ARG_DST, memory(act.md, Engine(),
                                                   y.typed_data() + p.offset * out)},
                             {DNNL_ARG_DIFF_SRC, memory(act.md, Engine(), gp)},
                             {DNNL_ARG_SCRATCHPAD, mem.scratchpad(act.scratch_bytes)}});
        diff_dst = gp;
      }
      s.wait();  // g written before it is summed
      SumChannels(diff_dst, p.size * g.oh, g.ow, g.o, &bias_parts[i * g.o]);
      const BackwardPlan& conv = *plan.conv;
      if (input_gradient) {
        const Ports& dp = conv.data_ports;
        float* dxp = dx->typed_data() + p.offset * in;
        memory diff_src = mem.output(dp.src, dxp);
        conv.data.execute(s, {{DNNL_ARG_DIFF_DST, mem.input(dp.dst, diff_dst)},
                              {DNNL_ARG_WEIGHTS, data_weights.at(p.size)},
                              {DNNL_ARG_DIFF_SRC, diff_src},
                              {DNNL_ARG_SCRATCHPAD, mem.scratchpad(conv.data_scratch_bytes)}});
        mem.finish(dp.src, diff_src, dxp);
      }
      const Ports& wp = conv.weights_ports;
      conv.weights.execute(s, {{DNNL_ARG_SRC, mem.input(wp.src, xp)},
                               {DNNL_ARG_DIFF_DST, mem.input(wp.dst, diff_dst)},
                               {DNNL_ARG_DIFF_WEIGHTS, partial[i]},
                               {DNNL_ARG_SCRATCHPAD,
                                mem.scratchpad(conv.weights_scratch_bytes)}});
      s.wait();
    });
    for (int64_t o = 0; o < g.o; ++o) {
      double total = 0.0;
      for (size_t i = 0; i < pieces.size(); ++i) total += bias_parts[i * g.o + o];
      db->typed_data()[o] = static_cast<float>(total);
    }
    // dw: the pieces' gradients summed in their order.
    dnnl::stream& s = ThreadStream();
    const Port& first = plans.at(pieces[0].size)->conv->weights_ports.wei;
    bool one_layout = true;
    for (const memory& m : partial) one_layout = one_layout && m.get_desc() == first.inner;
    std::vector<float*> parts;
    if (one_layout) {  // summed in the primitives' layout, then reordered once
      for (memory& m : partial) parts.push_back(static_cast<float*>(m.get_data_handle()));
      if (parts.size() > 1)
        SumInOrder(parts, first.same ? dw->typed_data() : parts[0],
                   first.inner.get_size() / sizeof(float));
      if (!first.same) {
        memory user(first.user, Engine(), dw->untyped_data());
        first.to_user.execute(s, partial[0], user);
      }
    } else {  // each reordered to JAX's layout, then summed
      for (size_t i = 0; i < pieces.size(); ++i) {
        const Port& port = plans.at(pieces[i].size)->conv->weights_ports.wei;
        memory user(port.user, Engine(), SharedArena().take(port.user.get_size()));
        port.to_user.execute(s, partial[i], user);
        parts.push_back(static_cast<float*>(user.get_data_handle()));
      }
      s.wait();
      SumInOrder(parts, dw->typed_data(), first.user.get_size() / sizeof(float));
    }
    s.wait();
  });
}

template <typename B>
auto WithConvAttrs(B binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right")
      .template Attr<int64_t>("activation");
}

using F32 = ffi::Buffer<ffi::F32>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EtOnednnConvFwd, FwdImpl,
    WithConvAttrs(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EtOnednnConvFwdResidual, FwdResidualImpl,
    WithConvAttrs(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    EtOnednnConvBwd, BwdImpl,
    WithConvAttrs(ffi::Ffi::Bind()
                      .Arg<F32>()
                      .Arg<F32>()
                      .Arg<F32>()
                      .Arg<F32>()
                      .Ret<F32>()
                      .Ret<F32>()
                      .Ret<F32>()
                      .Ret<F32>())
        .Attr<bool>("input_gradient"));

// The threads of the calls from the next one on (n >= 1), or every core
// (n = 0: OpenMP's count, $OMP_NUM_THREADS where set); returns the threads of
// the last call (0: none yet).
extern "C" int EtOnednnSetThreads(int n) {
  requested_threads.store(n < 0 ? 0 : n, std::memory_order_relaxed);
  return applied_threads.load(std::memory_order_relaxed);
}

// Each kind of call's id, calls, their wall time (ns) and the calls that
// built a primitive (not in the first two) since the process started, in the
// first `capacity` places of each array; returns the number of kinds (more
// than `capacity`: call again with room for them all).
extern "C" int64_t EtOnednnKindStats(int64_t capacity, uint64_t* ids, int64_t* calls,
                                     int64_t* nanos, int64_t* builds) {
  std::lock_guard<std::mutex> lock(kind_mu);
  int64_t i = 0;
  for (const auto& [kind, stats] : *kind_stats) {
    if (i < capacity) {
      ids[i] = kind;
      calls[i] = stats.calls;
      nanos[i] = stats.nanos;
      builds[i] = stats.builds;
    }
    ++i;
  }
  return i;
}

// The oneDNN version this was linked against, for logs.
extern "C" const char* EtOnednnVersion() {
  static std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." +
           std::to_string(ver->patch) + " (" + ver->hash + ")";
  }();
  return v.c_str();
}
