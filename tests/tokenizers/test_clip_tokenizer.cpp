// The CLIP tokenizer and kohya's prompt handling against clip_tokenizer.json: the ids, windows and
// weights that transformers 4.54.1's CLIPTokenizer (with ftfy) and kohya-ss/sd-scripts' own code
// give for the same strings (tests/fixtures/tokenizers/gen_clip_tokenizer_fixtures.py).
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <zlib.h>

#include "src/core/error.h"
#include "src/tokenizers/clip_tokenizer.h"
#include "src/tokenizers/kohya_prompt.h"
#include "src/tokenizers/text_cleaning.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const json& fixture() {
  static const json data = [] {
    std::ifstream in(SDT_TOKENIZER_FIXTURES "/clip_tokenizer.json");
    EXPECT_TRUE(in) << "missing fixture clip_tokenizer.json";
    return json::parse(in);
  }();
  return data;
}

const ClipTokenizer& sd1() {
  static const ClipTokenizer tokenizer = ClipTokenizer::from_bpe_vocab_gz(SDT_CLIP_VOCAB_GZ, ClipTokenizer::kSd1PadToken);
  return tokenizer;
}

const ClipTokenizer& sd2() {
  static const ClipTokenizer tokenizer = ClipTokenizer::from_bpe_vocab_gz(SDT_CLIP_VOCAB_GZ, ClipTokenizer::kSd2PadToken);
  return tokenizer;
}

const ClipTokenizer& tokenizer_named(const std::string& name) { return name == "sd1" ? sd1() : sd2(); }

