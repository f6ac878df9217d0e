#include "model/cuda_graph.hpp"

#include <ATen/autocast_mode.h>
#include <c10/core/StreamGuard.h>

#include "ablate/sdk/attention.hpp"

#ifdef ABLATE_WITH_CUDA_GRAPHS
#include <map>
#include <mutex>

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate {

#ifdef ABLATE_WITH_CUDA_GRAPHS

namespace {

// at::cuda::CUDAGraph, plus the clean-up of a capture that failed. When something in the captured work is not
// allowed during capture (a copy to the host, say), capture_end() throws at cudaStreamEndCapture, before it
// tells the caching allocators that the capture is over, and the destructor then never releases the pool. The
// allocators would keep routing this stream's allocations through a filter that refers to the destroyed graph,
// and keep the pool's memory: abandon() does what capture_end() and reset() would have done.
struct Graph : at::cuda::CUDAGraph {
  void abandon() noexcept {
    // capture_begin() put the random-number generators it registered into capture mode, and only a successful
    // capture_end() takes them out: left so, every later eager random draw on the device (dropout in the steps
    // that go on eagerly) would fail its "not capturing" check.
    if (!capture_ended_) {
      for (auto& state : captured_generator_states_) state.first->capturing_ = false;
    }
    // Nothing began; or capture_end() got as far as instantiating, and reset() releases the pool.
    if (capture_dev_ == UNDEFINED_DEVICE || capture_ended_) return;
    auto quietly = [](auto&& f) {
      try {
        f();
      } catch (...) {  // already undone by capture_end() before it threw
      }
    };
    quietly([&] { c10::cuda::CUDACachingAllocator::endAllocateToPool(capture_dev_, mempool_id_); });
    quietly([&] { at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(mempool_id_); });
    quietly([&] { c10::cuda::CUDACachingAllocator::releasePool(capture_dev_, mempool_id_); });
    quietly([&] { at::getHostAllocator(at::kCUDA)->release_pool(mempool_id_); });
    capture_dev_ = UNDEFINED_DEVICE;
  }
};

// One capture stream per device for the whole process, warmed up once by running the work eagerly on it:
// libraries set up per-stream state lazily (cuBLAS its workspace), and state first made during a capture would
// be allocated in that graph's memory and kept by the library for good, once for each new stream.
struct CaptureStream {
  c10::Stream stream;
  bool warmed = false;
};

CaptureStream& capture_stream(c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, CaptureStream> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(index);
  if (it == streams.end()) {
    it = streams.emplace(index, CaptureStream{at::cuda::getStreamFromPool(/*isHighPriority=*/false, index).unwrap()}).first;
  }
  return it->second;
}

}  // namespace

struct CudaGraph::Impl {
  Graph graph;
  bool captured = false;
};

CudaGraph::CudaGraph() : impl_(std::make_unique<Impl>()) {}
CudaGraph::~CudaGraph() = default;

bool CudaGraph::available(const torch::Device& device) { return device.is_cuda(); }

void CudaGraph::capture(const torch::Device& device, const std::function<void()>& work, const CudaGraph* share_memory_with,
                        bool warm_up) {
  TORCH_CHECK(device.is_cuda(), "CUDA graphs need a CUDA device, not ", device.str());
  TORCH_CHECK(!impl_->captured, "this CUDA graph is captured already");
  const auto index = device.has_index() ? device.index() : c10::DeviceIndex(0);
  // Streams are switched and waited for through c10's device-generic guards (dispatched into libtorch's CUDA
  // library), not CUDAStream's inline members, which would make the runner link the CUDA runtime itself.
  c10::Stream current = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(c10::Device(c10::DeviceType::CUDA, index));
  current.synchronize();
  // What the caller's eager passes left in the caching allocator goes back to the device before the warm-up and
  // the capture allocate their own: blocks cached for one stream serve no other, so a training step's
  // activations would otherwise be held three times over (the caller's stream, the capture stream, the graph's
  // pool). On an H100 at batch 8 this took the training graphs' peak memory from 6775 to 4409 MiB (the eager
  // steps' is 3331). Once per capture.
  c10::cuda::CUDACachingAllocator::emptyCache();
  auto& side = capture_stream(index);
  // Autocast's cache of cast weights lives outside the graph and is emptied when the autocast region ends: the
  // casts are recorded in the graph instead.
  const bool autocast_cache = at::autocast::is_autocast_cache_enabled();
  at::autocast::set_autocast_cache_enabled(false);
  struct Restore {
    bool cache;
    ~Restore() {
      at::autocast::set_autocast_cache_enabled(cache);
      sdk::forget_mask_memo();
    }
  } restore{autocast_cache};
  c10::StreamGuard on_side(side.stream);
  if (!side.warmed || warm_up) {
    work();
    side.stream.synchronize();
    side.warmed = true;
    c10::cuda::CUDACachingAllocator::emptyCache();  // the warm-up's temporaries, as above
  }
  auto& graph = impl_->graph;
  // The dense mask attend() remembers from an eager run (the warm-up's, the caller's) would be baked into the
  // graph instead of being built from key_valid at every replay, and freed after: forgotten right before capture.
  sdk::forget_mask_memo();
  try {
    // Thread-local mode: other threads (the data pipeline pinning host memory) may go on using CUDA meanwhile.
    const auto pool = share_memory_with && share_memory_with->captured() ? share_memory_with->impl_->graph.pool() : c10::MempoolId_t{0, 0};
    graph.capture_begin(pool, cudaStreamCaptureModeThreadLocal);
  } catch (...) {
    graph.abandon();
    throw;
  }
  try {
    work();
  } catch (...) {
    try {
      graph.capture_end();  // ends the (now invalid) capture, so the stream is usable again
    } catch (...) {
      graph.abandon();
    }
    throw;
  }
  try {
    graph.capture_end();
  } catch (...) {
    graph.abandon();
    throw;
  }
  side.stream.synchronize();
  impl_->captured = true;
}

bool CudaGraph::captured() const { return impl_->captured; }

void CudaGraph::replay() {
  TORCH_CHECK(impl_->captured, "CUDA graph replayed before it was captured");
  impl_->graph.replay();
}

#else

struct CudaGraph::Impl {};

CudaGraph::CudaGraph() = default;
CudaGraph::~CudaGraph() = default;

bool CudaGraph::available(const torch::Device&) { return false; }

void CudaGraph::capture(const torch::Device&, const std::function<void()>&, const CudaGraph*, bool) {
  TORCH_CHECK(false, "this runner was built without CUDA graphs (libtorch without CUDA)");
}

bool CudaGraph::captured() const { return false; }

void CudaGraph::replay() { TORCH_CHECK(false, "this runner was built without CUDA graphs"); }

#endif

}  // namespace ablate
