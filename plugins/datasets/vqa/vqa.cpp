// dataset/vqa: visual question answering with annotator answers, in two layouts.
//
// format = "vqa" (VQAv2, OK-VQA): a questions file {"data_subtype": "train2014", "questions": [{"image_id",
// "question", "question_id"}]} and an annotations file {"annotations": [{"question_id", "image_id",
// "question_type", "answer_type", "answers": [{"answer", "answer_confidence", "answer_id"}],
// "multiple_choice_answer"}]}; images are COCO's, named by image_pattern (default
// "COCO_{split}_{image_id:012}.jpg", split from the questions file's data_subtype unless given).
// format = "vizwiz": one file, a list of {"image", "question", "answers": [{"answer", "answer_confidence"}],
// "answerable", "answer_type"}.
//
// References are every annotator answer, duplicates kept (VQA accuracy counts them). The training target is
// chosen as the VizWiz solution in the background reading did (targets = "vizwiz"): among the answers given
// by at least three annotators the one with the most "yes" confidences (then the most annotators, then the
// first given); if no answer has three, the same among answers given by two; otherwise the question has no
// agreement and is left out, unless keep_no_agreement = true (for evaluation sets: the target is then the
// most common answer, and metadata target_rule = "no_agreement"). targets = "most_common" takes the answer
// most annotators gave (ties: most "yes", then first given) and leaves nothing out. Answers are compared
// as written (VQA's annotations are already normalised). Questions without answers (test splits) are left
// out (no_answers). report() counts each case; several_candidates counts the questions where more than one
// answer reached the deciding count, so that the "yes" confidences decided.
//
// The prompt is `prompt` with {question} filled in, by default "Question: {question} Answer:" (the usual
// short-answer VQA prompt; the target follows it).

#include <algorithm>
#include <map>

#include "ablate/sdk/plugin.hpp"
#include "../common/data_files.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;
namespace fs = std::filesystem;
using data::Pointer;
using value_t = sdk::Json::value_t;

struct VqaOptions : data::ImageFileOptions {  // image_folder: default the folder of the annotations (vqa) or of the file (vizwiz)
  std::string format = "vqa";
  std::string questions, annotations, split;
  std::string image_pattern = "COCO_{split}_{image_id:012}.jpg";
  std::string prompt = "Question: {question} Answer:";
  std::vector<std::string> question_types, answer_types;
  std::optional<bool> answerable;
  std::string targets = "vizwiz";
  bool keep_no_agreement = false;

  static VqaOptions parse(sdk::Options& o) {
    VqaOptions x;
    x.format = o.get("format", x.format);
    if (x.format == "vqa") {
      x.questions = o.require<std::string>("questions");
      x.annotations = o.require<std::string>("annotations");
      x.split = o.get("split", x.split);
      x.image_pattern = o.get("image_pattern", x.image_pattern);
      x.question_types = o.get("question_types", x.question_types);
      try {
        data::Template(x.image_pattern, {"split", "image_id", "question_id"});
      } catch (const std::invalid_argument& e) {
        o.fail("image_pattern", e.what());
      }
    } else if (x.format == "vizwiz") {
      x.file = o.require<std::string>("file");
      x.answerable = o.maybe<bool>("answerable");
    } else {
      o.fail("format", "must be \"vqa\" (VQAv2, OK-VQA) or \"vizwiz\"");
    }
    x.read(o);
    x.prompt = o.get("prompt", x.prompt);
    x.answer_types = o.get("answer_types", x.answer_types);
    x.targets = o.get("targets", x.targets);
    x.keep_no_agreement = o.get("keep_no_agreement", x.keep_no_agreement);
    try {
      data::Template(x.prompt, {"question"});
    } catch (const std::invalid_argument& e) {
      o.fail("prompt", e.what());
    }
    if (x.targets != "vizwiz" && x.targets != "most_common") o.fail("targets", "must be \"vizwiz\" or \"most_common\"");
    if (x.keep_no_agreement && x.targets != "vizwiz") o.fail("keep_no_agreement", "applies to targets = \"vizwiz\" only");
    data::check_limit(o, x.limit);
    return x;
  }
};

