// CLIP's byte-level BPE tokenizer, giving the ids that kohya-ss/sd-scripts gets from Hugging Face
// transformers' CLIPTokenizer (the Python one, with ftfy installed, as kohya's requirements pin).
//
// Text -> ids, in the reference's order:
//   1. the text is cut at the added tokens, "<|startoftext|>", "<|endoftext|>" and the padding token
//      (for SD 2.x that is "!", so every "!" in a prompt becomes id 0, as it does in the reference);
//   2. each piece between them is cleaned (text_cleaning.h: ftfy.fix_text, white space, lower case)
//      and split by CLIP's pattern into words: a contraction ('s 't 're 've 'm 'll 'd), a run of
//      letters, a single digit, or a run of other non-space characters;
//   3. each word's UTF-8 bytes map to printable symbols (GPT-2's byte-to-unicode table), the last
//      symbol gets the end-of-word marker "</w>", and the lowest-ranked merges apply until none do.
// No LibTorch here: ids are plain int32 vectors.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sdt {

class ClipTokenizer {
 public:
  // What the text encoder takes: 77 ids, BOS and EOS included.
  static constexpr int kModelMaxLength = 77;
  static constexpr std::string_view kStartOfText = "<|startoftext|>";
  static constexpr std::string_view kEndOfText = "<|endoftext|>";
  // The padding token of SD 1.x's tokenizer (openai/clip-vit-large-patch14) and of SD 2.x's
  // (stabilityai/stable-diffusion-2, subfolder tokenizer).
  static constexpr std::string_view kSd1PadToken = kEndOfText;
  static constexpr std::string_view kSd2PadToken = "!";

  // OpenAI's bpe_simple_vocab_16e6.txt.gz: the merges, from which the vocabulary follows (the 256
  // byte symbols, the same with "</w>", one token per merge, then the two special tokens).
  static ClipTokenizer from_bpe_vocab_gz(const std::string& path, std::string_view pad_token);
  // OpenAI's vocabulary as the project ships it (data/tokenizers/clip/, MIT): data/ beside the folder of the running
  // executable (the build folder's binaries find the source tree's), or $SDT_DATA_DIR. An sdt::Error when absent.
  static std::string bundled_vocab_gz();
  // A Hugging Face tokenizer folder's vocab.json and merges.txt.
  static ClipTokenizer from_vocab_json_and_merges(const std::string& vocab_json_path,
                                                  const std::string& merges_txt_path, std::string_view pad_token);

  // The same tokenizer padding with `id`, the text still cut only at its added tokens: kohya's
  // `tokenizer2.pad_token_id = 0` for SDXL's second encoder, which pads with id 0 ("!") while a "!" in a
  // caption stays the word "!</w>" (what kohya's pinned transformers 4.54.1 does with laion's bigG tokenizer,
  // whose own padding token is "<|endoftext|>").
  ClipTokenizer with_pad_id(int32_t id) const {
    ClipTokenizer copy = *this;
    copy.pad_id_ = id;
    return copy;
  }

  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  size_t vocab_size() const { return vocab_.size(); }

  // The ids of `text` without BOS and EOS, however many there are (tokenizer(text).input_ids[1:-1]).
  std::vector<int32_t> encode(std::string_view text) const;

  // tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids:
  // BOS, at most max_length - 2 ids, EOS, then padding up to max_length.
  std::vector<int32_t> encode_padded(std::string_view text, int max_length = kModelMaxLength) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };

  // `vocab_where` and `merges_where` name the files in errors (the same .txt.gz for OpenAI's).
  ClipTokenizer(std::unordered_map<std::string, int32_t> vocab, const std::string& vocab_where,
                const std::vector<std::pair<std::string, std::string>>& merges, const std::string& merges_where,
                std::string_view pad_token);

  int32_t id_of(const std::string& token, const std::string& where) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& ids) const;
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;

  std::unordered_map<std::string, int32_t> vocab_;
  // Key: (left symbol id << 32) | right symbol id.
  std::unordered_map<uint64_t, Merge> merges_;
  // The id of each byte's symbol, without and with the end-of-word marker.
  std::vector<int32_t> byte_ids_;
  std::vector<int32_t> byte_end_of_word_ids_;
  // Cut out of the text before cleaning: BOS, EOS and the padding token.
  std::vector<std::string> added_tokens_;
  int32_t bos_id_ = 0;
  int32_t eos_id_ = 0;
  int32_t pad_id_ = 0;
};

}  // namespace sdt
