#pragma once
// A developer's aid for performance work (bench/README.md), in two forms, each over training steps FIRST..LAST:
//  - ABLATE_OP_PROFILE=FIRST:LAST: every operator and autograd node timed on the host (ATen's RecordFunction
//    callbacks; no profiler library needed), printed by self time per step, in the same terms as
//    torch.profiler's key_averages() (which bench/train_bench.py prints for the reference with the same
//    variable). On CUDA that is launch cost: kernels run asynchronously.
//  - ABLATE_KERNEL_PROFILE=FIRST:LAST (CUDA): the device's kernels and copies, timed by the device (libtorch's
//    Kineto profiler, CUPTI), printed by device time per step; the reference prints torch.profiler's device
//    table with the same variable. This is where a large batch's time goes.
// Off, it costs nothing: no callback is registered, no profiler started.

#include <cstdint>
#include <memory>
#include <ostream>

namespace ablate {

class OpProfile {
 public:
  /// From ABLATE_OP_PROFILE or ABLATE_KERNEL_PROFILE, or null when neither is set. Throws sdk::InputError
  /// when one is not FIRST:LAST, or both are set.
  static std::unique_ptr<OpProfile> from_env();
  ~OpProfile();
  /// Call before and after each training step.
  void before_step(std::int64_t step);
  void after_step(std::int64_t step, std::ostream& out);

 private:
  OpProfile(std::int64_t first, std::int64_t last, bool kernels) : first_(first), last_(last), kernels_(kernels) {}
  void print_kernels(std::ostream& out);
  std::int64_t first_, last_;
  bool kernels_;  ///< ABLATE_KERNEL_PROFILE: the device's kernels (Kineto) rather than host operators
  bool kineto_ = false;
  bool active_ = false;
  std::uint64_t handle_ = 0;
};

}  // namespace ablate