namespace {

struct Answer {
  std::string text;
  bool yes = false;
};

struct Choice {
  std::string target;
  std::string rule;  // "3_or_more", "2", "most_common", "no_agreement"; empty: no answers at all
  int count = 0;
  int candidates = 0;  // answers that reached the deciding count
};

// See the file comment. `answers` in annotator order.
Choice choose(const std::vector<Answer>& answers, const std::string& mode) {
  struct Tally {
    std::string text;
    int count = 0, yes = 0;
  };
  std::vector<Tally> tallies;  // in order of first appearance
  for (const auto& a : answers) {
    auto it = std::find_if(tallies.begin(), tallies.end(), [&](const Tally& t) { return t.text == a.text; });
    if (it == tallies.end()) it = tallies.insert(tallies.end(), Tally{a.text, 0, 0});
    ++it->count;
    it->yes += a.yes ? 1 : 0;
  }
  Choice c;
  if (tallies.empty()) return c;
  // Best by (yes, count, earliest) among those with at least `min_count`.
  auto pick = [&](int min_count) -> const Tally* {
    const Tally* best = nullptr;
    c.candidates = 0;
    for (const auto& t : tallies) {
      if (t.count < min_count) continue;
      ++c.candidates;
      if (!best || t.yes > best->yes || (t.yes == best->yes && t.count > best->count)) best = &t;
    }
    return best;
  };
  if (mode == "vizwiz") {
    for (int level : {3, 2}) {
      if (const auto* t = pick(level)) {
        c.target = t->text;
        c.count = t->count;
        c.rule = level == 3 ? "3_or_more" : "2";
        return c;
      }
    }
  }
  // Most common: (count, yes, earliest).
  const Tally* best = &tallies.front();
  for (const auto& t : tallies) {
    if (t.count > best->count || (t.count == best->count && t.yes > best->yes)) best = &t;
  }
  c.target = best->text;
  c.count = best->count;
  c.candidates = 0;
  c.rule = mode == "vizwiz" ? "no_agreement" : "most_common";
  return c;
}

bool listed(const std::vector<std::string>& filter, const std::string& value) {
  return filter.empty() || std::find(filter.begin(), filter.end(), value) != filter.end();
}

}  // namespace

struct VqaItem {
  std::string id, image, question, target;
  std::vector<std::string> references;
  sdk::Json metadata;
};

class Vqa : public data::ItemDataset<VqaItem> {
 public:
  using options_type = VqaOptions;

  Vqa(const VqaOptions& o, const sdk::BuildContext& ctx) : o_(o), prompt_(o.prompt, {"question"}) {
    counts_ = {{"read", 0},     {"filtered_out", 0}, {"target_3_or_more", 0}, {"target_2", 0}, {"target_most_common", 0},
               {"dropped_no_agreement", 0}, {"kept_no_agreement", 0}, {"several_candidates", 0}, {"no_answers", 0}};
    if (o.format == "vqa") {
      read_vqa(ctx);
    } else {
      read_vizwiz(ctx);
    }
    if (o.check_images) check_images(origin_);
  }

  sdk::Sample get(std::size_t index) const override {
    const auto& item = samples_.at(index);
    sdk::Sample s;
    s.id = item.id;
    s.image = data::load_image(item.image, item.id);
    s.prompt = prompt_.fill({{"question", item.question}});
    s.target = item.target;
    s.references = item.references;
    s.metadata = item.metadata;
    return s;
  }

