#include "train/op_profile.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include "ablate/sdk/error.hpp"

namespace ablate {

namespace {

using Clock = std::chrono::steady_clock;

struct Totals {
  std::int64_t calls = 0;
  double self_s = 0, total_s = 0;
};

std::mutex g_mu;
std::map<std::string, Totals> g_totals;

// Per thread, the operators open on it: self time = own time minus that of the operators called inside.
struct Frame {
  Clock::time_point start;
  double children_s = 0;
};
thread_local std::vector<Frame> t_stack;


std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) {
  t_stack.push_back({Clock::now(), 0});
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (t_stack.empty()) return;  // started before the callback was added
  const auto frame = t_stack.back();
  t_stack.pop_back();
  const double total = std::chrono::duration<double>(Clock::now() - frame.start).count();
  if (!t_stack.empty()) t_stack.back().children_s += total;
  std::lock_guard<std::mutex> lock(g_mu);
  auto& t = g_totals[fn.name()];
  t.calls += 1;
  t.total_s += total;
  t.self_s += total - frame.children_s;
}

// One profile's table, per step, largest self time first: operators (self and total host time) or kernels
// (device time and share of it; a kernel has no children, so its self time is its time).
void print_table(std::ostream& out, const char* title, const char* about, const std::map<std::string, Totals>& totals,
                 std::int64_t first, std::int64_t last, bool kernels) {
  std::vector<std::pair<std::string, Totals>> rows(totals.begin(), totals.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.self_s > b.second.self_s; });
  const double steps = static_cast<double>(last - first + 1);
  double self_sum = 0;
  for (const auto& r : rows) self_sum += r.second.self_s;
  const int width = kernels ? 90 : 48;
  char line[320];
  std::snprintf(line, sizeof line, "%s, steps %lld..%lld (per step; %s)\n", title, static_cast<long long>(first),
                static_cast<long long>(last), about);
  out << line;
  if (kernels && rows.empty()) {
    out << "  no device activity recorded (not on CUDA, or this libtorch's profiler has no CUPTI)\n";
    return;
  }
  std::snprintf(line, sizeof line, "  %-*s %8s %10s %10s\n", width, kernels ? "kernel" : "name", "calls",
                kernels ? "device ms" : "self ms", kernels ? "share %" : "total ms");
  out << line;
  for (std::size_t i = 0; i < rows.size() && i < 40; ++i) {
    const auto& [name, t] = rows[i];
    std::snprintf(line, sizeof line, "  %-*.*s %8.1f %10.3f %10.*f\n", width, width, name.c_str(),
                  static_cast<double>(t.calls) / steps, 1e3 * t.self_s / steps, kernels ? 1 : 3,
                  kernels ? 100.0 * t.self_s / self_sum : 1e3 * t.total_s / steps);
    out << line;
  }
  std::snprintf(line, sizeof line, "  %-*s %8s %10.3f\n", width, kernels ? "all kernels and copies" : "all operators", "",
                1e3 * self_sum / steps);
  out << line;
}

namespace kineto {
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
const std::set<ActivityType> kActivities{ActivityType::CPU, ActivityType::CUDA};
}  // namespace kineto

}  // namespace

std::unique_ptr<OpProfile> OpProfile::from_env() {
  const char* ops = std::getenv("ABLATE_OP_PROFILE");
  const char* kernels = std::getenv("ABLATE_KERNEL_PROFILE");
  const bool has_ops = ops && *ops, has_kernels = kernels && *kernels;
  if (!has_ops && !has_kernels) return nullptr;
  if (has_ops && has_kernels) throw sdk::InputError("ABLATE_OP_PROFILE and ABLATE_KERNEL_PROFILE: set one of them, not both");
  const std::string name = has_ops ? "ABLATE_OP_PROFILE" : "ABLATE_KERNEL_PROFILE";
  const char* spec = has_ops ? ops : kernels;
  long long first = 0, last = 0;
  char tail = 0;
  if (std::sscanf(spec, "%lld:%lld%c", &first, &last, &tail) != 2 || first < 1 || last < first) {
    throw sdk::InputError(name + "=" + spec + ": expected FIRST:LAST, training steps from 1");
  }
  return std::unique_ptr<OpProfile>(new OpProfile(first, last, has_kernels));
}

OpProfile::~OpProfile() {
  if (handle_) at::removeCallback(handle_);
  if (kineto_) torch::autograd::profiler::disableProfiler();
}

void OpProfile::before_step(std::int64_t step) {
  if (kernels_) {
    if (step != first_ || kineto_) return;
    const kineto::ProfilerConfig config(kineto::ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, kineto::kActivities);
    torch::autograd::profiler::enableProfiler(config, kineto::kActivities);
    kineto_ = true;
    return;
  }
  if (step != first_ || handle_) return;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_totals.clear();
  }
  // Thread-local: the training thread and, through the autograd engine's state propagation, its backward
  // threads; not the data workers.
  handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end));
}

void OpProfile::after_step(std::int64_t step, std::ostream& out) {
  if (kernels_) {
    if (step == last_ && kineto_) print_kernels(out);
    return;
  }
  if (step != last_ || !handle_) return;
  at::removeCallback(handle_);
  handle_ = 0;
  std::map<std::string, Totals> totals;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    totals = g_totals;
  }
  print_table(out, "operator profile", "self time excludes operators called inside", totals, first_, last_, /*kernels=*/false);
}

void OpProfile::print_kernels(std::ostream& out) {
  // The trainer has read the last step's loss: every kernel of the steps has finished.
  const auto result = torch::autograd::profiler::disableProfiler();
  kineto_ = false;
  std::map<std::string, Totals> by_name;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;  // host-side events: the operator profile's business
    auto& t = by_name[e.name()];
    t.calls += 1;
    t.self_s += 1e-9 * static_cast<double>(e.durationNs());
  }
  print_table(out, "kernel profile", "device time of each kernel and copy", by_name, first_, last_, /*kernels=*/true);
}

}  // namespace ablate
