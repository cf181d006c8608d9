#include "src/train/make_optimizer.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <map>
#include <optional>
#include <set>

#include <fmt/ranges.h>

#include "src/core/error.h"
#include "src/core/text.h"

namespace sdt {

// ---------------------------------------------------------------- Python literals

namespace {

// Python's repr of a float: the shortest round-trip digits, always with a '.' or an exponent.
std::string python_float(double value) {
  std::string out = fmt::format("{}", value);
  if (out.find_first_not_of("-0123456789") == std::string::npos) out += ".0";
  return out;
}

std::string join_items(const std::vector<PyLiteral>& items, bool is_tuple) {
  std::string out = is_tuple ? "(" : "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i].repr();
  if (is_tuple && items.size() == 1) out += ",";
  return out + (is_tuple ? ")" : "]");
}

// Recursive descent over the literal grammar; positions in messages are 0-based character offsets.
class LiteralParser {
 public:
  LiteralParser(std::string_view text, const std::string& where) : text_(text), where_(where) {}

  PyLiteral parse() {
    // At the top level "a,b" is a tuple without parentheses, as Python reads it.
    PyLiteral out = sequence_or_value('\0');
    skip_space();
    if (pos_ != text_.size()) error("unexpected '{}'", text_[pos_]);
    return out;
  }

 private:
  template <typename... Args>
  [[noreturn]] void error(fmt::format_string<Args...> format, Args&&... args) {
    fail(where_, "'{}' is not a Python literal (number, True/False/None, tuple or quoted string): {} at character {}",
         text_, fmt::format(format, std::forward<Args>(args)...), pos_);
  }

  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool peek(char c) {
    skip_space();
    return pos_ < text_.size() && text_[pos_] == c;
  }

  // Items separated by commas up to `close` ('\0': end of text). One item without a comma is that
  // item itself, except in a list; a trailing comma makes a tuple.
  PyLiteral sequence_or_value(char close) {
    PyLiteral seq;
    seq.kind = close == ']' ? PyLiteral::Kind::List : PyLiteral::Kind::Tuple;
    bool saw_comma = false;
    while (!(close ? peek(close) : (skip_space(), pos_ == text_.size()))) {
      seq.items.push_back(value());
      if (!peek(',')) break;
      ++pos_;
      saw_comma = true;
    }
    if (close) {
      if (!peek(close)) error("expected '{}'", close);
      ++pos_;
    }
    if (seq.kind == PyLiteral::Kind::Tuple && !saw_comma) {
      if (seq.items.size() == 1) return seq.items[0];
      if (!close) error("no value");
    }
    return seq;
  }

  PyLiteral value() {
    skip_space();
    if (pos_ == text_.size()) error("missing value");
    const char c = text_[pos_];
    if (c == '(' || c == '[') {
      ++pos_;
      return sequence_or_value(c == '(' ? ')' : ']');
    }
    if (c == '\'' || c == '"') return string(c);
    if (std::isalpha(static_cast<unsigned char>(c))) return name();
    return number();
  }

  PyLiteral name() {
    const size_t start = pos_;
    while (pos_ < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[pos_])) || text_[pos_] == '_')) ++pos_;
    const std::string_view word = text_.substr(start, pos_ - start);
    PyLiteral out;
    if (word == "None") return out;
    if (word == "True" || word == "False") {
      out.kind = PyLiteral::Kind::Bool;
      out.boolean = word == "True";
      return out;
    }
    pos_ = start;
    error("'{}' is a name, not a value (quote a string)", word);
  }

  PyLiteral string(char quote) {
    PyLiteral out;
    out.kind = PyLiteral::Kind::Str;
    for (++pos_; pos_ < text_.size() && text_[pos_] != quote; ++pos_) {
      if (text_[pos_] == '\\' && pos_ + 1 < text_.size()) {
        const char escaped = text_[++pos_];
        out.text += escaped == 'n' ? '\n' : escaped == 't' ? '\t' : escaped;
      } else {
        out.text += text_[pos_];
      }
    }
    if (pos_ == text_.size()) error("unterminated string");
    ++pos_;
    return out;
  }

  PyLiteral number() {
    const size_t start = pos_;
    bool negative = false;
    while (pos_ < text_.size() && (text_[pos_] == '-' || text_[pos_] == '+')) negative ^= text_[pos_++] == '-';
    const size_t digits = pos_;
    bool is_float = false;
    while (pos_ < text_.size()) {
      const char c = text_[pos_];
      if (std::isdigit(static_cast<unsigned char>(c))) {
        ++pos_;
      } else if (c == '.' || c == 'e' || c == 'E') {
        is_float = true;
        ++pos_;
        if ((c == 'e' || c == 'E') && pos_ < text_.size() && (text_[pos_] == '-' || text_[pos_] == '+')) ++pos_;
      } else {
        break;
      }
    }
    const std::string body(text_.substr(digits, pos_ - digits));
    if (body.empty() || body == ".") {
      pos_ = start;
      error("expected a value");
    }
    PyLiteral out;
    if (is_float) {
      size_t used = 0;
      try {
        out.real = std::stod(body, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != body.size()) {
        pos_ = start;
        error("malformed number '{}'", body);
      }
      out.kind = PyLiteral::Kind::Float;
      if (negative) out.real = -out.real;
    } else {
      const auto [end, ec] = std::from_chars(body.data(), body.data() + body.size(), out.integer);
      if (ec != std::errc()) {
        pos_ = start;
        error("integer '{}' out of range", body);
      }
      out.kind = PyLiteral::Kind::Int;
      if (negative) out.integer = -out.integer;
    }
    return out;
  }

  std::string_view text_;
  const std::string& where_;
  size_t pos_ = 0;
};

}  // namespace