  sdk::Json report() const override {
    sdk::Json r = counts_;
    r["samples"] = samples_.size();
    // Only the cases this configuration can produce.
    if (o_.targets == "vizwiz") {
      r.erase("target_most_common");
      r.erase(o_.keep_no_agreement ? "dropped_no_agreement" : "kept_no_agreement");
    } else {
      for (const char* k : {"target_3_or_more", "target_2", "dropped_no_agreement", "kept_no_agreement", "several_candidates"}) r.erase(k);
    }
    return r;
  }

 private:
  using Item = VqaItem;

  bool full() const { return ItemDataset::full(o_.limit); }

  // Chooses the target and keeps the item, or counts why it is left out.
  bool add(Item item, const std::vector<Answer>& answers) {
    if (answers.empty()) {
      counts_["no_answers"] = counts_["no_answers"].get<std::int64_t>() + 1;
      return false;
    }
    const auto c = choose(answers, o_.targets);
    auto bump = [&](const char* key) { counts_[key] = counts_[key].get<std::int64_t>() + 1; };
    if (c.rule == "no_agreement" && !o_.keep_no_agreement) {
      bump("dropped_no_agreement");
      return false;
    }
    bump(c.rule == "3_or_more" ? "target_3_or_more" : c.rule == "2" ? "target_2" : c.rule == "most_common" ? "target_most_common" : "kept_no_agreement");
    if (c.candidates > 1) bump("several_candidates");
    item.target = c.target;
    item.metadata["target_rule"] = c.rule;
    item.metadata["target_count"] = c.count;
    samples_.push_back(std::move(item));
    return true;
  }

  std::string image_path(const data::JsonText& doc, const Pointer& at, const std::string& name) const {
    return root_.resolve(doc, at, name).string();
  }

  std::vector<Answer> answers_of(const data::JsonText& doc, const Pointer& entry, std::vector<std::string>& references) const {
    std::vector<Answer> out;
    const auto* list = doc.maybe(entry, "answers", value_t::array);
    if (!list) return out;
    for (std::size_t k = 0; k < list->size(); ++k) {
      const Pointer a = entry / "answers" / k;
      Answer ans;
      ans.text = doc.string(a, "answer");
      if (const auto* conf = doc.maybe(a, "answer_confidence", value_t::string)) ans.yes = conf->get<std::string>() == "yes";
      references.push_back(ans.text);
      out.push_back(std::move(ans));
    }
    return out;
  }

  void bump_read() { counts_["read"] = counts_["read"].get<std::int64_t>() + 1; }
  void bump_filtered() { counts_["filtered_out"] = counts_["filtered_out"].get<std::int64_t>() + 1; }

