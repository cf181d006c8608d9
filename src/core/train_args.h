// `sdt train` arguments under kohya-ss/sd-scripts' names, with kohya's precedence:
// command line > --config_file TOML (sections flattened) > defaults.
//
// The arguments are one table (train_args_table.inc, generated from kohya's train_network.py by
// tools/gen_train_args_table.py). The table makes both the typed struct below and the name-keyed
// specs that parse, print and document it, so the three can never disagree.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace sdt {

// kohya's `int_or_float`: a step count, or a ratio of the total steps (a float below 1 or "N%").
struct IntOrFloat {
  bool is_int = true;
  double value = 0;
  static IntOrFloat integer(int64_t v) { return {true, static_cast<double>(v)}; }
  static IntOrFloat ratio(double v) { return {false, v}; }
  bool operator==(const IntOrFloat&) const = default;
};

// The value kinds of the table; a kind name is also the C++ type of the field.
using Flag = bool;
using Int = int64_t;
using OptInt = std::optional<int64_t>;
using Float = double;
using OptFloat = std::optional<double>;
using Str = std::string;
using OptStr = std::optional<std::string>;
using StrList = std::vector<std::string>;
using FloatList = std::vector<double>;

struct TrainArgs {
#define SDT_ARG(name, kind, default_value, choices, group, help) kind name = default_value;
#define SDT_ARG_ALIAS(alias, target)
#include "src/core/train_args_table.inc"
#undef SDT_ARG
#undef SDT_ARG_ALIAS
};

enum class ArgKind { Flag, Int, OptInt, Float, OptFloat, Str, OptStr, StrList, FloatList, IntOrFloat };
std::string_view arg_kind_name(ArgKind kind);  // as shown to users: "true/false", "integer", ...

// One argument of any kind; monostate is "not set" (kohya's None).
using ArgValue = std::variant<std::monostate, bool, int64_t, double, std::string, std::vector<std::string>,
                              std::vector<double>, IntOrFloat>;

struct ArgSpec {
  std::string name;
  ArgKind kind;
  std::vector<std::string> choices;  // empty: any value
  std::string group;
  std::string help;
  ArgValue (*get)(const TrainArgs&);
  void (*set)(TrainArgs&, const ArgValue&);
};

const std::vector<ArgSpec>& train_arg_specs();
// By name or alias; nullptr when unknown.
const ArgSpec* find_train_arg(std::string_view name);
std::vector<std::string> train_arg_names_and_aliases();

// The value as TOML source ("1e-05", "\"text\"", "[\"a\", \"b\"]", "true").
std::string format_arg_value(const ArgValue& value);

struct ParsedTrainArgs {
  TrainArgs args;
  // Where the config file named by --config_file was read from ("" when none was read).
  std::string config_path;
};

// Parses the arguments that follow `sdt train`, reading --config_file when given. Throws
// sdt::Error naming the argument (and the file and line for config values) and what was expected.
ParsedTrainArgs parse_train_args(const std::vector<std::string>& argv);

// The effective configuration as a TOML file that --config_file reads back to the same arguments:
// every argument that differs from its default, except config_file/output_config/wandb_api_key
// (as kohya's --output_config writes it).
std::string train_args_to_toml(const TrainArgs& args);

// docs/configuration.md's argument section, generated from the table.
std::string train_args_reference_markdown();

}  // namespace sdt
