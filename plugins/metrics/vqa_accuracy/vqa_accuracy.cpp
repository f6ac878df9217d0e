// metric/vqa_accuracy: the official VQA accuracy (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
// vqaEval.py at a013f00, "Fixed processing answers bug"; VizWiz evaluates the same way). The references are
// the annotators' answers, duplicates kept. A prediction scores, averaged over the leave-one-out subsets of
// the answers, min(1, matching answers in the subset / 3): 1 when at least 4 of 10 annotators agree with it.
//
// Normalisation, as the official code does it, in its order:
//  - newlines and tabs become spaces, then surrounding whitespace is stripped (answers and prediction);
//  - only when the answers are not all the same string (after that strip) are the answers and the prediction
//    normalised further, so with unanimous annotators "Yes" does not match "yes";
//  - processPunctuation: each of ; / [ ] " { } ( ) = + \ _ - > < @ ` , ? ! is deleted when it has a space
//    beside it anywhere in the text or the text has a digit-comma-digit ("1,000"), else it becomes a space;
//    then a "." not followed by a digit is deleted (the first 32 of them: the original passes re.UNICODE
//    where re.sub takes its count);
//  - processDigitArticle: lowercase, split on whitespace, number words "none", "zero".."ten" -> digits,
//    articles a/an/the dropped, then the contractions table ("dont" -> "don't"), words joined by one space.
//
// Where the official code needs 10 answers, any number works the same way: leave-one-out over however many
// answers there are. One answer has no leave-one-out subset with anything in it (the official formula would
// always give 0), so it scores as exact match after normalisation; no answers score 0.
//
// Not reproduced: lowercasing is ASCII only (Python's str.lower() also folds other scripts), and digits in
// the "digit-comma-digit" and "." rules are ASCII digits (as in the original, which ran under Python 2 where
// \d on a str pattern is [0-9]).

#include <algorithm>
#include <array>
#include <set>
#include <string_view>
#include <unordered_map>

#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/text.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct VqaAccuracyOptions {
  static VqaAccuracyOptions parse(sdk::Options&) { return {}; }
};

