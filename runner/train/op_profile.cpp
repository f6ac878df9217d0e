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
  double bytes = 0;  ///< the tensors read and written by its leaf calls (see Frame::bytes)
  bool leaf = false;  ///< at least one call moved its bytes itself: the bytes column means something
};

std::mutex g_mu;
std::map<std::string, Totals> g_totals;
// FIRST:LAST:detail: rows keyed by argument types and callers too, with the bytes column. Off, the operators'
// arguments are not boxed for the callbacks, whose cost would land in the host times the plain table compares
// with torch.profiler's (which the reference records without shapes).
bool g_detail = false;

// Per thread, the operators open on it: self time = own time minus that of the operators called inside.
struct Frame {
  Clock::time_point start;
  double children_s = 0;
  std::string name;
  std::string key;
  // Bytes of the operator's distinct tensor arguments and results: what a memory-bound kernel reads and
  // writes, a device-independent measure of an elementwise pass. A tensor counts once (an in-place result is
  // its argument), by its own elements (a slice is not its whole storage).
  double bytes = 0;
  std::vector<std::pair<const void*, std::int64_t>> counted;  ///< data pointer and elements
  std::vector<const void*> arg_storages;
  bool in_place = false;  ///< ATen's convention: an in-place operator's name ends in '_'
  bool inner_traffic = false;  ///< an operator called inside moved bytes: they are counted there
};
thread_local std::vector<Frame> t_stack;

const char* short_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "f32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "f16";
    case at::kDouble: return "f64";
    case at::kLong: return "i64";
    case at::kInt: return "i32";
    case at::kBool: return "bool";
    case at::kByte: return "u8";
    default: return c10::toString(t);
  }
}

// Counts t's bytes unless the frame has counted the same tensor.
void count(Frame& f, const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return;
  const std::pair<const void*, std::int64_t> id{t.data_ptr(), t.numel()};
  if (std::find(f.counted.begin(), f.counted.end(), id) != f.counted.end()) return;
  f.counted.push_back(id);
  f.bytes += static_cast<double>(t.numel()) * static_cast<double>(t.element_size());
}

bool in_storage_of_argument(const Frame& f, const at::Tensor& t) {
  if (!t.has_storage()) return false;
  const void* s = t.storage().unsafeGetStorageImpl();
  return std::find(f.arg_storages.begin(), f.arg_storages.end(), s) != f.arg_storages.end();
}

