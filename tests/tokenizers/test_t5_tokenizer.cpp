// T5's tokenizer against transformers' T5TokenizerFast (tests/fixtures/tokenizers/t5_tokenizer.json, made by
// gen_t5_tokenizer_fixtures.py): over 200 strings through the shipped spiece.model and through a small model the
// generator trained, unpadded and as kohya's strategies call it (max_length, padding, truncation).
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/tokenizers/t5_tokenizer.h"

namespace sdt {
namespace {

const nlohmann::json& fixture() {
  static const nlohmann::json j = [] {
    std::ifstream in(SDT_TOKENIZER_FIXTURES "/t5_tokenizer.json");
    return nlohmann::json::parse(in);
  }();
  return j;
}

void expect_transformers_ids(const T5Tokenizer& tokenizer, const nlohmann::json& expected, const std::string& which) {
  const auto& strings = expected["strings"];
  ASSERT_GE(strings.size(), 200u);
  size_t equal = 0;
  for (size_t i = 0; i < strings.size(); ++i) {
    const std::vector<int64_t> ids = tokenizer.encode(strings[i].get<std::string>());
    const auto reference = expected["ids"][i].get<std::vector<int64_t>>();
    EXPECT_EQ(ids, reference) << which << ": \"" << strings[i].get<std::string>() << "\"";
    equal += ids == reference;
  }
  std::cout << "[conformance] T5 tokenizer (" << which << "): " << equal << " of " << strings.size()
            << " strings give transformers' ids\n";
  for (const auto& call : expected["kohya"]) {
    const T5Tokenizer::Tokens tokens = tokenizer.tokenize(call["text"].get<std::string>(), call["max_length"].get<int64_t>());
    EXPECT_EQ(tokens.ids, call["ids"].get<std::vector<int64_t>>()) << which << " max_length " << call["max_length"];
    EXPECT_EQ(tokens.mask, call["mask"].get<std::vector<int64_t>>()) << which << " max_length " << call["max_length"];
  }
}

TEST(T5Tokenizer, ShippedVocabularyGivesTransformersIds) {
  const T5Tokenizer tokenizer(SDT_T5_SPIECE);
  EXPECT_EQ(tokenizer.vocab_size(), 32100);
  expect_transformers_ids(tokenizer, fixture()["shipped"], "shipped spiece.model");
}

TEST(T5Tokenizer, ASmallTrainedModelGivesTransformersIds) {
  expect_transformers_ids(T5Tokenizer(SDT_TOKENIZER_FIXTURES "/t5_small.model"), fixture()["small"], "small trained model");
}

TEST(T5Tokenizer, AMissingOrInvalidModelIsNamed) {
  for (const std::string path : {std::string("/nonexistent/spiece.model"), std::string(SDT_TOKENIZER_FIXTURES "/t5_tokenizer.json")}) {
    try {
      T5Tokenizer tokenizer(path);
      ADD_FAILURE() << "expected an error for " << path;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace sdt
