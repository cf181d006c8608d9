// T5's tokenizer as transformers' T5TokenizerFast runs it in kohya's FLUX / Chroma / SD3 strategies: SentencePiece
// (unigram, NFKC normalisation, runs of whitespace as one, "▁" before each word) over the text between T5's special
// tokens (</s>, <pad>, <unk> and <extra_id_0> .. <extra_id_99>, which map to their own ids wherever they appear),
// then </s>. kohya calls it with padding="max_length", truncation=True: the ids are cut to max_length - 1, </s>
// appended, then padded with <pad> (0) to max_length; the mask is 1 on the ids and </s>.
//
// Where two segmentations score exactly the same (a vocabulary trained on repetitive text: "aaaa..."), SentencePiece
// and transformers' unigram pick differently; the pieces SentencePiece finds are segmented again the way transformers
// does (the best path, the earliest split among equal ones), so the ids are transformers' in every case.
//
// The vocabulary ships in data/tokenizers/t5/spiece.model (Apache-2.0, its LICENSE beside it); Debian's
// libsentencepiece runs it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace sdt {

class T5Tokenizer {
 public:
  // A SentencePiece model file (T5's spiece.model); a missing or invalid file is an sdt::Error naming it.
  explicit T5Tokenizer(const std::string& spiece_model);
  ~T5Tokenizer();
  T5Tokenizer(T5Tokenizer&&) noexcept;
  T5Tokenizer& operator=(T5Tokenizer&&) noexcept;

  // data/tokenizers/t5/spiece.model beside the executable (or under SDT_DATA_DIR, or an installed prefix).
  static std::string bundled_model();

  static constexpr int64_t kPad = 0, kEos = 1, kUnk = 2;
  static constexpr int kExtraIds = 100;

  // The ids of `text` followed by </s>, unpadded.
  std::vector<int64_t> encode(const std::string& text) const;

  struct Tokens {
    std::vector<int64_t> ids;   // max_length
    std::vector<int64_t> mask;  // 1 on the text's ids and </s>, 0 on padding
  };
  Tokens tokenize(const std::string& text, int64_t max_length) const;

  int64_t vocab_size() const;  // pieces plus the 100 <extra_id_N>

 private:
  // transformers' Viterbi over normalised text without unknown characters: the best-scoring pieces, ties to the path
  // found first.
  std::vector<int64_t> best_segmentation(const std::string& normalized) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  int64_t pieces_ = 0;
  std::unordered_map<std::string, int> piece_ids_;  // the normal pieces (not <pad>, </s>, <unk>)
  size_t longest_piece_ = 0;                        // bytes
};

}  // namespace sdt
