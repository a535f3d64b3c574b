// oneDNN convolutions for XLA:CPU behind JAX's FFI: forward, backward-data and
// backward-weights (with the bias gradient) of a stride-1 'same' 2-D convolution on NHWC activations and HWIO kernels, the layouts XLA hands us, so the
// activations are never reordered.
//
// Threads: each call splits its batch into one part per thread of XLA's own intra-op pool
// (the FFI's ThreadPool) and runs every part with single-threaded oneDNN primitives. Letting
// oneDNN open its own OpenMP team instead put two runtimes on the same cores: XLA's idle
// workers spin while oneDNN's team works, and the convolutions ran ~1.7x slower inside a
// training step than alone (docs/benchmarks.md). Parts are claimed from a shared counter, so
// the calling thread finishes all of them itself when no worker is free: no call ever waits
// for a pool thread, and two calls on the pool at once cannot deadlock.
//
// Built by fedmask_jax/kernels/build.py against jaxlib's FFI headers and PyPI's oneDNN
// (onednn-cpu-gomp); loaded and registered by fedmask_jax/kernels/onednn.py.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

// Single-threaded oneDNN inside this scope: oneDNN sizes its parallelism by the calling
// thread's OpenMP thread count, which this sets to one and then restores -- the thread may be
// the host's main thread, whose other OpenMP users (PyTorch in the benchmark) keep theirs.
class OneThread {
 public:
  OneThread() : previous_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(previous_); }

 private:
  int previous_;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Backward-weights also gives the bias gradient, from the same pass over dy. The forward
// leaves the bias (and ReLU) to XLA's fusion after it: fused into oneDNN they were rounded
// differently for equal outputs at the border and inside, which broke the exact ties the
// max-pool's first-maximum gradient depends on (binary masks over +-c weights make many).
enum Kind { kForward, kBackwardData, kBackwardWeights };

struct Shape {
  int64_t n, h, w, c, kh, kw, o;
  bool operator<(const Shape& other) const {
    return std::tie(n, h, w, c, kh, kw, o) <
           std::tie(other.n, other.h, other.w, other.c, other.kh, other.kw, other.o);
  }
  Shape with_batch(int64_t batch) const { return Shape{batch, h, w, c, kh, kw, o}; }
  memory::desc act(int64_t channels) const { return memory::desc({n, channels, h, w}, dt::f32, tag::nhwc); }
  memory::desc src() const { return act(c); }
  memory::desc dst() const { return act(o); }
  memory::desc wei(tag t) const { return memory::desc({o, c, kh, kw}, dt::f32, t); }
  memory::desc bias() const { return memory::desc({o}, dt::f32, tag::a); }
  memory::dims strides() const { return {1, 1}; }
  memory::dims pad_l() const { return {(kh - 1) / 2, (kw - 1) / 2}; }
  memory::dims pad_r() const { return {kh - 1 - (kh - 1) / 2, kw - 1 - (kw - 1) / 2}; }
  size_t weights() const { return size_t(kh * kw * c * o); }
  size_t src_row() const { return size_t(h * w * c); }  // floats per example
  size_t dst_row() const { return size_t(h * w * o); }
};

// One primitive for one (kind, shape), single-threaded, with the scratchpad owned by the
// caller so that several threads may execute it at once; and the reorder between XLA's HWIO
// weights and the blocked layout oneDNN chose for them.
struct Plan {
  dnnl::primitive prim;
  memory::desc weights;  // the primitive's (diff_)weights layout
  memory::desc scratch;
  dnnl::reorder wei_reorder;  // HWIO -> weights (forward, backward-data), weights -> HWIO
};

