#pragma once
// The linear layer every adaptable projection uses. It can carry a LoRA adapter (rank, alpha, dropout; merge
// and unmerge) without its parent module being rebuilt; strategies find it by dynamic_cast, which works
// across plugin libraries because its vtable and RTTI live in libablate_sdk.so.

#include <torch/nn/module.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <vector>

namespace ablate::sdk {

struct LoraConfig {
  std::int64_t r = 8;
  double alpha = 8.0;
  double dropout = 0.0;
  /// rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.
  bool rslora = false;
};

/// y = x W^T + b (+ scaling * B A dropout(x) when an adapter is attached and not merged).
/// With an adapter whose dropout is off (p = 0, or evaluation), forward() runs as forward_shared() does for
/// one layer: x is cast once for both products, and the adapter's product is added inside the matrix product.
/// Parameters: "weight" [out, in], "bias" [out]; with an adapter, "lora_A.weight" [r, in] and
/// "lora_B.weight" [out, r], as PEFT names them in adapter_model.safetensors.
/// fan_in_fan_out: the weight is stored [in, out] and y = x W + b, as GPT-2's Conv1D stores it (PEFT's
/// flag of the same name); adapters keep their usual shapes.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(std::int64_t in_features, std::int64_t out_features, bool bias = true, bool fan_in_fan_out = false);
  ~LinearImpl() override;

  torch::Tensor forward(const torch::Tensor& x);
  /// torch.nn.Linear's initialisation: Kaiming-uniform (a = sqrt(5)) weight, uniform bias.
  void reset_parameters();

  /// Attaches an adapter. A is Kaiming-uniform (a = sqrt(5)) and B zero, as PEFT initialises them, so the
  /// layer's output does not change. The base weight and bias are frozen. Throws if one is attached.
  void attach_lora(const LoraConfig& config);
  bool has_lora() const { return static_cast<bool>(lora_A); }
  const LoraConfig& lora_config() const { return lora_; }
  double lora_scaling() const;
  /// Folds the adapter into weight (W += scaling * B A); forward() then skips the adapter path.
  void merge();
  /// Undoes merge().
  void unmerge();
  bool merged() const { return merged_; }

  std::int64_t in_features;
  std::int64_t out_features;
  bool fan_in_fan_out;
  torch::Tensor weight;
  torch::Tensor bias;  ///< undefined without bias
  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout lora_dropout{nullptr};

 private:
  /// scaling * B A, in the weight's layout and dtype.
  torch::Tensor delta_weight() const;
  LoraConfig lora_;
  bool merged_ = false;
};
TORCH_MODULE(Linear);

/// The type a matrix product of x runs in: autocast's type for x's device when autocast is on there (float64
/// is left alone, as autocast leaves it), else x's own.
at::ScalarType compute_type(const torch::Tensor& x);

/// layers[i](x) for layers that all read the same x (a block's q/k/v projections, LLaMA's gate/up), computed
/// together so that x costs what one reader costs, where autocast and autograd would otherwise charge per
/// reader:
///  - forward: x is cast to the compute type once (autocast casts it for every product: q, k, v and each LoRA
///    A), the LoRA A products of every adapter run as one product, and each adapter's B product is added to
///    its layer's output inside that product (no separate scaling and sum passes);
///  - backward: x's gradient is summed inside the matrix products (each reader's product accumulates into one
///    buffer) and converted to x's type once, instead of one conversion and one float32 sum per reader.
/// Numbers: the same products in the same type; the gradient of x is summed in the compute type across
/// readers (autograd sums float32 conversions of each), a difference of the compute type's rounding.
/// Falls back to calling each layer when any of them cannot take part: an adapter with dropout active while
/// training (each reader would need its own mask) or a layer of another input width.
/// `relu`: every output goes through ReLU inside the same step (OPT's fc1): on CUDA a layer without an adapter
/// gets it from the matrix product's epilogue, and backward masks with the saved output, as autograd would.
std::vector<torch::Tensor> forward_shared(const std::vector<LinearImpl*>& layers, const torch::Tensor& x,
                                          bool relu = false);

/// fc2(relu(fc1(x))): an MLP whose activation is ReLU (OPT's). With set_fused_relu(false), the default, exactly
/// `fc2(forward_shared({&fc1}, x, true)[0])`. With set_fused_relu(true), where neither layer has an active
/// adapter, the two products and the ReLU are one autograd node:
///  - on CUDA in bf16 or f16, fc1's product writes the ReLU's mask as bits (cuBLASLt's RELU_AUX epilogue) and
///    fc2's input-gradient product applies it (DRELU_BGRAD, which also gives fc1's bias gradient; DRELU without
///    a bias, or where cuBLASLt has no DRELU_BGRAD kernel for the sizes, the bias gradient then summed by
///    torch): no ReLU backward pass, and the mask kept until backward
///    is 1 bit per element rather than fc1's output (which is then kept only if fc2's weight trains);
///  - elsewhere (the CPU, float32, no cuBLASLt kernel for the sizes): torch's ops, the same as with it off.
/// The numbers are those of the products and the ReLU either way; only the passes between them go.
torch::Tensor relu_mlp(LinearImpl& fc1, LinearImpl& fc2, const torch::Tensor& x);
void set_fused_relu(bool on);
bool fused_relu();

}  // namespace ablate::sdk
