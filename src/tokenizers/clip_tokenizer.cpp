// CLIP BPE tokenizer: vocabulary loading (OpenAI's .txt.gz or Hugging Face's vocab.json +
// merges.txt), the added-token cut, CLIP's word pattern, and byte-level BPE on vocabulary ids.
#include "src/tokenizers/clip_tokenizer.h"

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include "src/core/data_files.h"
#include "src/core/error.h"
#include "src/tokenizers/text_cleaning.h"

namespace sdt {

namespace {

// CLIP's vocabulary holds 49152 - 256 - 2 merges; Hugging Face's tokenizer reads no more than that
// from merges.txt, skipping its first (version) line, as OpenAI's loader does with the .txt.gz.
constexpr size_t kMaxMerges = 49152 - 256 - 2;
constexpr std::string_view kEndOfWord = "</w>";

// GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the other 68 bytes
// for U+0100 onwards, so that every byte has a visible, non-space symbol. Returned as UTF-8 per
// byte, in the table's order (printable bytes first), which is also the vocabulary's order.
std::vector<std::pair<uint8_t, std::string>> byte_symbols() {
  std::vector<std::pair<uint8_t, std::string>> symbols;
  const auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; };
  for (int b = 0; b < 256; ++b) {
    if (printable(b)) symbols.emplace_back(b, utf8_encode(std::u32string(1, static_cast<char32_t>(b))));
  }
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    if (!printable(b)) symbols.emplace_back(b, utf8_encode(std::u32string(1, next++)));
  }
  return symbols;
}

// The merge lines: those after the first (a version line), at most kMaxMerges of them.
std::vector<std::string> merge_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream stream(text);
  std::string line;
  std::getline(stream, line);
  while (lines.size() < kMaxMerges && std::getline(stream, line)) lines.push_back(line);
  return lines;
}

// A line's symbols, split on white space as Python's str.split() does (byte symbols are printable,
// so ASCII white space is all a merges file can separate them with).
std::vector<std::string> merge_symbols(const std::string& line) {
  std::vector<std::string> symbols;
  size_t pos = 0;
  while (true) {
    pos = line.find_first_not_of(" \t\r\v\f", pos);
    if (pos == std::string::npos) break;
    const size_t end = line.find_first_of(" \t\r\v\f", pos);
    symbols.push_back(line.substr(pos, end == std::string::npos ? std::string::npos : end - pos));
    if (end == std::string::npos) break;
    pos = end;
  }
  return symbols;
}

std::string read_gzip(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) fail(path, "cannot open the vocabulary file: {}", std::strerror(errno));
  std::string text;
  std::array<char, 1 << 16> buffer;
  int n = 0;
  while ((n = gzread(file, buffer.data(), static_cast<unsigned>(buffer.size()))) > 0) text.append(buffer.data(), n);
  int error = Z_OK;
  const std::string message = gzerror(file, &error);
  const bool plain = gzdirect(file) != 0;
  gzclose(file);
  if (n < 0 || (error != Z_OK && error != Z_STREAM_END)) {
    fail(path, "corrupt gzip data ({}): expected OpenAI's gzip-compressed BPE merges", message);
  }
  if (plain) fail(path, "not gzip-compressed: expected OpenAI's bpe_simple_vocab_16e6.txt.gz");
  return text;
}

std::string read_file(const std::string& path, const std::string& expected) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open {}: {}", expected, std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Each merge line's two symbols; errors name `where` and the line (the version line is line 1).
std::vector<std::pair<std::string, std::string>> parse_merges(const std::vector<std::string>& lines,
                                                              const std::string& where) {
  std::vector<std::pair<std::string, std::string>> merges;
  for (size_t i = 0; i < lines.size(); ++i) {
    std::vector<std::string> symbols = merge_symbols(lines[i]);
    if (symbols.size() != 2) {
      fail(fmt::format("{}: line {}", where, i + 2), "expected a merge (two symbols separated by a space), found '{}'",
           lines[i]);
    }
    merges.emplace_back(std::move(symbols[0]), std::move(symbols[1]));
  }
  return merges;
}

// Python's str.strip() on the ASCII white space a merges.txt can hold.
std::string strip(const std::string& text) {
  const size_t first = text.find_first_not_of(" \t\n\r\v\f");
  if (first == std::string::npos) return {};
  return text.substr(first, text.find_last_not_of(" \t\n\r\v\f") - first + 1);
}

}  // namespace

