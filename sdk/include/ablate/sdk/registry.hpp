#pragma once
// The registry a plugin fills in its register function: one factory per id and kind.

#include <functional>
#include <memory>
#include <string>
#include <type_traits>

#include "ablate/sdk/backbone.hpp"
#include "ablate/sdk/component.hpp"
#include "ablate/sdk/dataset.hpp"
#include "ablate/sdk/encoder.hpp"
#include "ablate/sdk/metric.hpp"
#include "ablate/sdk/options.hpp"
#include "ablate/sdk/projector.hpp"
#include "ablate/sdk/strategy.hpp"

namespace ablate::sdk {

enum class Kind { encoder, projector, backbone, strategy, dataset, metric };
const char* kind_name(Kind kind);

/// One way to build objects of kind T. Ids are stable (they end up in database rows): add "@2" rather than
/// rename. `version` changes when the same options would now give different numbers; it is part of every
/// cell key that uses the factory.
template <class T>
struct Factory {
  std::string id;
  int version = 1;
  std::string summary;
  /// Reads every option it knows from the view and checks them; throws OptionError. No side effects: the
  /// host calls it while expanding a grid, before anything runs.
  std::function<void(Options&)> parse;
  /// Builds the object. Called with a fresh view over the same options.
  std::function<std::shared_ptr<T>(Options&, const BuildContext&)> create;
};

/// Filled by a plugin's register function; implemented by the host. Calls are only valid during that
/// function. Registering an id twice for one kind throws.
class Registry {
 public:
  virtual ~Registry();
  virtual void add_encoder(Factory<Encoder> factory) = 0;
  virtual void add_projector(Factory<Projector> factory) = 0;
  virtual void add_backbone(Factory<Backbone> factory) = 0;
  virtual void add_strategy(Factory<Strategy> factory) = 0;
  virtual void add_dataset(Factory<Dataset> factory) = 0;
  virtual void add_metric(Factory<Metric> factory) = 0;

  /// Registers Impl under `id`. Impl derives from one of the kinds, names its options struct as
  /// `options_type`, which has `static options_type parse(Options&)`, and has the constructor
  /// `Impl(const options_type&, const BuildContext&)`.
  template <class Impl>
  void add(std::string id, int version, std::string summary);
};

template <class Impl>
void Registry::add(std::string id, int version, std::string summary) {
  using O = typename Impl::options_type;
  auto parse = [](Options& o) { (void)O::parse(o); };
  auto make = [](auto* tag) {
    using Base = std::remove_pointer_t<decltype(tag)>;
    return [](Options& o, const BuildContext& ctx) -> std::shared_ptr<Base> {
      return std::make_shared<Impl>(O::parse(o), ctx);
    };
  };
  if constexpr (std::is_base_of_v<Encoder, Impl>) {
    add_encoder({std::move(id), version, std::move(summary), parse, make(static_cast<Encoder*>(nullptr))});
  } else if constexpr (std::is_base_of_v<Projector, Impl>) {
    add_projector({std::move(id), version, std::move(summary), parse, make(static_cast<Projector*>(nullptr))});
  } else if constexpr (std::is_base_of_v<Backbone, Impl>) {
    add_backbone({std::move(id), version, std::move(summary), parse, make(static_cast<Backbone*>(nullptr))});
  } else if constexpr (std::is_base_of_v<Strategy, Impl>) {
    add_strategy({std::move(id), version, std::move(summary), parse, make(static_cast<Strategy*>(nullptr))});
  } else if constexpr (std::is_base_of_v<Dataset, Impl>) {
    add_dataset({std::move(id), version, std::move(summary), parse, make(static_cast<Dataset*>(nullptr))});
  } else {
    static_assert(std::is_base_of_v<Metric, Impl>, "Impl must derive from an ablate::sdk kind");
    add_metric({std::move(id), version, std::move(summary), parse, make(static_cast<Metric*>(nullptr))});
  }
}

}  // namespace ablate::sdk
