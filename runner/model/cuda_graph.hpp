#pragma once
// One CUDA graph: a piece of work whose tensors never move or change shape, captured once and replayed with
// one launch instead of one per operation. Decoding uses it for its one-token steps (model/vlm.cpp), and training
// for a step's forward and backward passes (train/train_steps.cpp): a small or mid-size model otherwise spends
// much of a step launching kernels.
//
// Built only when libtorch has CUDA (ABLATE_WITH_CUDA_GRAPHS); elsewhere available() is false and capture()
// throws. Nothing here needs the CUDA runtime library of its own: the runner loads libtorch's.

#include <functional>
#include <memory>

#include <torch/types.h>

namespace ablate {

class CudaGraph {
 public:
  CudaGraph();
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  /// This build can capture graphs on `device` (a CUDA device and a CUDA build of libtorch).
  static bool available(const torch::Device& device);

  /// Records `work` on the process's capture stream for `device` (the default stream cannot be captured), after
  /// the device has finished what came before; the first capture on a device runs `work` once eagerly on that
  /// stream first. `work` must have run eagerly at least once with the same tensors (libraries initialise
  /// lazily, and that cannot be captured), must not wait for the device (no .item(), no copy to the host) and
  /// must allocate nothing it expects to keep: its outputs live in the graph's own memory, rewritten at every
  /// replay. Throws when something in `work` cannot be captured; the object is then unusable, and the stream
  /// and the allocators are as they were. `share_memory_with`: a captured graph whose memory this one may reuse
  /// for its temporaries (graphs that never run at the same time, whose outputs are read before the other
  /// runs: the training step's shapes). `warm_up`: run `work` eagerly on the capture stream first even when the
  /// stream is warm already (work that sets up state other work did not: autograd's threads, their cuBLAS handles).
  void capture(const torch::Device& device, const std::function<void()>& work, const CudaGraph* share_memory_with = nullptr,
               bool warm_up = false);
  bool captured() const;
  /// Runs the captured work again on the current stream, reading the same input tensors' current contents.
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ablate
