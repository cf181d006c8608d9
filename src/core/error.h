// One error type for everything the user can get wrong: it carries where (a file, a key path,
// a tensor name) and what was expected, so `main` can print it once and exit non-zero.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace sdt {

class Error : public std::runtime_error {
 public:
  // `where` is the file (and key or tensor) the problem is in; `what` says what is wrong and
  // what was expected.
  Error(std::string where, const std::string& what);
  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

template <typename... Args>
[[noreturn]] void fail(std::string where, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(std::move(where), fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace sdt
