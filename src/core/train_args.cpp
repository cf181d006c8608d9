#include "src/core/train_args.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <map>

#include <toml.hpp>

#include "src/core/error.h"
#include "src/core/text.h"

namespace sdt {
namespace {

// ------------------------------------------------------------- field <-> ArgValue, per C++ type
ArgValue to_value(bool v) { return v; }
ArgValue to_value(int64_t v) { return v; }
ArgValue to_value(double v) { return v; }
ArgValue to_value(const std::string& v) { return v; }
ArgValue to_value(const std::vector<std::string>& v) { return v; }
ArgValue to_value(const std::vector<double>& v) { return v; }
ArgValue to_value(const IntOrFloat& v) { return v; }
template <typename T>
ArgValue to_value(const std::optional<T>& v) {
  return v ? to_value(*v) : ArgValue{};
}

template <typename T>
void from_value(const ArgValue& v, T& field) {
  field = std::get<T>(v);
}
template <typename T>
void from_value(const ArgValue& v, std::optional<T>& field) {
  if (std::holds_alternative<std::monostate>(v)) {
    field.reset();
  } else {
    field = std::get<T>(v);
  }
}

std::vector<std::string> split_choices(std::string_view choices) {
  return choices.empty() ? std::vector<std::string>{} : split(choices, '|');
}

struct Alias {
  std::string alias;
  std::string target;
};

const std::vector<Alias>& aliases() {
  static const std::vector<Alias> list = {
#define SDT_ARG(name, kind, default_value, choices, group, help)
#define SDT_ARG_ALIAS(alias, target) {#alias, #target},
#include "src/core/train_args_table.inc"
#undef SDT_ARG
#undef SDT_ARG_ALIAS
  };
  return list;
}

// ------------------------------------------------------------- text -> value (command line)
std::optional<int64_t> parse_int(std::string_view s) {
  std::string t = trim(s);
  std::string_view v = t;
  if (!v.empty() && v.front() == '+') v.remove_prefix(1);
  int64_t out = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size()) return std::nullopt;
  return out;
}

std::optional<double> parse_float(std::string_view s) {
  std::string t = trim(s);
  if (t.empty()) return std::nullopt;
  char* end = nullptr;
  double out = std::strtod(t.c_str(), &end);
  if (end != t.c_str() + t.size()) return std::nullopt;
  return out;
}

// kohya's int_or_float: "N%" is a ratio; a value >= 1 must be an integer (a step count); a value
// below 1 is a ratio of the total steps.
std::optional<IntOrFloat> parse_int_or_float(std::string_view s) {
  std::string t = trim(s);
  if (!t.empty() && t.back() == '%') {
    auto percent = parse_float(std::string_view(t).substr(0, t.size() - 1));
    if (!percent) return std::nullopt;
    return IntOrFloat::ratio(*percent / 100.0);
  }
  auto f = parse_float(t);
  if (!f) return std::nullopt;
  if (*f >= 1) {
    auto i = parse_int(t);
    if (!i) return std::nullopt;
    return IntOrFloat::integer(*i);
  }
  return IntOrFloat::ratio(*f);
}

[[noreturn]] void bad_value(const std::string& where, const ArgSpec& spec, std::string_view got) {
  fail(where, "argument --{}: expected {}, got '{}'", spec.name, arg_kind_name(spec.kind), got);
}

ArgValue value_from_text(const ArgSpec& spec, const std::vector<std::string>& words, const std::string& where) {
  switch (spec.kind) {
    case ArgKind::Flag:
      return true;
    case ArgKind::Int:
    case ArgKind::OptInt:
      if (auto v = parse_int(words.at(0))) return *v;
      bad_value(where, spec, words.at(0));
    case ArgKind::Float:
    case ArgKind::OptFloat:
      if (auto v = parse_float(words.at(0))) return *v;
      bad_value(where, spec, words.at(0));
    case ArgKind::Str:
    case ArgKind::OptStr:
      return words.at(0);
    case ArgKind::StrList:
      return words;
    case ArgKind::FloatList: {
      std::vector<double> out;
      for (const auto& w : words) {
        auto v = parse_float(w);
        if (!v) bad_value(where, spec, w);
        out.push_back(*v);
      }
      return out;
    }
    case ArgKind::IntOrFloat:
      if (auto v = parse_int_or_float(words.at(0))) return *v;
      bad_value(where, spec, words.at(0));
  }
  fail(where, "internal: unhandled argument kind");
}

// ------------------------------------------------------------- TOML value -> value (config file)
ArgValue value_from_toml(const ArgSpec& spec, const toml::value& v, const std::string& where) {
  auto wrong = [&]() -> ArgValue {
    fail(where, "expected {}, got a TOML {}", arg_kind_name(spec.kind), toml::stringize(v.type()));
  };
  auto number = [&](const toml::value& x) -> std::optional<double> {
    if (x.is_floating()) return x.as_floating();
    if (x.is_integer()) return static_cast<double>(x.as_integer());
    return std::nullopt;
  };
  switch (spec.kind) {
    case ArgKind::Flag:
      return v.is_boolean() ? ArgValue{v.as_boolean()} : wrong();
    case ArgKind::Int:
    case ArgKind::OptInt:
      return v.is_integer() ? ArgValue{static_cast<int64_t>(v.as_integer())} : wrong();
    case ArgKind::Float:
    case ArgKind::OptFloat:
      if (auto x = number(v)) return *x;
      return wrong();
    case ArgKind::Str:
    case ArgKind::OptStr:
      return v.is_string() ? ArgValue{v.as_string().str} : wrong();
    case ArgKind::StrList: {
      // A single string is taken as a one-element list.
      if (v.is_string()) return std::vector<std::string>{v.as_string().str};
      if (!v.is_array()) return wrong();
      std::vector<std::string> out;
      for (const auto& e : v.as_array()) {
        if (!e.is_string()) return wrong();
        out.push_back(e.as_string().str);
      }
      return out;
    }
    case ArgKind::FloatList: {
      if (auto x = number(v)) return std::vector<double>{*x};
      if (!v.is_array()) return wrong();
      std::vector<double> out;
      for (const auto& e : v.as_array()) {
        auto x = number(e);
        if (!x) return wrong();
        out.push_back(*x);
      }
      return out;
    }
    case ArgKind::IntOrFloat:
      // In a config file the TOML type decides, as in kohya: an integer is a step count, a float
      // is a ratio; a string follows the command-line rules ("10%").
      if (v.is_integer()) return IntOrFloat::integer(v.as_integer());
      if (v.is_floating()) return IntOrFloat::ratio(v.as_floating());
      if (v.is_string()) {
        if (auto x = parse_int_or_float(v.as_string().str)) return *x;
      }
      return wrong();
  }
  return wrong();
}

std::string choice_text(const ArgValue& v) {
  if (auto s = std::get_if<std::string>(&v)) return *s;
  if (auto i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  return format_arg_value(v);
}

void check_choices(const ArgSpec& spec, const ArgValue& v, const std::string& where) {
  if (spec.choices.empty() || std::holds_alternative<std::monostate>(v)) return;
  std::string text = choice_text(v);
  for (const auto& c : spec.choices) {
    if (c == text) return;
  }
  std::string list;
  for (const auto& c : spec.choices) list += (list.empty() ? "" : ", ") + c;
  fail(where, "argument --{}: '{}' is not one of: {}{}", spec.name, text, list, did_you_mean(text, spec.choices));
}

const ArgSpec& lookup_or_fail(std::string_view name, const std::string& where) {
  if (const ArgSpec* spec = find_train_arg(name)) return *spec;
  fail(where, "unknown argument '{}'{}", name, did_you_mean(name, train_arg_names_and_aliases()));
}

// argparse accepts any unambiguous prefix of a long option; so do we.
const ArgSpec& lookup_cli_option(std::string_view name) {
  if (const ArgSpec* exact = find_train_arg(name)) return *exact;
  std::vector<std::string> matches;
  for (const auto& candidate : train_arg_names_and_aliases()) {
    if (candidate.starts_with(name)) matches.push_back(candidate);
  }
  if (matches.size() == 1) return *find_train_arg(matches[0]);
  if (matches.size() > 1) {
    std::string list;
    for (const auto& m : matches) list += (list.empty() ? "--" : ", --") + m;
    fail("command line", "ambiguous option --{} could match {}", name, list);
  }
  return lookup_or_fail(name, "command line");
}

std::string toml_string(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string toml_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// Reads --config_file: kohya flattens one level of sections into plain keys.
void apply_config_file(TrainArgs& args, const std::string& path) {
  toml::value root;
  try {
    root = toml::parse(path);
  } catch (const toml::syntax_error& e) {
    fail(path, "not valid TOML: {}", e.what());
  } catch (const std::runtime_error& e) {
    fail(path, "cannot read config file: {}", e.what());
  }
  std::map<std::string, std::string> seen_in;  // key -> section it came from
  auto apply = [&](const std::string& key, const toml::value& v, const std::string& section) {
    const std::string where = fmt::format("{}:{}: key '{}'{}", path, v.location().line(), key,
                                          section.empty() ? "" : " in [" + section + "]");
    const ArgSpec& spec = lookup_or_fail(key, where);
    if (spec.name == "config_file" || spec.name == "output_config") {
      fail(where, "'{}' belongs on the command line, not inside a config file", spec.name);
    }
    auto [it, fresh] = seen_in.emplace(spec.name, section);
    if (!fresh) {
      fail(where, "'{}' is already set{}", spec.name, it->second.empty() ? " at the top level" : " in [" + it->second + "]");
    }
    ArgValue value = value_from_toml(spec, v, where);
    check_choices(spec, value, where);
    spec.set(args, value);
  };
  // In file order, so a key given twice is reported at its second place.
  struct Entry {
    std::string key;
    const toml::value* value;
    std::string section;
  };
  std::vector<Entry> entries;
  for (const auto& [key, v] : root.as_table()) {
    if (v.is_table()) {
      for (const auto& [inner_key, inner] : v.as_table()) entries.push_back({inner_key, &inner, key});
    } else {
      entries.push_back({key, &v, ""});
    }
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.value->location().line() < b.value->location().line(); });
  for (const auto& e : entries) apply(e.key, *e.value, e.section);
}

}  // namespace

std::string_view arg_kind_name(ArgKind kind) {
  switch (kind) {
    case ArgKind::Flag: return "true/false (a flag)";
    case ArgKind::Int: return "an integer";
    case ArgKind::OptInt: return "an integer";
    case ArgKind::Float: return "a number";
    case ArgKind::OptFloat: return "a number";
    case ArgKind::Str: return "a string";
    case ArgKind::OptStr: return "a string";
    case ArgKind::StrList: return "a list of strings";
    case ArgKind::FloatList: return "a list of numbers";
    case ArgKind::IntOrFloat: return "a step count (integer) or a ratio (number below 1, or 'N%')";
  }
  return "?";
}

const std::vector<ArgSpec>& train_arg_specs() {
  static const std::vector<ArgSpec> specs = {
#define SDT_ARG(name, kind, default_value, choices, group, help)                       \
  {#name,                                                                               \
   ArgKind::kind,                                                                       \
   split_choices(choices),                                                              \
   group,                                                                               \
   help,                                                                                \
   [](const TrainArgs& a) { return to_value(a.name); },                                 \
   [](TrainArgs& a, const ArgValue& v) { from_value(v, a.name); }},
#define SDT_ARG_ALIAS(alias, target)
#include "src/core/train_args_table.inc"
#undef SDT_ARG
#undef SDT_ARG_ALIAS
  };
  return specs;
}

const ArgSpec* find_train_arg(std::string_view name) {
  static const std::map<std::string, const ArgSpec*, std::less<>> index = [] {
    std::map<std::string, const ArgSpec*, std::less<>> m;
    for (const auto& spec : train_arg_specs()) m[spec.name] = &spec;
    for (const auto& a : aliases()) m[a.alias] = m.at(a.target);
    return m;
  }();
  auto it = index.find(name);
  return it == index.end() ? nullptr : it->second;
}

std::vector<std::string> train_arg_names_and_aliases() {
  std::vector<std::string> names;
  for (const auto& spec : train_arg_specs()) names.push_back(spec.name);
  for (const auto& a : aliases()) names.push_back(a.alias);
  return names;
}

std::string format_arg_value(const ArgValue& value) {
  struct Visitor {
    std::string operator()(std::monostate) const { return ""; }
    std::string operator()(bool v) const { return v ? "true" : "false"; }
    std::string operator()(int64_t v) const { return std::to_string(v); }
    std::string operator()(double v) const { return toml_float(v); }
    std::string operator()(const std::string& v) const { return toml_string(v); }
    std::string operator()(const std::vector<std::string>& v) const {
      std::string s = "[";
      for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + toml_string(v[i]);
      return s + "]";
    }
    std::string operator()(const std::vector<double>& v) const {
      std::string s = "[";
      for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + toml_float(v[i]);
      return s + "]";
    }
    std::string operator()(const IntOrFloat& v) const {
      return v.is_int ? std::to_string(static_cast<int64_t>(v.value)) : toml_float(v.value);
    }
  };
  return std::visit(Visitor{}, value);
}

ParsedTrainArgs parse_train_args(const std::vector<std::string>& argv) {
  // Pass 1: split argv into (option, words) in order; nargs="*" options take every word up to
  // the next "--option", the others take exactly one (flags none).
  struct Given {
    const ArgSpec* spec;
    std::vector<std::string> words;
  };
  std::vector<Given> given;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& token = argv[i];
    if (!token.starts_with("--") || token.size() == 2) {
      fail("command line", "unexpected argument '{}' (arguments are --name value or --name=value)", token);
    }
    std::string name = token.substr(2);
    std::optional<std::string> inline_value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      inline_value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    const ArgSpec& spec = lookup_cli_option(name);
    Given g{&spec, {}};
    const bool is_list = spec.kind == ArgKind::StrList || spec.kind == ArgKind::FloatList;
    if (spec.kind == ArgKind::Flag) {
      if (inline_value) fail("command line", "argument --{} is a flag and takes no value (got '={}')", spec.name, *inline_value);
    } else if (inline_value) {
      g.words.push_back(*inline_value);
    } else if (is_list) {
      while (i + 1 < argv.size() && !argv[i + 1].starts_with("--")) g.words.push_back(argv[++i]);
    } else {
      if (i + 1 >= argv.size() || argv[i + 1].starts_with("--")) {
        fail("command line", "argument --{}: expected one value ({})", spec.name, arg_kind_name(spec.kind));
      }
      g.words.push_back(argv[++i]);
    }
    given.push_back(std::move(g));
  }

