// The ViT encoders library: encoder/clip_vit and encoder/siglip share their transformer blocks (vit.hpp).

#include "ablate/sdk/plugin.hpp"

namespace ablate::plugins::vit {
void register_clip(sdk::Registry& registry);
void register_siglip(sdk::Registry& registry);
}  // namespace ablate::plugins::vit

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  ablate::plugins::vit::register_clip(registry);
  ablate::plugins::vit::register_siglip(registry);
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