namespace {

/// s.replace('\n', ' ').replace('\t', ' ').strip()
std::string clean(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '\t', ' ');
  std::size_t begin = 0, end = s.size();
  while (begin < end) {
    const auto w = sdk::python_space_at(s, begin);
    if (w == 0) break;
    begin += w;
  }
  // Trailing whitespace: find where the last run of it starts by scanning forward.
  std::size_t run = std::string::npos;
  for (std::size_t i = begin; i < end;) {
    if (const auto w = sdk::python_space_at(s, i)) {
      if (run == std::string::npos) run = i;
      i += w;
    } else {
      run = std::string::npos;
      ++i;
    }
  }
  if (run != std::string::npos) end = run;
  return s.substr(begin, end - begin);
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

constexpr std::string_view kPunct = ";/[]\"{}()=+\\_->@<`,?!";

std::string process_punctuation(const std::string& in) {
  bool digit_comma_digit = false;
  for (std::size_t i = 1; i + 1 < in.size(); ++i) digit_comma_digit |= in[i] == ',' && is_digit(in[i - 1]) && is_digit(in[i + 1]);
  // Which marks are deleted (rather than turned into spaces) depends only on the input text, so the
  // original's replace() per mark is the same as one pass over the characters.
  std::array<bool, 128> erase{};
  for (const char p : kPunct) {
    const auto at = static_cast<unsigned char>(p);
    erase[at] = digit_comma_digit || in.find(std::string{p, ' '}) != std::string::npos || in.find(std::string{' ', p}) != std::string::npos;
  }
  std::string mid;
  for (const char c : in) {
    if (kPunct.find(c) == std::string_view::npos) {
      mid += c;
    } else if (!erase[static_cast<unsigned char>(c)]) {
      mid += ' ';
    }
  }
  // periodStrip "(?!<=\d)(\.)(?!\d)" (whose first group is a lookahead that always passes), count = 32.
  std::string out;
  int removed = 0;
  for (std::size_t i = 0; i < mid.size(); ++i) {
    if (mid[i] == '.' && removed < 32 && !(i + 1 < mid.size() && is_digit(mid[i + 1]))) {
      ++removed;
      continue;
    }
    out += mid[i];
  }
  return out;
}

const std::unordered_map<std::string, std::string>& number_words() {
  static const std::unordered_map<std::string, std::string> map = {
      {"none", "0"}, {"zero", "0"}, {"one", "1"}, {"two", "2"}, {"three", "3"}, {"four", "4"},
      {"five", "5"}, {"six", "6"},  {"seven", "7"}, {"eight", "8"}, {"nine", "9"}, {"ten", "10"}};
  return map;
}

/// The official table as it is, entries that can never match (capitals after lowercasing) included.
const std::unordered_map<std::string, std::string>& contractions() {
  static const std::unordered_map<std::string, std::string> map = {
      {"aint", "ain't"}, {"arent", "aren't"}, {"cant", "can't"}, {"couldve", "could've"}, {"couldnt", "couldn't"},
      {"couldn'tve", "couldn't've"}, {"couldnt've", "couldn't've"}, {"didnt", "didn't"}, {"doesnt", "doesn't"},
      {"dont", "don't"}, {"hadnt", "hadn't"}, {"hadnt've", "hadn't've"}, {"hadn'tve", "hadn't've"},
      {"hasnt", "hasn't"}, {"havent", "haven't"}, {"hed", "he'd"}, {"hed've", "he'd've"}, {"he'dve", "he'd've"},
      {"hes", "he's"}, {"howd", "how'd"}, {"howll", "how'll"}, {"hows", "how's"}, {"Id've", "I'd've"},
      {"I'dve", "I'd've"}, {"Im", "I'm"}, {"Ive", "I've"}, {"isnt", "isn't"}, {"itd", "it'd"},
      {"itd've", "it'd've"}, {"it'dve", "it'd've"}, {"itll", "it'll"}, {"let's", "let's"}, {"maam", "ma'am"},
      {"mightnt", "mightn't"}, {"mightnt've", "mightn't've"}, {"mightn'tve", "mightn't've"},
      {"mightve", "might've"}, {"mustnt", "mustn't"}, {"mustve", "must've"}, {"neednt", "needn't"},
      {"notve", "not've"}, {"oclock", "o'clock"}, {"oughtnt", "oughtn't"}, {"ow's'at", "'ow's'at"},
      {"'ows'at", "'ow's'at"}, {"'ow'sat", "'ow's'at"}, {"shant", "shan't"}, {"shed've", "she'd've"},
      {"she'dve", "she'd've"}, {"she's", "she's"}, {"shouldve", "should've"}, {"shouldnt", "shouldn't"},
      {"shouldnt've", "shouldn't've"}, {"shouldn'tve", "shouldn't've"}, {"somebody'd", "somebodyd"},
      {"somebodyd've", "somebody'd've"}, {"somebody'dve", "somebody'd've"}, {"somebodyll", "somebody'll"},
      {"somebodys", "somebody's"}, {"someoned", "someone'd"}, {"someoned've", "someone'd've"},
      {"someone'dve", "someone'd've"}, {"someonell", "someone'll"}, {"someones", "someone's"},
      {"somethingd", "something'd"}, {"somethingd've", "something'd've"}, {"something'dve", "something'd've"},
      {"somethingll", "something'll"}, {"thats", "that's"}, {"thered", "there'd"}, {"thered've", "there'd've"},
      {"there'dve", "there'd've"}, {"therere", "there're"}, {"theres", "there's"}, {"theyd", "they'd"},
      {"theyd've", "they'd've"}, {"they'dve", "they'd've"}, {"theyll", "they'll"}, {"theyre", "they're"},
      {"theyve", "they've"}, {"twas", "'twas"}, {"wasnt", "wasn't"}, {"wed've", "we'd've"},
      {"we'dve", "we'd've"}, {"weve", "we've"}, {"werent", "weren't"}, {"whatll", "what'll"},
      {"whatre", "what're"}, {"whats", "what's"}, {"whatve", "what've"}, {"whens", "when's"},
      {"whered", "where'd"}, {"wheres", "where's"}, {"whereve", "where've"}, {"whod", "who'd"},
      {"whod've", "who'd've"}, {"who'dve", "who'd've"}, {"wholl", "who'll"}, {"whos", "who's"},
      {"whove", "who've"}, {"whyll", "why'll"}, {"whyre", "why're"}, {"whys", "why's"}, {"wont", "won't"},
      {"wouldve", "would've"}, {"wouldnt", "wouldn't"}, {"wouldnt've", "wouldn't've"},
      {"wouldn'tve", "wouldn't've"}, {"yall", "y'all"}, {"yall'll", "y'all'll"}, {"y'allll", "y'all'll"},
      {"yall'd've", "y'all'd've"}, {"y'alld've", "y'all'd've"}, {"y'all'dve", "y'all'd've"},
      {"youd", "you'd"}, {"youd've", "you'd've"}, {"you'dve", "you'd've"}, {"youll", "you'll"},
      {"youre", "you're"}, {"youve", "you've"}};
  return map;
}

std::string process_digit_article(std::string in) {
  std::transform(in.begin(), in.end(), in.begin(), [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; });
  std::string out;
  for (auto word : sdk::python_split(in)) {
    if (const auto it = number_words().find(word); it != number_words().end()) word = it->second;
    if (word == "a" || word == "an" || word == "the") continue;
    if (const auto it = contractions().find(word); it != contractions().end()) word = it->second;
    out += (out.empty() ? "" : " ") + word;
  }
  return out;
}

}  // namespace

class VqaAccuracy : public sdk::Metric {
 public:
  using options_type = VqaAccuracyOptions;
  VqaAccuracy(const VqaAccuracyOptions&, const sdk::BuildContext&) {}

  std::vector<double> score(const std::vector<std::string>& predictions,
                            const std::vector<std::vector<std::string>>& references) const override {
    std::vector<double> out;
    out.reserve(predictions.size());
    for (std::size_t i = 0; i < predictions.size(); ++i) out.push_back(accuracy(predictions[i], references[i]));
    return out;
  }

 private:
  static double accuracy(const std::string& prediction, const std::vector<std::string>& references) {
    if (references.empty()) return 0.0;
    std::vector<std::string> answers;
    for (const auto& r : references) answers.push_back(clean(r));
    auto predicted = clean(prediction);
    const auto normalise = [](const std::string& s) { return process_digit_article(process_punctuation(s)); };
    if (answers.size() == 1) return normalise(answers[0]) == normalise(predicted) ? 1.0 : 0.0;
    if (std::set<std::string>(answers.begin(), answers.end()).size() > 1) {
      for (auto& a : answers) a = normalise(a);
      predicted = normalise(predicted);
    }
    const auto total = static_cast<std::ptrdiff_t>(std::count(answers.begin(), answers.end(), predicted));
    double sum = 0.0;
    for (const auto& a : answers) {
      const auto matches = total - (a == predicted ? 1 : 0);  // the others in this leave-one-out subset
      sum += std::min(1.0, static_cast<double>(matches) / 3);
    }
    return sum / static_cast<double>(answers.size());
  }
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::VqaAccuracy>("vqa_accuracy", 1, "VQA accuracy (min(1, matches/3), leave-one-out), as the official vqaEval.py");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