ClipTokenizer ClipTokenizer::from_bpe_vocab_gz(const std::string& path, std::string_view pad_token) {
  const auto merges = parse_merges(merge_lines(read_gzip(path)), path);
  if (merges.empty()) fail(path, "no BPE merges: expected OpenAI's bpe_simple_vocab_16e6.txt.gz");
  // OpenAI's vocabulary: the byte symbols, the byte symbols ending a word, one token per merge,
  // then the two special tokens.
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(2 * 256 + merges.size() + 2);
  int32_t next_id = 0;
  // A token listed twice keeps its later id, as OpenAI's dict(zip(vocab, range(len(vocab)))) does.
  const auto add = [&](const std::string& token) { vocab.insert_or_assign(token, next_id++); };
  const auto symbols = byte_symbols();
  for (const auto& [byte, symbol] : symbols) add(symbol);
  for (const auto& [byte, symbol] : symbols) add(symbol + std::string(kEndOfWord));
  for (const auto& [left, right] : merges) add(left + right);
  add(std::string(kStartOfText));
  add(std::string(kEndOfText));
  return ClipTokenizer(std::move(vocab), path, merges, path, pad_token);
}

ClipTokenizer ClipTokenizer::from_vocab_json_and_merges(const std::string& vocab_json_path,
                                                        const std::string& merges_txt_path,
                                                        std::string_view pad_token) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(read_file(vocab_json_path, "the vocabulary (vocab.json)"));
  } catch (const nlohmann::json::parse_error& e) {
    fail(vocab_json_path, "not valid JSON ({}): expected an object mapping tokens to ids", e.what());
  }
  if (!json.is_object()) fail(vocab_json_path, "expected a JSON object mapping tokens to ids");
  std::unordered_map<std::string, int32_t> vocab;
  for (const auto& [token, id] : json.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      fail(vocab_json_path, "token '{}': expected a non-negative integer id, found {}", token, id.dump());
    }
    vocab.emplace(token, id.get<int32_t>());
  }
  const std::string merges_text = strip(read_file(merges_txt_path, "the BPE merges (merges.txt)"));
  return ClipTokenizer(std::move(vocab), vocab_json_path, parse_merges(merge_lines(merges_text), merges_txt_path),
                       merges_txt_path, pad_token);
}

ClipTokenizer::ClipTokenizer(std::unordered_map<std::string, int32_t> vocab, const std::string& vocab_where,
                             const std::vector<std::pair<std::string, std::string>>& merges, const std::string& merges_where,
                             std::string_view pad_token)
    : vocab_(std::move(vocab)) {
  bos_id_ = id_of(std::string(kStartOfText), vocab_where);
  eos_id_ = id_of(std::string(kEndOfText), vocab_where);
  pad_id_ = id_of(std::string(pad_token), vocab_where);
  added_tokens_ = {std::string(kStartOfText), std::string(kEndOfText)};
  if (pad_token != kStartOfText && pad_token != kEndOfText) added_tokens_.emplace_back(pad_token);

  byte_ids_.resize(256);
  byte_end_of_word_ids_.resize(256);
  for (const auto& [byte, symbol] : byte_symbols()) {
    byte_ids_[byte] = id_of(symbol, vocab_where);
    byte_end_of_word_ids_[byte] = id_of(symbol + std::string(kEndOfWord), vocab_where);
  }

  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const auto id = [&](const std::string& token) {
      const auto it = vocab_.find(token);
      if (it == vocab_.end()) {
        fail(fmt::format("{}: line {}", merges_where, rank + 2), "token '{}' is not in the vocabulary", token);
      }
      return it->second;
    };
    const uint64_t key = (static_cast<uint64_t>(id(left)) << 32) | static_cast<uint32_t>(id(right));
    // A pair listed twice keeps its later rank, as a Python dict built from the list does.
    merges_.insert_or_assign(key, Merge{static_cast<int32_t>(rank), id(left + right)});
  }
}

int32_t ClipTokenizer::id_of(const std::string& token, const std::string& where) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) fail(where, "token '{}' is not in the vocabulary", token);
  return it->second;
}

std::vector<int32_t> ClipTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  size_t piece_start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const std::string* added = nullptr;
    for (const std::string& token : added_tokens_) {
      if (text.substr(pos, token.size()) == token && (added == nullptr || token.size() > added->size())) added = &token;
    }
    if (added == nullptr) {
      ++pos;
      continue;
    }
    encode_piece(text.substr(piece_start, pos - piece_start), ids);
    ids.push_back(vocab_.at(*added));
    pos += added->size();
    piece_start = pos;
  }
  encode_piece(text.substr(piece_start), ids);
  return ids;
}

