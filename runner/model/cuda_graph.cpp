#include "model/cuda_graph.hpp"

#include <ATen/autocast_mode.h>
#include <c10/core/StreamGuard.h>

#include "ablate/sdk/attention.hpp"

#ifdef ABLATE_WITH_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate {

#ifdef ABLATE_WITH_CUDA_GRAPHS

struct CudaGraph::Impl {
  at::cuda::CUDAGraph graph;
  bool captured = false;
};

CudaGraph::CudaGraph() : impl_(std::make_unique<Impl>()) {}
CudaGraph::~CudaGraph() = default;

bool CudaGraph::available(const torch::Device& device) { return device.is_cuda(); }

void CudaGraph::capture(const torch::Device& device, const std::function<void()>& work) {
  TORCH_CHECK(device.is_cuda(), "CUDA graphs need a CUDA device, not ", device.str());
  TORCH_CHECK(!impl_->captured, "this CUDA graph is captured already");
  const auto index = device.has_index() ? device.index() : c10::DeviceIndex(0);
  // Streams are switched and waited for through c10's device-generic guards (dispatched into libtorch's CUDA
  // library), not CUDAStream's inline members, which would make the runner link the CUDA runtime itself.
  c10::Stream current = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(c10::Device(c10::DeviceType::CUDA, index));
  current.synchronize();
  c10::Stream side = at::cuda::getStreamFromPool(/*isHighPriority=*/false, index).unwrap();
  // Autocast's cache of cast weights lives outside the graph and is emptied when the autocast region ends: the
  // casts are recorded in the graph instead. The dense mask attend() remembers is forgotten for the same reason.
  const bool autocast_cache = at::autocast::is_autocast_cache_enabled();
  at::autocast::set_autocast_cache_enabled(false);
  sdk::forget_mask_memo();
  struct Restore {
    bool cache;
    ~Restore() {
      at::autocast::set_autocast_cache_enabled(cache);
      sdk::forget_mask_memo();
    }
  } restore{autocast_cache};
  c10::StreamGuard on_side(side);
  // Thread-local mode: other threads (the data pipeline pinning host memory) may go on using CUDA meanwhile.
  impl_->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  try {
    work();
  } catch (...) {
    try {
      impl_->graph.capture_end();  // ends the (now invalid) capture, so the stream is usable again
    } catch (...) {
    }
    throw;
  }
  impl_->graph.capture_end();
  side.synchronize();
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

void CudaGraph::capture(const torch::Device&, const std::function<void()>&) {
  TORCH_CHECK(false, "this runner was built without CUDA graphs (libtorch without CUDA)");
}

bool CudaGraph::captured() const { return false; }

void CudaGraph::replay() { TORCH_CHECK(false, "this runner was built without CUDA graphs"); }

#endif

}  // namespace ablate
