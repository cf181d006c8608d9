#include "src/data/captions.h"

#include <cmath>

namespace sdt {
namespace {

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  size_t pos = 0;
  while ((pos = s.find(from, pos)) != std::string::npos) {
    s.replace(pos, from.size(), to);
    pos += to.size();
  }
  return s;
}

std::vector<std::string> stripped_nonempty(const std::string& part, const std::string& sep) {
  std::vector<std::string> out;
  for (const auto& t : python_split(part, sep)) {
    std::string s = python_strip(t);
    if (!s.empty()) out.push_back(s);
  }
  return out;
}

// `{a|b|c}` -> one alternative; `{{` and `}}` stand for literal braces.
std::string expand_wildcards(const std::string& caption, Rng& rng) {
  std::string out;
  size_t i = 0;
  while (i < caption.size()) {
    if (caption.compare(i, 2, "{{") == 0) {
      out += '{';
      i += 2;
    } else if (caption.compare(i, 2, "}}") == 0) {
      out += '}';
      i += 2;
    } else if (caption[i] == '{') {
      size_t close = caption.find('}', i + 1);
      // kohya's regex \{([^}]+)\}: needs at least one character before the closing brace.
      if (close == std::string::npos || close == i + 1) {
        out += caption[i++];
        continue;
      }
      std::vector<std::string> options = python_split(caption.substr(i + 1, close - i - 1), "|");
      out += options[static_cast<size_t>(rng.randint(0, static_cast<int64_t>(options.size()) - 1))];
      i = close + 1;
    } else {
      out += caption[i++];
    }
  }
  return out;
}

}  // namespace

std::vector<std::string> python_split(const std::string& s, const std::string& sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t pos = s.find(sep, start);
    if (pos == std::string::npos) {
      parts.push_back(s.substr(start));
      return parts;
    }
    parts.push_back(s.substr(start, pos - start));
    start = pos + sep.size();
  }
}

std::string python_strip(const std::string& s) {
  const char* ws = " \t\n\r\v\f";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

std::string process_caption(const SubsetConfig& subset, const std::string& raw, const CaptionContext& context, Rng& rng) {
  std::string caption = raw;
  if (subset.caption_prefix && !subset.caption_prefix->empty()) caption = *subset.caption_prefix + " " + caption;
  if (subset.caption_suffix && !subset.caption_suffix->empty()) caption = caption + " " + *subset.caption_suffix;

  bool drop = subset.caption_dropout_rate > 0 && rng.uniform() < subset.caption_dropout_rate;
  drop = drop || (subset.caption_dropout_every_n_epochs > 0 && context.epoch % subset.caption_dropout_every_n_epochs == 0);
  if (drop) return "";

  if (subset.enable_wildcard) {
    if (caption.find('\n') != std::string::npos) {
      auto lines = python_split(caption, "\n");
      caption = lines[static_cast<size_t>(rng.randint(0, static_cast<int64_t>(lines.size()) - 1))];
    }
    caption = expand_wildcards(caption, rng);
  } else {
    caption = caption.substr(0, caption.find('\n'));
  }

  // kohya turns a ratio (below 1) into a step count the first time it is used.
  const double warmup_steps = subset.token_warmup_step < 1
                                  ? std::floor(subset.token_warmup_step * static_cast<double>(context.max_train_steps))
                                  : subset.token_warmup_step;
  if (subset.shuffle_caption || subset.token_warmup_step > 0 || subset.caption_tag_dropout_rate > 0) {
    const std::string& sep = subset.caption_separator;
    std::vector<std::string> fixed, flex, fixed_suffix;
    const std::string keep_sep = subset.keep_tokens_separator.value_or("");
    if (!keep_sep.empty() && caption.find(keep_sep) != std::string::npos) {
      size_t first = caption.find(keep_sep);
      std::string fixed_part = caption.substr(0, first);
      std::string flex_part = caption.substr(first + keep_sep.size());
      if (size_t second = flex_part.find(keep_sep); second != std::string::npos) {
        fixed_suffix = stripped_nonempty(flex_part.substr(second + keep_sep.size()), sep);
        flex_part = flex_part.substr(0, second);
      }
      fixed = stripped_nonempty(fixed_part, sep);
      flex = stripped_nonempty(flex_part, sep);
    } else {
      for (const auto& t : python_split(python_strip(caption), sep)) flex.push_back(python_strip(t));
      if (subset.keep_tokens > 0) {
        size_t keep = std::min(flex.size(), static_cast<size_t>(subset.keep_tokens));
        fixed.assign(flex.begin(), flex.begin() + static_cast<std::ptrdiff_t>(keep));
        flex.erase(flex.begin(), flex.begin() + static_cast<std::ptrdiff_t>(keep));
      }
    }
    if (warmup_steps > 0 && static_cast<double>(context.step) < warmup_steps) {
      const double per_step = (static_cast<double>(flex.size()) - static_cast<double>(subset.token_warmup_min)) / warmup_steps;
      const int64_t keep = static_cast<int64_t>(std::floor(static_cast<double>(context.step) * per_step)) + subset.token_warmup_min;
      // Python slicing: a negative end counts from the back, an end past the size is the size.
      const int64_t n = static_cast<int64_t>(flex.size());
      const int64_t end = keep < 0 ? std::max<int64_t>(0, n + keep) : std::min(n, keep);
      flex.resize(static_cast<size_t>(end));
    }
    if (subset.shuffle_caption) rng.shuffle(flex);
    if (subset.caption_tag_dropout_rate > 0) {
      std::vector<std::string> kept;
      for (auto& t : flex) {
        if (rng.uniform() >= subset.caption_tag_dropout_rate) kept.push_back(std::move(t));
      }
      flex = std::move(kept);
    }
    // Re-joined with ", " whatever caption_separator is, as kohya does.
    std::vector<std::string> all = std::move(fixed);
    all.insert(all.end(), flex.begin(), flex.end());
    all.insert(all.end(), fixed_suffix.begin(), fixed_suffix.end());
    caption.clear();
    for (size_t i = 0; i < all.size(); ++i) caption += (i ? ", " : "") + all[i];
  }
  if (subset.secondary_separator && !subset.secondary_separator->empty()) {
    caption = replace_all(caption, *subset.secondary_separator, subset.caption_separator);
  }
  return caption;
}

}  // namespace sdt