  // Pass 2: the config file first, then the command line over it.
  ParsedTrainArgs parsed;
  std::optional<std::string> config_file;
  bool output_config = false;
  for (const auto& g : given) {
    if (g.spec->name == "config_file") config_file = g.words.at(0);
    if (g.spec->name == "output_config") output_config = true;
  }
  if (config_file) {
    std::string path = config_file->ends_with(".toml") ? *config_file : *config_file + ".toml";
    // With --output_config and a file that does not exist yet, the file is the output (kohya).
    if (std::filesystem::exists(path)) {
      apply_config_file(parsed.args, path);
      parsed.config_path = path;
    } else if (!output_config) {
      fail(path, "config file not found (--config_file)");
    }
  }
  for (const auto& g : given) {
    ArgValue value = value_from_text(*g.spec, g.words, "command line");
    check_choices(*g.spec, value, "command line");
    g.spec->set(parsed.args, value);
  }
  // kohya's old spelling wins where given (train_util.prepare_dataset_args).
  if (parsed.args.caption_extention) {
    parsed.args.caption_extension = *parsed.args.caption_extention;
    parsed.args.caption_extention.reset();
  }
  return parsed;
}

std::string train_args_to_toml(const TrainArgs& args) {
  const TrainArgs defaults;
  std::string out;
  for (const auto& spec : train_arg_specs()) {
    if (spec.name == "config_file" || spec.name == "output_config" || spec.name == "wandb_api_key") continue;
    ArgValue v = spec.get(args);
    if (v == spec.get(defaults) || std::holds_alternative<std::monostate>(v)) continue;
    out += spec.name + " = " + format_arg_value(v) + "\n";
  }
  return out;
}

