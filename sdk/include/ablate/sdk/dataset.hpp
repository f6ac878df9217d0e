#pragma once
// Datasets: indexed samples of image, prompt, target and references.

#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "ablate/sdk/image.hpp"
#include "ablate/sdk/options.hpp"

namespace ablate::sdk {

struct Sample {
  std::string id;                       ///< stable across runs; samples of replays are matched on it
  Image image;                          ///< RGB, height x width x 3
  std::string prompt;                   ///< what the model is given (instruction and question)
  std::string target;                   ///< the text trained on
  std::vector<std::string> references;  ///< what metrics compare against; at least the target
  Json metadata = Json::object();       ///< anything else (question type, ...)
};

class Dataset {
 public:
  virtual ~Dataset();
  virtual std::size_t size() const = 0;
  /// Sample `index` < size(). Must be thread-safe: the host calls it from several worker threads at once.
  virtual Sample get(std::size_t index) const = 0;
  /// Every word this dataset's text can contain, if it is a closed set (synthetic data); empty otherwise.
  /// Lets a backbone built from scratch make a word-level tokenizer.
  virtual std::vector<std::string> vocabulary() const;
  /// What building the dataset decided, as counts a researcher wants to see and keep: samples read,
  /// dropped and why, how VQA targets were chosen... An object of name -> number (or nested objects);
  /// the host prints it and stores it with the run. Empty by default.
  virtual Json report() const;
};

/// A sample that cannot be made (an image that is missing or does not decode). The host skips the sample
/// or stops, as `[data] on_bad_sample` says, naming `sample_id`.
class SampleError : public std::runtime_error {
 public:
  SampleError(std::string sample_id, const std::string& what) : std::runtime_error(what), sample_id_(std::move(sample_id)) {}
  ~SampleError() override;  // defined in the SDK library, so that its type information lives there
  const std::string& sample_id() const { return sample_id_; }

 private:
  std::string sample_id_;
};

}  // namespace ablate::sdk
