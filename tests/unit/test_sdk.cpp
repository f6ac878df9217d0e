// The SDK's kit: typed options, SHA-256, safetensors, strict loading, tokenizer, images.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/hash.hpp"
#include "ablate/sdk/image.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/options.hpp"
#include "ablate/sdk/tokenizer.hpp"
#include "ablate/sdk/weights.hpp"
#include "helpers.hpp"

using namespace ablate;
using ablate::test::TempDir;
using ablate::test::write_file;

TEST_CASE("options: typed reads with defaults, resolved values, unknown keys with their line", "[sdk][options]") {
  sdk::Json table = {{"r", 8}, {"alpha", 16}, {"name", "x"}, {"nested", {{"a", 1}, {"typo", 2}}}, {"extra", true}};
  auto where = std::make_shared<sdk::SourceMap>(sdk::SourceMap{
      {"", {"f.toml", 1}}, {"/extra", {"f.toml", 7}}, {"/nested", {"f.toml", 4}}, {"/nested/typo", {"f.toml", 5}}});
  sdk::Options o(table, "", "strategy", where);
  CHECK(o.get("r", std::int64_t{1}) == 8);
  CHECK(o.get("alpha", 1.0) == 16.0);  // integers read as floats
  CHECK(o.get("dropout", 0.1) == 0.1);
  CHECK(o.get("name", "default") == "x");
  CHECK_THROWS_WITH(o.get("name", std::int64_t{0}), "f.toml:1: strategy.name: expected an integer, got a string");
  auto nested = o.table("nested");
  CHECK(nested.get("a", std::int64_t{0}) == 1);
  CHECK_THROWS_WITH(o.finish(), "f.toml:7: strategy.extra: unknown key");  // keys are checked in sorted order
  (void)o.get("extra", false);
  CHECK_THROWS_WITH(o.finish(), "f.toml:5: strategy.nested.typo: unknown key");
  (void)nested.get("typo", std::int64_t{0});
  CHECK_NOTHROW(o.finish());
  const auto resolved = o.resolved();
  CHECK(resolved["dropout"] == 0.1);
  CHECK(resolved["nested"]["a"] == 1);
  CHECK_THROWS_WITH(o.require<std::string>("missing"), "f.toml:1: strategy.missing: missing (required)");
}

