// strategy/full, head, projector, encoder, backbone: train one named part of the assembled model in full.
// In a list they add up: ["projector", "head"] trains both.

#include "ablate/sdk/plugin.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct NoOptions {
  static NoOptions parse(sdk::Options&) { return {}; }
};

/// Trains the module that `Part::name(target)` names.
template <class Part>
class TrainPart : public sdk::Strategy {
 public:
  using options_type = NoOptions;
  TrainPart(const NoOptions&, const sdk::BuildContext&) {}
  void apply(sdk::TrainTarget& target) override { target.train(Part::name(target)); }
};

struct Whole { static std::string name(const sdk::TrainTarget&) { return ""; } };
struct Head { static std::string name(const sdk::TrainTarget& t) { return t.head(); } };
struct ProjectorPart { static std::string name(const sdk::TrainTarget&) { return "projector"; } };
struct EncoderPart { static std::string name(const sdk::TrainTarget&) { return "encoder"; } };
struct BackbonePart { static std::string name(const sdk::TrainTarget&) { return "backbone"; } };

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  using namespace ablate::plugins;
  registry.add<TrainPart<Whole>>("full", 1, "Train every parameter");
  registry.add<TrainPart<Head>>("head", 1, "Train the backbone's LM head (the embedding matrix when tied)");
  registry.add<TrainPart<ProjectorPart>>("projector", 1, "Train the projector");
  registry.add<TrainPart<EncoderPart>>("encoder", 1, "Train the image encoder");
  registry.add<TrainPart<BackbonePart>>("backbone", 1, "Train the whole LLM backbone");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
