#pragma once
// Runs CUDA kernel source on the host, for the machines without a GPU (this one, CI). Include it before the
// kernels' header; compile with a host compiler and the CUDA toolkit's include folder (for cuda_bf16.h and
// friends, whose conversions also run on the host).
//
// What it models: a launch runs `threads` std::threads, one per CUDA thread of a block, over the blocks in
// turn. __shared__ variables become function statics, shared by the block's threads (one block runs at a
// time, and every thread passes a barrier before the next block starts). __syncthreads() is a barrier of the
// block; __shfl_xor_sync exchanges values through a slot per thread between two barriers of its warp, so warps
// run ahead of each other as far as they do on the GPU.
//
// What it does not: warps that diverge around a shuffle or a barrier (every thread of the block must reach each
// one, as in our kernels), the GPU's memory model beyond what the barriers order, its approximate intrinsics
// (rsqrtf here is exact), launch limits. It checks the arithmetic and the indexing of the source, not the GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__CUDACC__)
#error "simt.hpp is for host compilers: nvcc runs the kernels for real"
#endif

// cuda's host_defines.h leaves these empty for a host compiler, or does not define them.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace ablate::simt {

/// A reusable barrier for a fixed number of threads (std::barrier is C++20).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock lock(mutex_);
    const auto generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  std::uint64_t generation_ = 0;
};

/// What the threads of the running block share.
struct Block {
  explicit Block(int threads) : barrier(threads), slots(static_cast<std::size_t>(threads)) {
    for (int first = 0; first < threads; first += 32) warps.push_back(std::make_unique<Barrier>(std::min(32, threads - first)));
  }
  Barrier barrier;                               ///< __syncthreads
  std::vector<std::unique_ptr<Barrier>> warps;  ///< one per warp of 32, for the shuffles
  std::vector<float> slots;                      ///< one per thread, for the shuffles
};

inline thread_local Block* current = nullptr;

/// Runs kernel(args...) as a launch of `blocks` blocks of `threads` threads would, and returns cudaSuccess.
/// Kernels do not throw (a thread that did would leave the others at a barrier).
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned blocks, int threads, Args... args);

}  // namespace ablate::simt

// The built-in variables, per host thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};

inline void __syncthreads() { ablate::simt::current->barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  auto& b = *ablate::simt::current;
  auto& warp = *b.warps[threadIdx.x / 32];  // only the warp waits, as on the GPU
  b.slots[threadIdx.x] = v;
  warp.arrive_and_wait();
  // The partner in the same warp of 32, as the hardware's butterfly.
  const unsigned partner = (threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask));
  const float r = b.slots[partner];
  warp.arrive_and_wait();  // nobody overwrites a slot before the whole warp has read its partner's
  return r;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

template <class... Params, class... Args>
cudaError_t ablate::simt::launch(void (*kernel)(Params...), unsigned blocks, int threads, Args... args) {
  Block block(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      current = &block;
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      blockDim = {static_cast<unsigned>(threads), 1, 1};
      for (unsigned b = 0; b < blocks; ++b) {
        blockIdx = {b, 0, 0};
        kernel(args...);
        block.barrier.arrive_and_wait();  // the block's shared statics are free for the next one
      }
    });
  }
  for (auto& t : pool) t.join();
  return cudaSuccess;
}
