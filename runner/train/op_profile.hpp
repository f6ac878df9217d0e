#pragma once
// A developer's aid for performance work (bench/README.md), in two forms, each over training steps FIRST..LAST:
//  - ABLATE_OP_PROFILE=FIRST:LAST: every operator and autograd node timed on the host (ATen's RecordFunction
//    callbacks; no profiler library needed), printed by self time per step, in the same terms as
//    torch.profiler's key_averages() (which bench/train_bench.py prints for the reference with the same
//    variable). On CUDA that is launch cost: kernels run asynchronously.
//    FIRST:LAST:detail splits the rows by the arguments' types (* = not contiguous) and three callers, and adds a
//    MiB column: the bytes of the tensors each operator read and wrote, counted at the operator that moved them.
//    For the memory-bound elementwise and norm passes that is their traffic, the same on any device: on the CPU
//    it tells what a GPU step at the same shapes moves (bench/README.md).
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
  /// when one is not FIRST:LAST (or, for operators, FIRST:LAST:detail), or both are set.
  static std::unique_ptr<OpProfile> from_env();
  ~OpProfile();
  /// Call before and after each training step.
  void before_step(std::int64_t step);
  void after_step(std::int64_t step, std::ostream& out);

 private:
  OpProfile(std::int64_t first, std::int64_t last, bool kernels, bool detail)
      : first_(first), last_(last), kernels_(kernels), detail_(detail) {}
  void print_kernels(std::ostream& out);
  std::int64_t first_, last_;
  bool kernels_;  ///< ABLATE_KERNEL_PROFILE: the device's kernels (Kineto) rather than host operators
  bool detail_;   ///< ABLATE_OP_PROFILE=FIRST:LAST:detail: rows by argument types and caller too
  bool kineto_ = false;
  bool active_ = false;
  std::uint64_t handle_ = 0;
};

}  // namespace ablate
