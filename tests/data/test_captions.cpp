// Caption processing in kohya's order, with fixed seeds.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "src/data/captions.h"

namespace sdt {
namespace {

std::string run(const SubsetConfig& s, const std::string& caption, CaptionContext ctx = {}, uint64_t seed = 1) {
  Rng rng(seed, static_cast<uint64_t>(ctx.epoch), 0, RngPurpose::Caption);
  return process_caption(s, caption, ctx, rng);
}

TEST(Captions, PrefixSuffixAndFirstLine) {
  SubsetConfig s;
  s.caption_prefix = "masterpiece";
  s.caption_suffix = "best quality";
  EXPECT_EQ(run(s, "1girl, solo\nsecond line"), "masterpiece 1girl, solo");  // suffix was on the second line
  EXPECT_EQ(run(s, "1girl, solo"), "masterpiece 1girl, solo best quality");
}

TEST(Captions, DropoutEveryNEpochsEmptiesTheCaptionPrefixIncluded) {
  SubsetConfig s;
  s.caption_prefix = "p";
  s.caption_dropout_every_n_epochs = 3;
  EXPECT_EQ(run(s, "a, b", {.epoch = 3}), "");
  EXPECT_EQ(run(s, "a, b", {.epoch = 4}), "p a, b");
}

TEST(Captions, DropoutRateIsApproximatelyTheRate) {
  SubsetConfig s;
  s.caption_dropout_rate = 0.25;
  int dropped = 0;
  for (uint64_t seed = 0; seed < 4000; ++seed) dropped += run(s, "x", {}, seed).empty();
  EXPECT_NEAR(dropped / 4000.0, 0.25, 0.03);
}

TEST(Captions, KeepTokensStayInFrontAndTheRestIsShuffledDeterministically) {
  SubsetConfig s;
  s.shuffle_caption = true;
  s.keep_tokens = 2;
  const std::string caption = "sks, dog, a, b, c, d, e, f";
  std::string once = run(s, caption, {}, 7);
  EXPECT_EQ(once, run(s, caption, {}, 7));  // same seed, same result
  EXPECT_TRUE(once.starts_with("sks, dog, ")) << once;
  std::set<std::string> seen;
  for (uint64_t seed = 0; seed < 50; ++seed) seen.insert(run(s, caption, {}, seed));
  EXPECT_GT(seen.size(), 20u);
  for (const auto& c : seen) {
    auto tokens = python_split(c, ", ");
    std::sort(tokens.begin(), tokens.end());
    EXPECT_EQ(tokens, (std::vector<std::string>{"a", "b", "c", "d", "dog", "e", "f", "sks"}));
  }
}

TEST(Captions, KeepTokensSeparatorFixesPrefixAndSuffix) {
  SubsetConfig s;
  s.shuffle_caption = true;
  s.keep_tokens_separator = "|||";
  // kohya's documentation example: the part after the second ||| stays last.
  std::string out = run(s, "1girl, hatsune miku ||| red, blue, green ||| masterpiece, rating: general", {}, 3);
  EXPECT_TRUE(out.starts_with("1girl, hatsune miku, ")) << out;
  EXPECT_TRUE(out.ends_with(", masterpiece, rating: general")) << out;
  EXPECT_NE(out.find("red"), std::string::npos);
}

TEST(Captions, CustomSeparatorIsRejoinedWithCommaSpaceAndSecondarySeparatorRestored) {
  SubsetConfig s;
  s.caption_tag_dropout_rate = 0.0001;  // triggers the split/re-join without changing tags (almost surely)
  s.caption_separator = ";";
  s.secondary_separator = ";;;";
  EXPECT_EQ(run(s, "a ;b;c"), "a, b, c");
  SubsetConfig t;
  t.secondary_separator = "+";
  EXPECT_EQ(run(t, "blue+sky, cloud"), "blue,sky, cloud");
}

TEST(Captions, WildcardsPickOneAlternativeAndBracesEscape) {
  SubsetConfig s;
  s.enable_wildcard = true;
  std::set<std::string> seen;
  for (uint64_t seed = 0; seed < 200; ++seed) seen.insert(run(s, "a {red|green|blue} ball {{literal}}", {}, seed));
  EXPECT_EQ(seen, (std::set<std::string>{"a red ball {literal}", "a green ball {literal}", "a blue ball {literal}"}));
  std::set<std::string> lines;
  for (uint64_t seed = 0; seed < 200; ++seed) lines.insert(run(s, "first\nsecond", {}, seed));
  EXPECT_EQ(lines, (std::set<std::string>{"first", "second"}));
}

TEST(Captions, TokenWarmupKeepsAGrowingNumberOfTags) {
  SubsetConfig s;
  s.token_warmup_min = 1;
  s.token_warmup_step = 10;
  const std::string caption = "t0, t1, t2, t3, t4, t5";
  // kohya: floor(step * (6 - 1) / 10) + 1 tags while step < 10
  EXPECT_EQ(run(s, caption, {.step = 0}), "t0");
  EXPECT_EQ(run(s, caption, {.step = 4}), "t0, t1, t2");
  EXPECT_EQ(run(s, caption, {.step = 10}), caption);
  s.token_warmup_step = 0.5;  // a ratio of max_train_steps
  EXPECT_EQ(run(s, caption, {.step = 10, .max_train_steps = 100}), "t0, t1");
}

TEST(Captions, PythonSplitAndStripSemantics) {
  EXPECT_EQ(python_split("a,,b", ","), (std::vector<std::string>{"a", "", "b"}));
  EXPECT_EQ(python_split("", ","), (std::vector<std::string>{""}));
  EXPECT_EQ(python_strip("  x y \t\n"), "x y");
}

}  // namespace
}  // namespace sdt
