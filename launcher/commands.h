// The subcommands of `sdt`. Each parses its configuration, builds the objects it needs and runs
// them; no logic of its own lives here.
#pragma once

#include <string>
#include <vector>

namespace sdt {

int run_inspect(const std::string& path);
int run_inspect_dataset(const std::vector<std::string>& argv);
int run_train(const std::vector<std::string>& argv);

}  // namespace sdt
