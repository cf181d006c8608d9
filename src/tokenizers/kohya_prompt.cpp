// kohya's long-prompt windows and prompt weighting (library/strategy_base.py TokenizeStrategy,
// library/lpw_stable_diffusion.py), on ids from ClipTokenizer.
#include "src/tokenizers/kohya_prompt.h"

#include <algorithm>
#include <charconv>

#include "src/core/error.h"
#include "src/tokenizers/text_cleaning.h"

namespace sdt {

namespace {

constexpr int kWindow = ClipTokenizer::kModelMaxLength - 2;  // ids of text per 77-id chunk
constexpr double kRoundBracketMultiplier = 1.1;
constexpr double kSquareBracketMultiplier = 1 / 1.1;

// Python's float() of the text kohya's pattern [+-]?[.\d]+ captured (digits of any script): a
// number only if all of it parses, so "1.2.3" or "." is an error, as float() raises on them.
double parse_weight(std::u32string_view text, std::string_view prompt) {
  std::string ascii;
  for (char32_t c : text) {
    const int digit = decimal_digit_value(c);
    ascii.push_back(digit >= 0 ? static_cast<char>('0' + digit) : static_cast<char>(c));
  }
  const char* begin = ascii.data() + (ascii[0] == '+' ? 1 : 0);  // from_chars takes no '+'
  const char* end = ascii.data() + ascii.size();
  double value = 0;
  const auto result = std::from_chars(begin, end, value);
  if (result.ec != std::errc() || result.ptr != end) {
    fail("prompt", "attention weight '{}' is not a number in '{}'", utf8_encode(text), prompt);
  }
  return value;
}

// The length of kohya's weight syntax ":" [+-]? [.\d]+ ")" at `pos`, or 0.
size_t weight_syntax_length(std::u32string_view text, size_t pos) {
  size_t end = pos + 1;
  if (end < text.size() && (text[end] == '+' || text[end] == '-')) ++end;
  const size_t number_start = end;
  while (end < text.size() && (text[end] == '.' || decimal_digit_value(text[end]) >= 0)) ++end;
  if (end == number_start || end >= text.size() || text[end] != ')') return 0;
  return end + 1 - pos;
}

bool is_syntax(char32_t c) { return c == '\\' || c == '(' || c == ')' || c == '[' || c == ']' || c == ':'; }

// get_prompts_with_weights: each fragment encoded on its own, its weight repeated per id, the whole
// truncated to max_ids.
void encode_weighted(const ClipTokenizer& tokenizer, std::string_view prompt, size_t max_ids,
                     std::vector<int32_t>& ids, std::vector<double>& weights) {
  for (const PromptFragment& fragment : parse_prompt_attention(prompt)) {
    const std::vector<int32_t> fragment_ids = tokenizer.encode(fragment.text);
    ids.insert(ids.end(), fragment_ids.begin(), fragment_ids.end());
    weights.insert(weights.end(), fragment_ids.size(), fragment.weight);
    if (ids.size() > max_ids) break;
  }
  ids.resize(std::min(ids.size(), max_ids));
  weights.resize(ids.size());
}

// SD 2.x's fix-up of a window (its padding is not EOS): a window whose text runs to its last id ends
// with EOS, and one with nothing after BOS gets EOS there.
void end_window_with_eos(const ClipTokenizer& tokenizer, std::vector<int32_t>& chunk) {
  if (chunk[chunk.size() - 2] != tokenizer.eos_id() && chunk[chunk.size() - 2] != tokenizer.pad_id()) {
    chunk.back() = tokenizer.eos_id();
  }
  if (chunk[1] == tokenizer.pad_id()) chunk[1] = tokenizer.eos_id();
}

// TokenizeStrategy._get_input_ids' windows over max_length = 75 n + 2 ids: BOS, ids[1 + 75 k ...],
// then the last id of the whole sequence.
TokenChunks kohya_windows(const ClipTokenizer& tokenizer, const std::vector<int32_t>& ids) {
  TokenChunks chunks;
  for (size_t start = 1; start + kWindow < ids.size(); start += kWindow) {
    std::vector<int32_t> chunk{ids.front()};
    const auto window = ids.begin() + static_cast<ptrdiff_t>(start);
    chunk.insert(chunk.end(), window, window + kWindow);
    chunk.push_back(ids.back());
    if (tokenizer.pad_id() != tokenizer.eos_id()) end_window_with_eos(tokenizer, chunk);
    chunks.push_back(std::move(chunk));
  }
  return chunks;
}

// kohya's max_length: BOS + EOS + max_token_length (75 when not given).
size_t kohya_max_length(std::optional<int> max_token_length) {
  const int tokens = max_token_length.value_or(kWindow);
  if (tokens <= 0 || tokens % kWindow != 0) {
    fail("--max_token_length", "expected 75, 150 or 225 (a multiple of 75), got {}", tokens);
  }
  return static_cast<size_t>(tokens) + 2;
}

std::vector<float> to_float(const std::vector<double>& weights) { return {weights.begin(), weights.end()}; }

}  // namespace

std::vector<PromptFragment> parse_prompt_attention(std::string_view prompt) {
  const std::u32string text = utf8_decode(prompt, "prompt");
  std::vector<PromptFragment> fragments;
  std::vector<size_t> round_brackets;
  std::vector<size_t> square_brackets;
  const auto multiply_from = [&](size_t start, double multiplier) {
    for (size_t k = start; k < fragments.size(); ++k) fragments[k].weight *= multiplier;
  };
  const auto add_text = [&](std::u32string_view piece) { fragments.push_back({utf8_encode(piece), 1.0}); };

  size_t pos = 0;
  while (pos < text.size()) {
    const char32_t c = text[pos];
    if (c == '\\') {
      // "\(", "\)", "\[", "\]", "\\" keep the second character; a lone "\" leaves nothing.
      const bool escaped_pair =
          pos + 1 < text.size() && std::u32string_view(U"()[]\\").find(text[pos + 1]) != std::u32string_view::npos;
      add_text(text.substr(pos + 1, escaped_pair ? 1 : 0));
      pos += escaped_pair ? 2 : 1;
    } else if (c == '(') {
      round_brackets.push_back(fragments.size());
      ++pos;
    } else if (c == '[') {
      square_brackets.push_back(fragments.size());
      ++pos;
    } else if (c == ':') {
      const size_t length = weight_syntax_length(text, pos);
      if (length > 0 && !round_brackets.empty()) {
        // "(text:1.5)": the number between ':' and ')' closes the innermost round bracket.
        multiply_from(round_brackets.back(), parse_weight(text.substr(pos + 1, length - 2), prompt));
        round_brackets.pop_back();
      } else {
        add_text(text.substr(pos, std::max<size_t>(length, 1)));
      }
      pos += std::max<size_t>(length, 1);
    } else if (c == ')' && !round_brackets.empty()) {
      multiply_from(round_brackets.back(), kRoundBracketMultiplier);
      round_brackets.pop_back();
      ++pos;
    } else if (c == ']' && !square_brackets.empty()) {
      multiply_from(square_brackets.back(), kSquareBracketMultiplier);
      square_brackets.pop_back();
      ++pos;
    } else if (c == ')' || c == ']') {
      add_text(text.substr(pos, 1));
      ++pos;
    } else {
      size_t end = pos;
      while (end < text.size() && !is_syntax(text[end])) ++end;
      add_text(text.substr(pos, end - pos));
      pos = end;
    }
  }
  // Brackets left open apply to the end of the prompt.
  for (size_t start : round_brackets) multiply_from(start, kRoundBracketMultiplier);
  for (size_t start : square_brackets) multiply_from(start, kSquareBracketMultiplier);

  if (fragments.empty()) fragments.push_back({"", 1.0});
  std::vector<PromptFragment> merged{fragments.front()};
  for (size_t k = 1; k < fragments.size(); ++k) {
    if (fragments[k].weight == merged.back().weight) merged.back().text += fragments[k].text;
    else merged.push_back(fragments[k]);
  }
  return merged;
}

TokenChunks kohya_tokenize(const ClipTokenizer& tokenizer, std::string_view caption, std::optional<int> max_token_length) {
  const size_t max_length = kohya_max_length(max_token_length);
  std::vector<int32_t> ids = tokenizer.encode_padded(caption, static_cast<int>(max_length));
  if (max_length <= ClipTokenizer::kModelMaxLength) return {std::move(ids)};
  return kohya_windows(tokenizer, ids);
}

WeightedTokenChunks kohya_tokenize_with_weights(const ClipTokenizer& tokenizer, std::string_view caption,
                                                std::optional<int> max_token_length) {
  const size_t max_length = kohya_max_length(max_token_length);
  std::vector<int32_t> text_ids;
  std::vector<double> text_weights;
  encode_weighted(tokenizer, caption, max_length - 2, text_ids, text_weights);

  // BOS, ids, EOS, padding; weight 1 wherever there is no text.
  std::vector<int32_t> ids{tokenizer.bos_id()};
  ids.insert(ids.end(), text_ids.begin(), text_ids.end());
  ids.push_back(tokenizer.eos_id());
  ids.resize(max_length, tokenizer.pad_id());
  std::vector<double> weights{1.0};
  weights.insert(weights.end(), text_weights.begin(), text_weights.end());
  weights.resize(max_length, 1.0);

  if (max_length <= ClipTokenizer::kModelMaxLength) return {{std::move(ids)}, {to_float(weights)}};
  WeightedTokenChunks chunks{kohya_windows(tokenizer, ids), {}};
  for (size_t k = 0; k < chunks.ids.size(); ++k) {
    std::vector<float> window(ClipTokenizer::kModelMaxLength, 1.0f);
    for (int j = 0; j < kWindow; ++j) window[1 + j] = static_cast<float>(weights[1 + k * kWindow + j]);
    chunks.weights.push_back(std::move(window));
  }
  return chunks;
}

SamplingTokens tokenize_for_sampling(const ClipTokenizer& tokenizer, std::string_view prompt,
                                     std::optional<std::string_view> negative_prompt, int max_embeddings_multiples) {
  if (max_embeddings_multiples < 1) {
    fail("sampling", "max_embeddings_multiples must be at least 1, got {}", max_embeddings_multiples);
  }
  struct Encoded {
    std::vector<int32_t> ids;
    std::vector<double> weights;
  };
  const size_t max_ids = static_cast<size_t>(kWindow) * static_cast<size_t>(max_embeddings_multiples);
  std::vector<Encoded> prompts(negative_prompt ? 2 : 1);
  encode_weighted(tokenizer, prompt, max_ids, prompts[0].ids, prompts[0].weights);
  if (negative_prompt) encode_weighted(tokenizer, *negative_prompt, max_ids, prompts[1].ids, prompts[1].weights);

  // As many windows as the longer prompt needs (at least one).
  size_t longest = 0;
  for (const Encoded& p : prompts) longest = std::max(longest, p.ids.size());
  const size_t windows = longest == 0 ? 1 : std::min<size_t>(max_embeddings_multiples, (longest - 1) / kWindow + 1);
  const size_t length = kWindow * windows + 2;

  std::vector<WeightedTokenChunks> results;
  for (const Encoded& p : prompts) {
    // pad_tokens_and_weights: BOS, ids, then EOS to the end (whatever the padding token); per
    // window weight 1, the window's text weights, weight 1; then 1 up to 77 per window.
    std::vector<int32_t> ids{tokenizer.bos_id()};
    ids.insert(ids.end(), p.ids.begin(), p.ids.end());
    ids.resize(length, tokenizer.eos_id());
    std::vector<double> weights;
    if (!p.weights.empty()) {
      for (size_t k = 0; k < windows; ++k) {
        weights.push_back(1.0);
        const size_t begin = std::min(p.weights.size(), k * kWindow);
        const size_t end = std::min(p.weights.size(), (k + 1) * kWindow);
        weights.insert(weights.end(), p.weights.begin() + static_cast<ptrdiff_t>(begin),
                       p.weights.begin() + static_cast<ptrdiff_t>(end));
        weights.push_back(1.0);
      }
    }
    weights.resize(windows * ClipTokenizer::kModelMaxLength, 1.0);

    // get_unweighted_text_embeddings' windows: ids[75 k ... 75 k + 77) with BOS in front and, for
    // SD 1.x, the sequence's last id (EOS) behind; SD 2.x fixes each window up instead.
    WeightedTokenChunks chunks;
    for (size_t k = 0; k < windows; ++k) {
      const auto first = ids.begin() + static_cast<ptrdiff_t>(k * kWindow);
      std::vector<int32_t> chunk(first, first + ClipTokenizer::kModelMaxLength);
      if (windows > 1) {
        chunk.front() = ids.front();
        if (tokenizer.pad_id() == tokenizer.eos_id()) {
          chunk.back() = ids.back();
        } else {
          if (chunk.back() != tokenizer.eos_id() && chunk.back() != tokenizer.pad_id()) chunk.back() = tokenizer.eos_id();
          if (chunk[1] == tokenizer.pad_id()) chunk[1] = tokenizer.eos_id();
        }
      }
      chunks.ids.push_back(std::move(chunk));
      const auto window_weights = weights.begin() + static_cast<ptrdiff_t>(k * ClipTokenizer::kModelMaxLength);
      chunks.weights.emplace_back(window_weights, window_weights + ClipTokenizer::kModelMaxLength);
    }
    results.push_back(std::move(chunks));
  }
  SamplingTokens tokens{std::move(results[0]), std::nullopt};
  if (negative_prompt) tokens.negative = std::move(results[1]);
  return tokens;
}

}  // namespace sdt
