// The text-encoder output cache: one entry per caption variant, keyed by the processed caption
// text itself, holding what the family's TextEncoderOutputsCachingStrategy::outputs_to_cache makes
// (SD: "hidden_state"; other families add pooled outputs and attention masks). Images that share a
// caption (a DreamBooth class prompt) share one entry. docs/cache_format.md has the layout.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "src/cache/cache_format.h"
#include "src/core/tensor_io.h"

namespace sdt {

class TextEncoderCacheWriter {
 public:
  // identity.dtype is how floating-point outputs are stored; integer outputs stay int64, booleans uint8.
  TextEncoderCacheWriter(CacheIdentity identity, PartWriterOptions options);
  ~TextEncoderCacheWriter();  // an uncommitted part is deleted: call commit() when done
  // One entry per caption; each output is batch-first, row i belonging to captions[i]. Every batch
  // of a part must have the same outputs with the same per-row shapes.
  void add(const std::vector<std::string>& captions, const NamedTensors& outputs);
  void commit();

 private:
  struct Tables;
  PartSeries parts_;
  std::unique_ptr<Tables> tables_;  // of the open part
};

class TextEncoderCacheReader {
 public:
  // As LatentCacheReader: every committed part of the folder, refused when made differently.
  TextEncoderCacheReader(const std::string& dir, const CacheIdentity& expected);
  ~TextEncoderCacheReader();

  size_t size() const { return rows_.size(); }
  const std::vector<std::string>& files() const { return files_; }
  bool contains(const std::string& caption) const { return rows_.count(caption) > 0; }
  // The outputs for captions, stacked batch-first in the stored dtypes, in the order the first part
  // lists them. A caption without an entry is an sdt::Error naming it and the folder.
  NamedTensors read_batch(const std::vector<std::string>& captions) const;

 private:
  struct Part;
  struct Row {
    const Part* part;
    int64_t row;
  };
  std::string dir_;
  std::vector<std::string> files_;
  std::vector<std::unique_ptr<Part>> parts_;
  std::unordered_map<std::string, Row> rows_;
};

}  // namespace sdt
