// The data files the project ships in data/ (tokenizer vocabularies, with their licences), found at run time.
#pragma once

#include <string>

namespace sdt {

// data/<relative> under $SDT_DATA_DIR, beside the executable (the build folder), in the checkout above it, or in an
// installed prefix (share/sdt). An sdt::Error naming `what` and the flag that gives the file otherwise.
std::string shipped_data_file(const std::string& relative, const std::string& what, const std::string& flag);

}  // namespace sdt