// A folder under the system's temporary folder, removed with the object.
struct TempDir {
  fs::path path = fs::temp_directory_path() /
                  ("sdt_clip_" + std::to_string(::getpid()) + "_" +
                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

void write_file(const fs::path& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

std::string read_gz(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  std::string text;
  char buffer[1 << 16];
  for (int n; (n = gzread(file, buffer, sizeof buffer)) > 0;) text.append(buffer, n);
  gzclose(file);
  return text;
}

// Hugging Face's conversion of OpenAI's file: vocab.json lists the byte symbols (GPT-2's
// byte-to-unicode order), the same ending a word, one token per merge, then the special tokens;
// merges.txt is a version line and the merges. Written here independently of the tokenizer's
// loader, and checked against entries of the reference's vocab.json.
void write_hf_files(const fs::path& folder) {
  std::vector<std::string> lines;
  std::istringstream stream(read_gz(SDT_CLIP_VOCAB_GZ));
  for (std::string line; std::getline(stream, line);) lines.push_back(line);
  const std::vector<std::string> merges(lines.begin() + 1, lines.begin() + 1 + (49152 - 256 - 2));

  std::vector<char32_t> byte_order;
  for (char32_t b = 0; b < 256; ++b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) byte_order.push_back(b);
  }
  for (char32_t next = 256; byte_order.size() < 256; ++next) byte_order.push_back(next);
  std::vector<std::string> tokens;
  for (char32_t c : byte_order) tokens.push_back(utf8_encode(std::u32string(1, c)));
  for (char32_t c : byte_order) tokens.push_back(utf8_encode(std::u32string(1, c)) + "</w>");
  for (const std::string& merge : merges) {
    const size_t space = merge.find(' ');
    tokens.push_back(merge.substr(0, space) + merge.substr(space + 1));
  }
  tokens.push_back("<|startoftext|>");
  tokens.push_back("<|endoftext|>");

  json vocab = json::object();
  for (size_t id = 0; id < tokens.size(); ++id) vocab[tokens[id]] = id;
  for (const auto& entry : fixture()["vocab_sample"]) {
    ASSERT_EQ(vocab.at(entry[0].get<std::string>()), entry[1]) << "vocab.json entry " << entry[0];
  }
  write_file(folder / "vocab.json", vocab.dump());
  std::string merges_txt = "#version: 0.2\n";
  for (const std::string& merge : merges) merges_txt += merge + "\n";
  write_file(folder / "merges.txt", merges_txt);
}

std::string shown(const json& text) { return json(text).dump(); }

// The vocabulary the project ships is found beside the running executable (build/ binaries: the source tree's data/),
// so a single-file checkpoint needs no --tokenizer.
TEST(ClipTokenizer, TheBundledVocabularyIsFoundBesideTheExecutable) {
  EXPECT_EQ(std::filesystem::canonical(ClipTokenizer::bundled_vocab_gz()), std::filesystem::canonical(SDT_CLIP_VOCAB_GZ));
}

TEST(ClipTokenizer, VocabularyFromGzHasClipsSizeAndSpecialIds) {
  EXPECT_EQ(sd1().vocab_size(), fixture()["vocab_size"].get<size_t>());
  EXPECT_EQ(sd1().bos_id(), fixture()["bos"]);
  EXPECT_EQ(sd1().eos_id(), fixture()["eos"]);
  EXPECT_EQ(sd1().pad_id(), fixture()["pad_sd1"]);
  EXPECT_EQ(sd2().pad_id(), fixture()["pad_sd2"]);
}

TEST(ClipTokenizer, IdsEqualTheReferenceForEveryFixtureString) {
  const json& cases = fixture()["cases"];
  ASSERT_GE(cases.size(), 200u);
  for (const json& c : cases) {
    const std::string text = c["text"];
    EXPECT_EQ(sd1().encode(text), c["ids_sd1"].get<std::vector<int32_t>>()) << "SD 1.x, text " << shown(text);
    EXPECT_EQ(sd2().encode(text), c["ids_sd2"].get<std::vector<int32_t>>()) << "SD 2.x, text " << shown(text);
  }
}

TEST(ClipTokenizer, PaddedTo77LikeTheReferenceWithEachPaddingToken) {
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(sd1().encode_padded(text), c["padded_sd1"].get<std::vector<int32_t>>()) << "text " << shown(text);
    EXPECT_EQ(sd2().encode_padded(text), c["padded_sd2"].get<std::vector<int32_t>>()) << "text " << shown(text);
  }
}

TEST(ClipTokenizer, ExclamationMarkIsSd2sPaddingTokenInsideText) {
  // SD 2.x's tokenizer cuts "!" out as its padding token: id 0, not the BPE token "!!</w>".
  EXPECT_EQ(sd2().encode("hello!!"), (std::vector<int32_t>{3306, 0, 0}));
  EXPECT_EQ(sd1().encode("hello!!"), (std::vector<int32_t>{3306, 748}));
}

TEST(ClipTokenizer, VocabJsonAndMergesTxtGiveTheSameIds) {
  TempDir dir;
  write_hf_files(dir.path);
  const ClipTokenizer hf_sd1 = ClipTokenizer::from_vocab_json_and_merges(
      dir.path / "vocab.json", dir.path / "merges.txt", ClipTokenizer::kSd1PadToken);
  const ClipTokenizer hf_sd2 = ClipTokenizer::from_vocab_json_and_merges(
      dir.path / "vocab.json", dir.path / "merges.txt", ClipTokenizer::kSd2PadToken);
  EXPECT_EQ(hf_sd1.vocab_size(), sd1().vocab_size());
  EXPECT_EQ(hf_sd2.pad_id(), 0);
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(hf_sd1.encode(text), c["ids_sd1"].get<std::vector<int32_t>>()) << "text " << shown(text);
    EXPECT_EQ(hf_sd2.encode(text), c["ids_sd2"].get<std::vector<int32_t>>()) << "text " << shown(text);
  }
}

TEST(ClipKohyaPrompt, LongPromptWindowsEqualKohyas) {
  int compared = 0;
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    for (const std::string name : {"sd1", "sd2"}) {
      const TokenChunks plain{c["padded_" + name].get<std::vector<int32_t>>()};
      EXPECT_EQ(kohya_tokenize(tokenizer_named(name), text, std::nullopt), plain) << "text " << shown(text);
      for (int length : {150, 225}) {
        const std::string key = "kohya_" + name + "_" + std::to_string(length);
        if (!c.contains(key)) continue;
        EXPECT_EQ(kohya_tokenize(tokenizer_named(name), text, length), c[key].get<TokenChunks>())
            << key << ", text " << shown(text);
        ++compared;
      }
    }
  }
  EXPECT_GE(compared, 200);
}