template <class Fn>
void each_tensor(c10::ArrayRef<c10::IValue> values, Fn&& fn) {
  for (const auto& v : values) {
    if (v.isTensor()) {
      fn(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) fn(t);
    }
  }
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  Frame f;
  if (!g_detail) {  // the plain table: times alone, keyed by fn.name() at the end, as before detail existed
    f.start = Clock::now();
    t_stack.push_back(std::move(f));
    return nullptr;
  }
  f.name = fn.name();
  f.in_place = !f.name.empty() && f.name.back() == '_';
  std::string types;
  // Arguments are readable only here: the dispatcher boxes them for the start callbacks and destroys them
  // before the end ones. Autograd's nodes (another scope) have none.
  if (fn.scope() == at::RecordScope::FUNCTION) {
    each_tensor(fn.inputs(), [&](const at::Tensor& t) {
      if (!t.defined()) return;
      count(f, t);
      if (t.has_storage()) f.arg_storages.push_back(t.storage().unsafeGetStorageImpl());
      types += (types.empty() ? "" : ",") + std::string(short_type(t.scalar_type()));
      if (!t.is_contiguous()) types += "*";
    });
  }
  // Three callers: enough to tell, say, autocast's cast of a product's input from autograd's of a gradient.
  f.key = f.name + " [" + types + "]";
  const std::size_t callers = std::min<std::size_t>(t_stack.size(), 3);
  for (std::size_t i = 0; i < callers; ++i) f.key += " < " + t_stack[t_stack.size() - 1 - i].name;
  if (callers < 3) f.key += " < step";
  f.start = Clock::now();
  t_stack.push_back(std::move(f));
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (t_stack.empty()) return;  // started before the callback was added
  auto frame = std::move(t_stack.back());
  t_stack.pop_back();
  const double total = std::chrono::duration<double>(Clock::now() - frame.start).count();
  if (!t_stack.empty()) t_stack.back().children_s += total;
  // Bytes where the passes over memory happen: in operators none of whose inner operators moved any (a
  // composite such as aten::linear or aten::to would count its inner copy's or product's tensors again), and
  // not in an allocation, which writes nothing.
  const bool leaf = g_detail && fn.scope() == at::RecordScope::FUNCTION && !frame.inner_traffic;
  if (!leaf || frame.name.rfind("aten::empty", 0) == 0) {
    frame.bytes = 0;
  } else {
    // An out-of-place operator whose results all lie in its arguments' storage is a view: it moved nothing.
    // One that recorded no results (an internal record such as autograd's "detach") cannot be told from a view.
    bool views = true;
    each_tensor(fn.outputs(), [&](const at::Tensor& t) {
      if (!t.defined()) return;
      views = views && in_storage_of_argument(frame, t);
      count(frame, t);
    });
    if (views && !frame.in_place) frame.bytes = 0;
  }
  if (!t_stack.empty() && (frame.bytes > 0 || frame.inner_traffic)) t_stack.back().inner_traffic = true;
  std::lock_guard<std::mutex> lock(g_mu);
  auto& t = g_totals[g_detail ? frame.key : std::string(fn.name())];
  t.calls += 1;
  t.total_s += total;
  t.self_s += total - frame.children_s;
  t.bytes += frame.bytes;
  t.leaf = t.leaf || leaf;
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
  const int width = kernels ? 90 : g_detail ? 160 : 48;
  const std::size_t max_rows = g_detail ? rows.size() : 40;  // detail: every row, so that columns sum up
  char line[400];
  std::snprintf(line, sizeof line, "%s, steps %lld..%lld (per step; %s)\n", title, static_cast<long long>(first),
                static_cast<long long>(last), about);
  out << line;
  if (kernels && rows.empty()) {
    out << "  no device activity recorded (not on CUDA, or this libtorch's profiler has no CUPTI)\n";
    return;
  }
  constexpr double kMiB = 1024.0 * 1024.0;
  const bool mib_column = g_detail && !kernels;
  std::snprintf(line, sizeof line, "  %-*s %8s %10s %10s%s\n", width, kernels ? "kernel" : "name", "calls",
                kernels ? "device ms" : "self ms", kernels ? "share %" : "total ms", mib_column ? "        MiB" : "");
  out << line;
  double bytes_sum = 0;
  for (const auto& r : rows) bytes_sum += r.second.bytes;
  for (std::size_t i = 0; i < rows.size() && i < max_rows; ++i) {
    const auto& [name, t] = rows[i];
    char mib[32] = "";
    if (mib_column) {
      if (t.leaf) std::snprintf(mib, sizeof mib, " %10.1f", t.bytes / steps / kMiB);
      else std::snprintf(mib, sizeof mib, " %10s", "-");
    }
    std::snprintf(line, sizeof line, "  %-*.*s %8.1f %10.3f %10.*f%s\n", width, width, name.c_str(),
                  static_cast<double>(t.calls) / steps, 1e3 * t.self_s / steps, kernels ? 1 : 3,
                  kernels ? 100.0 * t.self_s / self_sum : 1e3 * t.total_s / steps, mib);
    out << line;
  }
  char mib[32] = "";
  if (mib_column) std::snprintf(mib, sizeof mib, " %10s %10.1f", "", bytes_sum / steps / kMiB);
  std::snprintf(line, sizeof line, "  %-*s %8s %10.3f%s\n", width, kernels ? "all kernels and copies" : "all operators",
                "", 1e3 * self_sum / steps, mib);
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
  int used = 0;
  const bool range = std::sscanf(spec, "%lld:%lld%n", &first, &last, &used) == 2 && first >= 1 && last >= first;
  const std::string rest = range ? std::string(spec + used) : std::string();
  if (!range || !(rest.empty() || (has_ops && rest == ":detail"))) {
    throw sdk::InputError(name + "=" + spec + ": expected FIRST:LAST" + (has_ops ? "[:detail]" : "") +
                          ", training steps from 1");
  }
  return std::unique_ptr<OpProfile>(new OpProfile(first, last, has_kernels, rest == ":detail"));
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
    g_detail = detail_;
  }
  // Thread-local: the training thread and, through the autograd engine's state propagation, its backward
  // threads; not the data workers.
  handle_ = at::addThreadLocalCallback(
      at::RecordFunctionCallback(on_start, on_end).needsInputs(detail_).needsOutputs(detail_));
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
  print_table(out, "operator profile",
              detail_ ? "self time excludes operators called inside; MiB: tensors read and written, by the operator "
                        "that moved them; * not contiguous"
                      : "self time excludes operators called inside",
              totals, first_, last_, /*kernels=*/false);
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