std::string PyLiteral::str() const {
  switch (kind) {
    case Kind::None: return "None";
    case Kind::Bool: return boolean ? "True" : "False";
    case Kind::Int: return std::to_string(integer);
    case Kind::Float: return python_float(real);
    case Kind::Str: return text;
    case Kind::Tuple: return join_items(items, true);
    case Kind::List: return join_items(items, false);
  }
  return "";
}

std::string PyLiteral::repr() const {
  if (kind != Kind::Str) return str();
  std::string out = "'";
  for (char c : text) out += c == '\'' || c == '\\' ? std::string("\\") + c : std::string(1, c);
  return out + "'";
}

PyLiteral parse_py_literal(std::string_view text, const std::string& where) { return LiteralParser(text, where).parse(); }

OptimizerKwargs parse_optimizer_args(const std::vector<std::string>& args) {
  OptimizerKwargs out;
  for (const std::string& arg : args) {
    // kohya splits at '=' and unpacks two parts: exactly one '=' is allowed.
    const size_t eq = arg.find('=');
    if (eq == std::string::npos || arg.find('=', eq + 1) != std::string::npos)
      fail("optimizer_args", "'{}' must be key=value with one '='", arg);
    const std::string key = arg.substr(0, eq);
    PyLiteral value = parse_py_literal(std::string_view(arg).substr(eq + 1), "optimizer_args " + key);
    auto same = std::find_if(out.begin(), out.end(), [&](const auto& kv) { return kv.first == key; });
    if (same != out.end()) {
      same->second = std::move(value);
    } else {
      out.emplace_back(key, std::move(value));
    }
  }
  return out;
}

// ---------------------------------------------------------------- typed reading of the arguments

namespace {

// Reads the arguments one optimizer accepts, each with its reference default; finish() rejects the
// rest, suggesting the nearest accepted name.
class ArgsReader {
 public:
  ArgsReader(const OptimizerKwargs& kwargs, std::string optimizer) : kwargs_(kwargs), optimizer_(std::move(optimizer)) {}

  double number(const std::string& key, double fallback) {
    const PyLiteral* v = take(key);
    if (!v) return fallback;
    if (!v->is_number()) wrong_type(key, "a number", *v);
    return v->number();
  }
  std::optional<double> number_or_none(const std::string& key, std::optional<double> fallback) {
    const PyLiteral* v = take(key);
    if (!v) return fallback;
    if (v->kind == PyLiteral::Kind::None) return std::nullopt;
    if (!v->is_number()) wrong_type(key, "a number or None", *v);
    return v->number();
  }
  int64_t integer(const std::string& key, int64_t fallback) {
    const PyLiteral* v = take(key);
    if (!v) return fallback;
    if (v->kind != PyLiteral::Kind::Int) wrong_type(key, "an integer", *v);
    return v->integer;
  }
  bool flag(const std::string& key, bool fallback) {
    const PyLiteral* v = take(key);
    if (!v) return fallback;
    if (v->kind != PyLiteral::Kind::Bool) wrong_type(key, "True or False", *v);
    return v->boolean;
  }
  std::pair<double, double> pair(const std::string& key, std::pair<double, double> fallback) {
    const PyLiteral* v = take(key);
    if (!v) return fallback;
    const bool ok = (v->kind == PyLiteral::Kind::Tuple || v->kind == PyLiteral::Kind::List) && v->items.size() == 2 &&
                    v->items[0].is_number() && v->items[1].is_number();
    if (!ok) wrong_type(key, "two numbers, like 0.9,0.999", *v);
    return {v->items[0].number(), v->items[1].number()};
  }