TEST(ClipKohyaPrompt, AttentionFragmentsEqualKohyas) {
  int compared = 0;
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    if (c.contains("attention_error")) {
      EXPECT_THROW(parse_prompt_attention(text), Error) << "text " << shown(text);
      EXPECT_THROW(kohya_tokenize_with_weights(sd1(), text, std::nullopt), Error);
      continue;
    }
    if (!c.contains("attention")) continue;
    const std::vector<PromptFragment> fragments = parse_prompt_attention(text);
    ASSERT_EQ(fragments.size(), c["attention"].size()) << "text " << shown(text);
    for (size_t k = 0; k < fragments.size(); ++k) {
      EXPECT_EQ(fragments[k].text, c["attention"][k][0]) << "text " << shown(text);
      EXPECT_EQ(fragments[k].weight, c["attention"][k][1].get<double>()) << "text " << shown(text);
    }
    ++compared;
  }
  EXPECT_GE(compared, 80);
}

TEST(ClipKohyaPrompt, WeightedCaptionIdsAndWeightsEqualKohyas) {
  int compared = 0;
  for (const json& c : fixture()["cases"]) {
    const std::string text = c["text"];
    for (const std::string name : {"sd1", "sd2"}) {
      for (int length : {75, 225}) {
        const std::string key = "weighted_" + name + "_" + std::to_string(length);
        if (!c.contains(key)) continue;
        const WeightedTokenChunks chunks = kohya_tokenize_with_weights(tokenizer_named(name), text, length);
        EXPECT_EQ(chunks.ids, c[key]["ids"].get<TokenChunks>()) << key << ", text " << shown(text);
        EXPECT_EQ(chunks.weights, c[key]["weights"].get<std::vector<std::vector<float>>>())
            << key << ", text " << shown(text);
        ++compared;
      }
    }
  }
  EXPECT_GE(compared, 200);
}

TEST(ClipKohyaPrompt, SamplingIdsAndWeightsEqualKohyasLongPromptPipeline) {
  int compared = 0;
  const auto expect_equal = [](const WeightedTokenChunks& ours, const json& reference, const std::string& what) {
    EXPECT_EQ(ours.ids, reference["ids"].get<TokenChunks>()) << what;
    EXPECT_EQ(ours.weights, reference["weights"].get<std::vector<std::vector<float>>>()) << what;
  };
  for (const json& c : fixture()["cases"]) {
    if (!c.contains("sampling_sd1")) continue;
    const std::string text = c["text"];
    for (const std::string name : {"sd1", "sd2"}) {
      // SD 2.x's result is stored only where it differs from SD 1.x's.
      const json& reference = c.contains("sampling_" + name) ? c["sampling_" + name] : c["sampling_sd1"];
      std::optional<std::string> negative;
      if (!reference["negative"].is_null()) negative = reference["negative"].get<std::string>();
      const SamplingTokens tokens = tokenize_for_sampling(tokenizer_named(name), text, negative);
      const std::string what = name + ", prompt " + shown(text) + ", negative " + reference["negative"].dump();
      expect_equal(tokens.prompt, reference["prompt"], what);
      ASSERT_EQ(tokens.negative.has_value(), !reference["negative_tokens"].is_null()) << what;
      if (tokens.negative) expect_equal(*tokens.negative, reference["negative_tokens"], what);
      ++compared;
    }
  }
  EXPECT_GE(compared, 100);
}

TEST(ClipKohyaPrompt, MaxTokenLengthMustBeAMultipleOf75) {
  EXPECT_THROW(kohya_tokenize(sd1(), "a cat", 100), Error);
  EXPECT_THROW(kohya_tokenize_with_weights(sd1(), "a cat", 0), Error);
  EXPECT_EQ(kohya_tokenize(sd1(), "a cat", 75), kohya_tokenize(sd1(), "a cat", std::nullopt));
  EXPECT_EQ(kohya_tokenize(sd1(), "a cat", 300).size(), 4u);
}

