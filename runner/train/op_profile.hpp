#pragma once
// A developer's aid for performance work (bench/README.md): with ABLATE_OP_PROFILE=FIRST:LAST in the
// environment, the trainer times every operator and autograd node of training steps FIRST..LAST (ATen's
// RecordFunction callbacks; no profiler library needed) and prints them by self time per step, in the same
// terms as torch.profiler's key_averages() (which bench/train_bench.py prints for the reference with the same
// variable). Off, it costs nothing: no callback is registered.

#include <cstdint>
#include <memory>
#include <ostream>

namespace ablate {

class OpProfile {
 public:
  /// From ABLATE_OP_PROFILE, or null when it is not set. Throws sdk::InputError when it is not FIRST:LAST.
  static std::unique_ptr<OpProfile> from_env();
  ~OpProfile();
  /// Call before and after each training step.
  void before_step(std::int64_t step);
  void after_step(std::int64_t step, std::ostream& out);

 private:
  OpProfile(std::int64_t first, std::int64_t last) : first_(first), last_(last) {}
  std::int64_t first_, last_;
  bool active_ = false;
  std::uint64_t handle_ = 0;
};

}  // namespace ablate
