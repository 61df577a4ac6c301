// A convolution layer, y = act(conv(x, w) + b [+ s]), and its gradients
// through oneDNN, as XLA FFI handlers.
//
// Built at first use by et_flax/onednn.py (g++, the onednn-cpu-gomp library
// and its devel headers, jaxlib's FFI headers). Tensors cross the boundary in
// JAX's layouts: activations NHWC, kernels HWIO, all float32. Inside, layers
// of up to 16 channels run on the layout oneDNN picks for this CPU (nChw16c,
// which with 16 channels *is* NHWC byte for byte, so E.T.'s activations pass
// through untouched); wider layers run oneDNN's NHWC kernels on JAX's arrays
// as they are (`Act`). Kernels are reordered to oneDNN's layout at each call.
//
// Handlers (attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left,
// pad_right, activation = 0 none | 1 relu | 2 tanh):
//   et_onednn_conv_fwd           (x, w, b)    -> y = act(conv(x, w) + b)
//   et_onednn_conv_fwd_residual  (x, w, b, s) -> y = act(conv(x, w) + b + s)
//   et_onednn_conv_bwd           (x, w, y, dy) -> (g, dx, dw)
//                                (one more attribute: input_gradient)
// where g = dy * act'(.) is the gradient at the pre-activation (and so the
// shortcut's and, summed, the bias's: the caller sums it, as oneDNN's own bias
// gradient adds one value at a time in float32), dx and dw the gradients of
// x and w. Without an activation g is dy and is not written; without
// input_gradient (x is not differentiated, e.g. the images) dx is not
// written: an output left untouched costs XLA no page of memory. Every shape is checked here against the attributes. The bias,
// shortcut and activation run as oneDNN post-ops in the convolution's own
// pass over memory.
//
// Primitives are built once per shape and thread count and cached; calls
// run one at a time on one thread of their own, each on an OpenMP team of
// the threads last set (EtOnednnSetThreads; by default all cores). The caches, the
// engine and the call buffers are never destroyed: the executor thread may
// still be in a call while the process exits.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
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

// The OpenMP team size of the next calls (0: OpenMP's own, all cores or
// $OMP_NUM_THREADS), set from Python at any time; the executor applies it
// between calls.
std::atomic<int> requested_threads{0};
std::atomic<int> applied_threads{0};  // the team size of the last call

// The team size the executor's calls run with now. oneDNN fixes a
// primitive's thread count when it is created, so it is part of every key.
int Threads() { return omp_get_max_threads(); }

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

// The activations' layout the primitives are created for. Up to 16 channels
// (plain E.T.), oneDNN's own choice: nChw16c, NHWC byte for byte at 16
// channels, with its fastest kernels there. Wider layers take NHWC: oneDNN's
// blocked choice would be reordered in and out at every call, where its NHWC
// kernels (brgconv) read and write JAX's arrays as they are
// (docs/performance.md).
memory::desc Act(const Geometry& g, const memory::dims& d) {
  bool narrow = g.c <= 16 && g.o <= 16;
  return memory::desc(d, Dt::f32, narrow ? Tag::any : Tag::nhwc);
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
  if (!slot) slot = std::make_unique<Plan>(make());
  return *slot;
}

// Scratchpads and reordered tensors, kept from call to call: a call's n-th
// buffer reuses the n-th block, grown when too small. Calls run one at a time
// (on the executor's thread), so no two calls share a block; reusing them
// spares a page fault per touched page at every call.
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

Arena& CallArena() {
  static auto* arena = new Arena;
  return *arena;
}

// The buffers of one call, from the arena.
class CallMemory {
 public:
  explicit CallMemory(dnnl::stream& s) : s_(s) { CallArena().rewind(); }

  void* take(size_t bytes) { return CallArena().take(bytes); }

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

// Every oneDNN call runs on this one thread, one call at a time. Each call
// already spreads over all cores with OpenMP; running calls from whichever
// XLA thread reaches them would give OpenMP a team of workers per calling
// thread, and two calls at once (XLA runs independent ops concurrently)
// would oversubscribe the cores.
class Executor {
 public:
  static Executor& Get() {
    static Executor* executor = new Executor();  // never destroyed: the thread outlives exit
    return *executor;
  }

  void Run(const std::function<void()>& task) {
    std::unique_lock<std::mutex> caller(call_mu_);
    std::unique_lock<std::mutex> lock(mu_);
    task_ = &task;
    done_ = false;
    cv_.notify_all();
    cv_.wait(lock, [&] { return done_; });
  }

 private:
  Executor() : thread_([this] { Loop(); }) { thread_.detach(); }