  void finish() const {
    for (const auto& [key, value] : kwargs_) {
      if (std::find(accepted_.begin(), accepted_.end(), key) != accepted_.end()) continue;
      fail("optimizer_args", "{} has no argument '{}' (it takes {}){}", optimizer_, key, fmt::join(accepted_, ", "),
           did_you_mean(key, accepted_));
    }
  }

 private:
  const PyLiteral* take(const std::string& key) {
    accepted_.push_back(key);
    for (const auto& [k, v] : kwargs_)
      if (k == key) return &v;
    return nullptr;
  }
  [[noreturn]] void wrong_type(const std::string& key, const char* expected, const PyLiteral& got) const {
    fail("optimizer_args " + key, "{} expects {}, got {}", optimizer_, expected, got.repr());
  }

  const OptimizerKwargs& kwargs_;
  std::string optimizer_;
  std::vector<std::string> accepted_;
};

std::string lowercase(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string format_kwargs(const OptimizerKwargs& kwargs) {
  std::string out;
  for (const auto& [key, value] : kwargs) out += (out.empty() ? "" : ",") + key + "=" + value.str();
  return out;
}

bool has_key(const OptimizerKwargs& kwargs, const std::string& key) {
  return std::any_of(kwargs.begin(), kwargs.end(), [&](const auto& kv) { return kv.first == key; });
}

PyLiteral py_bool(bool value) {
  PyLiteral out;
  out.kind = PyLiteral::Kind::Bool;
  out.boolean = value;
  return out;
}

PyLiteral py_float(double value) {
  PyLiteral out;
  out.kind = PyLiteral::Kind::Float;
  out.real = value;
  return out;
}

const std::vector<std::string> kOptimizerTypes = {"AdamW", "AdamW8bit", "Lion", "SGDNesterov", "Adafactor", "Prodigy"};

}  // namespace

// ---------------------------------------------------------------- the factory

MadeOptimizer make_optimizer(const TrainArgs& args, const std::vector<ParamGroup>& groups) {
  std::string type = args.optimizer_type;
  if (args.use_8bit_adam) {
    if (args.use_lion_optimizer) fail("use_8bit_adam", "cannot be combined with use_lion_optimizer");
    if (!type.empty()) fail("use_8bit_adam", "cannot be combined with optimizer_type ('{}')", type);
    type = "AdamW8bit";
  } else if (args.use_lion_optimizer) {
    if (!type.empty()) fail("use_lion_optimizer", "cannot be combined with optimizer_type ('{}')", type);
    type = "Lion";
  }
  if (type.empty()) type = "AdamW";
  const std::string lower = lowercase(type);
  OptimizerKwargs kwargs = parse_optimizer_args(args.optimizer_args);

  MadeOptimizer out;
  if (lower == "adamw") {
    ArgsReader read(kwargs, "AdamW");
    AdamWConfig c;
    std::tie(c.beta1, c.beta2) = read.pair("betas", {c.beta1, c.beta2});
    c.eps = read.number("eps", c.eps);
    c.weight_decay = read.number("weight_decay", c.weight_decay);
    read.finish();
    out.optimizer = std::make_unique<AdamW>(groups, c);
    out.name = "torch.optim.adamw.AdamW";
  } else if (lower == "adamw8bit") {
    ArgsReader read(kwargs, "AdamW8bit");
    AdamW8bitConfig c;
    std::tie(c.beta1, c.beta2) = read.pair("betas", {c.beta1, c.beta2});
    c.eps = read.number("eps", c.eps);
    c.weight_decay = read.number("weight_decay", c.weight_decay);
    c.min_8bit_size = read.integer("min_8bit_size", c.min_8bit_size);
    read.finish();
    out.optimizer = std::make_unique<AdamW8bit>(groups, c);
    out.name = "bitsandbytes.optim.adamw.AdamW8bit";
  } else if (lower == "lion") {
    ArgsReader read(kwargs, "Lion");
    LionConfig c;
    std::tie(c.beta1, c.beta2) = read.pair("betas", {c.beta1, c.beta2});
    c.weight_decay = read.number("weight_decay", c.weight_decay);
    c.decoupled_weight_decay = read.flag("decoupled_weight_decay", c.decoupled_weight_decay);
    read.finish();
    c.initial_lr = args.learning_rate;  // kohya constructs Lion with lr=learning_rate
    out.optimizer = std::make_unique<Lion>(groups, c);
    out.name = "lion_pytorch.lion_pytorch.Lion";
  } else if (lower == "sgdnesterov") {
    // kohya adds momentum=0.9 when absent (Nesterov needs momentum); it then shows in ss_optimizer.
    if (!has_key(kwargs, "momentum")) kwargs.emplace_back("momentum", py_float(0.9));
    ArgsReader read(kwargs, "SGDNesterov");
    SGDConfig c;
    c.nesterov = true;
    c.momentum = read.number("momentum", c.momentum);
    c.dampening = read.number("dampening", c.dampening);
    c.weight_decay = read.number("weight_decay", c.weight_decay);
    read.finish();
    out.optimizer = std::make_unique<SGD>(groups, c);
    out.name = "torch.optim.sgd.SGD";
  } else if (lower == "adafactor") {
    // kohya defaults relative_step to True, and forces it on when warmup_init asks for it.
    if (!has_key(kwargs, "relative_step")) kwargs.emplace_back("relative_step", py_bool(true));
    ArgsReader read(kwargs, "Adafactor");
    AdafactorConfig c;
    c.relative_step = read.flag("relative_step", c.relative_step);
    c.warmup_init = read.flag("warmup_init", c.warmup_init);
    if (!c.relative_step && c.warmup_init) {
      c.relative_step = true;
      std::find_if(kwargs.begin(), kwargs.end(), [](const auto& kv) { return kv.first == "relative_step"; })->second =
          py_bool(true);
    }
    std::tie(c.eps1, c.eps2) = read.pair("eps", {c.eps1, c.eps2});
    c.clip_threshold = read.number("clip_threshold", c.clip_threshold);
    c.decay_rate = read.number("decay_rate", c.decay_rate);
    c.beta1 = read.number_or_none("beta1", c.beta1);
    c.weight_decay = read.number("weight_decay", c.weight_decay);
    c.scale_parameter = read.flag("scale_parameter", c.scale_parameter);
    c.stochastic_bf16_rounding = args.fused_backward_pass;  // kohya's fused Adafactor (library/adafactor_fused.py)
    read.finish();
    out.optimizer = std::make_unique<Adafactor>(groups, c);
    out.name = "transformers.optimization.Adafactor";
    out.uses_adafactor_schedule = c.relative_step;
  } else if (lower == "prodigy") {
    ArgsReader read(kwargs, "Prodigy");
    ProdigyConfig c;
    std::tie(c.beta1, c.beta2) = read.pair("betas", {c.beta1, c.beta2});
    c.beta3 = read.number_or_none("beta3", c.beta3);
    c.eps = read.number("eps", c.eps);
    c.weight_decay = read.number("weight_decay", c.weight_decay);
    c.decouple = read.flag("decouple", c.decouple);
    c.use_bias_correction = read.flag("use_bias_correction", c.use_bias_correction);
    c.safeguard_warmup = read.flag("safeguard_warmup", c.safeguard_warmup);
    c.d0 = read.number("d0", c.d0);
    c.d_coef = read.number("d_coef", c.d_coef);
    c.growth_rate = read.number("growth_rate", c.growth_rate);
    c.slice_p = read.integer("slice_p", c.slice_p);
    read.finish();
    out.optimizer = std::make_unique<Prodigy>(groups, c);
    out.name = "prodigyopt.prodigy.Prodigy";
  } else {
    std::vector<std::string> lowered;
    for (const std::string& name : kOptimizerTypes) lowered.push_back(lowercase(name));
    const std::string near = nearest(lower, lowered);
    const auto index = std::find(lowered.begin(), lowered.end(), near) - lowered.begin();
    fail("optimizer_type", "'{}' is not an optimizer sdt has ({}){}", type, fmt::join(kOptimizerTypes, ", "),
         near.empty() ? "" : fmt::format(", did you mean '{}'?", kOptimizerTypes[index]));
  }
  out.args = format_kwargs(kwargs);
  return out;
}

}  // namespace sdt
