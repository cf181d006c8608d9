// Whole files or none: what every file sdt writes goes through, so a full disk, a killed process or a crash never
// leaves a truncated file under its final name.
#pragma once

#include <string>
#include <string_view>

namespace sdt {

// Writes `bytes` to `path` through a temporary beside it (`path`.tmp-<pid>): written, fsynced, renamed into place, the
// folder synced. sdt::Error naming `path`, the reason and, for a full disk, the bytes it needed; the temporary is
// removed and an older `path` is left as it was.
void write_file_atomically(const std::string& path, std::string_view bytes);

}  // namespace sdt