TEST(ClipTextCleaning, FtfyFixesApplyUntilTheTextIsStable) {
  const auto fixed = [](std::string_view text) { return utf8_encode(fix_text(utf8_decode(text, "test"))); };
  EXPECT_EQ(fixed("Tom &amp;amp; Jerry"), "Tom & Jerry");
  EXPECT_EQ(fixed("<b>&amp;</b>"), "<b>&amp;</b>");  // a '<' means HTML: entities stay
  EXPECT_EQ(fixed("１ｇｉｒｌ　ｿﾛ"), "1girl ソロ");
  EXPECT_EQ(fixed("\xE2\x80\x9Cﬁne\xE2\x80\x9D"), "\"fine\"");
  EXPECT_EQ(fixed("\x1b[31mred\x1b[0m\r\n"), "red\n");
  EXPECT_EQ(utf8_encode(to_lower(utf8_decode("ΟΔΟΣ İ", "test"))), "οδος i\xCC\x87");
}

TEST(ClipTokenizer, InvalidUtf8TextIsAnError) {
  EXPECT_THROW(sd1().encode("caf\xC3"), Error);
  EXPECT_THROW(sd1().encode("\xC0\xAF"), Error);  // overlong '/'
  EXPECT_THROW(sd1().encode("\xED\xA0\x80"), Error);  // a surrogate
}

TEST(ClipTokenizer, MissingVocabularyFileIsAnErrorNamingIt) {
  try {
    ClipTokenizer::from_bpe_vocab_gz("/nonexistent/bpe_simple_vocab_16e6.txt.gz", ClipTokenizer::kSd1PadToken);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "/nonexistent/bpe_simple_vocab_16e6.txt.gz");
  }
  EXPECT_THROW(ClipTokenizer::from_vocab_json_and_merges("/nonexistent/vocab.json", "/nonexistent/merges.txt",
                                                         ClipTokenizer::kSd1PadToken),
               Error);
}

TEST(ClipTokenizer, TruncatedOrPlainVocabularyFileIsAnError) {
  TempDir dir;
  std::ifstream in(SDT_CLIP_VOCAB_GZ, std::ios::binary);
  const std::string gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  write_file(dir.path / "truncated.gz", gz.substr(0, gz.size() / 2));
  write_file(dir.path / "plain.txt.gz", "#version: 0.2\ni n\n");
  for (const char* name : {"truncated.gz", "plain.txt.gz"}) {
    try {
      ClipTokenizer::from_bpe_vocab_gz(dir.path / name, ClipTokenizer::kSd1PadToken);
      FAIL() << name << ": expected an error";
    } catch (const Error& e) {
      EXPECT_EQ(e.where(), (dir.path / name).string());
    }
  }
}

TEST(ClipTokenizer, BrokenVocabJsonOrMergesTxtIsAnErrorNamingTheFile) {
  TempDir dir;
  write_hf_files(dir.path);
  const fs::path vocab = dir.path / "vocab.json";
  const fs::path merges = dir.path / "merges.txt";
  const fs::path bad = dir.path / "bad";
  write_file(bad, "[1, 2]");
  EXPECT_THROW(ClipTokenizer::from_vocab_json_and_merges(bad, merges, ClipTokenizer::kSd1PadToken), Error);
  write_file(bad, "#version: 0.2\ni n\nthree symbols here\n");
  try {
    ClipTokenizer::from_vocab_json_and_merges(vocab, bad, ClipTokenizer::kSd1PadToken);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), bad.string() + ": line 3");
  }
  write_file(bad, "#version: 0.2\ni n\nnot_a_symbol n\n");
  EXPECT_THROW(ClipTokenizer::from_vocab_json_and_merges(vocab, bad, ClipTokenizer::kSd1PadToken), Error);
  try {
    ClipTokenizer::from_vocab_json_and_merges(vocab, merges, "<|not a token|>");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), vocab.string());
  }
}

}  // namespace
}  // namespace sdt
