#include "src/core/error.h"

namespace sdt {

Error::Error(std::string where, const std::string& what)
    : std::runtime_error(where.empty() ? what : where + ": " + what), where_(std::move(where)) {}

}  // namespace sdt