std::string train_args_reference_markdown() {
  const TrainArgs defaults;
  std::string out;
  std::string group;
  auto cell = [](std::string s) {
    std::string escaped;
    for (char c : s) escaped += (c == '|') ? std::string("\\|") : std::string(1, c);
    return escaped;
  };
  for (const auto& spec : train_arg_specs()) {
    if (spec.group != group) {
      group = spec.group;
      out += "\n### " + group + "\n\n| argument | type | default | description |\n|---|---|---|---|\n";
    }
    std::string def = format_arg_value(spec.get(defaults));
    std::string type(arg_kind_name(spec.kind));
    if (!spec.choices.empty()) {
      type = "one of ";
      for (size_t i = 0; i < spec.choices.size(); ++i) type += (i ? ", " : "") + std::string("`") + spec.choices[i] + "`";
    }
    out += fmt::format("| `--{}` | {} | {} | {} |\n", spec.name, cell(type), def.empty() ? "none" : "`" + cell(def) + "`",
                       cell(spec.help));
  }
  std::string alias_lines;
  for (const auto& a : aliases()) alias_lines += "- `--" + a.alias + "` is another name for `--" + a.target + "`\n";
  if (!alias_lines.empty()) out += "\n### aliases\n\n" + alias_lines;
  return out;
}

}  // namespace sdt