  void read_vqa(const sdk::BuildContext& ctx) {
    const auto qfile = sdk::resolve_path(ctx.base_dir, o_.questions);
    const auto afile = sdk::resolve_path(ctx.base_dir, o_.annotations);
    origin_ = qfile.string();
    root_ = data::image_root(ctx.base_dir, o_.image_folder, afile.parent_path());
    auto q = data::JsonText::read(qfile);
    auto a = data::JsonText::read(afile);
    const auto& questions = q.need(Pointer(), "questions", value_t::array);
    const auto& annotations = a.need(Pointer(), "annotations", value_t::array);
    const data::Template pattern(o_.image_pattern, {"split", "image_id", "question_id"});
    std::string split = o_.split;
    if (split.empty() && pattern.uses("split")) {
      const auto* subtype = q.maybe(Pointer(), "data_subtype", value_t::string);
      if (!subtype) {
        q.fail(Pointer(), "no data_subtype to name the images by (image_pattern uses {split}); give the split option");
      }
      split = subtype->get<std::string>();
    }
    std::map<std::int64_t, std::size_t> by_question;
    for (std::size_t i = 0; i < annotations.size(); ++i) {
      const auto qid = a.integer(Pointer("/annotations") / i, "question_id");
      if (!by_question.emplace(qid, i).second) a.fail(Pointer("/annotations") / i / "question_id", "question_id " + std::to_string(qid) + " annotated twice");
    }
    for (std::size_t i = 0; i < questions.size() && !full(); ++i) {
      bump_read();
      const Pointer qp = Pointer("/questions") / i;
      const auto image_id = q.integer(qp, "image_id");
      const auto qid = q.integer(qp, "question_id");
      const auto question = q.string(qp, "question");
      const auto found = by_question.find(qid);
      if (found == by_question.end()) q.fail(qp / "question_id", "question " + std::to_string(qid) + " has no annotation in " + afile.string());
      const Pointer ap = Pointer("/annotations") / found->second;
      if (a.integer(ap, "image_id") != image_id) {
        a.fail(ap / "image_id", "image " + std::to_string(a.integer(ap, "image_id")) + " but the question is about image " +
                                    std::to_string(image_id) + " (" + q.where(qp) + ")");
      }
      const auto* qtype = a.maybe(ap, "question_type", value_t::string);
      const auto* atype = a.maybe(ap, "answer_type", value_t::string);
      const std::string question_type = qtype ? qtype->get<std::string>() : "", answer_type = atype ? atype->get<std::string>() : "";
      if (!listed(o_.question_types, question_type) || !listed(o_.answer_types, answer_type)) {
        bump_filtered();
        continue;
      }
      Item item;
      item.id = std::to_string(qid);
      item.question = question;
      const auto name = pattern.fill({{"split", split}, {"image_id", std::to_string(image_id)}, {"question_id", item.id}});
      item.image = image_path(q, qp / "image_id", name);
      const auto answers = answers_of(a, ap, item.references);
      item.metadata = {{"question_id", qid}, {"image_id", image_id}, {"question_type", question_type}, {"answer_type", answer_type}};
      if (const auto* mc = a.maybe(ap, "multiple_choice_answer", value_t::string)) item.metadata["multiple_choice_answer"] = *mc;
      add(std::move(item), answers);
    }
  }

  void read_vizwiz(const sdk::BuildContext& ctx) {
    const auto file = sdk::resolve_path(ctx.base_dir, o_.file);
    origin_ = file.string();
    root_ = data::image_root(ctx.base_dir, o_.image_folder, file.parent_path());
    auto doc = data::JsonText::read(file);
    const auto& entries = doc.at(Pointer(), value_t::array);
    for (std::size_t i = 0; i < entries.size() && !full(); ++i) {
      bump_read();
      const Pointer e = Pointer() / i;
      const auto image = doc.string(e, "image");
      const auto question = doc.string(e, "question");
      bool answerable = true;
      // 0 / 1 in VizWiz's files; true / false accepted too.
      const auto& flag = doc.root()[i].contains("answerable") ? doc.root()[i]["answerable"] : sdk::Json();
      if (flag.is_boolean()) {
        answerable = flag.get<bool>();
      } else if (!flag.is_null()) {
        const auto n = doc.integer(e, "answerable");
        if (n != 0 && n != 1) doc.fail(e / "answerable", "expected 0 or 1");
        answerable = n == 1;
      }
      const auto* atype = doc.maybe(e, "answer_type", value_t::string);
      const std::string answer_type = atype ? atype->get<std::string>() : "";
      if ((o_.answerable && *o_.answerable != answerable) || !listed(o_.answer_types, answer_type)) {
        bump_filtered();
        continue;
      }
      Item item;
      item.id = fs::path(image).stem().string();
      item.question = question;
      item.image = image_path(doc, e / "image", image);
      const auto answers = answers_of(doc, e, item.references);
      item.metadata = {{"image", image}, {"answerable", answerable}, {"answer_type", answer_type}};
      add(std::move(item), answers);
    }
  }

  VqaOptions o_;
  data::Template prompt_;
  data::ImageRoot root_;
  std::string origin_;
  sdk::Json counts_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Vqa>("vqa", 1, "VQAv2 / OK-VQA / VizWiz questions with annotator answers");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
