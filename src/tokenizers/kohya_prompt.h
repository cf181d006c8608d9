// kohya-ss/sd-scripts' SD 1.x / 2.x prompt handling on top of the CLIP tokenizer: long prompts in
// 77-token windows (--max_token_length 150 / 225), the attention syntax "(word:1.2)", "(word)",
// "[word]" for weighted captions, and the long-prompt weighting of its sample-image pipeline.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "src/tokenizers/clip_tokenizer.h"

namespace sdt {

// A prompt as the text encoder takes it: chunks of 77 ids (BOS, 75 ids, EOS or padding).
using TokenChunks = std::vector<std::vector<int32_t>>;

// The same with a weight per id (1 for BOS, EOS and padding), as float32 like kohya's tensors.
struct WeightedTokenChunks {
  TokenChunks ids;
  std::vector<std::vector<float>> weights;
};

// A run of prompt text and the product of the attention multipliers around it.
struct PromptFragment {
  std::string text;
  double weight;
};

// kohya's parse_prompt_attention: "(text)" multiplies by 1.1, "[text]" divides by 1.1,
// "(text:1.5)" multiplies by 1.5; "\(", "\)", "\[", "\]" and "\\" are literal characters; brackets
// left open close at the end; neighbouring fragments of equal weight merge. A weight that is not a
// number (as in "(a:1.2.3)", which kohya's float() rejects) is an error.
std::vector<PromptFragment> parse_prompt_attention(std::string_view prompt);

// SdTokenizeStrategy(v2, max_token_length).tokenize(caption): one chunk without max_token_length
// (or with 75); else the caption is encoded to max_token_length + 2 ids and cut into
// max_token_length / 75 windows of 75, each with BOS in front and the sequence's last id behind.
// With SD 2.x's padding ("!", id 0) a window that ends inside the text ends with EOS instead, and
// one that holds only padding starts with BOS, EOS.
TokenChunks kohya_tokenize(const ClipTokenizer& tokenizer, std::string_view caption,
                           std::optional<int> max_token_length);

// SdTokenizeStrategy.tokenize_with_weights(caption) (--weighted_captions): each fragment of
// parse_prompt_attention is encoded on its own, the ids truncated to max_token_length (75 without
// it), padded and cut into windows as kohya_tokenize does.
WeightedTokenChunks kohya_tokenize_with_weights(const ClipTokenizer& tokenizer, std::string_view caption,
                                                std::optional<int> max_token_length);

// The ids and weights kohya's sample images are made from (lpw_stable_diffusion's
// get_weighted_text_embeddings with max_embeddings_multiples windows at most): the prompt and the
// negative prompt (absent without classifier-free guidance; kohya passes "" when none is given)
// are truncated to 75 * max_embeddings_multiples ids, padded with EOS, and both get as many
// windows as the longer one needs.
struct SamplingTokens {
  WeightedTokenChunks prompt;
  std::optional<WeightedTokenChunks> negative;
};
SamplingTokens tokenize_for_sampling(const ClipTokenizer& tokenizer, std::string_view prompt,
                                     std::optional<std::string_view> negative_prompt, int max_embeddings_multiples = 3);

}  // namespace sdt