  void Loop() {
    const int default_threads = omp_get_max_threads();
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return task_ != nullptr; });
      int threads = requested_threads.load(std::memory_order_relaxed);
      if (threads <= 0) threads = default_threads;
      if (threads != omp_get_max_threads()) omp_set_num_threads(threads);
      applied_threads.store(omp_get_max_threads(), std::memory_order_relaxed);
      (*task_)();
      task_ = nullptr;
      done_ = true;
      cv_.notify_all();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_;
  const std::function<void()>* task_ = nullptr;
  bool done_ = false;
  std::thread thread_;
};

template <typename F>
ffi::Error Guarded(F body) {
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
    Executor::Get().Run(guarded);  // starting the executor's thread may throw too
  } catch (const std::exception& e) {
    error = std::string("oneDNN convolution could not run: ") + e.what();
  } catch (...) {
    error = "oneDNN convolution could not run: an unknown exception";
  }
  if (!error.empty()) return ffi::Error::Internal(error);
  return ffi::Error::Success();
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
  return Guarded([&] {
    const auto& plan = Cached<ForwardPlan>(
        std::make_tuple(g.key(), residual, activation, Threads()),
        [&] { return MakeForwardPlan(g, residual, activation); });
    dnnl::stream s(Engine());
    CallMemory mem(s);
    memory src = mem.input(plan.ports.src, x.untyped_data());
    memory wei = mem.input(plan.ports.wei, w.untyped_data());
    memory bia = mem.input(plan.ports.bia, b.untyped_data());
    memory dst = mem.output(plan.ports.dst, y->untyped_data());
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, bia},
        {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, mem.scratchpad(plan.scratch_bytes)}};
    if (residual)
      args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                   mem.input(plan.shortcut, const_cast<float*>(shortcut))});
    plan.prim.execute(s, args);
    mem.finish(plan.ports.dst, dst, y->untyped_data());
    s.wait();
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

// (activation relu or tanh: without one, g is dy)
void ActivationGradient(const Geometry& g, int64_t activation, void* dy, void* y, void* out,
                        dnnl::stream& s, CallMemory& mem) {
  const auto& plan = Cached<ActivationPlan>(
      std::make_tuple(g.n, g.o, g.oh, g.ow, activation, Threads()),
      [&] { return MakeActivationPlan(g.dst_dims(), activation); });
  plan.prim.execute(s, {{DNNL_ARG_DIFF_DST, memory(plan.md, Engine(), dy)},
                        {DNNL_ARG_DST, memory(plan.md, Engine(), y)},
                        {DNNL_ARG_DIFF_SRC, memory(plan.md, Engine(), out)},
                        {DNNL_ARG_SCRATCHPAD, mem.scratchpad(plan.scratch_bytes)}});
}

ffi::Error BwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> y,
                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> g_out,
                   ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                   int64_t activation, bool input_gradient) {
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
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y.dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded([&] {
    const auto& plan = Cached<BackwardPlan>(std::make_tuple(g.key(), Threads()),
                                            [&] { return MakeBackwardPlan(g); });
    dnnl::stream s(Engine());
    CallMemory mem(s);
    // Without an activation the pre-activation's gradient is dy itself: g is
    // not written (the caller uses dy).
    void* diff_dst = dy.untyped_data();
    if (activation != kNone) {
      ActivationGradient(g, activation, dy.untyped_data(), y.untyped_data(),
                         g_out->untyped_data(), s, mem);
      diff_dst = g_out->untyped_data();
    }
    if (input_gradient) {
      const Ports& dp = plan.data_ports;
      memory diff_src = mem.output(dp.src, dx->untyped_data());
      plan.data.execute(
          s, {{DNNL_ARG_DIFF_DST, mem.input(dp.dst, diff_dst)},
              {DNNL_ARG_WEIGHTS, mem.input(dp.wei, w.untyped_data())},
              {DNNL_ARG_DIFF_SRC, diff_src},
              {DNNL_ARG_SCRATCHPAD, mem.scratchpad(plan.data_scratch_bytes)}});
      mem.finish(dp.src, diff_src, dx->untyped_data());
    }
    const Ports& wp = plan.weights_ports;
    memory diff_wei = mem.output(wp.wei, dw->untyped_data());
    plan.weights.execute(
        s, {{DNNL_ARG_SRC, mem.input(wp.src, x.untyped_data())},
            {DNNL_ARG_DIFF_DST, mem.input(wp.dst, diff_dst)},
            {DNNL_ARG_DIFF_WEIGHTS, diff_wei},
            {DNNL_ARG_SCRATCHPAD, mem.scratchpad(plan.weights_scratch_bytes)}});
    mem.finish(wp.wei, diff_wei, dw->untyped_data());
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
                      .Ret<F32>())
        .Attr<bool>("input_gradient"));

// The OpenMP team size of the calls from the next one on (n >= 1), or
// OpenMP's own (n = 0); returns the team size of the last call (0: none yet).
extern "C" int EtOnednnSetThreads(int n) {
  requested_threads.store(n < 0 ? 0 : n, std::memory_order_relaxed);
  return applied_threads.load(std::memory_order_relaxed);
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
