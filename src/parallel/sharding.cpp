#include "src/parallel/sharding.h"

#include "src/core/error.h"

namespace sdt {

Sharding parse_sharding(std::string_view name) {
  for (Sharding s : {Sharding::none, Sharding::optimizer, Sharding::gradients, Sharding::full}) {
    if (name == sharding_name(s)) return s;
  }
  fail("--sharding", "'{}' is not one of none, optimizer, gradients, full", name);
}

std::string_view sharding_name(Sharding sharding) {
  switch (sharding) {
    case Sharding::none: return "none";
    case Sharding::optimizer: return "optimizer";
    case Sharding::gradients: return "gradients";
    case Sharding::full: return "full";
  }
  return "?";
}

}  // namespace sdt