std::vector<int32_t> ClipTokenizer::encode_padded(std::string_view text, int max_length) const {
  if (max_length < 2) fail("tokenizer", "max_length {} leaves no room for BOS and EOS", max_length);
  std::vector<int32_t> ids = encode(text);
  ids.resize(std::min(ids.size(), static_cast<size_t>(max_length - 2)));
  ids.insert(ids.begin(), bos_id_);
  ids.push_back(eos_id_);
  ids.resize(static_cast<size_t>(max_length), pad_id_);
  return ids;
}

namespace {

// CLIP's pattern is compiled case-insensitively; on lower-cased text that only lets U+017F LATIN
// SMALL LETTER LONG S stand for 's' in its literal parts.
bool matches_literal(std::u32string_view text, size_t pos, std::u32string_view literal) {
  if (text.size() - pos < literal.size()) return false;
  for (size_t k = 0; k < literal.size(); ++k) {
    const char32_t c = text[pos + k];
    if (c != literal[k] && !(literal[k] == 's' && c == 0x017F)) return false;
  }
  return true;
}

// U+0345 COMBINING GREEK YPOGEGRAMMENI case-folds to the letter iota, so the case-insensitive
// [^\s\p{L}\p{N}] of the `regex` package rejects it, while its [\p{L}] does not take it either: no
// alternative of CLIP's pattern matches it and the reference drops it like white space.
constexpr char32_t kUnmatchedMark = 0x0345;

// The length of the word CLIP's pattern matches at `pos`, trying its alternatives in order:
//   <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d | [\p{L}]+ | [\p{N}] | [^\s\p{L}\p{N}]+
// or 0 where nothing matches (white space, U+0345).
size_t word_length(std::u32string_view text, size_t pos) {
  constexpr std::u32string_view kLiterals[] = {U"<|startoftext|>", U"<|endoftext|>", U"'s", U"'t", U"'re", U"'ve",
                                               U"'m", U"'ll", U"'d"};
  for (std::u32string_view literal : kLiterals) {
    if (matches_literal(text, pos, literal)) return literal.size();
  }
  const auto run = [&](auto belongs) {
    size_t end = pos;
    while (end < text.size() && belongs(text[end])) ++end;
    return end - pos;
  };
  if (is_letter(text[pos])) return run(is_letter);
  if (is_number(text[pos])) return 1;
  return run([](char32_t c) { return !is_white_space(c) && !is_letter(c) && !is_number(c) && c != kUnmatchedMark; });
}

}  // namespace

void ClipTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& ids) const {
  if (piece.empty()) return;
  const std::u32string text = to_lower(whitespace_clean(fix_text(utf8_decode(piece, "prompt text"))));
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t length = word_length(text, pos);
    if (length == 0) {
      ++pos;
      continue;
    }
    const std::string word = utf8_encode(text.substr(pos, length));
    // The reference keeps the special tokens whole when the pattern finds them in cleaned text.
    if (word == kStartOfText || word == kEndOfText) ids.push_back(vocab_.at(word));
    else encode_word(word, ids);
    pos += length;
  }
}

void ClipTokenizer::encode_word(std::string_view word, std::vector<int32_t>& ids) const {
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const auto byte = static_cast<uint8_t>(word[i]);
    symbols.push_back(i + 1 == word.size() ? byte_end_of_word_ids_[byte] : byte_ids_[byte]);
  }
  // Apply the best-ranked merge among adjacent pairs, everywhere it occurs from left to right,
  // until no pair has a merge.
  std::vector<int32_t> merged;
  while (symbols.size() > 1) {
    const Merge* best = nullptr;
    uint64_t best_key = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const uint64_t key = (static_cast<uint64_t>(symbols[i]) << 32) | static_cast<uint32_t>(symbols[i + 1]);
      const auto it = merges_.find(key);
      if (it != merges_.end() && (best == nullptr || it->second.rank < best->rank)) best = &it->second, best_key = key;
    }
    if (best == nullptr) break;
    const auto left = static_cast<int32_t>(best_key >> 32);
    const auto right = static_cast<int32_t>(best_key & 0xFFFFFFFFu);
    merged.clear();
    for (size_t i = 0; i < symbols.size(); ++i) {
      if (symbols[i] == left && i + 1 < symbols.size() && symbols[i + 1] == right) {
        merged.push_back(best->merged_id);
        ++i;
      } else {
        merged.push_back(symbols[i]);
      }
    }
    symbols.swap(merged);
  }
  ids.insert(ids.end(), symbols.begin(), symbols.end());
}

std::string ClipTokenizer::bundled_vocab_gz() {
  return shipped_data_file("tokenizers/clip/bpe_simple_vocab_16e6.txt.gz", "CLIP vocabulary", "--tokenizer");
}

}  // namespace sdt