TEST_CASE("sha256 gives the standard test vectors", "[sdk]") {
  CHECK(sdk::sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sdk::sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sdk::sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("safetensors round-trip float32, float16 and bfloat16, memory-mapped", "[sdk][weights]") {
  TempDir dir;
  torch::manual_seed(0);
  sdk::TensorMap in = {{"a.weight", torch::randn({3, 4})},
                       {"b.half", torch::randn({5}).to(torch::kFloat16)},
                       {"c.bf16", torch::randn({2, 2, 2}).to(torch::kBFloat16)},
                       {"d.ids", torch::arange(6)}};
  sdk::write_safetensors(dir / "m.safetensors", in, {{"format", "pt"}});
  auto out = sdk::read_safetensors(dir / "m.safetensors");
  REQUIRE(out.size() == 4);
  for (const auto& [name, t] : in) {
    CHECK(out.at(name).dtype() == t.dtype());
    CHECK(torch::equal(out.at(name), t));
  }
  // Header: 8-byte length, then JSON padded to a multiple of 8.
  const auto bytes = ablate::test::read_file(dir / "m.safetensors");
  std::uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  CHECK(len % 8 == 0);
}

TEST_CASE("malformed safetensors and JSON name the file and the problem", "[sdk][weights][errors]") {
  TempDir dir;
  write_file(dir / "short.safetensors", "abc");
  CHECK_THROWS_WITH(sdk::read_safetensors(dir / "short.safetensors"), Catch::Contains("short.safetensors: not a safetensors file"));
  std::string bad(8, '\0');
  bad[0] = 100;
  write_file(dir / "huge.safetensors", bad + "{}");
  CHECK_THROWS_WITH(sdk::read_safetensors(dir / "huge.safetensors"), Catch::Contains("exceeds the file size"));
  write_file(dir / "c.json", "{\"a\": ");
  CHECK_THROWS_WITH(sdk::read_json(dir / "c.json"), Catch::Contains("c.json: malformed JSON at byte"));
  CHECK_THROWS_WITH(sdk::read_weights(dir / "nowhere"), Catch::Contains("no model.safetensors"));
  write_file(dir / "big.json", R"({"vocab_size": 1e400})");
  CHECK_THROWS_WITH(sdk::read_json(dir / "big.json"), Catch::EndsWith("big.json: number overflow parsing '1e400'"));
  std::filesystem::create_directories(dir / "folder.json");
  CHECK_THROWS_WITH(sdk::read_json(dir / "folder.json"), Catch::EndsWith("folder.json: is a folder, not a file"));
}

// A safetensors file from its header text and data bytes.
void write_safetensors_raw(const std::filesystem::path& file, const std::string& header, std::size_t data_bytes) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  write_file(file, bytes + header + std::string(data_bytes, '\0'));
}

TEST_CASE("safetensors headers are held to what the safetensors library accepts", "[sdk][weights][errors]") {
  TempDir dir;
  const auto f = dir / "t.safetensors";
  // Two float32 tensors of 2 x 2: 16 bytes each, tiling 32 bytes.
  auto two = [](const std::string& a_shape, const std::string& a_offsets, const std::string& b_offsets, const std::string& extra = "") {
    return R"({"a": {"dtype": "F32", "shape": )" + a_shape + R"(, "data_offsets": )" + a_offsets + R"(}, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": )" +
           b_offsets + "}" + extra + "}";
  };
  write_safetensors_raw(f, two("[2, 2]", "[0, 16]", "[16, 32]"), 32);
  CHECK(sdk::read_safetensors(f).size() == 2);
  write_safetensors_raw(f, two("[2, 2]", "[16, 32]", "[0, 16]"), 32);  // stored out of name order: fine
  CHECK(sdk::read_safetensors(f).size() == 2);
  const std::vector<std::pair<std::string, std::string>> refused = {
      {two("[2.0, 2]", "[0, 16]", "[16, 32]"), "tensor 'a' has a shape that is not a list of non-negative integers: [2.0,2]"},
      {two("[-2, -2]", "[0, 16]", "[16, 32]"), "tensor 'a' has a shape that is not a list of non-negative integers"},
      {two("[4294967296, 4294967296]", "[0, 16]", "[16, 32]"), "tensor 'a' has a shape too large"},
      {two("[2, 2]", "[0.5, 16.5]", "[16, 32]"), "tensor 'a' has data_offsets that are not two non-negative integers"},
      {two("[2, 2]", "[0, 16]", "[8, 24]"), "tensor 'b' overlaps the tensor before it"},
      {two("[2, 2]", "[0, 16]", "[16, 32]", R"(, "__metadata__": {"format": 5})"), "__metadata__ must be an object of strings"},
      {R"({"a": {"dtype": 7, "shape": [2, 2], "data_offsets": [0, 16]}})", "tensor 'a' has a dtype that is not a string: 7"},
  };
  for (const auto& [header, message] : refused) {
    write_safetensors_raw(f, header, 32);
    CHECK_THROWS_WITH(sdk::read_safetensors(f), Catch::Contains("t.safetensors: " + message));
  }
  write_safetensors_raw(f, two("[2, 2]", "[0, 16]", "[20, 36]"), 36);
  CHECK_THROWS_WITH(sdk::read_safetensors(f), Catch::Contains("tensor 'b' starts after a gap in the data"));
  write_safetensors_raw(f, two("[2, 2]", "[0, 16]", "[16, 32]"), 40);
  CHECK_THROWS_WITH(sdk::read_safetensors(f), Catch::Contains("t.safetensors: 8 bytes after the last tensor's data"));
}

TEST_CASE("loading by name is strict and lists missing, unexpected and mis-shaped tensors", "[sdk][weights][errors]") {
  sdk::Linear layer(3, 2);
  sdk::TensorMap good = {{"weight", torch::ones({2, 3})}, {"bias", torch::zeros({2})}};
  sdk::load_state(*layer, good, "ok");
  CHECK(layer->weight.sum().item<double>() == 6.0);
  sdk::TensorMap bad = {{"weight", torch::ones({3, 3})}, {"extra", torch::zeros({1})}};
  CHECK_THROWS_WITH(sdk::load_state(*layer, bad, "folder"),
                    "folder: weights do not fit the model: missing (1): bias; unexpected (1): extra; mis-shaped (1): "
                    "weight: file [3, 3] vs model [2, 3];");
  auto report = sdk::load_state(*layer, bad, "folder", /*strict=*/false, {"ext"});
  CHECK(report.unexpected.empty());
}