std::unique_ptr<Plan> MakePlan(Kind kind, const Shape& s) {
  OneThread one_thread;  // primitives sized for one thread (see the file comment)
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto direct = dnnl::algorithm::convolution_direct;
  const auto any_wei = s.wei(tag::any), hwio = s.wei(tag::hwio);
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, direct, s.src(), any_wei,
                                                s.bias(), s.dst(), s.strides(), s.pad_l(), s.pad_r(), attr);
  auto plan = std::make_unique<Plan>();
  if (kind == kForward) {
    plan->prim = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->scratch = fwd.scratchpad_desc();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(eng, direct, s.src(), any_wei, s.dst(), s.strides(),
                                                       s.pad_l(), s.pad_r(), fwd, attr);
    plan->prim = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->scratch = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(eng, direct, s.src(), any_wei, s.bias(), s.dst(),
                                                          s.strides(), s.pad_l(), s.pad_r(), fwd, attr);
    plan->prim = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->scratch = pd.scratchpad_desc();
  }
  plan->wei_reorder = kind == kBackwardWeights
                          ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->weights, eng, hwio))
                          : dnnl::reorder(dnnl::reorder::primitive_desc(eng, hwio, eng, plan->weights));
  return plan;
}

const Plan& GetPlan(Kind kind, const Shape& s) {
  static std::mutex mu;
  static std::map<std::pair<int, Shape>, std::unique_ptr<Plan>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{kind, s}];
  if (!slot) slot = MakePlan(kind, s);
  return *slot;
}

memory Mem(const memory::desc& md, void* data) { return memory(md, Engine(), data); }

// A per-thread scratchpad, grown as needed.
void* Scratch(size_t bytes) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// Runs part(i) for i in [0, parts): the calling thread and up to parts - 1 pool workers claim
// indices from one counter; returns when every part has finished.
template <typename F>
void RunParts(ffi::ThreadPool& pool, int parts, F part) {
  struct State {
    std::atomic<int> next{0};
    int parts;
    std::mutex mu;
    std::condition_variable cv;
    int done = 0;
    std::string error;
  };
  auto state = std::make_shared<State>();
  state->parts = parts;
  auto work = [state, part] {
    for (int i; (i = state->next.fetch_add(1)) < state->parts;) {
      std::string error;
      try {
        part(i);
      } catch (const std::exception& e) {
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(state->mu);
      if (!error.empty()) state->error = error;
      if (++state->done == state->parts) state->cv.notify_all();
    }
  };
  for (int i = 1; i < parts; ++i) {
    auto task = work;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->parts; });
  if (!state->error.empty()) throw std::runtime_error(state->error);
}

// How many parts a batch of n is split into, and part i's [begin, end).
int NumParts(ffi::ThreadPool& pool, int64_t n) {
  return int(std::max<int64_t>(1, std::min<int64_t>(n, std::max<int64_t>(1, pool.num_threads()))));
}
std::pair<int64_t, int64_t> PartRange(int64_t n, int parts, int i) {
  return {n * i / parts, n * (i + 1) / parts};
}

// x: [N, H, W, C], w: [KH, KW, C, O]; false for anything else.
bool ShapeOf(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, Shape* s) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[2] != xd[3]) return false;
  *s = Shape{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3]};
  return true;
}

template <typename F>
ffi::Error Guarded(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

ffi::Error BadShape() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "onednn conv: expected x [N,H,W,C] and w [KH,KW,C,O] with matching C");
}

// The weights in the layout of kind's primitive for a batch part (every part size shares it:
// oneDNN's weights layout depends on the channels, not the batch).
memory BlockedWeights(Kind kind, const Shape& part, float* hwio_data) {
  const Plan& p = GetPlan(kind, part);
  memory hwio = Mem(part.wei(tag::hwio), hwio_data);
  memory blocked(p.weights, Engine());
  dnnl::stream strm(Engine());
  p.wei_reorder.execute(strm, hwio, blocked);
  strm.wait();
  return blocked;
}

