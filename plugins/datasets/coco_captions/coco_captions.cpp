// dataset/coco_captions: COCO's caption annotations (captions_train2017.json...):
//
//   {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}],
//    "annotations": [{"image_id": 391895, "id": 1, "caption": "A man riding a bike."}, ...]}
//
// One sample per image, in the order of "images": every caption is a reference (in file order, surrounding
// whitespace removed), the caption at target_index (default 0, the first; the last when an image has fewer)
// is the target. Images with no caption are left out and counted. The prompt is `prompt`, empty by default
// (GIT's captioning: the caption follows the image directly).

#include <map>

#include "ablate/sdk/plugin.hpp"
#include "../common/data_files.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;
namespace fs = std::filesystem;
using data::Pointer;
using value_t = sdk::Json::value_t;

struct CocoCaptionsOptions : data::ImageFileOptions {  // image_folder: default the folder of `file`
  std::int64_t target_index = 0;
  std::string prompt;

  static CocoCaptionsOptions parse(sdk::Options& o) {
    CocoCaptionsOptions x;
    x.read_with_file(o);
    x.target_index = o.get("target_index", x.target_index);
    x.prompt = o.get("prompt", x.prompt);
    if (x.target_index < 0) o.fail("target_index", "must be 0 or positive");
    data::check_limit(o, x.limit);
    return x;
  }
};

struct CocoCaptionsItem {
  std::string id, file_name, image, target;
  std::int64_t image_id = 0;
  std::vector<std::string> references;
};

class CocoCaptions : public data::ItemDataset<CocoCaptionsItem> {
 public:
  using options_type = CocoCaptionsOptions;

  CocoCaptions(const CocoCaptionsOptions& o, const sdk::BuildContext& ctx) : prompt_(o.prompt) {
    const auto file = sdk::resolve_path(ctx.base_dir, o.file);
    root_ = data::image_root(ctx.base_dir, o.image_folder, file.parent_path());
    auto doc = data::JsonText::read(file);
    const auto& images = doc.need(Pointer(), "images", value_t::array);
    const auto& annotations = doc.need(Pointer(), "annotations", value_t::array);
    std::map<std::int64_t, std::size_t> by_id;  // image id -> index in images
    for (std::size_t i = 0; i < images.size(); ++i) {
      const auto id = doc.integer(Pointer("/images") / i, "id");
      if (!by_id.emplace(id, i).second) doc.fail(Pointer("/images") / i / "id", "image id " + std::to_string(id) + " listed twice");
    }
    std::vector<std::vector<std::string>> captions(images.size());
    for (std::size_t k = 0; k < annotations.size(); ++k) {
      const Pointer a = Pointer("/annotations") / k;
      const auto image_id = doc.integer(a, "image_id");
      const auto caption = data::trim(doc.string(a, "caption"));
      const auto it = by_id.find(image_id);
      if (it == by_id.end()) doc.fail(a / "image_id", "image " + std::to_string(image_id) + " is not in \"images\"");
      captions[it->second].push_back(caption);
    }
    std::int64_t no_captions = 0, clamped = 0, read = 0;
    for (std::size_t i = 0; i < images.size(); ++i) {
      if (full(o.limit)) break;
      ++read;
      const Pointer im = Pointer("/images") / i;
      const auto name = doc.string(im, "file_name");
      const auto path = root_.resolve(doc, im / "file_name", name);
      if (captions[i].empty()) {
        ++no_captions;
        continue;
      }
      CocoCaptionsItem item;
      item.image_id = doc.integer(im, "id");
      item.id = std::to_string(item.image_id);
      item.file_name = name;
      item.image = path.string();
      auto index = static_cast<std::size_t>(o.target_index);
      if (index >= captions[i].size()) {
        index = captions[i].size() - 1;
        ++clamped;
      }
      item.target = captions[i][index];
      item.references = std::move(captions[i]);
      samples_.push_back(std::move(item));
    }
    report_ = {{"images_read", read},
               {"captions", annotations.size()},
               {"samples", samples_.size()},
               {"no_captions", no_captions},
               {"target_index_clamped", clamped}};
    doc.release();
    if (o.check_images) check_images(file.string());
  }

  sdk::Sample get(std::size_t index) const override {
    const auto& item = samples_.at(index);
    sdk::Sample s;
    s.id = item.id;
    s.image = data::load_image(item.image, item.id);
    s.prompt = prompt_;
    s.target = item.target;
    s.references = item.references;
    s.metadata = {{"image_id", item.image_id}, {"file_name", item.file_name}, {"captions", item.references.size()}};
    return s;
  }

 private:
  std::string prompt_;
  data::ImageRoot root_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::CocoCaptions>("coco_captions", 1, "COCO caption annotations (one sample per image)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
