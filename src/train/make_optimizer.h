// kohya's optimizer set-up (train_util.get_optimizer): --optimizer_type, case-insensitive, "" meaning
// AdamW, the legacy --use_8bit_adam / --use_lion_optimizer, --optimizer_args "key=value" with values
// read as Python literals (ast.literal_eval), and the ss_optimizer metadata string.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "src/core/train_args.h"
#include "src/train/optimizers.h"

namespace sdt {

// A Python literal of the forms optimizer_args use: None, True/False, ints, floats, quoted strings,
// tuples ("0.9,0.999" or "(0.9, 0.999)") and lists.
struct PyLiteral {
  enum class Kind { None, Bool, Int, Float, Str, Tuple, List };
  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  std::string text;
  std::vector<PyLiteral> items;

  bool is_number() const { return kind == Kind::Int || kind == Kind::Float; }
  double number() const { return kind == Kind::Int ? static_cast<double>(integer) : real; }
  std::string str() const;   // Python's str(): what kohya writes into ss_optimizer
  std::string repr() const;  // Python's repr(): strings quoted
};

// Throws sdt::Error at `where` when `text` is not such a literal.
PyLiteral parse_py_literal(std::string_view text, const std::string& where);

// "key=value" pairs in order; a repeated key keeps its first place and takes the last value (a dict).
using OptimizerKwargs = std::vector<std::pair<std::string, PyLiteral>>;
OptimizerKwargs parse_optimizer_args(const std::vector<std::string>& args);

struct MadeOptimizer {
  std::unique_ptr<Optimizer> optimizer;
  std::string name;  // the reference class as kohya names it: "<module>.<Class>"
  std::string args;  // the arguments it was given, kohya's "k=v,k=v" (with its added defaults)
  // Adafactor with relative_step computes its own lrs: kohya then replaces --lr_scheduler by
  // AdafactorSchedule and ignores the groups' lrs.
  bool uses_adafactor_schedule = false;

  std::string ss_optimizer() const { return args.empty() ? name : name + "(" + args + ")"; }
};

// The optimizer --optimizer_type names over `groups`. Throws sdt::Error naming the argument for an
// unknown optimizer, an unknown argument (suggesting the nearest valid one) or a value of the wrong type.
MadeOptimizer make_optimizer(const TrainArgs& args, const std::vector<ParamGroup>& groups);

}  // namespace sdt
