#include "src/tokenizers/t5_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <regex>

#include "src/core/data_files.h"
#include "src/core/error.h"

namespace sdt {

T5Tokenizer::T5Tokenizer(const std::string& spiece_model) : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = processor_->Load(spiece_model);
  if (!status.ok()) fail(spiece_model, "not a SentencePiece model T5's tokenizer can use: {}", status.ToString());
  pieces_ = processor_->GetPieceSize();
  for (int id = 0; id < pieces_; ++id) {
    if (processor_->IsControl(id) || processor_->IsUnknown(id) || processor_->IsUnused(id)) continue;
    const std::string& piece = processor_->IdToPiece(id);
    piece_ids_.emplace(piece, id);
    longest_piece_ = std::max(longest_piece_, piece.size());
  }
  if (processor_->pad_id() != kPad || processor_->eos_id() != kEos || processor_->unk_id() != kUnk) {
    fail(spiece_model, "T5's tokenizer needs <pad> 0, </s> 1, <unk> 2; this model has {}, {}, {}", processor_->pad_id(),
         processor_->eos_id(), processor_->unk_id());
  }
}

T5Tokenizer::~T5Tokenizer() = default;
T5Tokenizer::T5Tokenizer(T5Tokenizer&&) noexcept = default;
T5Tokenizer& T5Tokenizer::operator=(T5Tokenizer&&) noexcept = default;

std::string T5Tokenizer::bundled_model() { return shipped_data_file("tokenizers/t5/spiece.model", "T5 vocabulary", "--t5xxl_tokenizer"); }

int64_t T5Tokenizer::vocab_size() const { return pieces_ + kExtraIds; }

namespace {

size_t utf8_length(unsigned char lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

}  // namespace

std::vector<int64_t> T5Tokenizer::best_segmentation(const std::string& text) const {
  struct Node {
    double score = 0;
    size_t start = 0;
    int id = -1;  // -1: not reached
  };
  std::vector<Node> best(text.size() + 1);
  best[0].id = 0;
  for (size_t start = 0; start < text.size(); start += utf8_length(static_cast<unsigned char>(text[start]))) {
    if (best[start].id < 0) continue;
    for (size_t end = start + utf8_length(static_cast<unsigned char>(text[start])); end <= text.size() && end - start <= longest_piece_;
         end += end < text.size() ? utf8_length(static_cast<unsigned char>(text[end])) : 1) {
      const auto piece = piece_ids_.find(text.substr(start, end - start));
      if (piece == piece_ids_.end()) continue;
      const double score = best[start].score + processor_->GetScore(piece->second);
      if (best[end].id < 0 || score > best[end].score) best[end] = {score, start, piece->second};  // ties: the first
    }
  }
  if (best[text.size()].id < 0) return {};
  std::vector<int64_t> ids;
  for (size_t at = text.size(); at > 0; at = best[at].start) ids.push_back(best[at].id);
  return {ids.rbegin(), ids.rend()};
}

std::vector<int64_t> T5Tokenizer::encode(const std::string& text) const {
  // transformers splits the text at its special tokens first; each piece between them is tokenized on its own.
  static const std::regex special(R"(</s>|<pad>|<unk>|<extra_id_(\d{1,2})>)");
  std::vector<int64_t> ids;
  // SentencePiece normalises and segments; each run of its pieces between unknown characters is segmented again with
  // transformers' tie-breaking (a run's text is its pieces joined).
  const auto encode_piece = [&](const std::string& piece) {
    std::vector<int> piece_ids;
    processor_->Encode(piece, &piece_ids);
    for (size_t i = 0; i < piece_ids.size();) {
      if (piece_ids[i] == kUnk) {
        ids.push_back(kUnk);
        ++i;
        continue;
      }
      size_t end = i;
      std::string run;
      for (; end < piece_ids.size() && piece_ids[end] != kUnk; ++end) run += processor_->IdToPiece(piece_ids[end]);
      const std::vector<int64_t> resegmented = best_segmentation(run);
      if (resegmented.empty()) {
        ids.insert(ids.end(), piece_ids.begin() + static_cast<std::ptrdiff_t>(i), piece_ids.begin() + static_cast<std::ptrdiff_t>(end));
      } else {
        ids.insert(ids.end(), resegmented.begin(), resegmented.end());
      }
      i = end;
    }
  };
  auto begin = text.cbegin();
  for (std::sregex_iterator it(text.begin(), text.end(), special), end; it != end; ++it) {
    const std::smatch& m = *it;
    encode_piece(std::string(begin, m[0].first));
    begin = m[0].second;
    const std::string token = m.str(0);
    if (token == "</s>") ids.push_back(kEos);
    else if (token == "<pad>") ids.push_back(kPad);
    else if (token == "<unk>") ids.push_back(kUnk);
    else ids.push_back(pieces_ + kExtraIds - 1 - std::stoi(m.str(1)));  // <extra_id_0> is the last id
  }
  encode_piece(std::string(begin, text.cend()));
  ids.push_back(kEos);
  return ids;
}

T5Tokenizer::Tokens T5Tokenizer::tokenize(const std::string& text, int64_t max_length) const {
  if (max_length < 1) fail("T5 tokenizer", "max_length must be at least 1, got {}", max_length);
  Tokens out;
  out.ids = encode(text);
  if (static_cast<int64_t>(out.ids.size()) > max_length) {
    out.ids.resize(static_cast<size_t>(max_length));
    out.ids.back() = kEos;
  }
  out.mask.assign(out.ids.size(), 1);
  out.ids.resize(static_cast<size_t>(max_length), kPad);
  out.mask.resize(static_cast<size_t>(max_length), 0);
  return out;
}

}  // namespace sdt
