#pragma once
// Normalisation layers with Hugging Face parameter names, and the residual add + LayerNorm step of a
// transformer block as one operation.

#include <torch/nn/module.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

namespace ablate::sdk {

/// RMSNorm as transformers' LlamaRMSNorm: weight * (x / sqrt(mean(x^2) + eps)), computed in float32 and cast
/// back before the weight multiplies. Parameter: "weight". Float32 input goes through torch's rms_norm (fused
/// on CUDA).
class RMSNormImpl : public torch::nn::Module {
 public:
  explicit RMSNormImpl(std::int64_t size, double eps = 1e-6);
  ~RMSNormImpl() override;
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

/// What a block's residual add and LayerNorm hand on: the residual stream and the normalised input of the
/// next matrix products, in the type those run in (compute_type(): bf16 under bf16 autocast).
struct NormStep {
  torch::Tensor stream;  ///< float32 as the residual came
  torch::Tensor normed;
};

/// A block's `residual + branch` followed by `ln`, for both orders transformers use:
///  - pre-LN (`post` false; OPT with do_layer_norm_before, GPT-2): stream = residual + branch,
///    normed = ln(stream);
///  - post-LN (`post` true; OPT-350m): stream = ln(residual + branch), and normed is the same values.
/// `branch` may be undefined (no add: the first block's input). The numbers are those of `residual + branch`,
/// `ln(...)` and autocast's cast of ln's output to the products' type, as the modules compute them.
/// With set_fused_norm(true) and float32 residual and norm parameters, it runs as one pass each way
/// (on CUDA our own kernels, sdk/src/cuda/add_layer_norm.cu; on the CPU a loop over rows) instead of the
/// add, the norm, the cast and, in backward, the conversions and sums of the gradients around them. The
/// mean and variance are then summed in another order: float32 rounding differences, no more.
NormStep add_layer_norm(const torch::Tensor& residual, const torch::Tensor& branch, torch::nn::LayerNormImpl& ln,
                        bool post);
/// The same with an RMSNorm (LLaMA's pre-norm blocks): the numbers of `residual + branch`, `norm(...)` and the
/// cast, or with set_fused_norm(true) one pass each way (the kernels' RMSNorm form: no mean, no bias).
NormStep add_layer_norm(const torch::Tensor& residual, const torch::Tensor& branch, RMSNormImpl& norm, bool post);

/// The residual stream between pre-LN blocks (pre_ln_block) when each block's last add runs inside the next
/// block's first norm: the hidden states are `h + pending`, `pending` being the last block's last branch
/// (undefined: nothing pending, as before the first block).
struct PreLnStream {
  torch::Tensor h, pending;
  torch::Tensor hidden() const { return pending.defined() ? h + pending : h; }
};

/// One pre-LN block as GPT-2's, LLaMA's and CLIP's and SigLIP's encoder layers compute it, h + attn(ln_1(h))
/// and then h + mlp(ln_2(h)), with each residual add inside the norm after it (add_layer_norm; `Norm` a
/// LayerNormImpl or an RMSNormImpl): the block's last add is left pending for the next block's first norm, or
/// for PreLnStream::hidden(). `attn` and `mlp` take the normed input, in the products' type, and return their
/// branch (dropout included).
template <class Norm, class Attn, class Mlp>
PreLnStream pre_ln_block(const PreLnStream& in, Norm& ln_1, Attn&& attn, Norm& ln_2, Mlp&& mlp) {
  auto n = add_layer_norm(in.h, in.pending, ln_1, /*post=*/false);
  auto a = attn(n.normed);
  n = add_layer_norm(n.stream, a, ln_2, /*post=*/false);
  return {n.stream, mlp(n.normed)};
}

/// Whether add_layer_norm() takes the fused path (off unless set: the runner's --fused-norm sets it, on for
/// CUDA by default, where an H100 measured the kernels faster). Process-wide, as torch's TF32 switch is.
void set_fused_norm(bool on);
bool fused_norm();

}  // namespace ablate::sdk