ffi::Error ForwardOrBackwardData(Kind kind, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                 float* in, float* out) {
  Shape s;
  if (!ShapeOf(x, w, &s)) return BadShape();
  return Guarded([&] {
    const int parts = NumParts(pool, s.n);
    const auto first = PartRange(s.n, parts, 0);
    memory wei = BlockedWeights(kind, s.with_batch(first.second - first.first), w.typed_data());
    const bool forward = kind == kForward;
    std::vector<float> zero_bias(forward ? size_t(s.o) : 0, 0.f);  // the forward's pd has a bias
    const size_t in_row = forward ? s.src_row() : s.dst_row();
    const size_t out_row = forward ? s.dst_row() : s.src_row();
    RunParts(pool, parts, [&, parts](int i) {
      OneThread one_thread;
      auto [b, e] = PartRange(s.n, parts, i);
      const Shape part = s.with_batch(e - b);
      const Plan& p = GetPlan(kind, part);
      memory scratch = Mem(p.scratch, Scratch(p.scratch.get_size()));
      float* pin = in + b * in_row;
      float* pout = out + b * out_row;
      dnnl::stream strm(Engine());
      if (forward) {
        p.prim.execute(strm, {{DNNL_ARG_SRC, Mem(part.src(), pin)}, {DNNL_ARG_WEIGHTS, wei},
                              {DNNL_ARG_BIAS, Mem(part.bias(), zero_bias.data())}, {DNNL_ARG_DST, Mem(part.dst(), pout)},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
      } else {
        p.prim.execute(strm, {{DNNL_ARG_DIFF_DST, Mem(part.dst(), pin)}, {DNNL_ARG_WEIGHTS, wei},
                              {DNNL_ARG_DIFF_SRC, Mem(part.src(), pout)}, {DNNL_ARG_SCRATCHPAD, scratch}});
      }
      strm.wait();
    });
  });
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  return ForwardOrBackwardData(kForward, pool, x, w, x.typed_data(), y->typed_data());
}

ffi::Error ConvBackwardDataImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx) {
  return ForwardOrBackwardData(kBackwardData, pool, x, w, dy.typed_data(), dx->typed_data());
}

// Each part's weight and bias gradients go to their own buffers (part 0's to the results); the
// parts are summed in a fixed order, so the result does not depend on which thread ran which.
ffi::Error ConvBackwardWeightsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                                   ffi::ResultBuffer<ffi::F32> db) {
  Shape s;
  if (!ShapeOf(x, w, &s)) return BadShape();
  return Guarded([&] {
    const int parts = NumParts(pool, s.n);
    const size_t nw = s.weights(), nb = size_t(s.o);
    std::vector<float> partials(size_t(parts - 1) * nw), bias_partials(size_t(parts - 1) * nb);
    float* result = dw->typed_data();
    float* bias_result = db->typed_data();
    float* xs = x.typed_data();
    float* dys = dy.typed_data();
    RunParts(pool, parts, [&, parts](int i) {
      OneThread one_thread;
      auto [b, e] = PartRange(s.n, parts, i);
      const Shape part = s.with_batch(e - b);
      const Plan& p = GetPlan(kBackwardWeights, part);
      memory scratch = Mem(p.scratch, Scratch(p.scratch.get_size()));
      memory blocked(p.weights, Engine());
      memory hwio = Mem(part.wei(tag::hwio), i == 0 ? result : partials.data() + size_t(i - 1) * nw);
      memory bias = Mem(part.bias(), i == 0 ? bias_result : bias_partials.data() + size_t(i - 1) * nb);
      dnnl::stream strm(Engine());
      p.prim.execute(strm, {{DNNL_ARG_SRC, Mem(part.src(), xs + b * s.src_row())},
                            {DNNL_ARG_DIFF_DST, Mem(part.dst(), dys + b * s.dst_row())},
                            {DNNL_ARG_DIFF_WEIGHTS, blocked}, {DNNL_ARG_DIFF_BIAS, bias},
                            {DNNL_ARG_SCRATCHPAD, scratch}});
      p.wei_reorder.execute(strm, blocked, hwio);
      strm.wait();
    });
    for (int i = 1; i < parts; ++i) {
      const float* part = partials.data() + size_t(i - 1) * nw;
      for (size_t j = 0; j < nw; ++j) result[j] += part[j];
      const float* bias_part = bias_partials.data() + size_t(i - 1) * nb;
      for (size_t j = 0; j < nb; ++j) bias_result[j] += bias_part[j];
    }
  });
}

}  // namespace

// The handlers and the version are the library's only exported symbols (-fvisibility=hidden).
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedmaskConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedmaskConvBackwardData, ConvBackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (for its shape)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedmaskConvBackwardWeights, ConvBackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (for its shape)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Ret<ffi::Buffer<ffi::F32>>());  // db

extern "C" const char* FedmaskOnednnVersion() {
  static std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." + std::to_string(ver->patch);
  }();
  return v.c_str();
}

#pragma GCC visibility pop
