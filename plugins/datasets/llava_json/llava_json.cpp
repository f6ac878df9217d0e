// dataset/llava_json: LLaVA's conversation JSON, as LLaVA's train.py reads it (--data_path, --image_folder):
//
//   [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
//     "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
//                       {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Black."}]}, ...]
//
// Turns. LLaVA trains on every gpt turn of a conversation at once, each conditioned on all the turns before
// it. A Sample has one target, so a conversation with k exchanges becomes k samples (turns = "all"): sample j
// has the first j - 1 exchanges in its prompt and gpt turn j as its target, the same tokens trained on in
// the same context; their ids are "<id>" for the first and "<id>#<j>" for the others. turns = "first" keeps
// only the first exchange. The prompt is written in LLaVA's v1 layout without its system line:
//
//   [system "\n"] {user_prefix}{human 1}{assistant_prefix} {gpt 1}{separator}...{user_prefix}{human j}{assistant_prefix}
//
// with user_prefix = "USER: ", assistant_prefix = " ASSISTANT:", separator = "\n" by default (set both
// prefixes to "" for the bare question). As LLaVA's preprocess_multimodal does, "<image>" is moved to the
// front of its turn, followed by a newline. It may appear once, in the first human turn of a sample with an
// image; an image sample without it gets the image where the layout puts it when a prompt has none.
// Entries without "image" are text-only samples (an empty 0 x 0 x 3 image, metadata has_image = false).

#include <algorithm>

#include "ablate/sdk/plugin.hpp"
#include "../common/data_files.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;
namespace fs = std::filesystem;
using data::Pointer;
using value_t = sdk::Json::value_t;

namespace {
constexpr const char* kImageToken = "<image>";
}

struct LlavaJsonOptions : data::ImageFileOptions {  // image_folder: default the folder of `file`
  std::string turns = "all";
  std::string system;
  std::string user_prefix = "USER: ";
  std::string assistant_prefix = " ASSISTANT:";
  std::string separator = "\n";

  static LlavaJsonOptions parse(sdk::Options& o) {
    LlavaJsonOptions x;
    x.read_with_file(o);
    x.turns = o.get("turns", x.turns);
    x.system = o.get("system", x.system);
    x.user_prefix = o.get("user_prefix", x.user_prefix);
    x.assistant_prefix = o.get("assistant_prefix", x.assistant_prefix);
    x.separator = o.get("separator", x.separator);
    if (x.turns != "all" && x.turns != "first") o.fail("turns", "must be \"all\" or \"first\"");
    data::check_limit(o, x.limit);
    return x;
  }
};

struct LlavaJsonItem {
  std::string id, image, prompt, target;
  int turn = 1, turns = 1;
};

class LlavaJson : public data::ItemDataset<LlavaJsonItem> {
 public:
  using options_type = LlavaJsonOptions;

  LlavaJson(const LlavaJsonOptions& o, const sdk::BuildContext& ctx) {
    const auto file = sdk::resolve_path(ctx.base_dir, o.file);
    root_ = data::image_root(ctx.base_dir, o.image_folder, file.parent_path());
    auto doc = data::JsonText::read(file);
    const auto& entries = doc.at(Pointer(), value_t::array);
    std::int64_t text_only = 0, multi_turn = 0, exchanges_total = 0, unanswered = 0, without_token = 0, beyond_first = 0;
    for (std::size_t e = 0; e < entries.size(); ++e) {
      if (full(o.limit)) break;
      ++read_;
      const Pointer entry = Pointer() / e;
      const auto id = doc.id(entry, "id");
      std::string image_path;
      if (const auto* image = doc.maybe(entry, "image", value_t::string)) {
        image_path = root_.resolve(doc, entry / "image", image->get<std::string>()).string();
      } else {
        ++text_only;
      }
      const auto& turns = doc.need(entry, "conversations", value_t::array);
      std::vector<std::string> values;
      bool token_seen = false;
      for (std::size_t t = 0; t < turns.size(); ++t) {
        const Pointer turn = entry / "conversations" / t;
        const auto from = doc.string(turn, "from");
        const char* expected = t % 2 == 0 ? "human" : "gpt";
        if (from != expected) {
          doc.fail(turn / "from", "'" + from + "' where a '" + expected + "' turn belongs (turns alternate human, gpt, starting with human)");
        }
        auto value = doc.string(turn, "value");
        const auto at = value.find(kImageToken);
        if (at != std::string::npos) {
          if (image_path.empty()) doc.fail(turn / "value", "'<image>' in a sample without an image");
          if (t != 0) doc.fail(turn / "value", "'<image>' outside the first human turn");
          if (value.find(kImageToken, at + 1) != std::string::npos) doc.fail(turn / "value", "'<image>' more than once");
          value.erase(at, std::char_traits<char>::length(kImageToken));
          value = std::string(kImageToken) + "\n" + data::trim(value);
          token_seen = true;
        }
        values.push_back(std::move(value));
      }
      if (values.size() < 2) doc.fail(entry / "conversations", "needs a human turn and a gpt turn");
      if (values.size() % 2 == 1) ++unanswered;
      if (!image_path.empty() && !token_seen) ++without_token;
      const std::size_t exchanges = values.size() / 2;
      exchanges_total += static_cast<std::int64_t>(exchanges);
      if (exchanges > 1) ++multi_turn;
      std::string context = o.system.empty() ? "" : o.system + "\n";
      for (std::size_t j = 0; j < exchanges; ++j) {
        if (j > 0 && o.turns == "first") {
          beyond_first += static_cast<std::int64_t>(exchanges - j);
          break;
        }
        if (full(o.limit)) break;
        LlavaJsonItem item;
        item.id = j == 0 ? id : id + "#" + std::to_string(j + 1);
        item.image = image_path;
        item.prompt = context + o.user_prefix + values[2 * j] + o.assistant_prefix;
        item.target = values[2 * j + 1];
        item.turn = static_cast<int>(j + 1);
        item.turns = static_cast<int>(exchanges);
        context = item.prompt + " " + item.target + o.separator;
        samples_.push_back(std::move(item));
      }
    }
    doc.release();
    if (o.check_images) check_images(file.string());
    report_ = {{"entries_read", read_},
               {"samples", samples_.size()},
               {"exchanges", exchanges_total},
               {"multi_turn_entries", multi_turn},
               {"text_only_entries", text_only},
               {"image_without_token", without_token},
               {"unanswered_last_turn", unanswered},
               {"turns_not_used", beyond_first}};
  }

  sdk::Sample get(std::size_t index) const override {
    const auto& item = samples_.at(index);
    sdk::Sample s;
    s.id = item.id;
    s.image = item.image.empty() ? data::no_image() : data::load_image(item.image, item.id);
    s.prompt = item.prompt;
    s.target = item.target;
    s.references = {item.target};
    s.metadata = {{"turn", item.turn}, {"turns", item.turns}, {"has_image", !item.image.empty()}};
    return s;
  }

 private:
  data::ImageRoot root_;
  std::int64_t read_ = 0;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::LlavaJson>("llava_json", 1, "LLaVA conversation JSON (one sample per gpt turn)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
