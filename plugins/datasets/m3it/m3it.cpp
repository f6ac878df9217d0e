// dataset/m3it: M3IT's instruction JSONL (MMInstruction/M3IT: data/<task>/<subset>/<split>.jsonl), one object
// per line:
//
//   {"instruction": "...", "inputs": "...", "outputs": "...", "image_base64_str": ["<base64 PNG or JPEG>", ...]}
//
// Several subset files are concatenated in the order given (files = [...]). Sample ids are
// "<file>:<line>", where <file> is the file's stem ("train"), or as many trailing folders as it takes to
// tell the files apart ("coco/train", "vqa-v2/train"). The prompt is GIT-LLM's M3IT prompt up to the answer,
// "##Instruction: {instruction} ##Question: {inputs} ##Answer:", the target the outputs. A sample uses the
// first of its images (the count is in metadata); a line with none is a text-only sample.
//
// Files can be many GiB of base64: construction keeps the text fields and where each line is, and get()
// reads its line again and decodes the image. The base64 is checked at construction (cheap, and a bad
// string is a broken file, InputError); bytes that are not a PNG or JPEG are found in get() (SampleError).

#include <algorithm>
#include <set>

#include "ablate/sdk/plugin.hpp"
#include "../common/data_files.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;
namespace fs = std::filesystem;
using data::Pointer;
using value_t = sdk::Json::value_t;

struct M3itOptions {
  std::vector<std::string> files;
  std::string prompt = "##Instruction: {instruction} ##Question: {inputs} ##Answer:";
  std::int64_t limit = 0;

  static M3itOptions parse(sdk::Options& o) {
    M3itOptions x;
    x.files = o.get("files", x.files);
    x.prompt = o.get("prompt", x.prompt);
    x.limit = o.get("limit", x.limit);
    if (x.files.empty()) o.fail("files", "must name at least one JSONL file");
    if (std::set<std::string>(x.files.begin(), x.files.end()).size() != x.files.size()) o.fail("files", "names a file twice");
    try {
      data::Template(x.prompt, {"instruction", "inputs"});
    } catch (const std::invalid_argument& e) {
      o.fail("prompt", e.what());
    }
    data::check_limit(o, x.limit);
    return x;
  }
};

namespace {

// The shortest trailing parts of each path (extension dropped) that are all different.
std::vector<std::string> short_names(const std::vector<fs::path>& files) {
  std::vector<std::vector<std::string>> parts;
  std::size_t deepest = 1;
  for (const auto& f : files) {
    std::vector<std::string> p{f.stem().string()};
    for (auto dir = f.parent_path(); dir.has_filename(); dir = dir.parent_path()) p.push_back(dir.filename().string());
    deepest = std::max(deepest, p.size());
    parts.push_back(std::move(p));
  }
  std::vector<std::string> names(files.size());
  for (std::size_t depth = 1; depth <= deepest; ++depth) {
    for (std::size_t i = 0; i < files.size(); ++i) {
      std::string n;
      for (std::size_t k = std::min(depth, parts[i].size()); k-- > 0;) n += parts[i][k] + (k ? "/" : "");
      names[i] = n;
    }
    if (std::set<std::string>(names.begin(), names.end()).size() == names.size()) break;
  }
  return names;
}

}  // namespace

struct M3itItem {
  std::string id, prompt, target;
  std::size_t file = 0;
  data::JsonlLine line;
  int images = 0;
};

class M3it : public data::ItemDataset<M3itItem> {
 public:
  using options_type = M3itOptions;

  M3it(const M3itOptions& o, const sdk::BuildContext& ctx) {
    const data::Template prompt(o.prompt, {"instruction", "inputs"});
    for (const auto& f : o.files) files_.push_back(sdk::resolve_path(ctx.base_dir, f));
    const auto names = short_names(files_);
    std::int64_t read = 0, text_only = 0, multi_image = 0, png = 0, jpeg = 0, other = 0;
    sdk::Json per_file = sdk::Json::object();
    for (std::size_t f = 0; f < files_.size(); ++f) {
      std::int64_t kept_here = 0;
      const auto file_name = files_[f].string();
      data::for_each_line(files_[f], [&](const data::JsonlLine& line, const std::string& text) {
        if (full(o.limit)) return;
        ++read;
        const data::JsonText doc(file_name, text, line.number);
        const Pointer row;
        M3itItem item;
        item.id = names[f] + ":" + std::to_string(line.number);
        item.file = f;
        item.line = line;
        item.prompt = prompt.fill({{"instruction", doc.string(row, "instruction")}, {"inputs", doc.string(row, "inputs")}});
        item.target = doc.string(row, "outputs");
        const auto* images = doc.maybe(row, "image_base64_str", value_t::array);
        item.images = images ? static_cast<int>(images->size()) : 0;
        for (int k = 0; k < item.images; ++k) {
          const auto& b64 = doc.at(Pointer("/image_base64_str") / k, value_t::string).get_ref<const std::string&>();
          // Only the first image is used, but a bad string anywhere means a broken line.
          std::string problem;
          const auto bytes = data::decode_base64(b64, &problem);
          if (!bytes) doc.fail(Pointer("/image_base64_str") / k, "bad base64: " + problem);
          if (k == 0) {
            const auto& b = *bytes;
            if (b.size() >= 8 && b[0] == 0x89 && b[1] == 'P' && b[2] == 'N' && b[3] == 'G') {
              ++png;
            } else if (b.size() >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff) {
              ++jpeg;
            } else {
              ++other;
            }
          }
        }
        if (item.images == 0) ++text_only;
        if (item.images > 1) ++multi_image;
        samples_.push_back(std::move(item));
        ++kept_here;
      });
      per_file[names[f]] = kept_here;
    }
    report_ = {{"lines_read", read},   {"samples", samples_.size()}, {"text_only", text_only},
               {"multi_image", multi_image}, {"png", png}, {"jpeg", jpeg}, {"not_png_or_jpeg", other},
               {"per_file", per_file}};
  }

  sdk::Sample get(std::size_t index) const override {
    const auto& item = samples_.at(index);
    sdk::Sample s;
    s.id = item.id;
    s.prompt = item.prompt;
    s.target = item.target;
    s.references = {item.target};
    s.metadata = {{"source", item.id.substr(0, item.id.rfind(':'))}, {"images", item.images}};
    if (item.images == 0) {
      s.image = data::no_image();
      return s;
    }
    const auto& file = files_[item.file];
    const auto origin = file.string() + ":" + std::to_string(item.line.number) + ": image_base64_str[0]";
    std::vector<std::uint8_t> bytes;
    try {
      // The line was checked at construction; it only fails here if the file changed since.
      const auto row = sdk::Json::parse(data::read_line(file, item.line));
      auto decoded = data::decode_base64(row.at("image_base64_str").at(0).get_ref<const std::string&>(), nullptr);
      if (!decoded) throw std::runtime_error("bad base64");
      bytes = std::move(*decoded);
    } catch (const std::exception& e) {
      throw sdk::SampleError(item.id, "sample " + item.id + ": " + origin + ": cannot be read again (the file changed?): " + e.what());
    }
    s.image = data::decode_image(bytes, origin, item.id);
    return s;
  }

 private:
  std::vector<fs::path> files_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::M3it>("m3it", 1, "M3IT instruction JSONL with base64 images");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
