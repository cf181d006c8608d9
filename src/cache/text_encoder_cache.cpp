#include "src/cache/text_encoder_cache.h"

#include <fmt/format.h>

#include "src/cache/tensor_rows.h"
#include "src/core/error.h"
#include "src/core/text.h"

namespace sdt {
namespace {

constexpr const char* kGroup = "text_encoder_outputs";
constexpr const char* kCaptionTable = "caption";
constexpr const char* kChecksumSuffix = "_checksum";  // beside each output: "<output>_checksum"
constexpr int64_t kCaptionsPerChunk = 1024;

std::vector<int64_t> row_shape_of(const at::Tensor& batch) { return {batch.sizes().begin() + 1, batch.sizes().end()}; }

}  // namespace

// ---------------------------------------------------------------- writer

struct TextEncoderCacheWriter::Tables {
  h5::Handle group;
  h5::RowTable caption;
  std::vector<std::pair<std::string, h5::RowTable>> outputs;
  std::vector<h5::RowTable> checksums;  // per output: of each caption's stored row
};

TextEncoderCacheWriter::TextEncoderCacheWriter(CacheIdentity identity, PartWriterOptions options)
    : parts_(std::move(identity), std::move(options)) {
  stored_float_element(parts_.identity().dtype);  // refuse an unknown dtype before any work
}

TextEncoderCacheWriter::~TextEncoderCacheWriter() { tables_.reset(); }

void TextEncoderCacheWriter::add(const std::vector<std::string>& captions, const NamedTensors& outputs) {
  if (captions.empty()) return;
  const auto n = static_cast<int64_t>(captions.size());
  for (const auto& [name, batch] : outputs) {
    if (name == kCaptionTable) fail("text-encoder output cache", "an output may not be named '{}': that table holds the captions", name);
    if (batch.dim() < 1 || batch.size(0) != n) {
      fail("text-encoder output cache", "output '{}' has {} rows for {} captions", name, batch.dim() < 1 ? 0 : batch.size(0), n);
    }
  }
  PartFile& part = parts_.open();
  if (!tables_) {
    h5::Handle group = h5::create_group(part.id(), kGroup);
    std::vector<std::string> names;
    for (const auto& [name, batch] : outputs) names.push_back(name);
    h5::write_attribute(group.get(), "outputs", fmt::format("{}", fmt::join(names, ",")));
    auto caption = h5::RowTable::create(group.get(), kCaptionTable, h5::Element::string, {}, kCaptionsPerChunk);
    tables_.reset(new Tables{std::move(group), std::move(caption), {}});
    for (const auto& [name, batch] : outputs) {
      tables_->outputs.emplace_back(name, h5::RowTable::create(tables_->group.get(), name, element_for(batch, parts_.identity().dtype),
                                                                row_shape_of(batch), 1, parts_.options().gzip_level));
      tables_->checksums.push_back(h5::RowTable::create(tables_->group.get(), name + kChecksumSuffix, h5::Element::i64, {},
                                                        kCaptionsPerChunk));
    }
  }
  if (outputs.size() != tables_->outputs.size()) {
    fail(part.path(), "a batch with {} outputs where the part holds {}", outputs.size(), tables_->outputs.size());
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& [name, batch] = outputs[i];
    h5::RowTable& table = tables_->outputs[i].second;
    if (name != tables_->outputs[i].first || row_shape_of(batch) != table.row_shape()) {
      fail(part.path(), "output '{}' of rows {} where the part holds '{}' of rows {}", name, fmt::join(row_shape_of(batch), "x"),
           tables_->outputs[i].first, fmt::join(table.row_shape(), "x"));
    }
    const at::Tensor rows = rows_for(batch, table.element());
    if (!all_finite(rows)) {
      fail("text-encoder output cache", "output '{}' holds non-finite values for one of the captions \"{}\"", name,
           fmt::join(captions, "\", \""));
    }
    std::vector<int64_t> checksums;
    for (int64_t r = 0; r < n; ++r) {
      checksums.push_back(static_cast<int64_t>(entry_checksum(static_cast<const char*>(rows.data_ptr()) + r * table.row_bytes(), table.row_bytes())));
    }
    table.append(rows.data_ptr(), n);
    tables_->checksums[i].append(checksums.data(), n);
  }
  tables_->caption.append_strings(captions);
  parts_.count(n);
  if (parts_.commit_due()) commit();
}

void TextEncoderCacheWriter::commit() {
  tables_.reset();
  parts_.commit();
}

// ---------------------------------------------------------------- reader

struct TextEncoderCacheReader::Part {
  std::string path;
  h5::Handle file;
  std::vector<std::pair<std::string, h5::RowTable>> outputs;
  std::vector<std::vector<int64_t>> checksums;  // per output, per caption; empty for parts written before checksums
};

TextEncoderCacheReader::~TextEncoderCacheReader() = default;

TextEncoderCacheReader::TextEncoderCacheReader(const std::string& dir, const CacheIdentity& expected) : dir_(dir) {
  for (const std::string& path : committed_parts(dir, CacheKind::text_encoder_outputs)) {
    auto part = std::make_unique<Part>();
    part->path = path;
    CommittedPart committed = open_committed_part(path, expected);
    part->file = std::move(committed.file);
    const hid_t file = part->file.get();
    const int64_t committed_entries = committed.entries;
    std::vector<std::string> captions;
    if (h5::has_member(file, kGroup)) {
      h5::Handle group = h5::open_group(file, kGroup);
      captions = h5::RowTable::open(group.get(), kCaptionTable).read_strings();
      for (const std::string& name : split(h5::read_string_attribute(group.get(), "outputs").value_or(""), ',')) {
        if (name.empty()) continue;
        h5::RowTable table = h5::RowTable::open(group.get(), name);
        if (table.rows() != static_cast<int64_t>(captions.size())) {
          fail(h5::describe(table.id()), "{} rows for {} captions", table.rows(), captions.size());
        }
        part->outputs.emplace_back(name, std::move(table));
        std::vector<int64_t> checksums;
        if (h5::has_member(group.get(), name + kChecksumSuffix)) {
          const h5::RowTable sums = h5::RowTable::open(group.get(), name + kChecksumSuffix);
          if (sums.rows() != static_cast<int64_t>(captions.size())) fail(h5::describe(sums.id()), "{} rows for {} captions", sums.rows(), captions.size());
          checksums.resize(captions.size());
          sums.read(0, sums.rows(), checksums.data());
        }
        part->checksums.push_back(std::move(checksums));
      }
    }
    if (static_cast<int64_t>(captions.size()) != committed_entries) {
      fail(path, "holds {} entries but its commit recorded {}: the file is damaged; delete it and cache again", captions.size(),
           committed_entries);
    }
    if (!parts_.empty() && !captions.empty()) {
      const Part& first = *parts_.front();
      bool same = first.outputs.size() == part->outputs.size();
      for (size_t i = 0; same && i < first.outputs.size(); ++i) {
        same = first.outputs[i].first == part->outputs[i].first &&
               first.outputs[i].second.row_shape() == part->outputs[i].second.row_shape() &&
               first.outputs[i].second.element() == part->outputs[i].second.element();
      }
      if (!same) fail(path, "holds other outputs (names, shapes or types) than {}", first.path);
    }
    for (size_t r = 0; r < captions.size(); ++r) rows_.try_emplace(captions[r], Row{part.get(), static_cast<int64_t>(r)});
    files_.push_back(path);
    if (!captions.empty()) parts_.push_back(std::move(part));
  }
}

NamedTensors TextEncoderCacheReader::read_batch(const std::vector<std::string>& captions) const {
  std::vector<const Row*> rows;
  for (const auto& caption : captions) {
    const auto it = rows_.find(caption);
    if (it == rows_.end()) {
      fail(dir_, "no cached text-encoder outputs for the caption \"{}\" in the {} part files here; cache them with `sdt cache-te` "
                 "and this dataset",
           caption, files_.size());
    }
    rows.push_back(&it->second);
  }
  NamedTensors out;
  if (rows.empty()) return out;
  const Part& layout = *rows.front()->part;
  for (size_t o = 0; o < layout.outputs.size(); ++o) {
    const h5::RowTable& like = layout.outputs[o].second;
    std::vector<int64_t> shape{static_cast<int64_t>(rows.size())};
    shape.insert(shape.end(), like.row_shape().begin(), like.row_shape().end());
    at::Tensor batch = at::empty(shape, at::TensorOptions().dtype(scalar_type_of(like.element())));
    for (size_t i = 0; i < rows.size(); ++i) {
      try {
        char* stored = static_cast<char*>(batch.data_ptr()) + i * like.row_bytes();
        rows[i]->part->outputs[o].second.read(rows[i]->row, 1, stored);
        const std::vector<int64_t>& sums = rows[i]->part->checksums[o];
        if (!sums.empty() &&
            entry_checksum(stored, like.row_bytes()) != static_cast<uint64_t>(sums[static_cast<size_t>(rows[i]->row)])) {
          fail("checksum", "the stored '{}' differs from what was written (a flipped bit or a changed file); delete this part "
                           "and run `sdt cache-te` again, which encodes the captions it held", layout.outputs[o].first);
        }
      } catch (const Error& e) {
        fail(rows[i]->part->path, "reading the outputs of the caption \"{}\": {}", captions[i], e.what());
      }
    }
    out.emplace_back(layout.outputs[o].first, std::move(batch));
  }
  return out;
}

}  // namespace sdt
