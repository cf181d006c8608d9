// Small string helpers shared by the configuration layer.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace sdt {

// Levenshtein distance; used to suggest the nearest valid key for a typo.
size_t edit_distance(std::string_view a, std::string_view b);

// The candidate closest to `word`, or "" when none is close enough to be a plausible typo
// (distance at most a third of the word's length, and at least 1 allowed).
std::string nearest(std::string_view word, const std::vector<std::string>& candidates);

// ", did you mean 'x'?" or "".
std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates);

std::vector<std::string> split(std::string_view s, char sep);
std::string trim(std::string_view s);

}  // namespace sdt