TEST_CASE("the word-level tokenizer encodes, decodes and round-trips through its JSON", "[sdk][tokenizer]") {
  TempDir dir;
  auto tok = sdk::Tokenizer::word_level({"where", "is", "the", "red", "circle", "?", "top", "left"});
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.pad_id() == 0);
  CHECK(tok.encode("Where is the red circle?", true) == std::vector<std::int64_t>{1, 4, 5, 6, 7, 8, 9});
  CHECK(tok.encode("where is the blue circle", false) == std::vector<std::int64_t>{4, 5, 6, 3, 8});  // unknown -> <unk>
  CHECK(tok.encode("top left</s>", false) == std::vector<std::int64_t>{10, 11, 2});
  CHECK(tok.decode({1, 10, 11, 2}, true) == "top left");
  CHECK(tok.decode({1, 10, 11, 2}, false) == "<s> top left </s>");
  tok.save(dir / "tokenizer.json");
  auto again = sdk::Tokenizer::from_file(dir / "tokenizer.json");
  CHECK(again.encode("where is the red circle ?", true) == tok.encode("where is the red circle ?", true));
  write_file(dir / "bpe.json", R"({"model": {"type": "Unigram", "vocab": []}})");
  CHECK_THROWS_WITH(sdk::Tokenizer::from_file(dir / "bpe.json"), Catch::Contains("tokenizer model \"Unigram\" is not supported (supported: BPE, WordLevel)"));
  // Ids are u32 in tokenizers: a negative or non-integer id is refused when the file is read.
  for (const char* id : {"-1", "4294967296", "1.5", "\"7\""}) {
    write_file(dir / "ids.json", std::string(R"({"model": {"type": "WordLevel", "unk_token": "a", "vocab": {"a": 0, "b": )") + id + "}}}");
    CHECK_THROWS_WITH(sdk::Tokenizer::from_file(dir / "ids.json"),
                      Catch::Contains(std::string(R"(ids.json: model.vocab["b"]: id must be an integer from 0 to 4294967295, got )") + id));
  }
  write_file(dir / "post.json", R"({"model": {"type": "WordLevel", "unk_token": "a", "vocab": {"a": 0, "<s>": 1}},
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
      {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [-1], "tokens": ["<s>"]}}}})");
  CHECK_THROWS_WITH(sdk::Tokenizer::from_file(dir / "post.json"),
                    Catch::Contains(R"(post.json: post_processor.special_tokens["<s>"].ids: id must be an integer from 0 to 4294967295, got -1)"));
}

TEST_CASE("images: PNG round-trips, corrupt files are named, resize keeps size-preserving calls exact", "[sdk][image]") {
  TempDir dir;
  sdk::Image img = xt::zeros<std::uint8_t>({std::size_t{5}, std::size_t{7}, std::size_t{3}});
  for (std::size_t y = 0; y < 5; ++y) {
    for (std::size_t x = 0; x < 7; ++x) {
      for (std::size_t c = 0; c < 3; ++c) img(y, x, c) = static_cast<std::uint8_t>(y * 40 + x * 5 + c);
    }
  }
  auto png = sdk::encode_png(img);
  CHECK((sdk::decode_image(png, "mem") == img));
  CHECK(sdk::encode_png(img) == png);  // equal images, equal bytes (content hashes are stable)
  CHECK((sdk::resize(img, 7, 5, 3) == img));
  auto half = sdk::resize(img, 4, 3, 3);
  CHECK(half.shape(0) == 3);
  CHECK(half.shape(1) == 4);
  CHECK(sdk::center_crop(img, 3, 3).shape(1) == 3);
  std::vector<std::uint8_t> broken(png.begin(), png.begin() + 20);
  CHECK_THROWS_WITH(sdk::decode_image(broken, "pic.png"), Catch::StartsWith("pic.png: "));
  CHECK_THROWS_WITH(sdk::decode_image({1, 2, 3, 4}, "x.bin"), "x.bin: not a PNG or JPEG image");
  // Not regular files: read to the end, /dev/zero would take all memory (and a FIFO would block).
  std::filesystem::create_symlink("/dev/zero", dir / "zero.png");
  CHECK_THROWS_WITH(sdk::read_image(dir / "zero.png"), Catch::EndsWith("zero.png: not a regular file"));
  std::filesystem::create_directories(dir / "folder.png");
  CHECK_THROWS_WITH(sdk::read_image(dir / "folder.png"), Catch::EndsWith("folder.png: is a folder, not a file"));
}
